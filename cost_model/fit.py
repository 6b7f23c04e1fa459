"""Fitting a hardware profile to measured numbers: pure functions, nothing here runs anything.

`tools/calibrate.py` measures this machine (matmuls, attention, per-element math, the per-op
overhead of a captured block, memcpy, gloo collectives between spawned ranks) and hands its raw
measurements to `profile_from_measurements`, which fits the Hardware fields the cost model reads:
peak, GEMM efficiency curve and call latency, attention efficiency, math rate, op overhead,
memory bandwidth, collective alpha and bus bandwidth, all-gather's share of it. Each fit takes
plain numbers (the records the measuring writes) and returns plain numbers, so a profile can be
refitted from its saved measurements without measuring again, and every fit is tested against
closed-form data.

`fit_published` fits the efficiencies of GPU profiles the same way, to published training runs
(published.py, cost_model/data/published_runs.json) instead of measurements: least squares on
the log of predicted over published step time, over every run of the devices fitted, with
`leave_one_out` saying how well the fit predicts a run it did not see.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import NamedTuple

from cost_model.hardware import GiB, Hardware, local_cpu
from cost_model.layer_costs import block_costs
from cost_model.shapes import TransformerShape


class GemmFit(NamedTuple):
    """The Hardware fields a matmul sweep determines."""

    peak_flops: float
    gemm_eff: float
    """1.0: with one machine measured, the peak is the rate large GEMMs reach."""
    gemm_half: float
    call_latency: float
    """Seconds one matmul call costs beyond its arithmetic (dispatch): the profile's
    kernel_latency, which the cost model charges every op."""


def _shape_eff(m, n, k, half: float) -> float:
    return (m / (m + half)) * (n / (n + half)) * (k / (k + half))


def fit_gemm(points: list) -> GemmFit:
    """Fit t = latency + 2 m n k / (peak g(m) g(n) g(k)), g(x) = x / (x + half), to matmul
    timings ({"m", "n", "k", "flops": 2 m n k / t}; square sweeps of older profiles too).

    The curve describes how small shapes fall off from the fastest rate measured, which it
    passes through; the per-call latency is fitted with it, or the dispatch overhead of tiny
    calls would pass for a low efficiency of every small GEMM. Shapes of more work than the
    fastest are left out: caches slow them, which the curve cannot describe (the roofline's
    memory term bounds them instead). Least squares on log time over a grid of half-points and
    latencies."""
    def work(p):
        return p["m"] * p["n"] * p["k"]

    def seconds(p):
        return 2 * work(p) / p["flops"]

    fastest = max(points, key=lambda p: p["flops"])
    shapes = [p for p in points if work(p) <= work(fastest)]
    t_min = min(seconds(p) for p in shapes)
    largest = max(fastest["m"], fastest["n"], fastest["k"])
    halves = [0.0] + [2 ** (i / 4) for i in range(0, int(4 * math.log2(largest)) + 1)]
    best = None
    for half in halves:
        for step in range(100):
            latency = t_min * step / 100
            peak = 2 * work(fastest) / ((seconds(fastest) - latency) *
                                        _shape_eff(fastest["m"], fastest["n"], fastest["k"], half))
            err = sum(math.log((latency + 2 * work(p) /
                                (peak * _shape_eff(p["m"], p["n"], p["k"], half))) / seconds(p))
                      ** 2 for p in shapes)
            if best is None or err < best[0]:
                best = (err, GemmFit(peak, 1.0, half, latency))
    return best[1]


def fit_attention_eff(points: list, hw) -> float:
    """attention_eff making the cost model's flash-attention forward + backward (3.5 forwards,
    layer_costs.py) match the timings: the geometric mean over the shapes of the time the model
    gives at efficiency 1 over the time measured. 1.0 when none were timed."""
    if not points:
        return 1.0
    ratios = []
    for p in points:
        flops = 4 * p["heads"] * p["seq"] * p["seq"] * p["head_dim"] / 2  # causal half
        at_one = dataclasses.replace(hw, attention_eff=1.0)
        compute = at_one.attention_time(flops, p["seq"], p["seq"], p["head_dim"]) - \
            hw.kernel_latency
        ratios.append(3.5 * compute / max(1e-12, p["forward_backward_s"] -
                                          3.5 * hw.kernel_latency))
    return math.exp(sum(math.log(r) for r in ratios) / len(ratios))


def fit_math_rate(points: list) -> float | None:
    """Elements per second of per-element math: the geometric mean of the kernels' rates (None
    when none were timed: memory bound)."""
    if not points:
        return None
    rates = [p["elements"] / p["seconds"] for p in points]
    return math.exp(sum(math.log(r) for r in rates) / len(rates))


OVERHEAD_BLOCK = dict(hidden=16, heads=2, seq=4, batch=1)
"""A block so small its arithmetic is negligible: its time is the per-op overhead."""


def tiny_block_shape():
    """The cost model's shape of `measure_op_overhead`'s block (partitioner.models' GPT block:
    layer norms, separate q/k/v projections, learned positions, GeLU MLP)."""
    cfg = OVERHEAD_BLOCK
    return TransformerShape(layers=1, hidden=cfg["hidden"], heads=cfg["heads"], vocab=16,
                            seq=cfg["seq"], fused_qkv=False)


def fit_op_overhead(measured: dict | None, hw) -> tuple[float, float]:
    """(forward, backward) seconds per graph op: what the tiny block's timings leave over the
    cost model's prediction for it without overhead, over the block's ops. (0, 0) when not
    timed."""
    if not measured:
        return 0.0, 0.0
    bare = dataclasses.replace(hw, op_overhead=0.0, op_overhead_bwd=0.0)
    costs = block_costs(tiny_block_shape(), bare)
    args = (1, 1, measured["batch"], 0, 1, 1)  # t, c, b, sp, e, et
    nodes = measured["nodes"]
    forward = max(0.0, measured["forward_s"] - costs.fwd(*args)) / nodes
    backward = max(0.0, measured["forward_backward_s"] - measured["forward_s"] -
                   costs.bwd(*args)) / nodes
    return forward, backward


def _line_fit(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """(intercept, slope) of the least-squares line through the points."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / max(
        1e-30, sum((x - mx) ** 2 for x in xs))
    return my - slope * mx, slope


def _timings(res: dict, kind: str) -> list[tuple[float, float]]:
    """(bytes per rank, seconds) of every measurement of `kind`."""
    out = []
    for key, t in res.items():
        measured, n = key.split(":")
        if measured == kind:
            out.append((float(n), t))
    return out


def fit_alpha_beta(res: dict, world: int) -> tuple[float, float]:
    """(alpha per ring step, bus bandwidth) from all-reduce times, least squares on
    t = 2(n-1) alpha + S/B 2(n-1)/n."""
    points = _timings(res, "all_reduce")
    intercept, slope = _line_fit([S * 2 * (world - 1) / world for S, _ in points],
                                 [t for _, t in points])
    steps = 2 * (world - 1)
    bw = 1.0 / slope if slope > 0 else 1e9
    return max(intercept / steps, 1e-6), bw


def fit_all_gather_eff(res: dict, world: int, bus_bw: float) -> float:
    """All-gather bus bandwidth over all-reduce's `bus_bw`: from all-gather times of S bytes per
    rank, least squares on t = (n-1) alpha + n S (n-1)/n / (eff B). 1.0 when none were timed."""
    points = _timings(res, "all_gather")
    if len(points) < 2:
        return 1.0
    _, slope = _line_fit([S * (world - 1) for S, _ in points], [t for _, t in points])
    return (1.0 / slope) / bus_bw if slope > 0 else 1.0


def profile_from_measurements(measurements: dict) -> dict:
    """The Hardware fields fitted to `calibrate`'s raw measurements (a profile measured before
    attention, math or op overhead were timed keeps their neutral defaults)."""
    ranks = measurements["ranks"]
    gemm = fit_gemm(measurements["matmul"])
    coll = measurements["collectives_s"]
    alpha, bus = fit_alpha_beta(coll, ranks)
    # a rank timed with k threads runs at that rate only with k cores of its own
    cores = max(1, measurements["cores"] // measurements["threads"])
    fields = {
        **local_cpu().to_dict(), "name": "cpu-calibrated", "peak_flops": gemm.peak_flops,
        "gemm_eff": gemm.gemm_eff, "gemm_half": gemm.gemm_half,
        "kernel_latency": gemm.call_latency, "hbm_bw": measurements["memcpy_bytes_per_s"],
        "mem_eff": 1.0,
        "intra_bw": bus, "intra_eff": 1.0, "inter_bw": bus, "inter_eff": 1.0,
        "intra_latency": alpha, "inter_latency": alpha,
        "gpus_per_node": max(ranks, os.cpu_count() or 1), "reserved_bytes": 0.25 * GiB,
        "cores": cores, "elem_bytes": 4,  # float32, what the matmuls above ran in
        "all_gather_eff": fit_all_gather_eff(coll, ranks, bus),
        # gloo (PyTorch #118911): reduce-scatter is an all-reduce keeping this rank's chunk
        "reduce_scatter_is_all_reduce": True,
        "math_rate": fit_math_rate(measurements.get("math", [])),
    }
    hw = Hardware.from_dict(fields)
    fields["attention_eff"] = fit_attention_eff(measurements.get("attention", []), hw)
    # the overhead is what the block's timings leave over every other fitted term
    hw = dataclasses.replace(hw, attention_eff=fields["attention_eff"])
    fields["op_overhead"], fields["op_overhead_bwd"] = fit_op_overhead(
        measurements.get("op_overhead"), hw)
    return fields


# --- efficiencies fitted to published runs ---------------------------------------------------
class LeastSquares(NamedTuple):
    x: tuple[float, ...]
    residuals: tuple[float, ...]
    cost: float
    """Sum of squared residuals at `x`."""
    iterations: int


def _solve(a: list[list[float]], b: list[float]) -> list[float]:
    """x with a x = b (Gaussian elimination with partial pivoting; a is small and square)."""
    n = len(b)
    m = [row[:] + [rhs] for row, rhs in zip(a, b, strict=True)]
    for col in range(n):
        pivot = max(range(col, n), key=lambda r: abs(m[r][col]))
        m[col], m[pivot] = m[pivot], m[col]
        if abs(m[col][col]) < 1e-300:
            raise ZeroDivisionError("singular normal equations")
        for r in range(col + 1, n):
            f = m[r][col] / m[col][col]
            for k in range(col, n + 1):
                m[r][k] -= f * m[col][k]
    x = [0.0] * n
    for r in reversed(range(n)):
        x[r] = (m[r][n] - sum(m[r][k] * x[k] for k in range(r + 1, n))) / m[r][r]
    return x


def _jacobian_columns(residuals, x, r, upper) -> list[list[float]]:
    """d r / d x_j for each j, by forward differences (backward at an upper bound)."""
    columns = []
    for j, xj in enumerate(x):
        h = 1e-6 * max(1.0, abs(xj))
        step = list(x)
        step[j] = xj + h if xj + h <= upper[j] else xj - h
        shifted = residuals(tuple(step))
        columns.append([(a - b) / (step[j] - xj) for a, b in zip(shifted, r, strict=True)])
    return columns


def least_squares(residuals, x0, lower, upper, max_iter: int = 50,
                  tol: float = 1e-8) -> LeastSquares:
    """Levenberg-Marquardt within bounds: the x minimizing sum(residuals(x)^2).

    `residuals` maps a tuple of parameters to a list of residuals. The Jacobian is taken by
    forward differences, so the residuals may be any function (here: the cost model's
    predictions, which have max() in them); a parameter on a bound the descent points past is
    held there (an active set), and a step leaving the box is clipped to it."""
    def clip(x):
        return tuple(min(hi, max(lo, v)) for v, lo, hi in zip(x, lower, upper, strict=True))

    def cost(r):
        return sum(v * v for v in r)

    x = clip(tuple(float(v) for v in x0))
    r = list(residuals(x))
    c = cost(r)
    damping = 1e-3
    it = 0
    for it in range(1, max_iter + 1):
        jac = _jacobian_columns(residuals, x, r, upper)
        n = len(x)
        jtj = [[sum(a * b for a, b in zip(jac[i], jac[k], strict=True)) for k in range(n)]
               for i in range(n)]
        jtr = [sum(a * b for a, b in zip(jac[i], r, strict=True)) for i in range(n)]
        # a parameter on a bound that descent would push past it stays there: solving for it
        # too and clipping the step afterwards can leave a step that helps none of the others
        free = [i for i in range(n)
                if not (x[i] >= upper[i] and jtr[i] < 0 or x[i] <= lower[i] and jtr[i] > 0)]
        improved = False
        while damping < 1e12 and free:
            a = [[jtj[i][k] + (damping * (jtj[i][i] or 1.0) if i == k else 0.0)
                  for k in free] for i in free]
            try:
                step = _solve(a, [-jtr[i] for i in free])
            except ZeroDivisionError:
                damping *= 10
                continue
            delta = [0.0] * n
            for i, d in zip(free, step, strict=True):
                delta[i] = d
            trial = clip(tuple(v + d for v, d in zip(x, delta, strict=True)))
            r_trial = list(residuals(trial))
            c_trial = cost(r_trial)
            if c_trial < c:
                done = c - c_trial <= tol * max(c, 1e-30)
                x, r, c = trial, r_trial, c_trial
                damping = max(damping / 10, 1e-12)
                improved = True
                break
            damping *= 10
        if not improved or done:
            break
    return LeastSquares(x, tuple(r), c, it)


PUBLISHED_FIELDS = ("gemm_eff", "mem_eff")
"""The Hardware fields fitted to published runs, per device: the GEMM roofline's large-shape
efficiency and the efficiency of the memory-bound kernels (norms, activations, softmax,
optimizer), the terms of a step the datasheets do not give. The curve's `gemm_half` is not among
them: every published GEMM has its dimensions >= 2048 but the attention's head dimension, so
the runs do not determine it (fitted with the others it runs to its bound, a flat curve, which
would make the planner optimistic on small models). It stays the profile's, which
tools/calibrate.py measures on a device. Everything else (peaks, bandwidths, the mechanisms)
is not fitted either."""
PUBLISHED_BOUNDS = {"gemm_eff": (0.3, 1.0), "gemm_half": (1.0, 2048.0), "mem_eff": (0.2, 1.0)}


class PublishedFit(NamedTuple):
    profiles: dict
    """Device name -> the Hardware profile with its fitted fields."""
    parameters: dict
    """Device name -> {field: fitted value}."""
    errors: dict
    """Run name -> predicted / published step time - 1, with the fitted profiles."""
    rms_log_error: float
    iterations: int


def fitted_devices(runs, min_sources: int = 2) -> list[str]:
    """Devices with runs from at least `min_sources` papers: a device seen in one table only
    would be fitted to that table (three parameters through a handful of rows)."""
    papers: dict[str, set] = {}
    for run in runs:
        papers.setdefault(run.gpu, set()).add(run.source.paper)
    return sorted(d for d, p in papers.items() if len(p) >= min_sources)


def fit_published(runs, base: dict, devices: list[str], predict,
                  fields: tuple[str, ...] = PUBLISHED_FIELDS, start: dict | None = None
                  ) -> PublishedFit:
    """Fit `fields` of each device in `devices` jointly, by least squares on the log of
    predicted over published step time of every run.

    `base`: device name -> Hardware (the profiles before the fit; other devices are used as
    they are); `predict(run, profiles) -> predicted seconds`; `start`: device -> {field:
    value} to start from (default: the base profiles' values)."""
    keys = [(d, f) for d in devices for f in fields]
    x0 = [(start or {}).get(d, {}).get(f, getattr(base[d], f)) for d, f in keys]

    def profiles_at(x):
        profiles = dict(base)
        for d in devices:
            profiles[d] = dataclasses.replace(
                base[d], **{f: v for (dd, f), v in zip(keys, x, strict=True) if dd == d})
        return profiles

    def residuals(x):
        profiles = profiles_at(x)
        return [math.log(predict(run, profiles) / run.published_step_s) for run in runs]

    result = least_squares(residuals, x0, [PUBLISHED_BOUNDS[f][0] for _, f in keys],
                           [PUBLISHED_BOUNDS[f][1] for _, f in keys])
    params = {d: {f: v for (dd, f), v in zip(keys, result.x, strict=True) if dd == d}
              for d in devices}
    errors = {run.name: math.exp(r) - 1 for run, r in zip(runs, result.residuals, strict=True)}
    rms = math.sqrt(result.cost / max(1, len(runs)))
    return PublishedFit(profiles_at(result.x), params, errors, rms, result.iterations)


def leave_one_out(runs, base: dict, devices: list[str], predict,
                  fields: tuple[str, ...] = PUBLISHED_FIELDS, start: dict | None = None
                  ) -> dict:
    """Run name -> the error predicting it with the parameters fitted to the other runs: how
    well the fit predicts a run it has not seen."""
    out = {}
    for i, run in enumerate(runs):
        rest = runs[:i] + runs[i + 1:]
        fit = fit_published(rest, base, [d for d in devices if d in fitted_devices(rest, 1)],
                            predict, fields, start)
        out[run.name] = predict(run, fit.profiles) / run.published_step_s - 1
    return out
