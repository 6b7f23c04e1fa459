import json
import re
import subprocess
import sys

import pytest

from partitioner.cli import main


def _run(capsys, *argv):
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_dump_json_has_every_rank_with_the_contract_schema(capsys):
    code, out, _ = _run(capsys, "dump", "partitioner.models:tiny", "--plan", "dp=2,mb=2",
                        "--rank", "all", "--format", "json")
    assert code == 0
    data = json.loads(out)
    assert data["world_size"] == 2 and data["plan"]["dp"] == 2
    assert [r["rank"] for r in data["ranks"]] == [0, 1]
    assert [r["coords"]["dp"] for r in data["ranks"]] == [0, 1]
    nodes = data["ranks"][0]["stages"][0]["nodes"]
    assert set(nodes[0]) == {"name", "op", "target", "shape", "placement", "collective"}
    linears = [n for n in nodes if n["target"] == "aten.linear.default"]
    assert linears and all(n["shape"][0] == 1 for n in linears)  # 4 sequences / (dp*mb)
    assert all(n["collective"] is None for n in nodes)  # dp inserts nothing into the graph


def test_dump_text_and_dot(capsys, tmp_path):
    code, out, _ = _run(capsys, "dump", "gpt:layers=2,hidden=64,heads=4,seq=16,vocab=128",
                        "--plan", "dp=2")
    assert code == 0
    assert out.startswith("rank 0  coords") and "placement" in out and "aten.embedding" in out
    target = tmp_path / "g.dot"
    code, _, _ = _run(capsys, "dump", "llama3-8b", "--plan", "dp=1", "--seq", "32",
                      "--format", "dot", "--out", str(target))
    text = target.read_text()
    assert code == 0 and text.startswith("digraph partitioned {") and text.rstrip().endswith("}")
    assert "cluster_rank0_stage0" in text and "->" in text


def test_dump_passes_prints_the_ordered_pipeline_with_each_record(capsys):
    code, out, _ = _run(capsys, "dump", "partitioner.models:tiny", "--plan",
                        "pp=2,mb=2,recompute=selective", "--passes")
    assert code == 0
    names = [line.split()[1] for line in out.splitlines()[2:]]
    assert names == ["batch_statistics", "causal_mask", "tensor_parallel",
                     "sequence_parallel", "context_parallel", "expert_parallel", "dropout",
                     "mixed_precision", "pipeline_split", "recompute", "kernels", "device",
                     "async_tp", "collectives", "lowering"]
    rows = {line.split()[1]: line for line in out.splitlines()[2:]}
    assert "skipped" in rows["tensor_parallel"] and "skipped" in rows["expert_parallel"]
    assert "4 segments -> 2 stages: pre..blocks.0 | blocks.1..post" in rows["pipeline_split"]
    assert "2 attention cores recomputed" in rows["recompute"]
    assert "0 dropouts on the counter generator (seed 0)" in rows["dropout"]
    assert "2 stage submodules on 2 pp ranks" in rows["lowering"]


def test_dump_hugging_face_config_json(capsys, tmp_path):
    pytest.importorskip("transformers")
    from transformers import LlamaConfig

    path = tmp_path / "config.json"
    LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                max_position_embeddings=32).to_json_file(path)
    code, out, _ = _run(capsys, "dump", str(path), "--plan", "dp=1", "--format", "json")
    assert code == 0
    assert any(n["target"] == "aten.linear.default"
               for n in json.loads(out)["ranks"][0]["stages"][0]["nodes"])


@pytest.mark.parametrize("argv, fragment", [
    (["dump", "partitioner.models:tiny", "--plan", "tp=0"], "tp=0 must be a positive integer"),
    (["dump", "partitioner.models:tiny", "--plan", "dp=2", "--world-size", "3"],
     "!= world size 3"),
    (["dump", "nosuch.module:factory", "--plan", "dp=1"], "cannot load model factory"),
    (["dump", "gpt:layers=2,hidden=x", "--plan", "dp=1"], "hidden='x'"),
    (["dump", "no-such-preset", "--plan", "dp=1"], "unknown model 'no-such-preset'"),
    (["dump", "partitioner.models:tiny", "--plan", "dp=1", "--rank", "5"], "outside a world"),
    (["dump", "partitioner.models:tiny", "--plan", "ep=2", "--world-size", "2"],
     "this model has none that the expert-parallel pass recognises"),
    (["dump", "gpt:layers=2,hidden=64,heads=4,seq=18,vocab=128", "--plan", "cp=2,cp_pad=off"],
     "sequence length 18 does not split into 2*cp=4 chunks"),
    (["dump", "partitioner.models:tiny", "--plan", "pp=8"], "the model has only 4 cuttable segments"),
])
def test_errors_are_one_line_and_exit_2(capsys, argv, fragment):
    code, out, err = _run(capsys, *argv)
    assert code == 2 and out == ""
    assert fragment in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


GQA_SPEC = "gpt:layers=4,hidden=64,heads=4,kv_heads=2,vocab=128,seq=32"


def test_dump_says_heads_and_lists_every_problem_and_its_fixes_are_accepted(capsys):
    code, out, err = _run(capsys, "dump", GQA_SPEC, "--plan", "tp=3", "--world-size", "3")
    assert code == 2 and out == "" and "Traceback" not in err
    first, *listed = err.strip().splitlines()
    assert "its 4 attention heads (2 kv heads) do not divide by tp=3" in first
    assert "tp=1, tp=2 or tp=4 (the tp values that split this model" in first
    # the rules fix names real module paths (blocks.0.attn.q_proj), with the layer as a glob
    (rules,) = re.findall(r"rules=(\S+)", first)
    assert "blocks.*.attn.q_proj:replicate" in rules.split(";")
    count = int(re.search(r"\((\d+) problems, listed below\)", first).group(1))
    assert len(listed) == count and all(line.startswith("  - node ") for line in listed)
    for plan in ("tp=2", "tp=4", f"tp=3,rules={rules}"):
        code, out, err = _run(capsys, "dump", GQA_SPEC, "--plan", plan)
        assert code == 0 and err == "", (plan, err)


def test_console_script_check_and_demo_run_end_to_end():
    done = subprocess.run([sys.executable, "-m", "partitioner.cli", "demo", "--steps", "2"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "PASS: every rank matches the single-device model" in done.stdout
    assert "per-rank graph summary" in done.stdout
    done = subprocess.run([sys.executable, "-m", "partitioner.cli", "check",
                           "partitioner.models:tiny_llama", "--plan", "dp=2,zero=1"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "PASS: plan dp=2,zero=1 on 2 CPU ranks" in done.stdout


def test_check_says_in_one_line_which_rank_died_and_why(capsys, monkeypatch):
    import runtime
    from runtime.launch import RankError, death_message

    def killed(world, *args, **kwargs):
        message = death_message(1, -9, world)
        raise RankError(message, rank=1, summary=message)

    monkeypatch.setattr(runtime, "spawn", killed)
    code, out, err = _run(capsys, "check", "llama3-70b", "--plan", "tp=2,pp=2",
                          "--world-size", "4")
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert "rank 1 of 4 was killed (SIGKILL)" in err and "out-of-memory" in err
    # the preset was shrunk first, and the shrink said
    assert "checking it shrunk to" in out and "layers 80 -> 2" in out
