"""Planning reports: text (terminal), Markdown and self-contained HTML with inline SVG.

Everything is read from a cost_model.search.SearchResult; nothing is recomputed except the
pipeline timeline, which replays the chosen schedule with the per-stage times of the estimate.
"""

from __future__ import annotations

import html
import math
from pathlib import Path

import networkx as nx

from core import schedules

GiB = 1024 ** 3
_COLORS = {"compute": "#4e79a7", "recompute": "#a0cbe8", "tp": "#f28e2b", "cp": "#ffbe7d",
           "ep": "#9c755f", "pp": "#76b7b2", "dp": "#59a14f", "embedding": "#b07aa1",
           "loss": "#ff9da7", "optimizer": "#edc948", "bubble": "#e15759",
           "shared_cores": "#bab0ac", "fwd": "#4e79a7", "bwd": "#59a14f", "wgrad": "#8cd17d",
           "weights": "#4e79a7", "grads": "#76b7b2", "activations": "#59a14f",
           "temporary": "#b07aa1", "allocator": "#d4a6c8", "reserved": "#bab0ac"}
TERM_NAMES = {"compute": "compute", "recompute": "recompute", "tp": "TP comm (exposed)",
              "cp": "CP comm (exposed)", "ep": "EP comm (exposed)", "pp": "PP p2p (exposed)",
              "dp": "DP gradient sync (exposed)", "embedding": "tied-embedding sync",
              "loss": "loss sum", "optimizer": "optimizer", "bubble": "pipeline bubble",
              "shared_cores": "shared cores"}
"""Estimate.step_terms_s keys as reports name them."""
MEMORY_PARTS = ("weights", "grads", "optimizer", "activations", "temporary", "allocator",
                "reserved")
"""MemoryBreakdown parts: the tensors, the caching allocator's margin over them, and what is
reserved outside the allocator (Hardware.allocator_margin, reserved_bytes)."""


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
    lines += ["", *_terms_text(result.chosen), "", *_memory_text(result.chosen)]
    if result.rejected:
        lines += ["", "rejected families:"]
        lines += [f"  {r.family}: {r.reason}" for r in result.rejected[:12]]
        if len(result.rejected) > 12:
            lines.append(f"  ... and {len(result.rejected) - 12} more")
    return "\n".join(lines) + "\n"


def _terms_text(est) -> list[str]:
    """The chosen plan's step time by term, one line each, and its MFU."""
    terms = {k: v for k, v in est.step_terms_s.items() if v > 0}
    width = max(len(TERM_NAMES[k]) for k in terms)
    lines = [f"chosen plan: {est.step_time_s:.3f} s/step, MFU {est.mfu:.1%} "
             f"({est.tflops_per_gpu:.1f} TFLOP/s/GPU); step time by term:"]
    lines += [f"  {TERM_NAMES[k].ljust(width)}  {v:8.4f} s  {v / est.step_time_s:6.1%}"
              for k, v in terms.items()]
    return lines


def _memory_text(est) -> list[str]:
    """The fullest rank's memory by part, the allocator's margin and the reserve named as such
    (a plan fits when the total is at most the device's memory)."""
    mem = est.memory
    margin = mem.allocator / mem.tensors if mem.tensors else 0.0
    tensors = ", ".join(f"{k} {getattr(mem, k) / GiB:.2f}" for k in MEMORY_PARTS[:5])
    return [f"memory of the fullest rank (pipeline rank {mem.rank}): {mem.total / GiB:.2f} of "
            f"{est.device_memory_bytes / GiB:.2f} GiB = tensors ({tensors}) + allocator margin "
            f"{mem.allocator / GiB:.2f} ({margin:.1%} of the tensors) + reserved outside the "
            f"allocator {mem.reserved / GiB:.2f}"]


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
    for r, (f, b_, m) in enumerate(zip(best.stage_fwd_s, best.stage_bwd_s,
                                       best.stage_memory_parts, strict=True)):
        out.append(f"| {r} | {f * 1e3:.2f} | {b_ * 1e3:.2f} | {m.total / GiB:.1f} ("
                   + ", ".join(f"{k} {getattr(m, k) / GiB:.1f}" for k in MEMORY_PARTS) + ") |")
    mem = best.memory.as_dict()
    out += ["", f"Memory of the fullest rank ({mem['rank']}): " + ", ".join(
        f"{k} {mem[k] / GiB:.2f} GiB" for k in MEMORY_PARTS), "",
            "## Step time by term", "", "| term | seconds | share |", "|---|---|---|"]
    for name, val in best.step_terms_s.items():
        if val > 0:
            out.append(f"| {TERM_NAMES[name]} | {val:.4f} | {val / best.step_time_s:.1%} |")
    out.append(f"| **step** | **{best.step_time_s:.4f}** | MFU {best.mfu:.1%} |")
    if result.rejected:
        out += ["", "## Rejected families", "", "| family | why |", "|---|---|"]
        out += [f"| `{r.family}` | {r.reason} |" for r in result.rejected]
    return "\n".join(out) + "\n"


# --- SVG ------------------------------------------------------------------------------------
def _svg(width: int, height: int, body: list[str], chart_id: str = "") -> str:
    ident = f' id="{chart_id}"' if chart_id else ""
    return (f'<svg xmlns="http://www.w3.org/2000/svg"{ident} class="chart" width="{width}" '
            f'height="{height}" viewBox="0 0 {width} {height}" font-family="sans-serif" '
            f'font-size="11">' + "".join(body) + "</svg>")


def _text(x, y, s, anchor="start", **kw) -> str:
    extra = "".join(f' {k.strip("_").replace("_", "-")}="{v}"' for k, v in kw.items())
    return f'<text x="{x:.1f}" y="{y:.1f}" text-anchor="{anchor}"{extra}>{html.escape(s)}</text>'


def _rect(x, y, w, h, color, title="", part="") -> str:
    tip = f"<title>{html.escape(title)}</title>" if title else ""
    data = f' data-part="{part}"' if part else ""
    return (f'<rect x="{x:.3f}" y="{y:.1f}" width="{max(w, 0):.3f}" height="{h:.1f}" '
            f'fill="{color}"{data}>{tip}</rect>')


_CHAR_W = 0.62 * 11
"""Width of one character of the charts' monospace labels (11 px; monospace fonts advance
0.6 em), rounded up so that an estimated box holds the drawn text."""


def _label_width(label: str) -> float:
    return len(label) * _CHAR_W


def _figure(value: float) -> str:
    """Four significant figures, trailing zeros kept (7.790, 65.15, 224.8, 1235)."""
    digits = 3 - math.floor(math.log10(abs(value))) if value else 3
    return f"{value:.{max(0, digits)}f}"


def stacked_bars(rows: list[tuple[str, dict]], unit: str, limit: float | None = None,
                 width: int = 760, names: dict | None = None, chart_id: str = "") -> str:
    """Horizontal stacked bars: [(label, {part: value})], an optional limit line. Labels that
    fit a left column go there, longer ones (plans) on a line of their own above their bar; the
    chart widens rather than cut a label. Each row is a `<g data-label>`, each segment a
    `<rect data-part>` whose width is its value on the chart's scale."""
    names = names or {}
    longest = max(_label_width(label) for label, _ in rows)
    above = longest > 140
    label_w = 4 if above else longest + 10
    width = int(max(width, longest + 12 if above else label_w + 240))
    bar_h, gap, head = 16, 6, (14 if above else 0)
    total_max = max([sum(p.values()) for _, p in rows] + [limit or 0]) or 1.0
    scale = (width - label_w - 90) / total_max
    body, y = [], 8
    for label, parts in rows:
        body.append(f'<g class="row" data-label="{html.escape(label)}">')
        if above:
            body.append(_text(label_w, y + 10, label, font_family="monospace", class_="label"))
        else:
            body.append(_text(label_w - 6, y + bar_h - 4, label, "end", font_family="monospace",
                              class_="label"))
        x, y = label_w, y + head
        for name, val in parts.items():
            if val > 0:
                body.append(_rect(x, y, val * scale, bar_h, _COLORS.get(name, "#888"),
                                  f"{names.get(name, name)}: {val:.4g} {unit}", part=name))
                x += val * scale
        body.append(_text(x + 4, y + bar_h - 4, f"{_figure(sum(parts.values()))} {unit}",
                          class_="total"))
        body.append("</g>")
        y += bar_h + gap
    if limit:
        lx = label_w + limit * scale
        body.append(f'<line x1="{lx:.1f}" y1="2" x2="{lx:.1f}" y2="{y:.1f}" stroke="#d00" '
                    f'stroke-dasharray="4 3"/>')
        body.append(_text(lx, y + 10, f"device {limit:.0f} {unit}", "middle", fill="#d00"))
        y += 14
    shown = list(dict.fromkeys(n for _, p in rows for n, v in p.items() if v > 0))
    x, y = label_w, y + 4
    for name in shown:
        text = names.get(name, name)
        step = 22 + 6.2 * len(text)
        if x + step > width and x > label_w:
            x, y = label_w, y + 16
        body.append(f'<g class="legend" data-part="{name}">'
                    + _rect(x, y, 10, 10, _COLORS.get(name, "#888")) + _text(x + 14, y + 9, text)
                    + "</g>")
        x += step
    return _svg(width, y + 18, body, chart_id)


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
        ", a rank's virtual stages in one row" if vpp > 1 else "") + ("" if p <= max_ranks else f", {len(show)} of {p} stages")
    body.append(_text(label_w, y + 12, f"0 … {end * 1e3:.1f} ms   ({note})"))
    body.append(_text(label_w, y + 26, "blue forward, green backward, light green weight "
                                       "gradients"))
    return _svg(width, y + 34, body, "timeline")


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


_STYLE = ("body{font-family:sans-serif;max-width:1000px;margin:2em auto;color:#222}"
          "table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ccc;"
          "padding:3px 7px;text-align:right}td:first-child,th:first-child{text-align:left}"
          "tr.chosen{background:#eef6ee}code{font-size:12px}.field{white-space:nowrap}"
          "h2{margin-top:1.6em}td.why,th.why,td.plan{text-align:left}")


def render_html(result, title: str = "model") -> str:
    """One self-contained page (inline SVG, no script): each part a `<section id>`."""
    best = result.chosen
    e = html.escape
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>Plan for {e(title)}"
             f"</title><style>{_STYLE}</style></head><body>", f"<h1>Plan for {e(title)}</h1>",
             "<section id='summary'>"]
    parts += [f"<p>{e(line)}</p>" for line in _header(result, title)]
    parts.append(f"<p id='chosen'><b>Chosen:</b> <code>{e(_plan_str(best))}</code> — "
                 f"<span class='step'>{best.step_time_s:.3f} s/step</span>, "
                 f"{best.tflops_per_gpu:.1f} TFLOP/s/GPU, <span class='mfu'>MFU "
                 f"{best.mfu:.1%}</span>, HFU {best.hfu:.1%}, {best.memory_gib:.1f} GiB/GPU</p>")
    parts.append("</section>")
    parts += _terms_html(best)
    parts.append("<section id='candidates'><h2>Candidates side by side</h2>"
                 "<table><tr><th>#</th>")
    rows = [_row(x) for x in result.plans]
    parts.append("".join(f"<th>{e(k)}</th>" for k in rows[0]) + "</tr>")
    for i, r in enumerate(rows):
        parts.append(f"<tr class='{'chosen' if i == 0 else ''}'><td>{i}</td>" + "".join(
            f"<td class='plan'><code>{_wrappable(v)}</code></td>" if k == "plan"
            else f"<td>{e(v)}</td>" for k, v in r.items()) + "</tr>")
    parts.append("</table>")
    parts.append("<h3>Step time of each candidate by term</h3>")
    parts.append(stacked_bars([(f"#{i} {_plan_str(x)}", x.step_terms_s)
                               for i, x in enumerate(result.plans)], "s", names=TERM_NAMES,
                              chart_id="candidates-time"))
    parts.append("<h3>Memory per GPU of each candidate (fullest rank)</h3>")
    parts.append(stacked_bars([(f"#{i} {_plan_str(x)}", _mem_parts(x.memory))
                               for i, x in enumerate(result.plans)], "GiB",
                              limit=best.device_memory_bytes / GiB,
                              chart_id="candidates-memory"))
    parts.append("</section><section id='stages'><h2>Chosen plan per pipeline stage</h2>"
                 "<h3>Time per microbatch (ms)</h3>")
    stage_rows = [(f"stage {r}", {"fwd": f * 1e3, "bwd": b_ * 1e3})
                  for r, (f, b_) in enumerate(zip(best.stage_fwd_s, best.stage_bwd_s,
                                                  strict=True))]
    parts.append(stacked_bars(_thin(stage_rows), "ms", chart_id="stage-time"))
    parts.append("<h3>Memory (GiB)</h3>")
    parts.append(stacked_bars(_thin([(f"stage {r}", _mem_parts(m))
                                     for r, m in enumerate(best.stage_memory_parts)]), "GiB",
                              limit=best.device_memory_bytes / GiB, chart_id="stage-memory"))
    parts.append("<h3>Pipeline timeline</h3>")
    parts.append(pipeline_timeline(best.stage_fwd_s, best.stage_bwd_s, best.plan.microbatches,
                                   best.plan.schedule, vpp=best.plan.vpp))
    parts.append("</section>")
    if result.rejected:
        parts.append("<section id='rejected'><h2>Rejected families</h2><table><tr><th>family"
                     "</th><th class='why'>why</th></tr>")
        parts += [f"<tr><td><code>{e(str(r.family))}</code></td><td class='why'>"
                  f"{e(r.reason)}</td></tr>" for r in result.rejected]
        parts.append("</table></section>")
    parts.append("</body></html>")
    return "\n".join(parts)


def _wrappable(plan: str) -> str:
    """A plan that wraps only between its fields (a browser would also break inside
    `interleaved-1f1b`)."""
    fields = plan.split(",")
    return "<wbr>".join(f"<span class='field'>{html.escape(f)}{',' if i < len(fields) - 1 else ''}"
                        f"</span>" for i, f in enumerate(fields))


def _terms_html(est) -> list[str]:
    """The chosen plan's step time by term: one stacked bar and its table, and the MFU."""
    terms = {k: v for k, v in est.step_terms_s.items() if v > 0}
    out = ["<section id='step-terms'><h2>Chosen plan: step time by term</h2>",
           f"<p>{est.step_time_s:.4f} s per step, MFU {est.mfu:.1%} (model FLOPs over the "
           f"dense 16-bit peak), HFU {est.hfu:.1%}.</p>",
           stacked_bars([("chosen", terms)], "s", names=TERM_NAMES, chart_id="step-terms-bar"),
           "<table id='step-terms-table'><tr><th>term</th><th>seconds</th><th>share</th></tr>"]
    out += [f"<tr data-term='{k}'><td>{html.escape(TERM_NAMES[k])}</td><td>{v:.4f}</td>"
            f"<td>{v / est.step_time_s:.1%}</td></tr>" for k, v in terms.items()]
    out.append(f"<tr data-term='step'><th>step</th><th>{est.step_time_s:.4f}</th>"
               f"<th>MFU {est.mfu:.1%}</th></tr></table></section>")
    return out


def _thin(rows: list, limit: int = 32) -> list:
    if len(rows) <= limit:
        return rows
    step = -(-len(rows) // limit)
    return rows[::step] + ([rows[-1]] if (len(rows) - 1) % step else [])


def _mem_parts(mem) -> dict:
    return {k: getattr(mem, k) / GiB for k in MEMORY_PARTS}


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
