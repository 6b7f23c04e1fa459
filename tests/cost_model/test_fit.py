"""The fits of cost_model/fit.py on synthetic measurements (tools/calibrate.py measures)."""

import pytest

from cost_model.fit import fit_alpha_beta, fit_all_gather_eff, fit_gemm, \
    profile_from_measurements


def _matmuls(rate_of, latency, sizes=(32, 64, 128, 256, 512, 1024)):
    """Square matmul timings as measure_matmul records them: t = latency + 2 n^3 / rate(n)."""
    out = []
    for n in sizes:
        t = latency + 2 * n ** 3 / rate_of(n)
        out.append({"m": n, "n": n, "k": n, "seconds": t, "flops": 2 * n ** 3 / t})
    return out


def test_alpha_beta_fit_recovers_parameters():
    alpha, bw, n = 50e-6, 2e9, 2
    res = {f"all_reduce:{S}": 2 * (n - 1) * alpha + S / bw * 2 * (n - 1) / n
           for S in (4096, 65536, 1 << 20, 8 << 20)}
    a, b = fit_alpha_beta(res, n)
    assert a == pytest.approx(alpha, rel=1e-6) and b == pytest.approx(bw, rel=1e-6)


def test_gemm_fit_recovers_half_point_and_call_latency():
    peak, half, latency = 1e11, 64.0, 2e-6
    fit = fit_gemm(_matmuls(lambda n: peak * (n / (n + half)) ** 3, latency))
    assert fit.gemm_half == pytest.approx(half, rel=0.1)
    assert fit.call_latency == pytest.approx(latency, rel=0.1)
    assert fit.peak_flops * fit.gemm_eff == pytest.approx(peak, rel=0.05)


def test_gemm_fit_takes_dispatch_overhead_for_latency_not_small_shape_inefficiency():
    # a flat rate, slowed only by a fixed 2 us a call for small shapes and by caches beyond
    # 128: no half-point, and the rate measured where caches still hold the operands
    rate, latency = 6e10, 2e-6
    fit = fit_gemm(_matmuls(lambda n: rate if n <= 128 else rate / 2, latency))
    assert fit.gemm_half == 0.0
    assert fit.call_latency == pytest.approx(latency, rel=0.05)
    assert fit.peak_flops == pytest.approx(rate, rel=0.01)


def test_all_gather_fit_compares_bandwidth_with_all_reduce():
    alpha, bw, n, eff = 50e-6, 2e9, 4, 0.5
    res = {f"all_gather:{S}": (n - 1) * alpha + n * S * (n - 1) / n / (eff * bw)
           for S in (4096, 65536, 1 << 20, 8 << 20)}
    assert fit_all_gather_eff(res, n, bw) == pytest.approx(eff, rel=1e-6)
    assert fit_all_gather_eff({}, n, bw) == 1.0  # not timed: the ring model's bandwidth


def test_profile_from_measurements():
    alpha, bw, n = 50e-6, 2e9, 2
    coll = {f"all_reduce:{S}": 2 * (n - 1) * alpha + S / bw * 2 * (n - 1) / n
            for S in (4096, 65536, 1 << 20, 8 << 20)}
    coll.update({f"all_gather:{S}": (n - 1) * alpha + n * S * (n - 1) / n / (0.8 * bw)
                 for S in (4096, 65536, 1 << 20, 8 << 20)})
    measurements = {"matmul": _matmuls(lambda _: 5e10, 1e-6), "memcpy_bytes_per_s": 2e10,
                    "collectives_s": coll, "ranks": n, "threads": 2, "cores": 8}
    hw = profile_from_measurements(measurements)
    assert hw["cores"] == 4  # a rank timed on 2 threads needs 2 of the 8 cores
    assert hw["elem_bytes"] == 4 and hw["reduce_scatter_is_all_reduce"]
    assert hw["intra_bw"] == pytest.approx(bw) and hw["intra_latency"] == pytest.approx(alpha)
    assert hw["all_gather_eff"] == pytest.approx(0.8)
    assert hw["kernel_latency"] == pytest.approx(1e-6, rel=0.05)
    assert hw["peak_flops"] == pytest.approx(5e10, rel=0.01)
