"""Planning reports: text (terminal), Markdown and self-contained HTML with inline SVG.

Everything is read from a cost_model.search.SearchResult; nothing is recomputed except the
pipeline timeline, which replays the chosen schedule with the per-stage times of the estimate.
"""

from __future__ import annotations

import html
from pathlib import Path

import networkx as nx

from core import schedules

GiB = 1024 ** 3
_COLORS = {"compute": "#4e79a7", "bubble": "#e15759", "comm": "#f28e2b", "other": "#bab0ac",
           "fwd": "#4e79a7", "bwd": "#59a14f", "wgrad": "#8cd17d", "weights": "#4e79a7", "grads": "#76b7b2",
           "optimizer": "#edc948", "activations": "#59a14f", "temporary": "#b07aa1",
           "reserved": "#bab0ac", "tp": "#f28e2b", "cp": "#e15759", "ep": "#9c755f",
           "pp": "#76b7b2", "dp": "#59a14f", "embedding": "#b07aa1"}


def _plan_str(est) -> str:
    return str(est.plan)


def _row(est) -> dict:
    return {"plan": _plan_str(est), "mbs": str(est.micro_batch_size),
            "step (s)": f"{est.step_time_s:.3f}", "TFLOP/s/GPU": f"{est.tflops_per_gpu:.1f}",
            "MFU": f"{est.mfu:.1%}", "HFU": f"{est.hfu:.1%}",
            "memory (GiB)": f"{est.memory_gib:.1f}", "bubble": f"{est.bubble_fraction:.1%}",
            "comm": f"{est.comm_fraction:.1%}"}


def _header(result, title: str) -> list[str]:
    s = result.shape
    return [f"model {title}: {s.num_parameters() / 1e9:.2f}B parameters, {s.layers} layers, "
            f"hidden {s.hidden}, {s.heads} heads" + (f", {s.experts} experts top-{s.topk}"
                                                      if s.experts else ""),
            f"cluster {result.cluster} ({result.cluster.gpus_per_node} GPUs a node, "
            f"{result.cluster.hardware.memory_bytes / GiB:.0f} GiB each); global batch "
            f"{result.global_batch}, sequence {result.seq}",
            f"searched {result.evaluated} plans in {result.search_time_s:.2f} s"
            + (f" (fixed: {result.fixed})" if result.fixed else "")]


def render_text(result, title: str = "model") -> str:
    lines = _header(result, title)
    lines.append("")
    rows = [_row(e) for e in result.plans]
    keys = list(rows[0])
    widths = {k: max(len(k), *(len(r[k]) for r in rows)) for k in keys}
    lines.append("  ".join(k.ljust(widths[k]) for k in keys))
    for i, r in enumerate(rows):
        lines.append("  ".join(r[k].ljust(widths[k]) for k in keys) + ("  <- chosen" if i == 0
                                                                       else ""))
    if result.rejected:
        lines += ["", "rejected families:"]
        lines += [f"  {r.family}: {r.reason}" for r in result.rejected[:12]]
        if len(result.rejected) > 12:
            lines.append(f"  ... and {len(result.rejected) - 12} more")
    return "\n".join(lines) + "\n"


def render_markdown(result, title: str = "model") -> str:
    best = result.chosen
    out = [f"# Plan for {title}", ""] + [f"- {line}" for line in _header(result, title)]
    out += ["", f"**Chosen:** `{_plan_str(best)}` — {best.step_time_s:.3f} s/step, "
                f"{best.tflops_per_gpu:.1f} TFLOP/s/GPU, MFU {best.mfu:.1%}, "
                f"{best.memory_gib:.1f} GiB/GPU", "", "## Candidates", ""]
    rows = [_row(e) for e in result.plans]
    keys = list(rows[0])
    out.append("| # | " + " | ".join(keys) + " |")
    out.append("|---|" + "---|" * len(keys))
    for i, r in enumerate(rows):
        out.append(f"| {i} | " + " | ".join(f"`{r[k]}`" if k == "plan" else r[k]
                                            for k in keys) + " |")
    out += ["", "## Chosen plan: per pipeline stage", "",
            "| stage | fwd (ms/mb) | bwd (ms/mb) | memory (GiB) |", "|---|---|---|---|"]
    for r, (f, b_, m) in enumerate(zip(best.stage_fwd_s, best.stage_bwd_s, best.stage_memory,
                                       strict=True)):
        out.append(f"| {r} | {f * 1e3:.2f} | {b_ * 1e3:.2f} | {m / GiB:.1f} |")
    mem = best.memory.as_dict()
    out += ["", f"Memory of the fullest rank ({mem['rank']}): " + ", ".join(
        f"{k} {mem[k] / GiB:.2f} GiB" for k in ("weights", "grads", "optimizer", "activations",
                                                 "temporary", "reserved")), "",
            "## Step time breakdown", "", "| part | seconds | share |", "|---|---|---|"]
    for name, val in _breakdown(best).items():
        out.append(f"| {name} | {val:.4f} | {val / best.step_time_s:.1%} |")
    out += ["", "## Exposed communication", "", "| kind | seconds |", "|---|---|"]
    out += [f"| {k} | {v:.4f} |" for k, v in best.comm_s.items() if v > 0] or ["| none | 0 |"]
    if result.rejected:
        out += ["", "## Rejected families", "", "| family | why |", "|---|---|"]
        out += [f"| `{r.family}` | {r.reason} |" for r in result.rejected]
    return "\n".join(out) + "\n"


def _breakdown(est) -> dict:
    comm = sum(est.comm_s.values())
    compute = max(0.0, est.step_time_s - est.bubble_s - comm - est.optimizer_s)
    return {"compute": compute, "bubble": est.bubble_s, "comm": comm,
            "other": est.optimizer_s}


# --- SVG ------------------------------------------------------------------------------------
def _svg(width: int, height: int, body: list[str]) -> str:
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
            f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="11">'
            + "".join(body) + "</svg>")


def _text(x, y, s, anchor="start", **kw) -> str:
    extra = "".join(f' {k.replace("_", "-")}="{v}"' for k, v in kw.items())
    return f'<text x="{x:.1f}" y="{y:.1f}" text-anchor="{anchor}"{extra}>{html.escape(s)}</text>'


def _rect(x, y, w, h, color, title="") -> str:
    tip = f"<title>{html.escape(title)}</title>" if title else ""
    return (f'<rect x="{x:.1f}" y="{y:.1f}" width="{max(w, 0):.1f}" height="{h:.1f}" '
            f'fill="{color}">{tip}</rect>')


def stacked_bars(rows: list[tuple[str, dict]], unit: str, limit: float | None = None,
                 width: int = 760) -> str:
    """Horizontal stacked bars: [(label, {part: value})]; an optional limit line."""
    label_w, bar_h, gap = 250, 16, 6
    total_max = max([sum(p.values()) for _, p in rows] + [limit or 0]) or 1.0
    scale = (width - label_w - 80) / total_max
    body, y = [], 8
    for label, parts in rows:
        body.append(_text(label_w - 6, y + bar_h - 4, label[:42], "end"))
        x = label_w
        for name, val in parts.items():
            body.append(_rect(x, y, val * scale, bar_h, _COLORS.get(name, "#888"),
                              f"{name}: {val:.4g} {unit}"))
            x += val * scale
        body.append(_text(x + 4, y + bar_h - 4, f"{sum(parts.values()):.3g} {unit}"))
        y += bar_h + gap
    if limit:
        lx = label_w + limit * scale
        body.append(f'<line x1="{lx:.1f}" y1="2" x2="{lx:.1f}" y2="{y:.1f}" stroke="#d00" '
                    f'stroke-dasharray="4 3"/>')
        body.append(_text(lx, y + 10, f"device {limit:.0f} {unit}", "middle", fill="#d00"))
        y += 14
    names = list(dict.fromkeys(n for _, p in rows for n in p))
    x = label_w
    for name in names:
        body.append(_rect(x, y + 4, 10, 10, _COLORS.get(name, "#888")))
        body.append(_text(x + 14, y + 13, name))
        x += 18 + 7 * len(name)
    return _svg(width, y + 22, body)


def pipeline_timeline(fwd: tuple, bwd: tuple, microbatches: int, schedule: str,
                      width: int = 760, max_ranks: int = 16, vpp: int = 1) -> str:
    """Replays the schedule with the per-stage times; shows at most `max_ranks` stages and
    up to 2p + 2 microbatches (interleaved: a multiple of p) so that warm-up, steady state and
    drain stay readable."""
    p = len(fwd)
    m = min(microbatches, 2 * p + 2)
    if schedule == "interleaved-1f1b":
        m = max(p, m - m % p)
    events = simulate_pipeline(fwd, bwd, m, schedule, vpp)
    end = max(t1 for _, _, _, _, t1 in events) or 1.0
    show = list(range(p)) if p <= max_ranks else sorted(
        set(range(0, p, max(1, p // (max_ranks - 1)))) | {p - 1})
    row_h, label_w = 14, 60
    scale = (width - label_w - 10) / end
    body = []
    for j, r in enumerate(show):
        y = 6 + j * (row_h + 3)
        body.append(_text(label_w - 4, y + row_h - 3, f"stage {r}", "end"))
        for rank, kind, mb, t0, t1 in events:
            if rank == r:
                body.append(_rect(label_w + t0 * scale, y, (t1 - t0) * scale - 0.5, row_h,
                                  _COLORS[kind], f"stage {r} {kind} mb {mb}: "
                                                 f"{t0 * 1e3:.1f}-{t1 * 1e3:.1f} ms"))
    y = 6 + len(show) * (row_h + 3)
    note = f"{m} of {microbatches} microbatches, {schedule}" + (
        "" if p <= max_ranks else f", {len(show)} of {p} stages")
    body.append(_text(label_w, y + 12, f"0 … {end * 1e3:.1f} ms   ({note}; blue forward, "
                                        f"green backward, light green weight gradients)"))
    return _svg(width, y + 20, body)


def simulate_pipeline(fwd, bwd, m: int, schedule: str, vpp: int = 1) -> list[tuple]:
    """[(rank, 'fwd'|'bwd'|'wgrad', microbatch, start, end)] of the plan's schedule
    (core.schedules: the runtime's orders) with pipeline rank r's forward and backward of a
    microbatch taking fwd[r] and bwd[r] over its `vpp` stages; a zero-bubble schedule's input-
    and weight-gradient steps ('bwd', 'wgrad') half of the backward each."""
    orders = schedules.schedule(schedule, len(fwd), m, vpp)
    rank_of = {a.stage: r for r, actions in enumerate(orders) for a in actions}
    graph = schedules.action_graph(orders)
    kinds = {"F": "fwd", "B": "bwd", "I": "bwd", "W": "wgrad"}
    done: dict = {}
    events = []
    for action in nx.topological_sort(graph):  # the rank's previous action is a predecessor
        r = rank_of[action.stage]
        seconds = {"F": fwd[r], "B": bwd[r]}.get(action.kind, bwd[r] / 2) / vpp
        t0 = max((done[dep] for dep in graph.predecessors(action)), default=0.0)
        done[action] = t0 + seconds
        events.append((r, kinds[action.kind], action.microbatch, t0, t0 + seconds))
    return events


def render_html(result, title: str = "model") -> str:
    best = result.chosen
    e = html.escape
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>Plan for {e(title)}"
             "</title><style>body{font-family:sans-serif;max-width:1000px;margin:2em auto;"
             "color:#222}table{border-collapse:collapse;font-size:13px}td,th{border:1px solid "
             "#ccc;padding:3px 7px;text-align:right}td:first-child,th:first-child{text-align:"
             "left}tr.chosen{background:#eef6ee}code{font-size:12px}h2{margin-top:1.6em}"
             "</style></head><body>", f"<h1>Plan for {e(title)}</h1>"]
    parts += [f"<p>{e(line)}</p>" for line in _header(result, title)]
    parts.append(f"<p><b>Chosen:</b> <code>{e(_plan_str(best))}</code> — "
                 f"{best.step_time_s:.3f} s/step, {best.tflops_per_gpu:.1f} TFLOP/s/GPU, MFU "
                 f"{best.mfu:.1%}, HFU {best.hfu:.1%}, {best.memory_gib:.1f} GiB/GPU</p>")
    parts.append("<h2>Candidates side by side</h2><table><tr><th>#</th>")
    rows = [_row(x) for x in result.plans]
    parts.append("".join(f"<th>{e(k)}</th>" for k in rows[0]) + "</tr>")
    for i, r in enumerate(rows):
        parts.append(f"<tr class='{'chosen' if i == 0 else ''}'><td>{i}</td>" + "".join(
            f"<td><code>{e(v)}</code></td>" if k == "plan" else f"<td>{e(v)}</td>"
            for k, v in r.items()) + "</tr>")
    parts.append("</table>")
    parts.append("<h3>Step time of each candidate</h3>")
    parts.append(stacked_bars([(f"#{i} {_plan_str(x)}", _breakdown(x))
                               for i, x in enumerate(result.plans)], "s"))
    parts.append("<h3>Memory per GPU of each candidate</h3>")
    parts.append(stacked_bars([(f"#{i} {_plan_str(x)}", _mem_parts(x.memory))
                               for i, x in enumerate(result.plans)], "GiB",
                              limit=best.device_memory_bytes / GiB))
    parts.append("<h2>Chosen plan per pipeline stage</h2><h3>Time per microbatch (ms)</h3>")
    stage_rows = [(f"stage {r}", {"fwd": f * 1e3, "bwd": b_ * 1e3})
                  for r, (f, b_) in enumerate(zip(best.stage_fwd_s, best.stage_bwd_s,
                                                  strict=True))]
    parts.append(stacked_bars(_thin(stage_rows), "ms"))
    parts.append("<h3>Memory (GiB)</h3>")
    parts.append(stacked_bars(_thin([(f"stage {r}", {"activations": m / GiB})
                                     for r, m in enumerate(best.stage_memory)]), "GiB",
                              limit=best.device_memory_bytes / GiB))
    parts.append("<h3>Pipeline timeline</h3>")
    parts.append(pipeline_timeline(best.stage_fwd_s, best.stage_bwd_s, best.plan.microbatches,
                                   best.plan.schedule, vpp=best.plan.vpp))
    parts.append("<h2>Exposed communication per step</h2>")
    comm = {k: v for k, v in best.comm_s.items() if v > 0}
    parts.append(stacked_bars([("chosen plan", comm)], "s") if comm else
                 "<p>no communication on the critical path</p>")
    if result.rejected:
        parts.append("<h2>Rejected families</h2><table><tr><th>family</th><th>why</th></tr>")
        parts += [f"<tr><td><code>{e(str(r.family))}</code></td><td style='text-align:left'>"
                  f"{e(r.reason)}</td></tr>" for r in result.rejected]
        parts.append("</table>")
    parts.append("</body></html>")
    return "\n".join(parts)


def _thin(rows: list, limit: int = 32) -> list:
    if len(rows) <= limit:
        return rows
    step = -(-len(rows) // limit)
    return rows[::step] + ([rows[-1]] if (len(rows) - 1) % step else [])


def _mem_parts(mem) -> dict:
    d = mem.as_dict()
    return {k: d[k] / GiB for k in ("weights", "grads", "optimizer", "activations", "temporary",
                                    "reserved")}


def write_report(result, path: str, title: str = "model") -> None:
    """`.html`/`.htm` -> HTML, `.md` -> Markdown."""
    suffix = Path(path).suffix.lower()
    if suffix in (".html", ".htm"):
        text = render_html(result, title)
    elif suffix in (".md", ".markdown"):
        text = render_markdown(result, title)
    else:
        raise ValueError(f"--report {path!r}: use a .html or .md file name")
    Path(path).write_text(text)
