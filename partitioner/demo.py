"""`partitioner demo`: the embedded default job.

Spawns CPU ranks (gloo), parallelizes a small reference GPT with the richest plan available,
trains a few steps, and prints the plan, the per-rank graph summary and the equivalence with
single-device training.
"""

from __future__ import annotations

import copy
import time

import torch

def default_plan(world_size: int) -> str:
    """The richest plan the runtime runs on `world_size` ranks: tensor x sequence x pipeline
    parallel (x data parallel with ZeRO-1 when there are ranks to spare), 1F1B over two
    microbatches, selective recompute."""
    if world_size % 4 == 0:
        zero = ",zero=1" if world_size > 4 else ""
        return f"tp=2,sp=on,pp=2,mb=2,recompute=selective{zero}"
    if world_size % 2 == 0:
        return "tp=2,sp=on,mb=2"
    return f"dp={world_size},zero=1,mb=2"


def _demo_rank(plan: str, steps: int):
    import torch.distributed as dist

    from partitioner.api import parallelize
    from partitioner.check import check_rank, lm_loss
    from partitioner.models import tiny

    rank = dist.get_rank()
    torch.manual_seed(0)
    model, (ids,) = tiny(batch=8)
    target = torch.roll(ids, shifts=-1, dims=1)
    reference = copy.deepcopy(model)
    pm = parallelize(model, plan, example_inputs=(ids,), loss_fn=lm_loss)
    opt = torch.optim.AdamW(pm.parameters(), lr=3e-3)
    ref_opt = torch.optim.AdamW(reference.parameters(), lr=3e-3)
    losses = []
    start = time.perf_counter()
    for _ in range(steps):
        opt.zero_grad()
        ref_opt.zero_grad()
        loss = pm.step(ids, target=target)
        ref_loss = lm_loss(reference(ids), target)
        ref_loss.backward()
        pm.clip_grad_norm_(1.0)
        torch.nn.utils.clip_grad_norm_(reference.parameters(), 1.0)
        opt.step()
        ref_opt.step()
        losses.append((loss.item(), ref_loss.item()))
    elapsed = time.perf_counter() - start
    summary = pm.explain().splitlines()[:2]
    report = check_rank(tiny, plan, dtype=torch.float64, factory_kwargs={"batch": 8})
    return {"rank": rank, "coords": pm.mesh.coords(), "summary": summary, "losses": losses,
            "seconds": elapsed, "report": report}


def run_demo(world_size: int = 4, plan: str | None = None, steps: int = 5) -> int:
    from core.plan import Plan
    from runtime import spawn

    plan = plan or default_plan(world_size)
    resolved = Plan.parse(plan).resolve(world_size)
    print(f"partitioner demo: {world_size} CPU ranks (gloo), plan {resolved}")
    start = time.perf_counter()
    results = spawn(world_size, _demo_rank, plan, steps)
    print("\nper-rank graph summary:")
    for r in results:
        print(f"  {r['summary'][0]}\n    {r['summary'][1]}")
    print("\ntraining (loss on the parallel ranks | single device):")
    for step, (ours, ref) in enumerate(results[0]["losses"]):
        print(f"  step {step}: {ours:.6f} | {ref:.6f}  (diff {abs(ours - ref):.1e})")
    print("\nequivalence with one device (float64, outputs, loss, gradients, AdamW steps):")
    print(results[0]["report"])
    failed = [r["rank"] for r in results if not r["report"].passed]
    verdict = (f"FAIL: ranks {failed} are out of tolerance" if failed
               else "PASS: every rank matches the single-device model")
    print(f"\n{verdict} ({time.perf_counter() - start:.1f}s)")
    return 1 if failed else 0
