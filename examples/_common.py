"""What the seven guide examples share: arguments, the checks that run before any collective,
the launch (torchrun, or CPU ranks spawned here), training next to a single-device copy, and
the printout.

An example is an `Example` (the guide's degrees, the model, what to print about each rank) and
a call to `main`. The phases, in order:

1. arguments: the Megatron names for the model and batch (`--num-layers`, `--seq-length`,
   `--micro-batch-size`, `--global-batch-size`, ...), `--plan` items over the example's plan,
   `--world-size` when spawning;
2. the plan: the guide's degrees halved until they fit the ranks at hand (never below the
   example's floors, never a degree the command line fixed), then the `--plan` items;
3. checks on plain numbers (world size, sequence, experts, batch), each problem one line with
   fixes that were checked to clear it, before any rank starts;
4. the run: every rank calls `parallelize`, which refuses a strategy that has not landed (or a
   model its passes cannot split) on every rank alike before its first collective: rank 0
   says so in one line. Otherwise every rank trains with AdamW, and rank 0 trains the same
   model on one device beside it and prints the losses and the largest difference.

Exit codes: 0 match, 1 mismatch, 2 a plan or shape that cannot run, 3 a strategy not landed.
The launching process never imports torch, so argument and number errors answer at once.
One module on purpose (about 700 lines): the examples are copied by users as a unit, and each
phase above is one section below.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import re
import sys
from dataclasses import dataclass, field
from typing import Callable

EXIT_MISMATCH, EXIT_USAGE, EXIT_NOT_LANDED = 1, 2, 3

DEGREES = ("tp", "pp", "cp", "ep", "etp")
"""Plan degrees the examples scale (dp is what is left of the world)."""
_HALVING_ORDER = ("tp", "etp", "ep", "cp", "pp")
"""Which degree gives way first when two are equally large."""


@dataclass(frozen=True)
class Example:
    """One guide job: its degrees, its model and what to say about each rank."""

    name: str
    """Script name without .py ("tp")."""
    strategy: str
    """What it shows ("tensor parallelism")."""
    guide: str
    """The guide's job, as the guide states it ("TP=8 on a GPT-2 block, 8 GPUs")."""
    degrees: dict[str, int]
    """The guide's degrees; "dp" is a lower bound on data parallelism, not a fixed degree."""
    floors: dict[str, int]
    """The smallest value each degree keeps when the guide is scaled down to fewer ranks."""
    fields: dict[str, str] = field(default_factory=dict)
    """Plan fields that do not scale ({"sp": "on"})."""
    model: dict = field(default_factory=dict)
    """GPTConfig fields of the model (partitioner.models); the command line overrides them."""
    seq: int = 32
    """Default --seq-length."""
    details: tuple[Callable, ...] = ()
    """Rank-side: each `detail(pm, model, job) -> str` says something about this rank's share."""
    flags: dict[str, str] = field(default_factory=dict)
    """How fixes spell a Numbers field on this example's command line, where that differs
    from the default (`--plan ep={}`)."""
    extra_arguments: Callable | None = None
    """`extra_arguments(parser)` adds flags (full.py: Megatron's parallel sizes)."""
    pinned_from: Callable | None = None
    """`pinned_from(args) -> {plan key: value}`: plan items the extra flags fix; the scaling
    leaves them alone."""

    @property
    def smallest_world(self) -> int:
        return scaled_degrees(self, 1, {})[1]


# --- the plan: the guide's degrees scaled to the world ---------------------------------------

def _need(degrees: dict[str, int]) -> int:
    """Ranks the degrees need: tp*cp*dp per pipeline stage must also hold etp*ep whole."""
    get = degrees.get
    dense = get("tp", 1) * get("cp", 1) * get("dp", 1)
    return get("pp", 1) * math.lcm(dense, get("etp", 1) * get("ep", 1))


def scaled_degrees(example: Example, world: int, pinned: dict[str, int]):
    """(degrees, ranks they need): the guide's degrees, the largest halved first, until they
    fit in `world`; floors and `pinned` (fixed by the command line) never change."""
    degrees = {**example.degrees, **pinned}
    while _need(degrees) > world:
        movable = [d for d in _HALVING_ORDER if d in degrees and d not in pinned
                   and degrees[d] // 2 >= example.floors.get(d, 1)]
        if not movable:
            break
        largest = max(degrees[d] for d in movable)
        degrees[next(d for d in movable if degrees[d] == largest)] //= 2
    return degrees, _need(degrees)


def parse_items(text: str | None) -> dict[str, str]:
    """`tp=2,mb=4,cp_pad=off` -> {"tp": "2", "microbatches": "4", "cp_pad": "off"}."""
    items: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in (text or "").split(","))):
        key, sep, value = item.partition("=")
        if not sep:
            raise UsageError(f"--plan item {item!r} is not key=value (e.g. --plan tp=2,mb=4)")
        items["microbatches" if key.strip() == "mb" else key.strip()] = value.strip()
    return items


def _on(value: str) -> bool:
    return value.lower() in ("on", "true", "1")


class UsageError(Exception):
    """A command line that cannot run: one line, the values, the constraint and a fix."""


# --- the numbers the guide's errors are about -----------------------------------------------

@dataclass(frozen=True)
class Numbers:
    """The plain numbers behind the guide's three common errors (no Plan internals)."""

    world: int
    tp: int = 1
    pp: int = 1
    cp: int = 1
    ep: int = 1
    etp: int | None = None
    """Expert tensor-parallel size; None means tp, as in Megatron."""
    vpp: int = 1
    seq: int = 32
    cp_pad: bool = True
    """Pad the sequence to a multiple of the cp chunk count (exact for causal attention)."""
    cp_algo: str = "ring"
    experts: int = 0
    topk: int = 2
    micro_batch: int = 1
    global_batch: int | None = None
    """None: micro_batch * dp * microbatches."""
    microbatches: int | None = None
    """None: global_batch / (micro_batch * dp), or the example's default."""

    @property
    def model_parallel(self) -> int:
        return self.tp * self.pp * self.cp

    @property
    def expert_tp(self) -> int:
        return self.etp or self.tp

    @property
    def dp(self) -> int:
        return self.world // self.model_parallel

    @property
    def cp_chunks(self) -> int:
        """Sequence chunks under cp: 2*cp load-balanced ones (ring, hybrid), cp for a2a."""
        return self.cp if self.cp_algo == "a2a" else 2 * self.cp

    @property
    def cp_padding(self) -> int:
        """Tokens appended so the sequence splits into cp chunks (0 without cp)."""
        return -self.seq % self.cp_chunks if self.cp > 1 else 0

    def resolved_microbatches(self) -> int:
        if self.global_batch is not None:
            return self.global_batch // (self.micro_batch * self.dp)
        if self.microbatches is not None:
            return self.microbatches
        return 2 * self.pp if self.pp > 1 else 1


@dataclass(frozen=True)
class Problem:
    text: str
    """The values and the constraint they break."""
    fixes: tuple[dict, ...]
    """Numbers field changes, each checked to clear this problem without adding another."""


def _multiples(value: int, step: int, at_least: int = 1) -> list[int]:
    """The multiples of `step` next to `value` (below if >= at_least, then above)."""
    below, above = value // step * step, -(-value // step) * step
    return [m for m in dict.fromkeys((below, above)) if m >= max(at_least, step)]


def _world_text(n: Numbers) -> str | None:
    """What is wrong with the world size for these degrees, or None."""
    if n.world % n.model_parallel:
        return (f"world size {n.world} is not divisible by the model-parallel size tp*pp*cp = "
                f"{n.tp}*{n.pp}*{n.cp} = {n.model_parallel} (each data-parallel replica takes "
                f"{n.model_parallel} ranks)")
    if (n.world // n.pp) % (n.expert_tp * n.ep):
        return (f"the {n.world // n.pp} ranks of a pipeline stage (world/pp = {n.world}/{n.pp}) "
                f"do not divide into expert groups of etp*ep = {n.expert_tp}*{n.ep} = "
                f"{n.expert_tp * n.ep} ranks")
    return None


def world_problem(n: Numbers) -> Problem | None:
    text = _world_text(n)
    if text is None:
        return None
    need = n.pp * math.lcm(n.tp * n.cp, n.expert_tp * n.ep)
    fixes = [{"world": w} for w in _multiples(n.world, need)]
    for dim in ("cp", "pp", "tp", "ep"):  # or one degree made smaller, the largest that fits
        smaller = [{dim: d} for d in range(getattr(n, dim) - 1, 0, -1)
                   if getattr(n, dim) % d == 0
                   and _world_text(dataclasses.replace(n, **{dim: d})) is None]
        fixes += smaller[:1]
    return Problem(text, tuple(fixes))


def sequence_problem(n: Numbers) -> Problem | None:
    if n.cp == 1 or n.cp_pad or n.seq % n.cp_chunks == 0:
        return None
    how = ("cp contiguous chunks (a2a)" if n.cp_algo == "a2a" else
           "2*cp load-balanced chunks (rank i takes chunks i and 2*cp-1-i)")
    text = (f"sequence length {n.seq} does not split into {n.cp_chunks} chunks for cp={n.cp}: "
            f"seq % {n.cp_chunks} = {n.seq % n.cp_chunks}, and cp_pad=off forbids padding "
            f"({how})")
    fixes = [{"seq": s} for s in _multiples(n.seq, n.cp_chunks)] + [{"cp_pad": True}]
    return Problem(text, tuple(fixes))


def experts_problem(n: Numbers) -> Problem | None:
    if n.ep == 1 or (n.experts and n.experts % n.ep == 0):
        return None
    if not n.experts:
        text = f"ep={n.ep} splits experts, and the model has none (--num-experts 0)"
    else:
        text = (f"{n.experts} experts do not divide over ep={n.ep} expert-parallel ranks "
                f"(num_experts % ep = {n.experts % n.ep}; each rank holds num_experts/ep whole "
                f"experts)")
    fixes = [{"experts": e} for e in _multiples(max(n.experts, n.topk), n.ep, at_least=n.topk)]
    fixes += [{"ep": d} for d in range(n.ep - 1, 0, -1) if n.experts % d == 0 or d == 1][:1]
    return Problem(text, tuple(fixes))


def batch_problem(n: Numbers) -> Problem | None:
    if n.world % n.model_parallel:
        return None  # world_problem speaks first; dp is not defined
    per_step = n.micro_batch * n.dp
    if n.global_batch is not None and n.global_batch % per_step:
        text = (f"global batch {n.global_batch} is not divisible by micro batch * dp = "
                f"{n.micro_batch}*{n.dp} = {per_step}")
    elif n.vpp > 1 and n.resolved_microbatches() % n.pp:
        text = (f"the interleaved schedule (vpp={n.vpp}) needs microbatches % pp == 0; "
                f"microbatches = {n.resolved_microbatches()}, pp = {n.pp}")
        per_step *= n.pp
    else:
        return None
    current = n.global_batch or per_step
    return Problem(text, tuple({"global_batch": g, "microbatches": None}
                               for g in _multiples(current, per_step)))


CHECKS = (world_problem, sequence_problem, experts_problem, batch_problem)


def problems(n: Numbers) -> list[Problem]:
    """Every problem of `n`, each with only the fixes that clear it: those that raise no
    other problem if there are any, else those that at least clear this one."""
    found = []
    broken = {check for check in CHECKS if check(n)}
    for check in CHECKS:
        problem = check(n)
        if problem is None:
            continue
        fixed = [(fix, dataclasses.replace(n, **fix)) for fix in problem.fixes]
        clearing = [(fix, m) for fix, m in fixed if check(m) is None]
        clean = [fix for fix, m in clearing if {c for c in CHECKS if c(m)} <= broken]
        found.append(Problem(problem.text, tuple(clean or [fix for fix, _ in clearing])))
    return found


# --- the command line ------------------------------------------------------------------------

def parser(example: Example) -> argparse.ArgumentParser:
    """The flags every example takes; Megatron's names where Megatron has one."""
    p = argparse.ArgumentParser(
        prog=f"{example.name}.py",
        description=f"{example.strategy}: the guide's {example.guide}, on an unmodified model. "
                    f"Runs under torchrun, or as plain python (spawns CPU ranks).")
    model = example.model
    p.add_argument("--plan", help="plan items over the example's plan, e.g. tp=2,mb=4")
    p.add_argument("--world-size", type=int,
                   help=f"ranks to spawn without torchrun (default {example.smallest_world})")
    p.add_argument("--num-layers", type=int, default=model.get("n_layer", 2))
    p.add_argument("--hidden-size", type=int, default=model.get("n_embd", 64))
    p.add_argument("--num-attention-heads", type=int, default=model.get("n_head", 8))
    p.add_argument("--num-query-groups", type=int, default=model.get("n_kv_head"),
                   help="key/value heads (grouped-query attention)")
    p.add_argument("--ffn-hidden-size", type=int, default=model.get("ffn_hidden"))
    p.add_argument("--vocab-size", type=int, default=model.get("vocab_size", 512))
    p.add_argument("--num-experts", type=int, default=model.get("n_experts", 0))
    p.add_argument("--moe-router-topk", type=int, default=model.get("topk", 2))
    p.add_argument("--seq-length", type=int, default=example.seq)
    p.add_argument("--micro-batch-size", type=int, default=2)
    p.add_argument("--global-batch-size", type=int,
                   help="default micro batch * dp * microbatches; microbatches = global batch "
                        "/ (micro batch * dp), as in Megatron")
    p.add_argument("--train-iters", type=int, default=3, help="training steps")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    p.add_argument("--seed", type=int, default=0)
    return p


def under_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ or all(
        key in os.environ for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))


@dataclass(frozen=True)
class Job:
    """Everything a rank needs; pickled to every spawned rank (functions by reference)."""

    example: Example
    plan: str
    """The plan string handed to parallelize (keys Plan knows)."""
    world: int
    numbers: Numbers
    config: dict
    """GPTConfig fields."""
    batch: int
    steps: int
    lr: float
    dtype: str
    seed: int
    launcher: str


def build_job(example: Example, args, pinned: dict[str, str], world: int,
              launcher: str) -> Job:
    """The plan and the numbers for this command line; raises UsageError with every problem."""
    from core.plan import Plan, PlanError

    items = {**pinned, **parse_items(args.plan)}
    fixed = {k: _integer(k, v) for k, v in items.items() if k in DEGREES}
    degrees, _ = scaled_degrees(example, world, fixed)
    fields = {**example.fields, **{k: str(v) for k, v in degrees.items() if k != "dp"}, **items}
    number = {k: _integer(k, fields.get(k, "1")) for k in (*DEGREES, "vpp")}
    if number["vpp"] > 1:
        fields.setdefault("schedule", "interleaved-1f1b")
    if number["ep"] == 1 and not args.num_experts:
        fields.pop("etp", None)  # no expert layer: the expert layout has nothing to place
    numbers = Numbers(
        world=world, tp=number["tp"], pp=number["pp"], cp=number["cp"], ep=number["ep"],
        etp=_integer("etp", fields["etp"]) if "etp" in fields else None, vpp=number["vpp"],
        seq=args.seq_length, cp_pad=_on(fields.get("cp_pad", "on")),
        cp_algo=fields.get("cp_algo", "ring"), experts=args.num_experts,
        topk=args.moe_router_topk, micro_batch=args.micro_batch_size,
        global_batch=args.global_batch_size,
        microbatches=_integer("mb", items["microbatches"]) if "microbatches" in items else None)
    found = problems(numbers)
    if found:
        raise UsageError("; ".join(render(p, example, launcher) for p in found))
    fields["microbatches"] = str(numbers.resolved_microbatches())
    try:
        plan = Plan.parse(",".join(f"{k}={v}" for k, v in fields.items())).resolve(world)
    except PlanError as error:
        raise UsageError(f"{example.name}.py: {error}") from None
    config = dict(example.model, n_layer=args.num_layers, n_embd=args.hidden_size,
                  n_head=args.num_attention_heads, n_kv_head=args.num_query_groups,
                  ffn_hidden=args.ffn_hidden_size, vocab_size=args.vocab_size,
                  n_experts=args.num_experts, topk=args.moe_router_topk,
                  seq_len=args.seq_length + numbers.cp_padding)
    return Job(example, str(plan), world, numbers, config,
               batch=args.micro_batch_size * plan.microbatches * plan.degree("dp"),
               steps=args.train_iters, lr=args.lr, dtype=args.dtype, seed=args.seed,
               launcher=launcher)


def _integer(key: str, value: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise UsageError(f"plan item {key}={value!r} must be an integer") from None


_FLAGS = {"world": "--world-size {}", "seq": "--seq-length {}", "experts": "--num-experts {}",
          "global_batch": "--global-batch-size {}", "cp_pad": "--plan cp_pad=on"}


def render(problem: Problem, example: Example, launcher: str) -> str:
    """`problem` as one line: values, constraint, and the fixes as command-line changes."""
    flags = {**_FLAGS, **example.flags}
    if launcher == "torchrun":
        flags["world"] = "torchrun --nproc-per-node {}"

    def spell(fix: dict) -> str:
        return " ".join(flags.get(key, f"--plan {key}={{}}").format(value)
                        for key, value in fix.items() if value is not None)

    fixes = " or ".join(spell(fix) for fix in problem.fixes) or "change the degrees"
    return f"{example.name}.py: {problem.text}; fix: {fixes}"


def _one_line(error: BaseException) -> str:
    return re.sub(r"\s+", " ", str(error)).strip()


# --- main --------------------------------------------------------------------------------------

def arguments(example: Example, argv) -> argparse.Namespace:
    p = parser(example)
    if example.extra_arguments is not None:
        example.extra_arguments(p)
    return p.parse_args(argv)


def job_for(example: Example, argv, world: int, launcher: str = "spawn") -> Job:
    """The job a command line asks for on `world` ranks (pure: no torch, no process group);
    raises UsageError."""
    args = arguments(example, argv)
    pinned = example.pinned_from(args) if example.pinned_from is not None else {}
    return build_job(example, args, pinned, world, launcher)


def main(example: Example, argv=None) -> int:
    """Run `example` from the command line (torchrun, or spawned CPU ranks); the exit code."""
    argv = sys.argv[1:] if argv is None else list(argv)
    torchrun = under_torchrun()
    rank = int(os.environ.get("RANK", "0"))  # torchrun: every rank checks, rank 0 speaks
    asked = arguments(example, argv).world_size
    world = int(os.environ["WORLD_SIZE"]) if torchrun else asked or example.smallest_world
    try:
        if asked not in (None, world):
            raise UsageError(f"{example.name}.py: --world-size {asked} differs from torchrun's "
                             f"{world} ranks; drop it")
        job = job_for(example, argv, world, "torchrun" if torchrun else "spawn")
    except UsageError as error:
        return _say(rank, EXIT_USAGE, str(error))
    if torchrun:
        return _torchrun(job)
    from runtime import spawn

    return max(spawn(world, train_rank, job))


def _torchrun(job: Job) -> int:
    import torch
    import torch.distributed as dist

    gpu = torch.cuda.is_available() and torch.cuda.device_count() >= int(
        os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if gpu:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl" if gpu else "gloo")
    try:
        return train_rank(job)
    finally:
        dist.destroy_process_group()


def _header(job: Job, backend: str) -> list[str]:
    ex, n = job.example, job.numbers
    where = f"{'spawned CPU' if job.launcher == 'spawn' else 'torchrun'} ranks ({backend})"
    lines = [f"{ex.name}.py: {ex.strategy}; the guide's {ex.guide}",
             f"  {job.world} {where}; plan {job.plan}; dp={n.dp}, "
             f"microbatches={n.resolved_microbatches()}, global batch {job.batch}"]
    if n.cp_padding:
        lines.append(f"  padding added: {n.cp_padding} tokens ({n.seq} -> "
                     f"{n.seq + n.cp_padding}, a multiple of {n.cp_chunks} chunks)")
    return lines


# --- on every rank -----------------------------------------------------------------------------

def train_rank(job: Job) -> int:
    """Parallelize, print what the guide prints, train; rank 0 trains one device beside it.
    Returns the exit code (the same on every rank)."""
    import copy

    import torch
    import torch.distributed as dist

    from partitioner import parallel_state, parallelize
    from partitioner.check import lm_loss_sum
    from partitioner.models import GPTConfig, build

    rank = dist.get_rank()
    dtype = getattr(torch, job.dtype)
    config = GPTConfig(**job.config)
    model, (ids,) = build(config, batch=job.batch, seq=job.numbers.seq, dtype=dtype,
                          seed=job.seed)
    reference = copy.deepcopy(model) if rank == 0 else None
    try:
        # parallelize runs every check before its first collective: a refusal is the same on
        # every rank, so every rank can return here without leaving another one waiting.
        # token-weighted (as Megatron's loss): exact over cp ranks and padded sequences
        pm = parallelize(model, job.plan, example_inputs=(ids,), loss_fn=lm_loss_sum)
    except NotImplementedError as error:
        return _say(rank, EXIT_NOT_LANDED, f"{job.example.name}.py: not landed yet, so this "
                                           f"example cannot run: {_one_line(error)}")
    except ValueError as error:  # PlanError, PassError: the plan does not fit this model
        return _say(rank, EXIT_USAGE, f"{job.example.name}.py: {_one_line(error)}")
    parallel_state.install(pm)  # collective; the getters now describe pm
    layout_ok = _getters_match_layout(pm)
    micro = ids[:job.numbers.micro_batch]  # the shape parallelize captured: no second capture
    out = pm(micro)
    lines = [f"rank {rank}: {coordinates()}"]
    lines += [f"    {detail(pm, model, job)}" for detail in job.example.details]
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, (lines, layout_ok))
    if rank == 0:
        print("\n".join(_header(job, dist.get_backend()) + _shapes(config, job, micro, out)
                        + [line for rank_lines, _ in gathered for line in rank_lines]),
              flush=True)
    if not all(ok for _, ok in gathered):
        return EXIT_MISMATCH
    worst = _train(job, pm, reference, config.vocab_size, dtype)
    verdict = torch.tensor([float(worst <= _tolerance(dtype))], device=pm.device)
    dist.broadcast(verdict, src=0)  # rank 0 judged; every rank exits the same way
    return 0 if verdict.item() else EXIT_MISMATCH


def _shapes(config, job: Job, micro, out) -> list[str]:
    experts = f", {config.n_experts} experts top-{config.topk}" if config.n_experts else ""
    return [f"  model: {config.n_layer} layer{'s' * (config.n_layer != 1)}, hidden "
            f"{config.n_embd}, {config.n_head} heads{experts}, vocab {config.vocab_size}: "
            f"{config.num_parameters() / 1e6:.2f}M parameters, {job.dtype}",
            f"  input {tuple(micro.shape)} token ids (a microbatch) -> output "
            f"{tuple(out.shape)} logits on every rank"]


def _say(rank: int, code: int, line: str) -> int:
    if rank == 0:
        print(line, file=sys.stderr, flush=True)
    return code


def _tolerance(dtype) -> float:
    from partitioner.check import TOLERANCES

    return TOLERANCES[dtype]


def _train(job: Job, pm, reference, vocab: int, dtype) -> float:
    """Train pm (and the reference on rank 0); returns rank 0's largest relative difference."""
    import torch

    from partitioner.check import lm_loss

    opt = torch.optim.AdamW(pm.parameters(), lr=job.lr)
    ref_opt = torch.optim.AdamW(reference.parameters(), lr=job.lr) if reference else None
    if reference is not None:
        reference.to(pm.device)
    generator = torch.Generator().manual_seed(job.seed + 1)  # the same batches on every rank
    abs_diff = rel = 0.0
    for step in range(job.steps):
        ids = torch.randint(0, vocab, (job.batch, job.numbers.seq), generator=generator)
        target = ids.roll(-1, dims=1)
        opt.zero_grad()
        loss = pm.step(ids, target=target)
        pm.clip_grad_norm_(1.0)
        opt.step()
        if reference is None:
            continue
        ref_opt.zero_grad()
        ref_loss = lm_loss(reference(ids.to(pm.device)), target.to(pm.device))
        ref_loss.backward()
        torch.nn.utils.clip_grad_norm_(reference.parameters(), 1.0)
        ref_opt.step()
        diff = abs(loss.item() - ref_loss.item())
        abs_diff, rel = max(abs_diff, diff), max(rel, diff / abs(ref_loss.item()))
        print(f"  step {step + 1}/{job.steps}: loss {loss.item():.6f}  (one device "
              f"{ref_loss.item():.6f})", flush=True)
    state = pm.full_state_dict()  # collective
    if reference is None:
        return 0.0
    weight_diff = weight_scale = 0.0  # one scale for all weights, as partitioner.check does
    for name, expected in reference.state_dict().items():
        diff = (state[name].to(expected.device).double() - expected.double()).abs().max().item()
        weight_diff = max(weight_diff, diff)
        weight_scale = max(weight_scale, expected.abs().max().item())
    abs_diff, rel = max(abs_diff, weight_diff), max(rel, weight_diff / (weight_scale + 1e-30))
    ok = rel <= _tolerance(dtype)
    print(f"max |parallel - single device| over {job.steps} steps: {abs_diff:.1e} "
          f"({'match' if ok else 'MISMATCH'}: losses, and weights after AdamW, within "
          f"{_tolerance(dtype):.0e} of their scale in {job.dtype})", flush=True)
    return rel


_COORDINATE_GETTERS = {
    "tp": "tensor_model_parallel", "pp": "pipeline_model_parallel", "cp": "context_parallel",
    "dp": "data_parallel", "ep": "expert_model_parallel", "etp": "expert_tensor_parallel",
    "edp": "expert_data_parallel",
}


def coordinates() -> str:
    """This rank's place, read through Megatron's getter names."""
    from partitioner import parallel_state

    experts = parallel_state.get_expert_model_parallel_world_size() > 1
    parts = []
    for dim, name in _COORDINATE_GETTERS.items():
        size = getattr(parallel_state, f"get_{name}_world_size")()
        if dim in ("tp", "pp", "cp", "dp") or experts:
            parts.append(f"{dim} {getattr(parallel_state, f'get_{name}_rank')()}/{size}")
    vpp = parallel_state.get_virtual_pipeline_model_parallel_world_size()
    return "  ".join(parts + ([f"vpp {vpp}"] if vpp else []))


def _getters_match_layout(pm) -> bool:
    """The getters' live groups hold exactly the ranks the layout (RankLayout) says."""
    import torch.distributed as dist

    from partitioner import parallel_state
    from core.layout import RankLayout

    rank = dist.get_rank()
    layouts = (RankLayout.dense(pm.plan), RankLayout.expert(pm.plan))
    for layout in layouts:
        for dim, _ in layout.sizes:
            name = _COORDINATE_GETTERS[dim]
            group = getattr(parallel_state, f"get_{name}_group")()
            expected = layout.group_ranks(dim, rank)
            if (dist.get_process_group_ranks(group) != expected or
                    getattr(parallel_state, f"get_{name}_rank")() != expected.index(rank)):
                print(f"rank {rank}: parallel_state's {dim} group differs from the layout's "
                      f"{expected}", file=sys.stderr, flush=True)
                return False
    return True


# --- what to say about a rank's share (Example.details) ----------------------------------------

def shard(pm, model, job: Job) -> str:
    """The first parameter this rank holds only a piece of (inside a block if any), against
    its full shape."""
    named = sorted(pm.named_parameters(), key=lambda item: not item[0].startswith("blocks."))
    for name, local in named:
        full = tuple(model.get_parameter(name).shape)
        if tuple(local.shape) != full:
            return f"{name}: local {tuple(local.shape)} of {full}"
    return "every parameter this rank holds is whole"


def stages(pm, model, job: Job) -> str:
    """The pipeline (virtual) stages and the blocks this rank holds."""
    blocks = sorted({int(m.group(1)) for name, _ in pm.named_parameters()
                     if (m := re.match(r"blocks\.(\d+)\.", name))})
    program = pm.program
    held = [stage.index for stage in program.stages] if program.pipeline else [0]
    return f"stages {held} of {pm.plan.stages}: blocks {_ranges(blocks)}"


def batch_slice(pm, model, job: Job) -> str:
    """The samples of each global batch this rank's data-parallel replica trains on."""
    from partitioner import parallel_state

    size, index = (parallel_state.get_data_parallel_world_size(),
                   parallel_state.get_data_parallel_rank())
    per = job.batch // size
    return f"samples {index * per}..{(index + 1) * per - 1} of each global batch of {job.batch}"


def sequence_slice(pm, model, job: Job) -> str:
    """The tokens this rank keeps between tensor-parallel regions (sequence parallelism)."""
    from partitioner import parallel_state

    tp, index = (parallel_state.get_tensor_model_parallel_world_size(),
                 parallel_state.get_tensor_model_parallel_rank())
    seq, hidden, per = job.numbers.seq, model.config.n_embd, job.numbers.seq // tp
    return (f"between TP regions: tokens {index * per}..{(index + 1) * per - 1} of {seq} "
            f"(activations (B, {per}, {hidden}) instead of (B, {seq}, {hidden}))")


def sequence_chunks(pm, model, job: Job) -> str:
    """The tokens this rank holds under context parallelism (the pass's layout) and how it
    sees the others."""
    from core.meta import CP_RECORD

    record = pm.program.stages[-1].gm.meta.get(CP_RECORD)
    if record is None or record.layout is None:
        return "the whole sequence (no context parallelism for this shape)"
    layout = record.layout
    spans = " and ".join(f"{c * layout.chunk}..{(c + 1) * layout.chunk - 1}"
                         for c in layout.chunk_ids(record.rank))
    pads = int((layout.positions(record.rank) >= record.length).sum())
    padded = f", {pads} of them padding" if pads else ""
    seen = ("k/v blocks passed around the ring" if record.algo == "ring" else
            "all-to-all to head shards over the whole sequence")
    return f"context: tokens {spans} of {layout.length}{padded}; attention: {seen}"


def local_experts(pm, model, job: Job) -> str:
    """The experts this rank's expert-parallel index holds (Megatron's contiguous split)."""
    from partitioner import parallel_state

    ep, index = (parallel_state.get_expert_model_parallel_world_size(),
                 parallel_state.get_expert_model_parallel_rank())
    per = model.config.n_experts // ep
    return f"local experts {index * per}..{(index + 1) * per - 1} of {model.config.n_experts}"


def _ranges(values: list[int]) -> str:
    out, start = [], None
    for i, v in enumerate(values):
        start = v if start is None else start
        if i + 1 == len(values) or values[i + 1] != v + 1:
            out.append(str(start) if start == v else f"{start}-{v}")
            start = None
    return ", ".join(out) or "none"
