"""Data parallelism, the guide's DP job: TP=8 x PP=4 model replicas, DP=2 of them (64 GPUs).

Gradients are all-reduced over dp in buckets overlapped with backward; `--plan zero=1` shards
the optimizer state over dp (Megatron's distributed optimizer).

    python examples/dp.py                                   # 2 CPU ranks: dp=2
    python examples/dp.py --world-size 8                    # tp=2, pp=2, dp=2
"""

import sys

import _common

EXAMPLE = _common.Example(
    name="dp", strategy="data parallelism",
    guide="DP job (TP=8, PP=4, DP=2, 64 GPUs)",
    degrees={"tp": 8, "pp": 4, "dp": 2}, floors={"dp": 2},
    model={"n_layer": 4, "n_embd": 64, "n_head": 8},
    details=(_common.batch_slice,))

if __name__ == "__main__":
    sys.exit(_common.main(EXAMPLE))
