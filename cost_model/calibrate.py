"""Measure this machine and write a hardware profile the cost model can load.

    python -m cost_model.calibrate --out cpu_profile.json [--ranks 2] [--quick]

Measures float32 matmuls over a grid of shapes with operands cold in cache, as training's are
(fits peak, efficiency and the small-GEMM half-point of hardware.Hardware), causal attention
(its efficiency against that GEMM roofline), the per-element math of norms, GeLU and softmax, the
per-op overhead of a captured graph (a tiny transformer block, forward and backward), memcpy
bandwidth, and gloo all-reduce / all-gather / reduce-scatter between spawned processes on
loopback (fits alpha, bus bandwidth and all-gather's share of it). The rates are one rank's
with `threads` threads; the profile records how many such ranks the machine's cores run at once
(`cores`), so the cost model can share the cores when a job runs more ranks than that. The
profile is plain JSON of Hardware fields: `get_hardware("cpu_profile.json")` or `--cluster-file`
use it; `profile_from_measurements` refits one from a profile's saved raw measurements without
measuring again, and `--reuse-collectives PROFILE` measures the single-core kernels again but
keeps PROFILE's collective timings (minutes of every core of a quiet machine).
This is the only module of cost_model/ that runs anything.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import time
from pathlib import Path
from typing import NamedTuple

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
    import itertools

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


class GemmFit(NamedTuple):
    """The Hardware fields a matmul sweep determines."""

    peak_flops: float
    gemm_eff: float
    """1.0: with one machine measured, the peak is the rate large GEMMs reach."""
    gemm_half: float
    call_latency: float
    """Seconds one matmul call costs beyond its arithmetic (dispatch): the profile's
    kernel_latency, which the cost model charges every op."""


def _shape_eff(m, n, k, half: float) -> float:
    return (m / (m + half)) * (n / (n + half)) * (k / (k + half))


def fit_gemm(points: list) -> GemmFit:
    """Fit t = latency + 2 m n k / (peak g(m) g(n) g(k)), g(x) = x / (x + half), to matmul
    timings ({"m", "n", "k", "flops": 2 m n k / t}; square sweeps of older profiles too).

    The curve describes how small shapes fall off from the fastest rate measured, which it
    passes through; the per-call latency is fitted with it, or the dispatch overhead of tiny
    calls would pass for a low efficiency of every small GEMM. Shapes of more work than the
    fastest are left out: caches slow them, which the curve cannot describe (the roofline's
    memory term bounds them instead). Least squares on log time over a grid of half-points and
    latencies."""
    def work(p):
        return p["m"] * p["n"] * p["k"]

    def seconds(p):
        return 2 * work(p) / p["flops"]

    fastest = max(points, key=lambda p: p["flops"])
    shapes = [p for p in points if work(p) <= work(fastest)]
    t_min = min(seconds(p) for p in shapes)
    largest = max(fastest["m"], fastest["n"], fastest["k"])
    halves = [0.0] + [2 ** (i / 4) for i in range(0, int(4 * math.log2(largest)) + 1)]
    best = None
    for half in halves:
        for step in range(100):
            latency = t_min * step / 100
            peak = 2 * work(fastest) / ((seconds(fastest) - latency) *
                                        _shape_eff(fastest["m"], fastest["n"], fastest["k"], half))
            err = sum(math.log((latency + 2 * work(p) /
                                (peak * _shape_eff(p["m"], p["n"], p["k"], half))) / seconds(p))
                      ** 2 for p in shapes)
            if best is None or err < best[0]:
                best = (err, GemmFit(peak, 1.0, half, latency))
    return best[1]


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


def fit_attention_eff(points: list, hw) -> float:
    """attention_eff making the cost model's flash-attention forward + backward (3.5 forwards,
    layer_costs.py) match the timings: the geometric mean over the shapes of the time the model
    gives at efficiency 1 over the time measured. 1.0 when none were timed."""
    if not points:
        return 1.0
    ratios = []
    for p in points:
        flops = 4 * p["heads"] * p["seq"] * p["seq"] * p["head_dim"] / 2  # causal half
        at_one = dataclasses.replace(hw, attention_eff=1.0)
        compute = at_one.attention_time(flops, p["seq"], p["seq"], p["head_dim"]) - \
            hw.kernel_latency
        ratios.append(3.5 * compute / max(1e-12, p["forward_backward_s"] -
                                          3.5 * hw.kernel_latency))
    return math.exp(sum(math.log(r) for r in ratios) / len(ratios))


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


def fit_math_rate(points: list) -> float | None:
    """Elements per second of per-element math: the geometric mean of the kernels' rates (None
    when none were timed: memory bound)."""
    if not points:
        return None
    rates = [p["elements"] / p["seconds"] for p in points]
    return math.exp(sum(math.log(r) for r in rates) / len(rates))


OVERHEAD_BLOCK = dict(hidden=16, heads=2, seq=4, batch=1)
"""A block so small its arithmetic is negligible: its time is the per-op overhead."""


def tiny_block_shape():
    """The cost model's shape of `measure_op_overhead`'s block (partitioner.models' GPT block:
    layer norms, separate q/k/v projections, learned positions, GeLU MLP)."""
    from cost_model.shapes import TransformerShape

    cfg = OVERHEAD_BLOCK
    return TransformerShape(layers=1, hidden=cfg["hidden"], heads=cfg["heads"], vocab=16,
                            seq=cfg["seq"], fused_qkv=False)


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


def fit_op_overhead(measured: dict | None, hw) -> tuple[float, float]:
    """(forward, backward) seconds per graph op: what the tiny block's timings leave over the
    cost model's prediction for it without overhead, over the block's ops. (0, 0) when not
    timed."""
    if not measured:
        return 0.0, 0.0
    from cost_model.layer_costs import block_costs

    bare = dataclasses.replace(hw, op_overhead=0.0, op_overhead_bwd=0.0)
    costs = block_costs(tiny_block_shape(), bare)
    args = (1, 1, measured["batch"], 0, 1, 1)  # t, c, b, sp, e, et
    nodes = measured["nodes"]
    forward = max(0.0, measured["forward_s"] - costs.fwd(*args)) / nodes
    backward = max(0.0, measured["forward_backward_s"] - measured["forward_s"] -
                   costs.bwd(*args)) / nodes
    return forward, backward


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


def _line_fit(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """(intercept, slope) of the least-squares line through the points."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / max(
        1e-30, sum((x - mx) ** 2 for x in xs))
    return my - slope * mx, slope


def _timings(res: dict, kind: str) -> list[tuple[float, float]]:
    """(bytes per rank, seconds) of every measurement of `kind`."""
    out = []
    for key, t in res.items():
        measured, n = key.split(":")
        if measured == kind:
            out.append((float(n), t))
    return out


def fit_alpha_beta(res: dict, world: int) -> tuple[float, float]:
    """(alpha per ring step, bus bandwidth) from all-reduce times, least squares on
    t = 2(n-1) alpha + S/B 2(n-1)/n."""
    points = _timings(res, "all_reduce")
    intercept, slope = _line_fit([S * 2 * (world - 1) / world for S, _ in points],
                                 [t for _, t in points])
    steps = 2 * (world - 1)
    bw = 1.0 / slope if slope > 0 else 1e9
    return max(intercept / steps, 1e-6), bw


def fit_all_gather_eff(res: dict, world: int, bus_bw: float) -> float:
    """All-gather bus bandwidth over all-reduce's `bus_bw`: from all-gather times of S bytes per
    rank, least squares on t = (n-1) alpha + n S (n-1)/n / (eff B). 1.0 when none were timed."""
    points = _timings(res, "all_gather")
    if len(points) < 2:
        return 1.0
    _, slope = _line_fit([S * (world - 1) for S, _ in points], [t for _, t in points])
    return (1.0 / slope) / bus_bw if slope > 0 else 1.0


def profile_from_measurements(measurements: dict) -> dict:
    """The Hardware fields fitted to `calibrate`'s raw measurements (a profile measured before
    attention, math or op overhead were timed keeps their neutral defaults)."""
    from cost_model.hardware import GiB, Hardware, local_cpu

    ranks = measurements["ranks"]
    gemm = fit_gemm(measurements["matmul"])
    coll = measurements["collectives_s"]
    alpha, bus = fit_alpha_beta(coll, ranks)
    # a rank timed with k threads runs at that rate only with k cores of its own
    cores = max(1, measurements["cores"] // measurements["threads"])
    fields = {
        **local_cpu().to_dict(), "name": "cpu-calibrated", "peak_flops": gemm.peak_flops,
        "gemm_eff": gemm.gemm_eff, "gemm_half": gemm.gemm_half,
        "kernel_latency": gemm.call_latency, "hbm_bw": measurements["memcpy_bytes_per_s"],
        "mem_eff": 1.0,
        "intra_bw": bus, "intra_eff": 1.0, "inter_bw": bus, "inter_eff": 1.0,
        "intra_latency": alpha, "inter_latency": alpha,
        "gpus_per_node": max(ranks, os.cpu_count() or 1), "reserved_bytes": 0.25 * GiB,
        "cores": cores, "elem_bytes": 4,  # float32, what the matmuls above ran in
        "all_gather_eff": fit_all_gather_eff(coll, ranks, bus),
        # gloo (PyTorch #118911): reduce-scatter is an all-reduce keeping this rank's chunk
        "reduce_scatter_is_all_reduce": True,
        "math_rate": fit_math_rate(measurements.get("math", [])),
    }
    hw = Hardware.from_dict(fields)
    fields["attention_eff"] = fit_attention_eff(measurements.get("attention", []), hw)
    # the overhead is what the block's timings leave over every other fitted term
    hw = dataclasses.replace(hw, attention_eff=fields["attention_eff"])
    fields["op_overhead"], fields["op_overhead_bwd"] = fit_op_overhead(
        measurements.get("op_overhead"), hw)
    return fields


def calibrate(ranks: int = 2, quick: bool = False, threads: int | None = None,
              collectives: dict | None = None) -> dict:
    """Measure this machine; `collectives`: a profile's saved collective timings (and the ranks
    they ran on) to reuse instead of launching ranks again."""
    import torch

    from cost_model.hardware import available_cores

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
    from cost_model.hardware import read_json

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
