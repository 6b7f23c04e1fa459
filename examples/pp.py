"""Pipeline parallelism, the guide's PP job: TP=4 x PP=4 with virtual stages (interleaved 1F1B).

The guide builds each stage's layers by hand and wires send/recv; here `parallelize` cuts the
ordinary model into pp*vpp stages and runs the interleaved schedule.

    python examples/pp.py                                   # 2 CPU ranks: pp=2, vpp=2
    torchrun --nproc-per-node 16 examples/pp.py             # tp=4, pp=4, vpp=2
"""

import sys

import _common

EXAMPLE = _common.Example(
    name="pp", strategy="pipeline parallelism",
    guide="PP job (TP=4, PP=4, virtual stages, 16 GPUs)",
    degrees={"tp": 4, "pp": 4}, floors={"pp": 2}, fields={"vpp": "2"},
    model={"n_layer": 8, "n_embd": 32, "n_head": 4},
    details=(_common.stages,))

if __name__ == "__main__":
    sys.exit(_common.main(EXAMPLE))
