"""parallelize() time against torch.export alone, for a 32-layer model (issue 2).

Capture (torch.export, non-strict) is the floor: everything parallelize adds on top of it —
plan resolution, graph copy, passes, lowering, process groups, materializing local tensors —
should stay under 2x of it. Runs on 2 gloo CPU ranks; prints and saves JSON.

Also the compile time of the same 32-layer model under `compile=on` (issue 17): inductor
compiles each rank's forward at the first step and its backward at the first backward; the
time is what the executor's compile records report (`explain()`), once (the inductor cache is
emptied first, so it is a cold compile).

    python benchmarks/parallelize_overhead.py [--layers 32] [--repeats 3] [--out F]
        [--compile-width 256] [--no-compile]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time


def _measure(layers: int, repeats: int, plan: str):
    import torch
    import torch.distributed as dist

    from partitioner import parallelize
    from partitioner.check import lm_loss
    from partitioner.models import GPTConfig, build

    config = GPTConfig(n_layer=layers, n_embd=256, n_head=8, vocab_size=1024, seq_len=128)
    model, (ids,) = build(config, batch=4, seq=128)
    export_s, parallelize_s = [], []
    for _ in range(repeats):
        dist.barrier()
        start = time.perf_counter()
        torch.export.export(model, (ids[:2],), strict=False)  # the dp=2 microbatch shape
        export_s.append(time.perf_counter() - start)
        dist.barrier()
        start = time.perf_counter()
        parallelize(model, plan, example_inputs=(ids,), loss_fn=lm_loss)
        parallelize_s.append(time.perf_counter() - start)
    return {"export_s": export_s, "parallelize_s": parallelize_s}


def _measure_compile(layers: int, width: int, plan: str):
    """compile=on: seconds to compile this rank's graphs at the first step (cold cache)."""
    import torch.distributed as dist

    from partitioner import parallelize
    from partitioner.check import lm_loss
    from partitioner.models import GPTConfig, build

    config = GPTConfig(n_layer=layers, n_embd=width, n_head=8, vocab_size=1024, seq_len=128)
    model, (ids,) = build(config, batch=4, seq=128)
    pm = parallelize(model, plan + ",compile=on", example_inputs=(ids,), loss_fn=lm_loss)
    dist.barrier()
    start = time.perf_counter()
    pm.step(ids, target=ids.roll(-1, 1))
    first_step_s = time.perf_counter() - start
    start = time.perf_counter()
    pm.step(ids, target=ids.roll(-1, 1))
    records = pm.executor.compiled.records()
    return {"first_step_s": first_step_s, "next_step_s": time.perf_counter() - start,
            "compile_s": sum(r.compile_s for r in records),
            "graphs": [r.summary() for r in records]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--plan", default="dp=2")
    parser.add_argument("--compile-width", type=int, default=256,
                        help="hidden size of the compile=on model (its layers: --layers)")
    parser.add_argument("--no-compile", action="store_true", help="skip the compile=on part")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results",
                                                      "parallelize_overhead.json"))
    args = parser.parse_args()
    from runtime import spawn

    per_rank = spawn(2, _measure, args.layers, args.repeats, args.plan)
    export = statistics.median(t for r in per_rank for t in r["export_s"])
    ours = statistics.median(t for r in per_rank for t in r["parallelize_s"])
    result = {"layers": args.layers, "plan": args.plan, "ranks": 2,
              "torch_export_median_s": round(export, 3), "parallelize_median_s": round(ours, 3),
              "ratio": round(ours / export, 3), "goal_ratio_below": 2.0, "raw": per_rank}
    print(f"{args.layers}-layer GPT, plan {args.plan}, 2 gloo ranks: torch.export "
          f"{export:.2f}s, parallelize {ours:.2f}s -> {ours / export:.2f}x (goal < 2x)")
    if not args.no_compile:
        import shutil
        import tempfile

        cache = tempfile.mkdtemp(prefix="inductor_cold_")
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache  # spawned ranks inherit it: a cold cache
        try:
            compiled = spawn(2, _measure_compile, args.layers, args.compile_width, args.plan,
                             timeout=1800)
        finally:
            shutil.rmtree(cache, ignore_errors=True)
        compile_s = max(r["compile_s"] for r in compiled)
        result["compile"] = {"layers": args.layers, "hidden": args.compile_width,
                             "plan": args.plan + ",compile=on",
                             "compile_s_slowest_rank": round(compile_s, 2),
                             "first_step_s": round(max(r["first_step_s"] for r in compiled), 2),
                             "next_step_s": round(max(r["next_step_s"] for r in compiled), 3),
                             "raw": compiled}
        print(f"{args.layers}-layer GPT (hidden {args.compile_width}), plan {args.plan},"
              f"compile=on: inductor compile {compile_s:.1f}s (cold cache, slowest rank; "
              f"first step {result['compile']['first_step_s']:.1f}s, next "
              f"{result['compile']['next_step_s']:.2f}s)")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
