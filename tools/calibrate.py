"""Measure this machine and write a hardware profile the cost model can load.

    python tools/calibrate.py --out cpu_profile.json [--ranks 2] [--quick]

Measures float32 matmuls over a grid of shapes with operands cold in cache, as training's are
(fits peak, efficiency and the small-GEMM half-point of hardware.Hardware), causal attention
(its efficiency against that GEMM roofline), the per-element math of norms, GeLU and softmax, the
per-op overhead of a captured graph (a tiny transformer block, forward and backward), memcpy
bandwidth, and gloo all-reduce / all-gather / reduce-scatter between spawned processes on
loopback (fits alpha, bus bandwidth and all-gather's share of it). The rates are one rank's
with `threads` threads; the profile records how many such ranks the machine's cores run at once
(`cores`), so the cost model can share the cores when a job runs more ranks than that. The
profile is plain JSON of Hardware fields: `get_hardware("cpu_profile.json")` or `--cluster-file`
use it; `--reuse-collectives PROFILE` measures the single-core kernels again but keeps PROFILE's
collective timings (minutes of every core of a quiet machine).

This script measures; the fitting is cost_model/fit.py (pure: `profile_from_measurements`
refits a profile from its saved raw measurements without measuring again). It lives outside the
packages because it runs ranks through the runtime, which the cost model never imports.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import math
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: the repository root holds the packages
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cost_model.fit import OVERHEAD_BLOCK, profile_from_measurements  # noqa: E402
from cost_model.hardware import available_cores, read_json  # noqa: E402

log = logging.getLogger(__name__)


def _bench(fn, repeat: int = 5, min_time: float = 0.02) -> float:
    fn()
    best = float("inf")
    for _ in range(repeat):
        n, t0 = 0, time.perf_counter()
        while True:
            fn()
            n += 1
            dt = time.perf_counter() - t0
            if dt >= min_time:
                break
        best = min(best, dt / n)
    return best


MATMUL_DIMS = (64, 256, 1024)
COLD_BYTES = 64 * 2 ** 20
"""Operands a cold measurement cycles through: more than a core's caches hold, so every matmul
reads its operands from memory (or the shared last-level cache), as a training step's do: the
activation another op just wrote, a weight last read a whole layer ago, other ranks' data in
between."""


def measure_matmul(dims=MATMUL_DIMS, threads: int | None = None,
                   cold_bytes: int = COLD_BYTES) -> list:
    """Seconds of a float32 (m, k) @ (k, n) matmul for every (m, n, k) in dims^3, thin shapes
    included, each call on the next of enough operand pairs to fill `cold_bytes`. A matmul
    repeated on the same operands (cache-hot) runs ~10% faster on large shapes and up to a third
    faster on thin ones than a training step's GEMMs do."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    out = []
    for m, n, k in itertools.product(dims, repeat=3):
        count = max(2, math.ceil(cold_bytes / (4 * (m * k + k * n + m * n))))
        pairs = [(torch.randn(m, k), torch.randn(k, n)) for _ in range(count)]
        turn = iter(itertools.cycle(pairs))

        def matmul():
            a, b = next(turn)
            torch.mm(a, b)

        t = _bench(matmul)
        out.append({"m": m, "n": n, "k": k, "seconds": t, "flops": 2 * m * n * k / t})
    return out


ATTENTION_SHAPES = ((32, 128, 32), (8, 512, 64), (4, 1024, 128))
"""(batch x heads, sequence, head dim) of the causal attention timings."""


def measure_attention(shapes=ATTENTION_SHAPES) -> list:
    """Seconds of causal scaled-dot-product attention forward, and forward plus backward."""
    import torch
    import torch.nn.functional as F

    out = []
    for heads, seq, head_dim in shapes:
        q, k, v = (torch.randn(1, heads, seq, head_dim, requires_grad=True) for _ in range(3))
        grad = torch.randn(1, heads, seq, head_dim)

        def forward():
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)

        out.append({"heads": heads, "seq": seq, "head_dim": head_dim,
                    "forward_s": _bench(forward),
                    "forward_backward_s": _bench(lambda: forward().backward(grad))})
    return out


MATH_ELEMENTS = 1 << 19
"""Elements of the math timings (2 MiB of float32: an activation a step writes and soon reads)."""


def measure_math(elements: int = MATH_ELEMENTS, width: int = 256) -> list:
    """Seconds of the per-element-math kernels of a block over `elements` float32 elements in
    rows of `width`: GeLU, layer norm, log-softmax (the norms, activation and softmax/loss of
    layer_costs.py)."""
    import torch
    import torch.nn.functional as F

    x = torch.randn(elements // width, width)
    kernels = {"gelu": lambda: F.gelu(x), "layer_norm": lambda: F.layer_norm(x, (width,)),
               "log_softmax": lambda: torch.log_softmax(x, -1)}
    return [{"op": op, "elements": x.numel(), "seconds": _bench(fn)}
            for op, fn in kernels.items()]


def measure_op_overhead(repeat: int = 200) -> dict:
    """Seconds of forward, and of forward plus backward, of a tiny transformer block captured
    the way the partitioner captures models (torch.export to one aten graph), and the graph's op
    count: what one op of a captured graph costs however small its tensors."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    cfg = OVERHEAD_BLOCK
    h, heads = cfg["hidden"], cfg["heads"]

    class Block(nn.Module):  # partitioner.models.Block, written out: cost_model imports no model
        def __init__(self):
            super().__init__()
            self.ln_1, self.ln_2 = nn.LayerNorm(h), nn.LayerNorm(h)
            self.q, self.k, self.v, self.o = (nn.Linear(h, h) for _ in range(4))
            self.up, self.down = nn.Linear(h, 4 * h), nn.Linear(4 * h, h)

        def forward(self, x):
            B, S, _ = x.shape
            y = self.ln_1(x)
            q, k, v = (p(y).view(B, S, heads, h // heads).transpose(1, 2)  # (B, nh, S, hd)
                       for p in (self.q, self.k, self.v))
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            x = x + self.o(a.transpose(1, 2).reshape(B, S, h))  # (B, S, h)
            return x + self.down(F.gelu(self.up(self.ln_2(x))))

    x = torch.randn(cfg["batch"], cfg["seq"], h)
    gm = torch.export.export(Block(), (x,), strict=False).module()
    nodes = sum(1 for n in gm.graph.nodes if n.op == "call_function")
    grad = torch.ones(cfg["batch"], cfg["seq"], h)
    fwd = _bench(lambda: gm(x), repeat=repeat // 40 or 1)
    both = _bench(lambda: gm(x).backward(grad), repeat=repeat // 40 or 1)
    return {"nodes": nodes, "forward_s": fwd, "forward_backward_s": both, **cfg}


def measure_memcpy(nbytes: int = 64 * 2 ** 20) -> float:
    import torch

    src = torch.empty(nbytes // 4)
    dst = torch.empty_like(src)
    t = _bench(lambda: dst.copy_(src))
    return 2 * nbytes / t  # read + write


def _collective_worker(sizes) -> dict:
    """On one rank of runtime.spawn: seconds per collective of each size (bytes per rank's
    input), through the primitives the runtime calls."""
    import torch
    import torch.distributed as dist

    from runtime.collectives import all_gather_into, reduce_scatter_into

    world = dist.get_world_size()
    res = {}
    for kind in ("all_reduce", "all_gather", "reduce_scatter"):
        for n in sizes:
            x = torch.ones(max(world, n // 4 // world * world))  # reduce-scatter splits it evenly
            gathered = torch.empty(world * x.numel())
            chunk = torch.empty(x.numel() // world)

            def op():
                if kind == "all_reduce":
                    dist.all_reduce(x)
                elif kind == "all_gather":
                    all_gather_into(gathered, x, None)
                else:
                    reduce_scatter_into(chunk, x, None)

            # a fixed iteration count: every rank must issue the same collectives
            op()
            dist.barrier()
            iters = 20 if n <= 65536 else 5
            t0 = time.perf_counter()
            for _ in range(iters):
                op()
            res[f"{kind}:{n}"] = (time.perf_counter() - t0) / iters
    return res


def measure_collectives(world: int = 2, sizes=(4096, 65536, 1 << 20, 8 << 20)) -> dict:
    # The one measuring module that launches ranks: it uses the runtime's launcher.
    from runtime import spawn

    return spawn(world, _collective_worker, tuple(sizes), timeout=120, threads_per_rank=1)[0]


def calibrate(ranks: int = 2, quick: bool = False, threads: int | None = None,
              collectives: dict | None = None) -> dict:
    """Measure this machine; `collectives`: a profile's saved collective timings (and the ranks
    they ran on) to reuse instead of launching ranks again."""
    import torch

    mm = measure_matmul((64, 256) if quick else MATMUL_DIMS, threads)
    mem_bw = measure_memcpy(16 << 20 if quick else 64 << 20)
    attention = measure_attention(ATTENTION_SHAPES[:1] if quick else ATTENTION_SHAPES)
    elementwise = measure_math()
    overhead = measure_op_overhead()
    if collectives is None:
        collectives = {"collectives_s": measure_collectives(
            ranks, (4096, 65536, 1 << 20) if quick else (4096, 65536, 1 << 20, 8 << 20)),
            "ranks": ranks}
    measurements = {"matmul": mm, "memcpy_bytes_per_s": mem_bw, "attention": attention,
                    "math": elementwise, "op_overhead": overhead,
                    "collectives_s": collectives["collectives_s"], "ranks": collectives["ranks"],
                    "threads": torch.get_num_threads(), "cores": available_cores()}
    return {"hardware": profile_from_measurements(measurements), "measurements": measurements}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="cpu_profile.json")
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--reuse-collectives", metavar="PROFILE", default=None,
                    help="take the collective timings from PROFILE's saved measurements (they "
                         "need every core of a quiet machine); measure the rest")
    args = ap.parse_args(argv)
    collectives = None
    if args.reuse_collectives:
        saved = read_json(args.reuse_collectives, "hardware profile").get("measurements")
        if not saved or "collectives_s" not in saved:
            raise SystemExit(f"{args.reuse_collectives} has no saved collective timings")
        collectives = {"collectives_s": saved["collectives_s"], "ranks": saved["ranks"]}
    prof = calibrate(args.ranks, args.quick, args.threads, collectives)
    Path(args.out).write_text(json.dumps(prof, indent=2))
    hw = prof["hardware"]
    print(f"wrote {args.out}: peak {hw['peak_flops'] / 1e9:.1f} GFLOP/s, half {hw['gemm_half']:.0f}"
          f", memcpy {hw['hbm_bw'] / 1e9:.1f} GB/s, gloo bus {hw['intra_bw'] / 1e9:.2f} GB/s, "
          f"alpha {hw['intra_latency'] * 1e6:.0f} us, all-gather at "
          f"{hw['all_gather_eff']:.2f} of all-reduce's bandwidth, {hw['cores']} ranks at once; "
          f"attention at {hw['attention_eff']:.2f} of the GEMM roofline, math "
          f"{(hw['math_rate'] or 0) / 1e9:.2f} Gelem/s, op overhead "
          f"{hw['op_overhead'] * 1e6:.1f} + {hw['op_overhead_bwd'] * 1e6:.1f} us")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
