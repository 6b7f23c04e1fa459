"""Benchmark runtime.kernels against the torch path a user would otherwise run.

    python benchmarks/kernels.py [--out benchmarks/results/kernels.json] [--dtype bf16] [--quick]
    python benchmarks/kernels.py --interpret     # tiny shapes on CPU under TRITON_INTERPRET=1

Pairs (kernel vs baseline), in TFLOP/s for matmul-shaped work and GB/s for memory-bound work:
- flash_attention fwd and fwd+bwd vs F.scaled_dot_product_attention (flash backend when
  available), causal, GQA shapes included;
- grouped_gemm fwd vs a per-expert loop of matmuls (torch.split by the group sizes);
- rms_norm / layer_norm fwd and fwd+bwd vs the unfused reference and torch's F.rms_norm /
  F.layer_norm; swiglu vs F.silu(gate) * up; permute+unpermute vs the sort/index reference.
GB/s counts each tensor read or written once (the minimum traffic); with a known card the
table also shows the fraction of its peak memory bandwidth. Issue 6's goals: attention forward
>= 0.9x SDPA flash, grouped GEMM >= 1.5x the loop for 8+ experts, norms/swiglu >= 80% of peak.
Without CUDA (and without --interpret) it says so and exits 0. Nothing runs at import time.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

# peak HBM bandwidth in GB/s by device-name fragment, for the "% of peak" column
PEAK_GBS = {"H200": 4800.0, "H100": 3350.0, "A100": 2039.0}


def _max_err(ours, base) -> float:
    """Max abs difference of the forward outputs: a sanity check that the pair computes the same."""
    import torch

    with torch.no_grad():
        return float((ours().float() - base().float()).abs().max())


def _bench(fn, interpret: bool) -> float:
    """Median milliseconds per call."""
    if interpret:
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e3
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))


def _attention_cases(quick, interpret):
    if interpret:
        return [(1, 2, 1, 64, 32, True)]
    cases = [(4, 32, 32, 2048, 128, True), (4, 32, 8, 4096, 128, True), (8, 16, 16, 2048, 64, False),
             (2, 32, 8, 8192, 128, True)]
    return cases[:2] if quick else cases


def bench_attention(rows, dtype, device, quick, interpret):
    import torch
    import torch.nn.functional as F

    from runtime.kernels import flash_attention

    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # pragma: no cover - older torch
        sdpa_kernel = None
    for B, H, KH, S, D, causal in _attention_cases(quick, interpret):
        q = torch.randn(B, H, S, D, device=device, dtype=dtype, requires_grad=True)
        k = torch.randn(B, KH, S, D, device=device, dtype=dtype, requires_grad=True)
        v = torch.randn(B, KH, S, D, device=device, dtype=dtype, requires_grad=True)
        do = torch.randn_like(q)
        flops = 4 * B * H * S * S * D * (0.5 if causal else 1.0)

        def sdpa():
            kk = k if KH == H else k.repeat_interleave(H // KH, 1)
            vv = v if KH == H else v.repeat_interleave(H // KH, 1)
            if sdpa_kernel is not None and device == "cuda" and dtype != torch.float32:
                with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
                    return F.scaled_dot_product_attention(q, kk, vv, is_causal=causal)
            return F.scaled_dot_product_attention(q, kk, vv, is_causal=causal)

        ours = lambda: flash_attention(q, k, v, causal=causal)[0]  # noqa: E731
        shape = f"B{B} H{H}/{KH} S{S} D{D}{' causal' if causal else ''}"
        err = _max_err(ours, sdpa)
        for mode, mult in (("fwd", 1.0), ("fwd+bwd", 3.5)):  # bwd = 2.5x fwd matmul work
            def run(f, mode=mode):
                if mode == "fwd":
                    with torch.no_grad():
                        f()
                else:
                    torch.autograd.grad(f(), [q, k, v], do)
            t_ours = _bench(lambda: run(ours), interpret)
            t_base = _bench(lambda: run(sdpa), interpret)
            rows.append(dict(op="flash_attention", mode=mode, shape=shape, unit="TFLOP/s",
                             ours_ms=t_ours, base_ms=t_base, baseline="F.scaled_dot_product_attention",
                             ours=flops * mult / t_ours * 1e-9, base=flops * mult / t_base * 1e-9, max_err=err))


def bench_grouped_gemm(rows, dtype, device, quick, interpret):
    import torch

    from runtime.kernels import grouped_gemm

    cases = [(64, 8, 48, 40)] if interpret else [(16384, 8, 4096, 14336), (16384, 64, 2048, 1408),
                                                (32768, 16, 4096, 2048), (8192, 128, 7168, 2048)]
    if quick and not interpret:
        cases = cases[:2]
    for T, E, K, N in cases:
        g = torch.Generator().manual_seed(0)
        logits = torch.randn(E, generator=g)
        sizes = torch.distributions.Multinomial(T, logits=logits).sample().to(torch.int64)  # skewed
        x = torch.randn(T, K, device=device, dtype=dtype)
        w = torch.randn(E, K, N, device=device, dtype=dtype) / K**0.5
        gs = sizes.to(device)
        split = sizes.tolist()

        def loop():
            return torch.cat([xi @ w[i] for i, xi in enumerate(torch.split(x, split))])

        err = _max_err(lambda: grouped_gemm(x, w, gs), loop)
        with torch.no_grad():
            t_ours = _bench(lambda: grouped_gemm(x, w, gs), interpret)
            t_base = _bench(loop, interpret)
        flops = 2 * T * K * N
        rows.append(dict(op="grouped_gemm", mode="fwd", shape=f"T{T} E{E} K{K} N{N}", unit="TFLOP/s",
                         ours_ms=t_ours, base_ms=t_base, baseline="per-expert loop of matmuls",
                         ours=flops / t_ours * 1e-9, base=flops / t_base * 1e-9, max_err=err))


def bench_memory_bound(rows, dtype, device, quick, interpret):
    import torch
    import torch.nn.functional as F

    from runtime.kernels import layer_norm, permute, reference, rms_norm, swiglu, unpermute

    shapes = [(64, 300)] if interpret else [(16384, 4096), (8192, 8192)]
    if quick and not interpret:
        shapes = shapes[:1]
    el = torch.tensor([], dtype=dtype).element_size()
    for M, N in shapes:
        x = torch.randn(M, N, device=device, dtype=dtype, requires_grad=True)
        w = torch.randn(N, device=device, dtype=dtype, requires_grad=True)
        b = torch.randn(N, device=device, dtype=dtype, requires_grad=True)
        dy = torch.randn(M, N, device=device, dtype=dtype)
        up = torch.randn(M, N, device=device, dtype=dtype, requires_grad=True)
        fused_rms = getattr(F, "rms_norm", None)
        pairs = [
            ("rms_norm", lambda: rms_norm(x, w), lambda: reference.rms_norm(x, w), "unfused torch", 2),
            ("layer_norm", lambda: layer_norm(x, w, b), lambda: reference.layer_norm(x, w, b), "unfused torch", 2),
            ("layer_norm", lambda: layer_norm(x, w, b), lambda: F.layer_norm(x, (N,), w, b), "F.layer_norm", 2),
            ("swiglu", lambda: swiglu(x, up), lambda: F.silu(x) * up, "F.silu(gate) * up", 3),
        ]
        if fused_rms is not None:
            pairs.insert(1, ("rms_norm", lambda: rms_norm(x, w), lambda: fused_rms(x, (N,), w), "F.rms_norm", 2))
        for op, ours, base, base_name, tensors in pairs:
            err = _max_err(ours, base)
            for mode in ("fwd", "fwd+bwd"):
                if mode == "fwd":
                    def run(f):
                        with torch.no_grad():
                            f()
                    traffic = tensors * M * N * el
                else:
                    inputs = [x, up] if op == "swiglu" else [x]
                    def run(f, inputs=inputs):
                        torch.autograd.grad(f(), inputs, dy)
                    # fwd traffic + bwd reads (inputs + dy) and writes (d inputs)
                    traffic = (tensors + (2 * tensors - 1 if op == "swiglu" else 3)) * M * N * el
                t_ours = _bench(lambda: run(ours), interpret)
                t_base = _bench(lambda: run(base), interpret)
                rows.append(dict(op=op, mode=mode, shape=f"{M}x{N}", unit="GB/s", ours_ms=t_ours,
                                 base_ms=t_base, baseline=base_name,
                                 ours=traffic / t_ours * 1e-6, base=traffic / t_base * 1e-6, max_err=err))
        # MoE token shuffle: permute then weighted unpermute, top-2 over 8 experts
        E, topk = 8, 2
        ids = torch.stack([torch.randperm(E, device=device)[:topk] for _ in range(min(M, 64))])
        ids = ids.repeat(M // ids.shape[0] + 1, 1)[:M]
        probs = torch.rand(M, topk, device=device)
        xd = x.detach()

        def shuffle(perm, unperm):
            p, m, _ = perm(xd, ids, E)
            return unperm(p, m, probs)

        err = _max_err(lambda: shuffle(permute, unpermute), lambda: shuffle(reference.permute, reference.unpermute))
        with torch.no_grad():
            t_ours = _bench(lambda: shuffle(permute, unpermute), interpret)
            t_base = _bench(lambda: shuffle(reference.permute, reference.unpermute), interpret)
        traffic = (1 + topk + topk + 1) * M * N * el  # read x, write copies, read copies, write out
        rows.append(dict(op="permute+unpermute", mode="fwd", shape=f"{M}x{N} top{topk}/{E}", unit="GB/s",
                         ours_ms=t_ours, base_ms=t_base, baseline="torch sort + index",
                         ours=traffic / t_ours * 1e-6, base=traffic / t_base * 1e-6, max_err=err))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.join("benchmarks", "results", "kernels.json"))
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    parser.add_argument("--quick", action="store_true", help="fewer shapes")
    parser.add_argument("--interpret", action="store_true",
                        help="tiny shapes on CPU under TRITON_INTERPRET=1 (a smoke check, not a timing)")
    parser.add_argument("--only", default="", help="comma list of: attention,gemm,memory")
    args = parser.parse_args(argv)

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if repo not in sys.path:
        sys.path.insert(0, repo)
    if args.interpret:
        os.environ["TRITON_INTERPRET"] = "1"  # must precede the first import of a kernel module
    import torch

    if not args.interpret and not torch.cuda.is_available():
        print("benchmarks/kernels.py needs a CUDA GPU (or --interpret for a CPU smoke check); skipping.")
        return 0
    device = "cpu" if args.interpret else "cuda"
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    if args.interpret and dtype == torch.bfloat16:
        dtype = torch.float16  # the interpreter's tl.dot is wrong on bfloat16
    name = "cpu (TRITON_INTERPRET=1)" if args.interpret else torch.cuda.get_device_name()
    peak = next((v for k, v in PEAK_GBS.items() if k in name), None)

    only = set(filter(None, args.only.split(","))) or {"attention", "gemm", "memory"}
    rows: list[dict] = []
    if "attention" in only:
        bench_attention(rows, dtype, device, args.quick, args.interpret)
    if "gemm" in only:
        bench_grouped_gemm(rows, dtype, device, args.quick, args.interpret)
    if "memory" in only:
        bench_memory_bound(rows, dtype, device, args.quick, args.interpret)

    for r in rows:
        r["speedup"] = r["base_ms"] / r["ours_ms"] if r["ours_ms"] > 0 else float("nan")
        r["peak_fraction"] = r["ours"] / peak if (peak and r["unit"] == "GB/s") else None
    header = f"{'op':<18} {'mode':<8} {'shape':<28} {'ours':>10} {'baseline':>10} {'unit':<8} {'x':>6} {'%peak':>6} {'maxerr':>8}  baseline"
    print(f"device: {name}, dtype: {dtype}")
    print(header)
    print("-" * len(header))
    for r in rows:
        pf = f"{100 * r['peak_fraction']:.0f}" if r["peak_fraction"] is not None else "-"
        print(f"{r['op']:<18} {r['mode']:<8} {r['shape']:<28} {r['ours']:>10.2f} {r['base']:>10.2f} "
              f"{r['unit']:<8} {r['speedup']:>6.2f} {pf:>6} {r['max_err']:>8.1e}  {r['baseline']}")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(dict(device=name, dtype=str(dtype), torch=torch.__version__, interpret=args.interpret,
                       peak_gbs=peak, results=rows), f, indent=2)
    print(f"saved {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
