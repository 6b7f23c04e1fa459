"""Expert parallelism, the guide's EP job: 8 experts, top-2 routing, EP=8, expert TP=2.

The experts of each MoE layer are split over ep ranks (tokens travel by all-to-all); inside
an expert, etp ranks split its matrices like tensor parallelism.

    python examples/ep.py                                   # 2 CPU ranks: ep=2
    torchrun --nproc-per-node 16 examples/ep.py             # tp=2, ep=8, etp=2
"""

import sys

import _common

EXAMPLE = _common.Example(
    name="ep", strategy="expert parallelism",
    guide="EP job (8 experts, top-2, EP=8, expert TP=2, 16 GPUs)",
    degrees={"tp": 2, "ep": 8, "etp": 2}, floors={"ep": 2},
    model={"n_layer": 2, "n_embd": 64, "n_head": 8, "n_experts": 8, "topk": 2,
           "norm": "rmsnorm", "position": "rope", "swiglu": True, "bias": False,
           "tie_embeddings": False},
    details=(_common.local_experts, _common.shard))

if __name__ == "__main__":
    sys.exit(_common.main(EXAMPLE))
