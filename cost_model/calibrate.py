"""Measure this machine and write a hardware profile the cost model can load.

    python -m cost_model.calibrate --out cpu_profile.json [--ranks 2] [--quick]

Measures float32 matmuls over a range of shapes (fits peak, efficiency and the small-GEMM
half-point of hardware.Hardware), memcpy bandwidth, and gloo all-reduce / all-gather between
spawned processes on loopback (fits alpha and bus bandwidth). The profile is plain JSON of
Hardware fields: `get_hardware("cpu_profile.json")` or `--cluster-file` use it.
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


def fit_gemm(points: list) -> tuple[float, float, float]:
    """(peak, eff, half) so that flops/s ~= peak*eff*g(n)^3: peak*eff from the largest shape,
    half from the shape whose throughput is closest to half of it (g(n)^3 = 1/2)."""
    best = max(p["flops"] for p in points)
    half = 32.0
    errs = []
    nmax = max(q["m"] for q in points)
    for h in [2 ** (i / 4) for i in range(8, int(4 * math.log2(nmax)) + 1)]:
        err = 0.0
        for p in points:
            n = p["m"]
            pred = best / (max(q["m"] for q in points) / (max(q["m"] for q in points) + h)) ** 3
            pred *= (n / (n + h)) ** 3
            err += (pred / p["flops"] - 1) ** 2
        errs.append((err, h))
    half = min(errs)[1]
    nmax = max(q["m"] for q in points)
    peak_eff = best / (nmax / (nmax + half)) ** 3
    return peak_eff, 1.0, half


def measure_memcpy(nbytes: int = 64 * 2 ** 20) -> float:
    import torch

    src = torch.empty(nbytes // 4)
    dst = torch.empty_like(src)
    t = _bench(lambda: dst.copy_(src))
    return 2 * nbytes / t  # read + write


def _collective_worker(sizes) -> dict:
    """On one rank of runtime.spawn: seconds per all_reduce / all_gather of each size."""
    import torch
    import torch.distributed as dist

    world = dist.get_world_size()
    res = {}
    for kind in ("all_reduce", "all_gather"):
        for n in sizes:
            x = torch.ones(n // 4)
            outs = [torch.empty_like(x) for _ in range(world)]

            def op():
                if kind == "all_reduce":
                    dist.all_reduce(x)
                else:
                    dist.all_gather(outs, x)

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


def fit_alpha_beta(res: dict, world: int) -> tuple[float, float]:
    """(alpha per ring step, bus bandwidth) from all-reduce times, least squares on
    t = 2(n-1) alpha + S/B 2(n-1)/n."""
    xs, ys = [], []
    for key, t in res.items():
        kind, n = key.split(":")
        if kind != "all_reduce":
            continue
        xs.append(float(n) * 2 * (world - 1) / world)
        ys.append(t)
    steps = 2 * (world - 1)
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / max(
        1e-30, sum((x - mx) ** 2 for x in xs))
    intercept = my - slope * mx
    bw = 1.0 / slope if slope > 0 else 1e9
    return max(intercept / steps, 1e-6), bw


def calibrate(ranks: int = 2, quick: bool = False, threads: int | None = None) -> dict:
    from cost_model.hardware import GiB, local_cpu

    base = local_cpu()
    mm = measure_matmul((32, 64, 128, 256) if quick else (32, 64, 128, 256, 512, 1024), threads)
    peak, eff, half = fit_gemm(mm)
    mem_bw = measure_memcpy(16 << 20 if quick else 64 << 20)
    coll = measure_collectives(ranks, (4096, 65536, 1 << 20) if quick else
                               (4096, 65536, 1 << 20, 8 << 20))
    alpha, bus = fit_alpha_beta(coll, ranks)
    hw = {
        **base.to_dict(), "name": "cpu-calibrated", "peak_flops": peak, "gemm_eff": eff,
        "gemm_half": half, "hbm_bw": mem_bw, "mem_eff": 1.0, "intra_bw": bus, "intra_eff": 1.0,
        "inter_bw": bus, "inter_eff": 1.0, "intra_latency": alpha, "inter_latency": alpha,
        "gpus_per_node": max(ranks, os.cpu_count() or 1), "reserved_bytes": 0.25 * GiB,
    }
    return {"hardware": hw, "measurements": {"matmul": mm, "memcpy_bytes_per_s": mem_bw,
                                              "collectives_s": coll, "ranks": ranks}}


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
          f"alpha {hw['intra_latency'] * 1e6:.0f} us")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
