"""Measure this machine and write a hardware profile the cost model can load.

    python -m cost_model.calibrate --out cpu_profile.json [--ranks 2] [--quick]

Measures float32 matmuls over a range of shapes (fits peak, efficiency and the small-GEMM
half-point of hardware.Hardware), memcpy bandwidth, and gloo all-reduce / all-gather /
reduce-scatter between spawned processes on loopback (fits alpha, bus bandwidth and all-gather's
share of it). The rates are one rank's with `threads` threads; the profile records how many such
ranks the machine's cores run at once (`cores`), so the cost model can share the cores when a job
runs more ranks than that. The profile is plain JSON of Hardware fields:
`get_hardware("cpu_profile.json")` or `--cluster-file` use it; `profile_from_measurements` refits
one from a profile's saved raw measurements without measuring again.
This is the only module of cost_model/ that runs anything.
"""

from __future__ import annotations

import argparse
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


def measure_matmul(sizes=(32, 64, 128, 256, 512, 1024), threads: int | None = None) -> list:
    import torch

    if threads:
        torch.set_num_threads(threads)
    out = []
    for n in sizes:
        a, b = torch.randn(n, n), torch.randn(n, n)
        t = _bench(lambda: torch.mm(a, b))
        out.append({"m": n, "n": n, "k": n, "seconds": t, "flops": 2 * n ** 3 / t})
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


def fit_gemm(points: list) -> GemmFit:
    """Fit t(n) = latency + 2 n^3 / (peak g(n)^3), g(n) = n / (n + half), to square matmul
    timings ({"m": n, "flops": 2 n^3 / t}).

    The curve describes how small shapes fall off from the fastest rate measured, which it
    passes through; the per-call latency is fitted with it, or the dispatch overhead of tiny
    calls would pass for a low efficiency of every small GEMM. Shapes larger than the fastest are
    left out: caches slow them, which the curve cannot describe (the roofline's memory term
    bounds them instead). Least squares on log time over a grid of half-points and latencies."""
    fastest = max(points, key=lambda p: p["flops"])
    n_fast = fastest["m"]
    t_fast = 2 * n_fast ** 3 / fastest["flops"]
    small = [(p["m"], 2 * p["m"] ** 3 / p["flops"]) for p in points if p["m"] <= n_fast]
    t_min = min(t for _, t in small)
    halves = [0.0] + [2 ** (i / 4) for i in range(0, int(4 * math.log2(n_fast)) + 1)]
    best = None
    for half in halves:
        for step in range(100):
            latency = t_min * step / 100
            peak = 2 * n_fast ** 3 / ((t_fast - latency) * (n_fast / (n_fast + half)) ** 3)
            err = sum(math.log((latency + 2 * n ** 3 / (peak * (n / (n + half)) ** 3)) / t) ** 2
                      for n, t in small)
            if best is None or err < best[0]:
                best = (err, GemmFit(peak, 1.0, half, latency))
    return best[1]


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
    """The Hardware fields fitted to `calibrate`'s raw measurements."""
    from cost_model.hardware import GiB, local_cpu

    ranks = measurements["ranks"]
    gemm = fit_gemm(measurements["matmul"])
    coll = measurements["collectives_s"]
    alpha, bus = fit_alpha_beta(coll, ranks)
    # a rank timed with k threads runs at that rate only with k cores of its own
    cores = max(1, measurements["cores"] // measurements["threads"])
    return {
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
    }


def calibrate(ranks: int = 2, quick: bool = False, threads: int | None = None) -> dict:
    import torch

    from cost_model.hardware import available_cores

    mm = measure_matmul((32, 64, 128, 256) if quick else (32, 64, 128, 256, 512, 1024), threads)
    mem_bw = measure_memcpy(16 << 20 if quick else 64 << 20)
    coll = measure_collectives(ranks, (4096, 65536, 1 << 20) if quick else
                               (4096, 65536, 1 << 20, 8 << 20))
    measurements = {"matmul": mm, "memcpy_bytes_per_s": mem_bw, "collectives_s": coll,
                    "ranks": ranks, "threads": torch.get_num_threads(),
                    "cores": available_cores()}
    return {"hardware": profile_from_measurements(measurements), "measurements": measurements}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="cpu_profile.json")
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv)
    prof = calibrate(args.ranks, args.quick, args.threads)
    Path(args.out).write_text(json.dumps(prof, indent=2))
    hw = prof["hardware"]
    print(f"wrote {args.out}: peak {hw['peak_flops'] / 1e9:.1f} GFLOP/s, half {hw['gemm_half']:.0f}"
          f", memcpy {hw['hbm_bw'] / 1e9:.1f} GB/s, gloo bus {hw['intra_bw'] / 1e9:.2f} GB/s, "
          f"alpha {hw['intra_latency'] * 1e6:.0f} us, all-gather at "
          f"{hw['all_gather_eff']:.2f} of all-reduce's bandwidth, {hw['cores']} ranks at once")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
