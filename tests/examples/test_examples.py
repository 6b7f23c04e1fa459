"""examples/: the guide's seven jobs, run as a user runs them.

tp.py runs from the command line as plain python (it spawns its CPU ranks) and under torchrun.
Every other landed example runs the same per-rank job (`_common.train_rank` on the job its
command line builds) on the test session's ranks: what a command-line run adds beyond that is
the launch, which tp.py covers, and each launch costs a process's and its ranks' torch import.
Each example must end with its match against single-device training. The examples whose
strategy has not landed must say so in one line and exit 3. The guide's three common errors are
provoked from the command line; their fixes are checked to work in-process.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import itertools
import re

import example_scripts
import pytest
from ranks import on_ranks

MATCH = re.compile(r"^max \|parallel - single device\| over 2 steps: \S+ \(match", re.M)

LANDED = [
    ("tp.py", [], "rank 1: tp 1/2  pp 0/1  cp 0/1  dp 0/1"),
    ("sp.py", [], "between TP regions: tokens 16..31 of 32"),
    ("pp.py", [], "rank 1: tp 0/1  pp 1/2  cp 0/1  dp 0/1  vpp 2"),
    ("dp.py", [], "rank 1: tp 0/1  pp 0/1  cp 0/1  dp 1/2"),
    # the sequence of 62 padded to 64 (4 load-balanced chunks)
    ("cp.py", [], "context: tokens 0..15 and 48..63 of 64, 2 of them padding"),
    # The guide's 4-D job at 8 ranks: tp=2, pp=2 with vpp=2, cp=2, sp.
    ("full.py", [], "rank 7: tp 1/2  pp 1/2  cp 1/2  dp 0/1  vpp 2"),
    # ep folded onto the 2 data-parallel ranks; the fix printed for `--num-experts 3`, applied
    ("ep.py", ["--num-experts", "4"], "rank 1: tp 0/1  pp 0/1  cp 0/1  dp 1/2  ep 1/2"),
    # ep folded onto the cp ranks (Megatron's parallel folding), etp = tp = 2 inside
    ("ep.py", ["--world-size", "4", "--plan", "cp=2"],
     "rank 2: tp 0/2  pp 0/1  cp 1/2  dp 0/1  ep 1/2  etp 0/2"),
]

NOT_LANDED = [  # move each to LANDED when its pass lands
    ("ep.py", ["--world-size", "4", "--plan", "tp=4,etp=2"],
     "expert tensor parallelism other than 1 or tp"),
]

GUIDE_ERRORS = [
    ("tp.py", ["--world-size", "3"],
     "tp.py: world size 3 is not divisible by the model-parallel size tp*pp*cp = 2*1*1 = 2 "
     "(each data-parallel replica takes 2 ranks); fix: --world-size 2 or --world-size 4 or "
     "--plan tp=1"),
    ("cp.py", ["--plan", "cp_pad=off"],
     "cp.py: sequence length 62 does not split into 4 chunks for cp=2: seq % 4 = 2, and "
     "cp_pad=off forbids padding (2*cp load-balanced chunks (rank i takes chunks i and "
     "2*cp-1-i)); fix: --seq-length 60 or --seq-length 64 or --plan cp_pad=on"),
    ("ep.py", ["--num-experts", "3"],
     "ep.py: 3 experts do not divide over ep=2 expert-parallel ranks (num_experts % ep = 1; "
     "each rank holds num_experts/ep whole experts); fix: --num-experts 2 or --num-experts 4 "
     "or --plan ep=1"),
]


def _train_rank(script: str, argv: list[str]) -> tuple[int, str, str]:
    """On every rank: the job `python examples/<script> argv...` runs; its exit code, and what
    it printed to stdout and to stderr."""
    common = example_scripts.common()
    example = example_scripts.example(script.removesuffix(".py"))
    job = common.job_for(example, argv, _world(script, argv), "spawn")
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = common.train_rank(job)
    return code, out.getvalue(), err.getvalue()


def _on_ranks(script: str, argv: list[str]) -> tuple[int, str, str]:
    """The example's job on the session's ranks: the exit code (the worst rank's) and rank 0's
    output, which is all a command-line run prints."""
    results = on_ranks(_world(script, argv), _train_rank, script, argv)
    return max(code for code, _, _ in results), results[0][1], results[0][2]


def _world(script: str, argv: list[str]) -> int:
    common = example_scripts.common()
    example = example_scripts.example(script.removesuffix(".py"))
    return common.arguments(example, argv).world_size or example.smallest_world


@pytest.mark.parametrize("script,args,rank_line", LANDED, ids=[c[0] for c in LANDED])
def test_example_matches_single_device(script, args, rank_line):
    argv = [*args, "--train-iters", "2"]
    if script == "tp.py":  # the command line itself, once
        result = example_scripts.run(script, *argv)
        assert result.returncode == 0, result.stdout + result.stderr
        code, printed = result.returncode, result.stdout
    else:
        code, printed, _ = _on_ranks(script, argv)
    assert code == 0, printed
    assert MATCH.search(printed), printed
    assert rank_line in printed
    assert "spawned CPU ranks (gloo)" in printed


def test_example_under_torchrun():
    result = example_scripts.run("tp.py", "--train-iters", "2", torchrun=2)
    assert result.returncode == 0, result.stdout + result.stderr
    assert MATCH.search(result.stdout), result.stdout
    assert "2 torchrun ranks (gloo)" in result.stdout
    assert result.stdout.count("tp.py: tensor parallelism") == 1  # rank 0 alone speaks


@pytest.mark.parametrize("script,args,feature", NOT_LANDED, ids=[c[0] for c in NOT_LANDED])
def test_example_of_a_strategy_not_landed_says_so(script, args, feature):
    code, printed, errors = _on_ranks(script, list(args))
    assert code == 3, printed + errors
    assert printed == ""  # no header, no training: it never pretends
    said = [line for line in errors.splitlines() if "not landed" in line]
    assert len(said) == 1 and feature in said[0], errors


@pytest.mark.parametrize("script,args,message", GUIDE_ERRORS, ids=[c[0] for c in GUIDE_ERRORS])
def test_guide_error_is_one_line_with_values_and_fix(script, args, message):
    result = example_scripts.run(script, *args, timeout=60)
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.strip() == message


# --- pure: plans, numbers, fixes ---------------------------------------------------------------

@pytest.mark.parametrize("name,world,degrees", [
    ("tp", 2, {"tp": 2}), ("tp", 8, {"tp": 8}),
    ("sp", 2, {"tp": 2}),
    ("pp", 2, {"tp": 1, "pp": 2}), ("pp", 4, {"tp": 2, "pp": 2}), ("pp", 16, {"tp": 4, "pp": 4}),
    ("dp", 2, {"tp": 1, "pp": 1, "dp": 2}), ("dp", 8, {"tp": 2, "pp": 2, "dp": 2}),
    ("dp", 64, {"tp": 8, "pp": 4, "dp": 2}),
    ("cp", 2, {"tp": 1, "cp": 2}), ("cp", 32, {"tp": 8, "cp": 4}),
    ("ep", 2, {"tp": 1, "ep": 2, "etp": 1}), ("ep", 16, {"tp": 2, "ep": 8, "etp": 2}),
    ("full", 8, {"tp": 2, "pp": 2, "cp": 2}),
])
def test_guide_plan_scaled_to_the_ranks_at_hand(name, world, degrees):
    example = example_scripts.example(name)
    assert example_scripts.common().scaled_degrees(example, world, {})[0] == degrees


def test_smallest_runs():
    smallest = {name: example_scripts.example(name).smallest_world
                for name in example_scripts.NAMES}
    assert smallest == {"tp": 2, "sp": 2, "pp": 2, "cp": 2, "dp": 2, "ep": 2, "full": 8}


def test_full_takes_megatron_command_lines():
    common, full = example_scripts.common(), example_scripts.example("full")
    job = common.job_for(full, [
        "--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2",
        "--num-layers-per-virtual-pipeline-stage", "1", "--num-layers", "4",
        "--context-parallel-size", "1", "--sequence-parallel",
        "--micro-batch-size", "1", "--global-batch-size", "16"], 8)
    # microbatches = global batch / (micro batch x dp) = 16 / (1 x 2)
    assert job.plan == ("tp=2,pp=2,dp=2,sp=on,microbatches=8,schedule=interleaved-1f1b,"
                        "vpp=2")
    assert job.batch == 16 and job.numbers.expert_tp == 2  # etp defaults to tp
    newer = common.job_for(full, ["--num-virtual-stages-per-pipeline-rank", "2",
                                  "--context-parallel-size", "1"], 8)
    older = common.job_for(full, ["--virtual-pipeline-model-parallel-size", "2",
                                  "--context-parallel-size", "1"], 8)
    assert newer.plan == older.plan and "vpp=2" in newer.plan
    no_pp = common.job_for(full, ["--pipeline-model-parallel-size", "1",
                                  "--context-parallel-size", "1"], 8)
    assert "vpp" not in no_pp.plan and "dp=4" in no_pp.plan


def test_torchrun_fix_names_torchrun():
    common = example_scripts.common()
    with pytest.raises(common.UsageError, match="fix: torchrun --nproc-per-node 2 or "):
        common.job_for(example_scripts.example("tp"), [], 3, "torchrun")


def test_padding_added_where_exact():
    Numbers = example_scripts.common().Numbers
    assert Numbers(world=2, cp=2, seq=62).cp_padding == 2
    assert Numbers(world=32, tp=8, cp=4, seq=8190).cp_padding == 2  # the guide's 8K job
    assert Numbers(world=2, cp=2, seq=61, cp_algo="a2a").cp_padding == 1
    assert Numbers(world=2, seq=61).cp_padding == 0


def test_every_fix_clears_its_problem():
    """Over a grid of shapes: every problem has a fix, and each fix applied clears it, without
    raising another unless no single change can (what the command line prints works)."""
    common = example_scripts.common()
    grid = itertools.product((3, 4, 8, 12), (1, 2, 4), (1, 2), (1, 2), (1, 2, 4), (0, 3, 8),
                             (30, 32), (False, True))
    seen = set()
    for world, tp, pp, cp, ep, experts, seq, pad in grid:
        n = common.Numbers(world=world, tp=tp, pp=pp, cp=cp, ep=ep, experts=experts, seq=seq,
                           cp_pad=pad, vpp=2 if pp > 1 else 1, global_batch=6)
        broken = {check for check in common.CHECKS if check(n)}
        for check, problem in zip(sorted(broken, key=common.CHECKS.index), common.problems(n),
                                  strict=True):
            seen.add(problem.text.split(" ")[0])
            assert problem.fixes, problem.text
            after = [{c for c in common.CHECKS if c(dataclasses.replace(n, **fix))}
                     for fix in problem.fixes]
            assert all(check not in checks for checks in after), (n, problem)
            clean = [checks <= broken for checks in after]
            assert all(clean) or not any(clean), (n, problem)
    assert seen == {"world", "the", "sequence", "ep=2", "ep=4", "3", "global"}, seen
