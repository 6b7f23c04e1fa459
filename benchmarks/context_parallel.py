"""Context parallelism at cp=2 against one rank and against torch's `context_parallel`.

The in-repo Llama-style model (`partitioner.models.tiny_llama`: RMSNorm, RoPE, SwiGLU, GQA; by
default 2 layers, hidden 256, 4 heads, 2 kv heads, vocab 512, batch 1) at sequence lengths 2K,
4K and 8K, on 2 gloo CPU ranks with 1 thread each. Runners, each a fwd+bwd step of the
token-weighted LM loss (sum of cross-entropies over the global token count):

- one rank: the plain model, no cp. It runs on both ranks at once (each its own full step, no
  communication), so each core sees the same neighbour load as under cp;
- ours ring / ours a2a: `parallelize(model, "cp=2,cp_algo=ring|a2a", loss_fn=lm_loss_sum)`;
- torch: `torch.distributed.tensor.experimental.context_parallel` with its head-tail
  (load-balanced) layout, made to run on CPU by a sharding handler for
  `aten._scaled_dot_product_flash_attention_for_cpu` (and its backward) that calls torch's own
  ring templates (`_templated_ring_attention[_backward]`, what its CUDA flash handler calls);
  the user side it needs (RoPE tables passed as sharded buffers, targets sharded, loss over the
  global count, one flat all-reduce of the gradients over cp) is written out below.

Per rank it reports the step time (median over interleaved repetitions of the slowest rank's
time, the runners alternating within each repetition, with a paired bootstrap interval on the
ratios), the bytes sent (see `_Sent`), the activation bytes saved for backward (as
benchmarks/activation_memory.py counts them, with those saved by the attention op apart), and
the per-rank attention work from `core.sequence_layout.SequenceLayout`, then the issue's
targets as PASS/MISS lines. Timings are never asserted. Saves JSON.

    python benchmarks/context_parallel.py [--seqs 2048,4096,8192] [--layers 2] [--hidden 256]
                                          [--reps 8] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

from round_robin import ratio_interval

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VARIANTS = ("one_rank", "ours_ring", "ours_a2a", "torch_cp")
CP = 2


# --- bytes sent ----------------------------------------------------------------------------

def _wchar() -> int:
    """Bytes this process (all threads, gloo's included) has handed to write-like syscalls."""
    with open("/proc/self/io") as f:
        for line in f:
            if line.startswith("wchar:"):
                return int(line.split()[1])
    raise RuntimeError("/proc/self/io has no wchar line")


class _Sent:
    """What a rank sends, counted two ways.

    `wire`: the growth of /proc/self/io `wchar` over the step, i.e. every byte the rank's
    threads wrote (gloo writes its TCP pairs with write/writev, which wchar counts; a step writes
    nothing else). That is what gloo sends, whoever called it: our runtime's `torch.distributed`
    calls and torch's functional collectives alike.
    `calls`: the payload each Python-level collective call hands to gloo, by kind, from
    wrappers around `torch.distributed.{isend,send,all_reduce,all_gather,all_gather_into_tensor,
    all_to_all,reduce_scatter_tensor}` (our runtime's ring sends, gradient and loss all-reduces)
    and around the `torch.ops._c10d_functional` ops (our graph's collectives, and torch's
    functional collectives under its context_parallel), converted to bytes this rank sends under
    gloo's algorithms (all-reduce: 2(n-1)/n of the buffer; all-gather: its input to each other
    rank; all-to-all: the input rows bound for other ranks; a send: all of it).
    """

    def __init__(self) -> None:
        self.by_kind: dict[str, int] = {}
        self.active = False
        self._patched: list[tuple[object, str, object]] = []

    def install(self) -> None:
        import torch
        import torch.distributed as dist
        from torch.distributed.distributed_c10d import _resolve_process_group

        n = dist.get_world_size()
        functional = torch.ops._c10d_functional

        def nbytes(t):
            return t.numel() * t.element_size()

        def to_others(t, out_splits, in_splits, group, *a, **k):
            """all_to_all_single: the input rows bound for the other ranks."""
            if not in_splits:
                return (n - 1) * nbytes(t) // n
            rank = dist.get_rank(_resolve_process_group(group))
            row = nbytes(t) // max(1, t.shape[0])
            return row * sum(size for r, size in enumerate(in_splits) if r != rank)

        rules = [  # (module, name, bytes this rank sends given the call's args)
            (dist, "isend", lambda t, *a, **k: nbytes(t)),
            (dist, "send", lambda t, *a, **k: nbytes(t)),
            (dist, "all_reduce", lambda t, *a, **k: 2 * (n - 1) * nbytes(t) // n),
            (dist, "all_gather", lambda outs, t, *a, **k: (n - 1) * nbytes(t)),
            (dist, "all_gather_into_tensor", lambda out, t, *a, **k: (n - 1) * nbytes(t)),
            (dist, "all_to_all", lambda outs, ins, *a, **k: sum(map(nbytes, ins)) * (n - 1) // n),
            (dist, "reduce_scatter_tensor", lambda out, t, *a, **k: (n - 1) * nbytes(t) // n),
            (functional, "all_reduce", lambda t, *a, **k: 2 * (n - 1) * nbytes(t) // n),
            (functional, "all_gather_into_tensor", lambda t, *a, **k: (n - 1) * nbytes(t)),
            (functional, "reduce_scatter_tensor", lambda t, *a, **k: (n - 1) * nbytes(t) // n),
            (functional, "all_to_all_single", to_others),
        ]
        for module, name, rule in rules:
            original = getattr(module, name)
            self._patched.append((module, name, original))
            kind = name if module is dist else f"functional.{name}"
            setattr(module, name, self._wrap(kind, original, rule))

    def _wrap(self, kind, original, rule):
        sent = self

        class Counted:
            """Counts calls; attributes (an op packet's `.default`) are the original's."""

            def __call__(self, *args, **kwargs):
                if sent.active:
                    sent.by_kind[kind] = sent.by_kind.get(kind, 0) + int(rule(*args, **kwargs))
                return original(*args, **kwargs)

            def __getattr__(self, name):
                return getattr(original, name)
        return Counted()


# --- activation memory -----------------------------------------------------------------------

def _attention_mode():
    """A torch-function mode that says when an attention op is running: the model's
    F.scaled_dot_product_attention (one rank; torch's context_parallel, whose wrapper calls it),
    our graph's aten SDPA node (a2a, between its all-to-alls) and our ring op. Autograd packs what
    an op saves while the op runs, so a pack hook that sees `inside` set is saving for it."""
    from torch.overrides import TorchFunctionMode

    class AttentionMode(TorchFunctionMode):
        inside = False

        def __torch_function__(self, func, types, args=(), kwargs=None):
            name = str(func)
            if "scaled_dot_product" not in name and "ring_attention" not in name:
                return func(*args, **(kwargs or {}))
            self.inside = True
            try:
                return func(*args, **(kwargs or {}))
            finally:
                self.inside = False
    return AttentionMode()


def _saved_bytes(step, params) -> tuple[dict[str, int], float]:
    """Bytes of the distinct storages autograd saves during `step()`, weights excluded (as
    benchmarks/activation_memory.py), and those of them saved by the attention op; and the
    step's loss."""
    import torch
    from torch.distributed.tensor import DTensor

    weights = {p.untyped_storage().data_ptr() for p in params}
    saved: dict[int, int] = {}
    attention: dict[int, int] = {}
    mode = _attention_mode()

    def pack(t):
        local = t._local_tensor if isinstance(t, DTensor) else t
        storage = local.untyped_storage()
        if storage.data_ptr() not in weights:
            saved[storage.data_ptr()] = storage.nbytes()
            if mode.inside:
                attention[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), mode:
        loss = float(step())
    return {"total": sum(saved.values()), "attention": sum(attention.values())}, loss


# --- the runners ----------------------------------------------------------------------------

def _model(args, seq):
    from partitioner.models import tiny_llama

    model, (ids,) = tiny_llama(batch=args.batch, seq=seq, n_layer=args.layers,
                               n_embd=args.hidden, n_head=args.heads, n_kv_head=args.kv_heads,
                               vocab_size=args.vocab, seq_len=seq)
    return model, ids, ids.roll(-1, 1)


class _Runner:
    """One variant at one sequence length: `step()` (fwd+bwd, returns the loss) and the
    parameters (excluded from saved activations)."""

    def __init__(self, step, params) -> None:
        self.step, self.params = step, params


def _one_rank(args, seq) -> _Runner:
    from partitioner.check import lm_loss_sum

    model, ids, target = _model(args, seq)

    def step():
        model.zero_grad(set_to_none=True)
        total, count = lm_loss_sum(model(ids), target)
        loss = total / count
        loss.backward()
        return loss.detach()
    return _Runner(step, list(model.parameters()))


def _ours(args, seq, algo: str) -> _Runner:
    from partitioner import parallelize
    from partitioner.check import lm_loss_sum

    model, ids, target = _model(args, seq)
    pm = parallelize(model, f"cp={CP},cp_algo={algo}", example_inputs=(ids,),
                     loss_fn=lm_loss_sum)
    params = list(pm.parameters())

    def step():
        for p in params:
            p.grad = None
        return pm.step(ids, target=target).detach()
    return _Runner(step, params)


def _register_cpu_flash_handler() -> None:
    """Let torch's context_parallel run on CPU: route the CPU flash kernel (forward and
    backward), which its dispatcher has no handler for, to torch's own ring templates, the same
    ones its CUDA flash handler calls. q, k, v, out and lse are all sharded on dim 2 (the
    sequence), as in its `_scaled_dot_product_flash_attention` CP strategy."""
    import torch
    from torch.distributed.tensor import DTensor, Shard
    from torch.distributed.tensor.experimental._context_parallel import _attention as cp

    aten = torch.ops.aten
    forward = aten._scaled_dot_product_flash_attention_for_cpu.default
    backward = aten._scaled_dot_product_flash_attention_for_cpu_backward.default
    seq_dim = 2

    def local(x):
        return x.to_local() if isinstance(x, DTensor) else x

    def handler(op_call, args, kwargs):
        mesh = next(a.device_mesh for a in args if isinstance(a, DTensor))
        args = [local(a) for a in args]
        kwargs = {k: local(v) for k, v in kwargs.items()}
        if kwargs.pop("attn_mask", None) is not None:
            raise NotImplementedError("CP on CPU: an explicit attn_mask is not supported")
        group = mesh.get_group()
        if op_call is forward:
            q, k, v, *rest = args
            dropout_p, is_causal = (rest + [0.0, False][len(rest):])[:2]
            results = cp._templated_ring_attention(
                group, seq_dim, forward, q, k, v, is_causal=is_causal, dropout_p=dropout_p,
                **kwargs)
        else:
            grad_out, q, k, v, out, lse, dropout_p, is_causal = args
            results = cp._templated_ring_attention_backward(
                group, seq_dim, backward, grad_out=grad_out, grad_out_name="grad_out",
                query=q, key=k, value=v, out=out, logsumexp=lse, is_causal=is_causal,
                dropout_p=dropout_p, **kwargs)
        return tuple(DTensor.from_local(t, mesh, [Shard(seq_dim)], run_check=False)
                     for t in results)

    # `custom_ops` is what context_parallel installs on entry and removes on exit.
    cp.custom_ops[forward] = handler
    cp.custom_ops[backward] = handler


def _torch_cp(args, seq) -> _Runner:
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.experimental import context_parallel
    from torch.distributed.tensor.experimental._context_parallel import _cp_options
    from torch.nn.functional import cross_entropy

    from partitioner.models import rope_tables

    model, ids, target = _model(args, seq)
    _register_cpu_flash_handler()
    _cp_options.enable_load_balance = True  # head-tail: rank i holds chunks i and 2cp-1-i
    mesh = init_device_mesh("cpu", (CP,), mesh_dim_names=("cp",))
    cos, sin = rope_tables(seq, model.config.head_dim)  # (S, hd/2) each
    count = target.numel()
    params = list(model.parameters())

    def forward(ids_, cos_, sin_):
        x = model.wte(ids_)  # (B, S/cp, h): GPT.forward with the rank's RoPE rows given
        for block in model.blocks:
            x = block(x, cos_, sin_)
        return model.lm_head(model.ln_f(x))

    def step():
        model.zero_grad(set_to_none=True)
        buffers = [ids.clone(), target.clone(), cos.clone(), sin.clone()]
        with context_parallel(mesh, buffers=buffers, buffer_seq_dims=[1, 1, 0, 0],
                              no_restore_buffers=set(buffers)):
            ids_, target_, cos_, sin_ = buffers
            logits = forward(ids_, cos_, sin_)
            loss = cross_entropy(logits.flatten(0, 1), target_.flatten(), reduction="sum") / count
            loss.backward()
        grads = [p.grad for p in params]
        flat = torch._utils._flatten_dense_tensors(grads)
        dist.all_reduce(flat)  # gradients summed over cp, one bucket
        for g, reduced in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads),
                              strict=True):
            g.copy_(reduced)
        loss = loss.detach()
        dist.all_reduce(loss)
        return loss
    return _Runner(step, params)


def _rank_main(args):
    import torch
    import torch.distributed as dist

    sent = _Sent()
    sent.install()
    out = {"threads": torch.get_num_threads(), "seqs": {}}
    for seq in args.seqs:
        runners = {"one_rank": _one_rank(args, seq), "ours_ring": _ours(args, seq, "ring"),
                   "ours_a2a": _ours(args, seq, "a2a"), "torch_cp": _torch_cp(args, seq)}
        row = {"loss": {}, "saved": {}, "calls": {}, "wire": {}}
        for name, runner in runners.items():  # one measured step each, also the warm-up
            dist.barrier()
            sent.by_kind, sent.active = {}, True
            start = _wchar()
            row["saved"][name], row["loss"][name] = _saved_bytes(runner.step, runner.params)
            row["wire"][name] = _wchar() - start
            sent.active = False
            row["calls"][name] = dict(sent.by_kind)
        row["times"] = _interleaved({n: r.step for n, r in runners.items()}, args.reps)
        out["seqs"][seq] = row
        del runners
    return out


def _interleaved(steps: dict, reps: int) -> dict[str, list[float]]:
    """Seconds of each step on this rank, every variant once per repetition between barriers
    (as benchmarks/round_robin.py), the order rotated each repetition so none always runs first
    after the previous one; the runners are warm (their measured step ran)."""
    import torch.distributed as dist

    names = list(steps)
    times = {n: [] for n in names}
    for rep in range(reps):
        for name in names[rep % len(names):] + names[:rep % len(names)]:
            dist.barrier()
            start = time.perf_counter()
            steps[name]()
            dist.barrier()
            times[name].append(time.perf_counter() - start)
    return times


# --- attention work from the layout ----------------------------------------------------------

def _attention_work(seq: int) -> dict[str, list[float]]:
    """Visible (query, key) pairs of a causal mask per rank, as a share of one rank's
    S(S+1)/2, for the load-balanced and contiguous layouts (what ring attention computes), and
    ours a2a's (every rank attends over the whole sequence with 1/cp of the heads)."""
    from core.sequence_layout import SequenceLayout

    total = seq * (seq + 1) // 2
    work = {}
    for name, balanced in (("balanced", True), ("contiguous", False)):
        layout = SequenceLayout(seq, CP, balanced)
        work[name] = [int((layout.positions(r) + 1).sum()) / total for r in range(CP)]
    work["a2a"] = [1 / CP] * CP
    return work


# --- statistics --------------------------------------------------------------------------------

def _slowest(per_rank, seq, name) -> list[float]:
    return [max(steps) for steps in zip(*(r["seqs"][seq]["times"][name] for r in per_rank),
                                        strict=True)]


def _mib(b) -> str:
    return f"{b / 2**20:.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seqs", default="2048,4096,8192",
                        help="comma-separated sequence lengths (multiples of 2*cp)")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=512)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--reps", type=int, default=8, help="timed repetitions (+1 warm-up)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: sequences 256,512, 1 layer, 3 repetitions")
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results",
                                                      "context_parallel.json"))
    args = parser.parse_args()
    if args.quick:
        args.seqs, args.layers, args.reps = "256,512", 1, 3
    args.seqs = [int(s) for s in args.seqs.split(",")]
    sys.path.insert(0, ROOT)
    from runtime import spawn

    started = time.perf_counter()
    per_rank = spawn(CP, _rank_main, args, timeout=3600, threads_per_rank=1)
    wall = time.perf_counter() - started
    threads = [r["threads"] for r in per_rank]

    print(f"tiny_llama {args.layers} layers, hidden {args.hidden}, {args.heads} heads "
          f"({args.kv_heads} kv), vocab {args.vocab}, batch {args.batch}, float32; "
          f"cp={CP} on {CP} gloo CPU ranks, torch.set_num_threads per rank = {threads} "
          f"(the one-rank baseline too, run on both ranks at once); fwd+bwd of a "
          f"token-weighted LM loss; {args.reps} interleaved repetitions (+1 warm-up), "
          f"slowest rank per repetition, median, 95% paired bootstrap on ratios")
    results = {"config": vars(args) | {"cp": CP, "threads_per_rank": threads,
                                       "wall_s": wall}, "seqs": {}}
    targets = []
    for seq in args.seqs:
        times = {n: _slowest(per_rank, seq, n) for n in VARIANTS}
        base = statistics.median(times["one_rank"])
        rows = per_rank[0]["seqs"][seq]
        saved = {n: max(r["seqs"][seq]["saved"][n]["total"] for r in per_rank) for n in VARIANTS}
        attn = {n: max(r["seqs"][seq]["saved"][n]["attention"] for r in per_rank)
                for n in VARIANTS}
        wire = {n: max(r["seqs"][seq]["wire"][n] for r in per_rank) for n in VARIANTS}
        calls = {n: max(sum(r["seqs"][seq]["calls"][n].values()) for r in per_rank)
                 for n in VARIANTS}
        print(f"\nsequence {seq}")
        print(f"{'variant':<10}{'loss':>12}{'|dloss|':>10}{'ms/step':>10}{'vs 1 rank [95%]':>22}"
              f"{'sent MiB':>10}{'(calls)':>9}{'saved MiB':>11}{'vs 1 rank':>10}"
              f"{'attn op MiB':>12}")
        entry = {"times_s": times, "loss": rows["loss"],
                 "sent_by_call": {n: rows["calls"][n] for n in VARIANTS},
                 "attention_work": _attention_work(seq), "variants": {}}
        for n in VARIANTS:
            med = statistics.median(times[n])
            ratio, lo, hi = ratio_interval(times[n], times["one_rank"])
            dloss = abs(rows["loss"][n] - rows["loss"]["one_rank"])
            print(f"{n:<10}{rows['loss'][n]:>12.7f}{dloss:>10.1e}{med * 1e3:>10.1f}"
                  f"{f'{ratio:.2f} [{lo:.2f},{hi:.2f}]':>22}{_mib(wire[n]):>10}"
                  f"{_mib(calls[n]):>9}{_mib(saved[n]):>11}{saved[n] / saved['one_rank']:>10.2f}"
                  f"{_mib(attn[n]):>12}")
            entry["variants"][n] = {
                "median_s": med, "ratio_to_one_rank": ratio, "ratio_ci95": [lo, hi],
                "loss": rows["loss"][n], "abs_loss_diff": dloss, "sent_bytes_wire": wire[n],
                "sent_bytes_calls": calls[n], "saved_bytes": saved[n],
                "saved_bytes_attention_op": attn[n],
                "saved_ratio_to_one_rank": saved[n] / saved["one_rank"]}
        for n in ("ours_ring", "ours_a2a", "torch_cp"):
            tol = 1e-5 * max(1.0, abs(rows["loss"]["one_rank"]))
            ok = abs(rows["loss"][n] - rows["loss"]["one_rank"]) <= tol
            print(f"  loss {n} == one rank (float32, tol {tol:.0e}): {'yes' if ok else 'NO'}")
            entry["variants"][n]["loss_matches"] = ok
        work = entry["attention_work"]
        print("  attention work per rank (visible causal query-key pairs / one rank's):"
              f" load-balanced {[round(w, 3) for w in work['balanced']]},"
              f" contiguous {[round(w, 3) for w in work['contiguous']]};"
              f" a2a (heads split) {[round(w, 3) for w in work['a2a']]}")
        for n in ("ours_ring", "ours_a2a", "torch_cp"):
            print(f"  sent by {n} (payload by call, MiB): "
                  + ", ".join(f"{k} {_mib(v)}" for k, v in sorted(rows["calls"][n].items())))
        for n in ("ours_ring", "ours_a2a"):
            ratio, lo, hi = ratio_interval(times[n], times["torch_cp"])
            print(f"  {n} vs torch_cp: {ratio:.2f}x [{lo:.2f},{hi:.2f}]")
            entry["variants"][n]["ratio_to_torch_cp"] = ratio
            entry["variants"][n]["ratio_to_torch_cp_ci95"] = [lo, hi]
        results["seqs"][str(seq)] = entry
        if seq == max(args.seqs):
            for n in ("ours_ring", "ours_a2a"):
                v = entry["variants"][n]
                targets += [
                    (f"seq {seq}: {n} step time <= 0.6x one rank", v["ratio_to_one_rank"] <= 0.6,
                     f"{v['ratio_to_one_rank']:.2f}x [{v['ratio_ci95'][0]:.2f},"
                     f"{v['ratio_ci95'][1]:.2f}]"),
                    (f"seq {seq}: {n} saved activations <= 0.6x one rank",
                     v["saved_ratio_to_one_rank"] <= 0.6, f"{v['saved_ratio_to_one_rank']:.2f}x"),
                    (f"seq {seq}: {n} faster than torch context_parallel",
                     v["ratio_to_torch_cp"] < 1.0,
                     f"{v['ratio_to_torch_cp']:.2f}x [{v['ratio_to_torch_cp_ci95'][0]:.2f},"
                     f"{v['ratio_to_torch_cp_ci95'][1]:.2f}]")]
    print(f"\ntargets (issue), at the longest sequence:")
    for what, ok, value in targets:
        print(f"  {'PASS' if ok else 'MISS'}  {what}: {value}")
    results["targets"] = [{"target": w, "pass": ok, "value": v} for w, ok, v in targets]
    results["raw"] = per_rank
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1)
    print(f"saved {args.out} ({wall:.0f}s)")


if __name__ == "__main__":
    main()
