"""The counter-based dropout (core/dropout.py) against torch's own dropout, its peer.

Times forward + backward of `x * dropout_mask(x)` (what the dropout pass puts in the graph)
and of `torch.nn.functional.dropout(x)` (the device RNG) on (batch, seq, hidden) activations,
plus our mask drawn for one tp=2 feature shard (each rank draws only its elements), on this
machine's CPU and, when there is one, its GPU (with the peak memory the call adds). Saves JSON.

    python benchmarks/dropout.py [--shapes 4x512x1024,8x1024x2048] [--repeat 5]
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _time(fn, device, repeat: int) -> float:
    import torch

    fn()  # warm-up
    samples = []
    for _ in range(repeat):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def _peak_added(fn, device) -> int | None:
    import torch

    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def _row(shape, device, repeat: int, p: float = 0.1) -> dict:
    import torch
    import torch.nn.functional as F

    importlib.import_module("runtime")  # registers what partitioner.dropout_mask does
    from core import ops
    from core.dropout import IndexSpec

    x = torch.randn(shape, device=device, requires_grad=True)
    grad = torch.ones_like(x)
    full = IndexSpec.of(shape, [list(range(n)) for n in shape]).flat()
    half = shape[-1] // 2
    shard = IndexSpec.of(shape, [list(range(n)) for n in shape[:-1]]
                         + [list(range(half, 2 * half))]).flat()
    x_shard = torch.randn(*shape[:-1], half, device=device)

    def ours():
        (x * ops.dropout_mask(x, p, 0, 1, 1, full)).backward(grad)

    def torchs():
        F.dropout(x, p, True).backward(grad)

    def ours_shard():
        ops.dropout_mask(x_shard, p, 0, 1, 1, shard)

    return {"shape": list(shape), "device": str(device), "elements": x.numel(),
            "ours_fwd_bwd_s": _time(ours, device, repeat),
            "torch_fwd_bwd_s": _time(torchs, device, repeat),
            "ours_mask_tp2_shard_s": _time(ours_shard, device, repeat),
            "ours_peak_added_bytes": _peak_added(ours, device),
            "torch_peak_added_bytes": _peak_added(torchs, device)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shapes", default="4x512x1024,8x1024x2048")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results",
                                                      "dropout.json"))
    args = parser.parse_args()
    sys.path.insert(0, ROOT)
    import torch

    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available()
                                       else [])
    shapes = [tuple(int(n) for n in text.split("x")) for text in args.shapes.split(",")]
    rows = [_row(shape, device, args.repeat) for device in devices for shape in shapes]
    print(f"{'device':<7}{'shape':<18}{'ours fwd+bwd ms':>17}{'torch fwd+bwd ms':>18}"
          f"{'ratio':>7}{'tp=2 shard mask ms':>20}{'ours peak MiB':>15}{'torch peak MiB':>16}")
    for row in rows:
        peak = [f"{row[k] / 2**20:.1f}" if row[k] is not None else "-"
                for k in ("ours_peak_added_bytes", "torch_peak_added_bytes")]
        print(f"{row['device']:<7}{'x'.join(map(str, row['shape'])):<18}"
              f"{row['ours_fwd_bwd_s'] * 1e3:>17.2f}{row['torch_fwd_bwd_s'] * 1e3:>18.2f}"
              f"{row['ours_fwd_bwd_s'] / row['torch_fwd_bwd_s']:>7.2f}"
              f"{row['ours_mask_tp2_shard_s'] * 1e3:>20.2f}{peak[0]:>15}{peak[1]:>16}")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"p": 0.1, "rows": rows}, f, indent=1)
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
