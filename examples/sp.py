"""Sequence parallelism, the guide's SP job: TP with the activations between tensor-parallel
regions split along the sequence (LayerNorm, dropout and residuals on 1/tp of the tokens).

    python examples/sp.py                                   # 2 CPU ranks, tp=2, sp=on
    torchrun --nproc-per-node 8 examples/sp.py
"""

import sys

import _common

EXAMPLE = _common.Example(
    name="sp", strategy="sequence parallelism",
    guide="SP job (TP=8 with a sequence-parallel MLP block, 8 GPUs)",
    degrees={"tp": 8}, floors={"tp": 2}, fields={"sp": "on"},
    model={"n_layer": 1, "n_embd": 64, "n_head": 8},
    details=(_common.sequence_slice, _common.shard))

if __name__ == "__main__":
    sys.exit(_common.main(EXAMPLE))
