"""`partitioner` command line: dump, plan, check, demo (see DESIGN.md, "CLI")."""

from __future__ import annotations

import argparse
import logging
import os
import sys

MODEL_HELP = ("pkg.module:factory (returns model, example inputs), a Hugging Face config.json, "
              "a preset (gpt3-175b, llama3-8b, llama3-70b, llama3-405b, mixtral-8x7b, "
              "deepseek-v3) or gpt:layers=..,hidden=..,heads=..[,seq=,vocab=,ffn=,kv_heads=,"
              "experts=,topk=,swiglu=on]")


class CliError(Exception):
    """Printed as one line; exit status 2."""


def resolve_model(spec: str, *, batch: int, seq: int | None = None, device: str = "meta"):
    """MODEL -> (model, example_inputs) with `batch` sequences (meta device by default)."""
    import torch

    from partitioner import models

    if spec.endswith(".json") or os.path.isfile(spec):
        return _hf_from_config(spec, batch=batch, seq=seq, device=device)
    if ":" in spec and not spec.startswith("gpt:"):
        from partitioner.check import load_factory

        try:
            factory = load_factory(spec)
        except (ImportError, AttributeError) as error:
            raise CliError(f"cannot load model factory {spec!r}: {error}") from None
        with torch.device(device):
            model, inputs = factory()
        return model, _rebatch(tuple(inputs), batch, device)
    config = models.resolve_config(spec)
    return models.build(config, batch=batch, seq=seq, device=device)


def _rebatch(inputs: tuple, batch: int, device: str) -> tuple:
    """The factory's example inputs with `batch` rows (repeated or cut along dim 0)."""
    import torch

    out = []
    for x in inputs:
        if isinstance(x, torch.Tensor) and x.dim() > 0:
            reps = -(-batch // x.shape[0])
            x = x.repeat(reps, *([1] * (x.dim() - 1)))[:batch]
            x = x.to(device)
        out.append(x)
    return tuple(out)


def _hf_from_config(path: str, *, batch: int, seq: int | None, device: str):
    import torch

    try:
        from transformers import AutoConfig, AutoModelForCausalLM
    except ImportError:
        raise CliError("a config.json MODEL needs the transformers package") from None
    if not os.path.isfile(path):
        raise CliError(f"no such file: {path}")
    config = AutoConfig.from_pretrained(path)
    config.use_cache = False
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config)
    seq = seq or min(getattr(config, "max_position_embeddings", 128), 128)
    ids = torch.zeros(batch, seq, dtype=torch.long, device=device)
    return model, (ids,)


def _world_size(plan, given: int | None) -> int:
    """--world-size, or the plan's product with dp=1 when the plan leaves dp unset."""
    return given or plan.model_parallel * (plan.dp or 1)


# --- dump ----------------------------------------------------------------------------------

def cmd_dump(args) -> int:
    from core.plan import Plan
    from partitioner.compiler import rank_programs
    from partitioner.report.graph import passes_text, to_dot, to_json, to_text

    plan = Plan.parse(args.plan)
    world = _world_size(plan, args.world_size)
    plan = plan.resolve(world)
    model, inputs = resolve_model(args.model, batch=plan.degree("dp") * plan.microbatches,
                                  seq=args.seq)
    if args.rank == "all":
        ranks = list(range(world))
    else:
        try:
            ranks = [int(args.rank)]
        except ValueError:
            raise CliError(f"--rank {args.rank!r} must be an integer or 'all'") from None
        if not 0 <= ranks[0] < world:
            raise CliError(f"--rank {ranks[0]} is outside a world of {world} ranks")
    programs = rank_programs(model, plan, inputs, ranks=ranks)
    render = passes_text if args.passes else {"text": to_text, "json": to_json,
                                              "dot": to_dot}[args.format]
    text = render(plan, world, programs)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    else:
        sys.stdout.write(text if text.endswith("\n") else text + "\n")
    return 0


# --- check ---------------------------------------------------------------------------------

def _check_worker(model, plan: str, dtype_name: str, steps: int):
    import torch

    from partitioner.check import check_rank

    return check_rank(_ModelFactory(model), plan, dtype=getattr(torch, dtype_name), steps=steps)


class _ModelFactory:
    """Picklable factory for `check`: MODEL (a spec, or a shrunk config) on CPU, a small batch."""

    def __init__(self, model, batch: int = 4, seq: int | None = None) -> None:
        self.model, self.batch, self.seq = model, batch, seq

    def __call__(self):
        from partitioner import models

        if isinstance(self.model, models.GPTConfig):
            return models.build(self.model, batch=self.batch, seq=self.seq, device="cpu")
        return resolve_model(self.model, batch=self.batch, seq=self.seq, device="cpu")


def _checked_model(spec: str, plan):
    """MODEL for `check`: a preset or `gpt:` shape too large for CPU ranks is shrunk, with the
    same structure and divisibility facts under the plan, and the shrink is said."""
    from partitioner import models
    from partitioner.shrink import needs_shrinking, parameters_text, shrink

    if os.path.isfile(spec) or (":" in spec and not spec.startswith("gpt:")):
        return spec
    config = models.resolve_config(spec)
    if not needs_shrinking(config):
        return spec
    small = shrink(config, plan)
    print(f"check: {spec} has {parameters_text(config.num_parameters())} parameters, too many "
          f"for CPU ranks; checking it shrunk to {parameters_text(small.config.num_parameters())}"
          f" with the same structure and the same divisibility by the plan ({small})")
    return small.config


def cmd_check(args) -> int:
    from core.plan import Plan
    from runtime import RankError, spawn

    plan = Plan.parse(args.plan)
    world = _world_size(plan, args.world_size)
    plan.resolve(world)  # reject a bad plan before starting ranks
    model = _checked_model(args.model, plan)
    try:
        reports = spawn(world, _check_worker, model, args.plan, args.dtype, args.steps)
    except RankError as error:
        raise CliError(error.summary()) from None
    for report in reports:
        print(report)
    failed = [r.rank for r in reports if not r.passed]
    print(f"{'FAIL' if failed else 'PASS'}: plan {args.plan} on {world} CPU ranks vs one device"
          + (f" (ranks {failed} outside tolerance)" if failed else ""))
    return 1 if failed else 0


# --- demo ----------------------------------------------------------------------------------

def cmd_demo(args) -> int:
    from partitioner.demo import run_demo
    from runtime import RankError

    try:
        return run_demo(world_size=args.world_size, plan=args.plan, steps=args.steps)
    except RankError as error:
        raise CliError(error.summary()) from None


# --- plan ----------------------------------------------------------------------------------

def _plan_module():
    try:
        from partitioner.report import plan_cli
    except ImportError:
        return None
    return plan_cli


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="partitioner", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    dump = sub.add_parser("dump", help="print every rank's partitioned graph (no GPUs needed)")
    dump.add_argument("model", help=MODEL_HELP)
    dump.add_argument("--plan", required=True, help='e.g. "tp=2,pp=2"')
    dump.add_argument("--world-size", type=int, default=None)
    dump.add_argument("--rank", default="0", help="a rank or 'all'")
    dump.add_argument("--format", choices=("text", "dot", "json"), default="text")
    dump.add_argument("--out", default=None)
    dump.add_argument("--seq", type=int, default=None, help="sequence length of the example")
    dump.add_argument("--passes", action="store_true",
                      help="print the ordered pass pipeline and what each pass recorded")
    dump.set_defaults(func=cmd_dump)

    plan = sub.add_parser("plan", help="pick a plan for a cluster with the cost model")
    plan_cli = _plan_module()
    if plan_cli is not None:
        plan_cli.add_arguments(plan)
        plan.set_defaults(func=plan_cli.run)
    else:
        plan.add_argument("rest", nargs=argparse.REMAINDER)
        plan.set_defaults(func=lambda a: _unavailable("plan", "issue 5"))

    check = sub.add_parser("check", help="run the plan on CPU ranks against one device")
    check.add_argument("model", help=MODEL_HELP)
    check.add_argument("--plan", required=True)
    check.add_argument("--world-size", type=int, default=None)
    check.add_argument("--dtype", choices=("float64", "float32"), default="float64")
    check.add_argument("--steps", type=int, default=2, help="AdamW steps compared")
    check.set_defaults(func=cmd_check)

    demo = sub.add_parser("demo", help="the embedded default: CPU ranks, tiny GPT")
    demo.add_argument("--world-size", type=int, default=4)
    demo.add_argument("--plan", default=None)
    demo.add_argument("--steps", type=int, default=5)
    demo.set_defaults(func=cmd_demo)
    return parser


def _unavailable(command: str, issue: str) -> int:
    raise CliError(f"'partitioner {command}' is not available yet ({issue})")


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    from partitioner.capture import CaptureError
    from core.plan import PlanError
    from passes import PassError

    try:
        return args.func(args)
    except (CliError, PlanError, PassError, CaptureError, NotImplementedError, ValueError,
            KeyError, FileNotFoundError) as error:
        # One line, except where the message lists what it found (every problem of a model).
        message = str(error).strip() or repr(error)
        print(f"partitioner {args.command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
