"""Fits of calibrate.py on synthetic measurements (the measuring itself runs in benchmarks)."""

import pytest

from cost_model.calibrate import fit_alpha_beta, fit_gemm


def test_alpha_beta_fit_recovers_parameters():
    alpha, bw, n = 50e-6, 2e9, 2
    res = {f"all_reduce:{S}": 2 * (n - 1) * alpha + S / bw * 2 * (n - 1) / n
           for S in (4096, 65536, 1 << 20, 8 << 20)}
    a, b = fit_alpha_beta(res, n)
    assert a == pytest.approx(alpha, rel=1e-6) and b == pytest.approx(bw, rel=1e-6)


def test_gemm_fit_recovers_half_point():
    peak, half = 1e11, 64.0
    pts = [{"m": n, "flops": peak * (n / (n + half)) ** 3} for n in (32, 64, 128, 256, 512, 1024)]
    p, eff, h = fit_gemm(pts)
    assert h == pytest.approx(half, rel=0.1) and p * eff == pytest.approx(peak, rel=0.1)
