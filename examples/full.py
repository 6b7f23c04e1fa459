"""The guide's full training loop: TP, PP with virtual stages, CP, SP and DP at once.

Takes Megatron's own argument names, so a Megatron command line carries over:

    python examples/full.py                                 # 8 CPU ranks: tp=2, pp=2, cp=2
    python examples/full.py --context-parallel-size 1       # 8 ranks: tp=2, pp=2, dp=2
    torchrun --nproc-per-node 16 examples/full.py \\
        --tensor-model-parallel-size 2 --pipeline-model-parallel-size 2 \\
        --num-virtual-stages-per-pipeline-rank 2 --context-parallel-size 2 \\
        --sequence-parallel --num-layers 4 --hidden-size 64 --num-attention-heads 4 \\
        --seq-length 32 --micro-batch-size 1 --global-batch-size 8

microbatches = global batch / (micro batch x dp); the expert tensor-parallel size defaults to
the tensor-parallel size, as in Megatron.
"""

import argparse
import sys

import _common

MEGATRON_DEGREES = {
    "tp": "--tensor-model-parallel-size", "pp": "--pipeline-model-parallel-size",
    "cp": "--context-parallel-size", "ep": "--expert-model-parallel-size",
    "etp": "--expert-tensor-parallel-size",
}
GUIDE = {"tp": 2, "pp": 2, "cp": 2}
"""The guide's model-parallel degrees (its DP=2 comes from running 16 ranks)."""


def megatron_arguments(parser: argparse.ArgumentParser) -> None:
    for flag in MEGATRON_DEGREES.values():
        parser.add_argument(flag, type=int)
    vpp = parser.add_mutually_exclusive_group()
    vpp.add_argument("--virtual-pipeline-model-parallel-size",
                     "--num-virtual-stages-per-pipeline-rank", dest="vpp", type=int,
                     help="virtual stages per pipeline rank (default 2)")
    vpp.add_argument("--num-layers-per-virtual-pipeline-stage", type=int,
                     help="layers per virtual stage: vpp = num_layers / (pp x this)")
    parser.add_argument("--sequence-parallel", action=argparse.BooleanOptionalAction,
                        help="default on when tp > 1")


def pinned(args) -> dict[str, str]:
    """Plan items fixed by Megatron's flags (the scaling leaves them alone)."""
    items = {}
    for dim, flag in MEGATRON_DEGREES.items():
        value = getattr(args, flag[2:].replace("-", "_"))
        if value is not None:
            items[dim] = str(value)
    pp = int(items.get("pp", GUIDE["pp"]))
    per_stage = args.num_layers_per_virtual_pipeline_stage
    if per_stage:
        vpp, left = divmod(args.num_layers, pp * per_stage)
        if left or not vpp:
            raise _common.UsageError(
                f"full.py: --num-layers {args.num_layers} does not split into pp={pp} ranks of "
                f"virtual stages of {per_stage} layers; fix: --num-layers "
                f"{pp * per_stage * max(1, vpp)}")
        items["vpp"] = str(vpp)
    elif args.vpp is not None:
        items["vpp"] = str(args.vpp)
    elif pp == 1:
        items["vpp"] = "1"  # virtual stages need a pipeline (Megatron refuses vpp with pp=1)
    if args.sequence_parallel is not None:
        items["sp"] = "on" if args.sequence_parallel else "off"
    elif int(items.get("tp", GUIDE["tp"])) == 1:
        items["sp"] = "off"  # sequence parallelism needs tp > 1
    return items


EXAMPLE = _common.Example(
    name="full", strategy="4-D parallelism (tp, pp with vpp, cp, sp, dp)",
    guide="full training loop (TP=2, PP=2, VPP=2, CP=2, SP, DP=2, 16 GPUs)",
    degrees=GUIDE, floors=GUIDE, fields={"sp": "on", "vpp": "2"},
    model={"n_layer": 4, "n_embd": 64, "n_head": 4},
    details=(_common.stages, _common.sequence_chunks, _common.shard),
    flags={dim: f"{flag} {{}}" for dim, flag in MEGATRON_DEGREES.items()},
    extra_arguments=megatron_arguments, pinned_from=pinned)

if __name__ == "__main__":
    sys.exit(_common.main(EXAMPLE))
