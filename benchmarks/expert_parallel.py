"""Expert parallelism at ep=2 against ep=1 (every expert replicated), for 8, 16 and 64 experts.

The in-repo MoE (`partitioner.models.tiny_moe`: Llama-style blocks whose MLPs are top-2 softmax
routed experts with stacked weights; by default 2 layers, hidden 128, expert inner size 128,
batch 4 of 128 tokens) on 2 gloo CPU ranks with 1 thread each, in one spawn:

- ep=1: `parallelize(model, "dp=2")`: each rank holds every expert and runs the model as written
  (dense-masked: every expert computes every token, the routing weights zero outside the top-k);
- ep=2: `parallelize(model, "ep=2")`, folded onto the same 2 data-parallel ranks: each rank holds
  half of the experts, and each (token, choice) pair is sent by all-to-all to the rank holding
  its expert, computed there by a grouped GEMM and sent back.

Per rank and configuration it reports the step time (fwd+bwd of the LM loss; median over
interleaved repetitions of the slowest rank's time), the all-to-all bytes the rank sends (the
rows bound for the other rank, dispatch and return, forward and backward, counted at the
functional all-to-all calls), the expert parameter bytes it holds, and the rows each of its
experts received in the last step. Prints the target (expert parameter memory at ep=2 is half
of ep=1's within 5%) as PASS/MISS; timings are never asserted. Saves JSON.

    python benchmarks/expert_parallel.py [--experts 8,16,64] [--layers 2] [--hidden 128]
                                         [--reps 5] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PLANS = {"ep1": "dp=2", "ep2": "ep=2"}


class _AllToAllBytes:
    """Bytes this rank hands to all-to-alls for the other ranks (the runtime's expert dispatch
    calls `torch.ops._c10d_functional.all_to_all_single` with uneven row splits)."""

    def __init__(self) -> None:
        import torch
        import torch.distributed as dist
        from torch.distributed.distributed_c10d import _resolve_process_group

        self.sent = 0
        namespace = torch.ops._c10d_functional
        original = namespace.all_to_all_single
        counter = self

        class Counted:
            def __call__(self, x, out_splits, in_splits, group, *args, **kwargs):
                rank = dist.get_rank(_resolve_process_group(group))
                row = x.element_size() * (x.numel() // max(1, x.shape[0]))
                counter.sent += row * sum(n for r, n in enumerate(in_splits) if r != rank)
                return original(x, out_splits, in_splits, group, *args, **kwargs)

            def __getattr__(self, name):
                return getattr(original, name)

        namespace.all_to_all_single = Counted()


def _run(args, experts_list):
    """On every rank: both plans for each expert count, interleaved repetitions."""
    import torch
    import torch.distributed as dist

    from partitioner import parallelize
    from partitioner.check import lm_loss
    from partitioner.models import tiny_moe

    torch.set_num_threads(1)
    counter = _AllToAllBytes()
    results = {}
    for experts in experts_list:
        torch.manual_seed(0)
        model, (ids,) = tiny_moe(batch=args.batch, seq=args.seq, n_layer=args.layers,
                                 n_embd=args.hidden, n_head=4, n_experts=experts,
                                 moe_ffn_hidden=args.expert_ffn, vocab_size=512,
                                 seq_len=args.seq)
        target = ids.roll(-1, 1)
        models = {name: parallelize(model, plan, example_inputs=(ids,), loss_fn=lm_loss)
                  for name, plan in PLANS.items()}
        times = {name: [] for name in models}
        sent = {}
        losses = {}
        for rep in range(args.reps + 1):  # the first repetition warms up
            for name, pm in models.items():
                dist.barrier()
                counter.sent = 0
                start = time.perf_counter()
                losses[name] = float(pm.step(ids, target=target))
                elapsed = torch.tensor(time.perf_counter() - start, dtype=torch.float64)
                dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
                sent[name] = counter.sent
                if rep:
                    times[name].append(float(elapsed))
                for p in pm.parameters():
                    p.grad = None
        expert_bytes = {name: sum(p.numel() * p.element_size()
                                  for n, p in pm.named_parameters() if ".w_in" in n
                                  or ".w_out" in n)
                        for name, pm in models.items()}
        results[experts] = {
            "times_s": times, "step_s": {n: statistics.median(t) for n, t in times.items()},
            "loss": losses, "all_to_all_bytes_sent": sent, "expert_param_bytes": expert_bytes,
            "rows_per_expert_last_step": models["ep2"].last_expert_rows}
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experts", default="8,16,64")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--expert-ffn", type=int, default=128)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="8 experts, 2 repetitions")
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results",
                                                      "expert_parallel.json"))
    args = parser.parse_args()
    if args.quick:
        args.experts, args.reps = "8", 2
    experts_list = [int(e) for e in args.experts.split(",")]
    sys.path.insert(0, ROOT)
    from runtime import spawn

    started = time.perf_counter()
    per_rank = spawn(2, _run, args, experts_list, timeout=3600)
    report = {"config": {**vars(args), "ranks": 2, "threads_per_rank": 1,
                         "wall_s": time.perf_counter() - started},
              "experts": {}, "targets": []}
    print(f"{'experts':>7} {'plan':<5} {'step s':>8} {'vs ep1':>7} {'a2a sent/rank':>14} "
          f"{'expert params/rank':>19}  rows per local expert, last step (rank 0 | rank 1)")
    for experts in experts_list:
        rows = [rank[experts] for rank in per_rank]
        entry = {"per_rank": rows}
        base = rows[0]["step_s"]["ep1"]
        for name in PLANS:
            step = rows[0]["step_s"][name]
            sent = max(r["all_to_all_bytes_sent"][name] for r in rows)
            params = max(r["expert_param_bytes"][name] for r in rows)
            balance = (" | ".join(str(r["rows_per_expert_last_step"]) for r in rows)
                       if name == "ep2" else "")
            print(f"{experts:>7} {name:<5} {step:>8.3f} {step / base:>6.2f}x "
                  f"{sent / 2**20:>11.2f} MiB {params / 2**20:>16.2f} MiB  {balance}")
        ratio = (max(r["expert_param_bytes"]["ep2"] for r in rows)
                 / max(r["expert_param_bytes"]["ep1"] for r in rows))
        target = {"target": f"{experts} experts: expert parameter memory per rank at ep=2 is "
                            f"1/2 of ep=1's within 5%",
                  "pass": abs(ratio - 0.5) <= 0.05 * 0.5, "value": f"{ratio:.3f}x"}
        report["targets"].append(target)
        entry["step_ratio_ep2_vs_ep1"] = rows[0]["step_s"]["ep2"] / base
        report["experts"][str(experts)] = entry
    for target in report["targets"]:
        print(f"{'PASS' if target['pass'] else 'MISS'}  {target['target']}: {target['value']}")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
