"""Step time and memory per rank, fp32 against param_dtype=bf16, in one run.

For each plan (dp=2 with ZeRO-1, tp=2) and each precision, fresh gloo ranks (one spawn per
case, so the process peak belongs to that case) train a GPT for a few AdamW steps and report
per rank:

- `step_s`: the median wall time of `pm.step` + `opt.step()` (after warm-up steps);
- `state_bytes`: bytes of the distinct storages the run holds between steps: main weights,
  compute copies, gradients, ZeRO-1 buffers and shards, AdamW state (walked, exact), with the
  cost model's prediction for the same rank (`cost_model.memory.param_bytes`);
- `saved_activation_bytes`: distinct storages autograd saves during one step's forward (the
  weights and their compute copies excluded), as benchmarks/activation_memory.py counts them;
- `peak_bytes`: on CUDA `torch.cuda.max_memory_allocated`; on CPU the growth of the process's
  peak resident set (ru_maxrss) from before the model was built to after the steps, which
  includes allocator caching and torch's own buffers: an upper bound, coarse.

On a CPU without bf16 units (AVX512-BF16 / AMX) bf16 matmuls are emulated: on the machine the
saved results come from a (1024x256)@(256x1024) matmul takes 40 ms in fp32 and 1000 ms in bf16,
so the time columns say what such a machine does, not what a GPU does; the memory columns hold
on any device.

    python benchmarks/mixed_precision.py [--layers 2] [--hidden 256] [--seq 128] [--batch 8]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PLANS = ["dp=2,zero=1", "tp=2"]
PRECISIONS = {"fp32": "", "bf16": ",param_dtype=bf16"}


def _storages(tensors) -> int:
    seen: dict[int, int] = {}
    for tensor in tensors:
        if tensor is not None and tensor.device.type != "meta":
            storage = tensor.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def _held_tensors(pm, opt):
    state = pm.state
    yield from state.store.parameters()
    yield from (p.grad for p in state.store.parameters())
    yield from pm.parameters()
    yield from (p.grad for p in pm.parameters())
    if state.compute is not None:
        yield from state.compute.copies.values()
    if state.zero is not None:
        yield from state.zero.flat.values()
    for per_param in opt.state.values():
        yield from (v for v in per_param.values() if hasattr(v, "untyped_storage"))


def _peak_bytes() -> int:
    import resource

    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kB on Linux


def _run(args, plan: str):
    import torch

    from partitioner import parallelize
    from partitioner.check import lm_loss
    from partitioner.models import tiny

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    start_peak = _peak_bytes()
    torch.manual_seed(0)
    model, (ids,) = tiny(batch=args.batch, seq=args.seq, n_layer=args.layers,
                         n_embd=args.hidden, n_head=args.heads, vocab_size=args.vocab,
                         seq_len=args.seq)
    target = ids.roll(-1, 1)
    pm = parallelize(model, plan, (ids,), loss_fn=lm_loss)
    del model
    opt = torch.optim.AdamW(pm.parameters(), lr=1e-3)
    times, losses = [], []
    for step in range(args.warmup + args.steps):
        began = time.perf_counter()
        opt.zero_grad()
        losses.append(pm.step(ids, target=target).item())
        opt.step()
        if step >= args.warmup:
            times.append(time.perf_counter() - began)

    held = {id(t): t for t in _held_tensors(pm, opt) if t is not None}
    weights = {t.untyped_storage().data_ptr() for t in held.values()}
    saved: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        pm.step(ids, target=target)
    local_params = sum(p.numel() for p in pm.state.store.parameters())
    return {"step_s": statistics.median(times), "losses": losses,
            "state_bytes": _storages(held.values()), "local_params": local_params,
            "saved_activation_bytes": sum(saved.values()),
            "peak_bytes": _peak_bytes() - start_peak,
            "peak_measure": ("cuda max_memory_allocated" if torch.cuda.is_available()
                             else "ru_maxrss growth")}


def _predicted_state(plan: str, local_params: int, dp: int) -> float:
    """What the cost model's bytes per parameter say this rank holds between steps. ZeRO-1
    frees the full gradients once they are reduce-scattered: between steps only the shard's
    1/dp remain (the cost model counts the full ones, held during backward)."""
    from core.plan import Plan
    from cost_model.memory import param_bytes

    parsed = Plan.parse(plan)
    per = param_bytes(parsed.param_dtype or "fp32", parsed.zero)
    shards = dp if parsed.zero else 1
    return (per.weights + (per.grads + per.optimizer) / shards) * local_params


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results",
                                                      "mixed_precision.json"))
    args = parser.parse_args()
    sys.path.insert(0, ROOT)
    from runtime import spawn

    rows = []
    print(f"{'plan':<14}{'precision':<10}{'rank':>5}{'step ms':>10}{'state MiB':>11}"
          f"{'predicted':>11}{'saved act MiB':>15}{'peak MiB':>10}")
    for plan in PLANS:
        for precision, suffix in PRECISIONS.items():
            per_rank = spawn(2, _run, args, plan + suffix)
            for rank, result in enumerate(per_rank):
                dp = 2 if plan.startswith("dp=2") else 1
                result["predicted_state_bytes"] = _predicted_state(
                    plan + suffix, result["local_params"], dp)
                rows.append({"plan": plan, "precision": precision, "rank": rank, **result})
                mib = 2 ** 20
                print(f"{plan:<14}{precision:<10}{rank:>5}{result['step_s'] * 1e3:>10.1f}"
                      f"{result['state_bytes'] / mib:>11.2f}"
                      f"{result['predicted_state_bytes'] / mib:>11.2f}"
                      f"{result['saved_activation_bytes'] / mib:>15.2f}"
                      f"{result['peak_bytes'] / mib:>10.1f}")
    report = {"config": vars(args), "rows": rows,
              "notes": "state_bytes walked over distinct storages; peak_bytes is "
                       f"{rows[0]['peak_measure']} per rank process"}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as handle:
        json.dump(report, handle, indent=2)
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
