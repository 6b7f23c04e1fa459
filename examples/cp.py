"""Context parallelism, the guide's CP job: TP=8 x CP=4 on an 8K sequence, padded to split.

Each of the cp ranks holds 2 of the 2*cp sequence chunks (i and 2*cp-1-i, so causal attention
work balances) and ring attention passes k/v blocks around. A sequence that does not split is
padded at the end (exact for causal attention); `--plan cp_pad=off` refuses instead.

    python examples/cp.py                                   # 2 CPU ranks: cp=2
    torchrun --nproc-per-node 32 examples/cp.py --seq-length 8190
"""

import sys

import _common

EXAMPLE = _common.Example(
    name="cp", strategy="context parallelism",
    guide="CP job (TP=8, CP=4, an 8K sequence with padding, 32 GPUs)",
    degrees={"tp": 8, "cp": 4}, floors={"cp": 2},
    model={"n_layer": 2, "n_embd": 64, "n_head": 8, "norm": "rmsnorm", "position": "rope",
           "swiglu": True, "bias": False, "tie_embeddings": False},
    details=(_common.sequence_chunks, _common.shard),
    seq=62)  # 62 = 64 - 2: ring chunks need a multiple of 2*cp, so padding shows

if __name__ == "__main__":
    sys.exit(_common.main(EXAMPLE))
