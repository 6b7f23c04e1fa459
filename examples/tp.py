"""Tensor parallelism, the guide's TP job: a GPT-2 block split over tp ranks (TP=8, 8 GPUs).

The guide rewrites the block with ColumnParallelLinear / RowParallelLinear; here the model is the
ordinary reference GPT and one `parallelize(model, "tp=N")` finds the column/row pairs.

    python examples/tp.py                                   # 2 CPU ranks, tp=2
    torchrun --nproc-per-node 8 examples/tp.py              # tp=8, as in the guide
"""

import sys

import _common

EXAMPLE = _common.Example(
    name="tp", strategy="tensor parallelism", guide="TP job (TP=8, a GPT-2 block, 8 GPUs)",
    degrees={"tp": 8}, floors={"tp": 2},
    model={"n_layer": 1, "n_embd": 64, "n_head": 8},  # GPT-2 style: LayerNorm, GeLU, biases
    details=(_common.shard,))

if __name__ == "__main__":
    sys.exit(_common.main(EXAMPLE))
