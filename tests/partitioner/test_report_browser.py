"""`partitioner plan --report out.html` as users see it: the page opened in headless Chromium
(Debian's `chromium` and `chromium-driver`, driven by selenium), every section drawn, no label
cut, and the numbers drawn - bar lengths, printed figures, table cells - those of `plan --json`
from the same run.

Without a browser the tests skip, saying what to install; under CI (CI=true, where `.ci/run`
installs it) a missing browser fails them."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import os
import re
import shutil
import tempfile

import pytest

from partitioner.cli import main

CASES = {
    # the page: pp=4 interleaved, tp/cp/dp, zero=1, 60+ rejected families
    "llama3-70b": ["llama3-70b", "--cluster", "64xH100"],
    # experts, pipelined, and full recomputation held so that its term is drawn
    "mixtral": ["mixtral-8x7b", "--cluster", "64xH100", "--top", "3", "--fix",
                "recompute=full,pp=4"],
    # no pipeline (one stage), nothing rejected in the fixed family
    "small": ["gpt:layers=8,hidden=1024,heads=16", "--cluster", "16xH100", "--fix",
              "tp=1,pp=1,cp=1", "--top", "2"],
}
MEMORY_PARTS = ("weights", "grads", "optimizer", "activations", "temporary", "allocator",
                "reserved")
CHARTS = ("step-terms-bar", "candidates-time", "candidates-memory", "stage-time",
          "stage-memory", "timeline")


def _missing_browser() -> str | None:
    if importlib.util.find_spec("selenium") is None:
        return "python package selenium is not installed (pip install -e '.[test]')"
    missing = [exe for exe in ("chromium", "chromedriver") if shutil.which(exe) is None]
    if missing:
        return (f"{' and '.join(missing)} not on PATH (apt-get install chromium "
                f"chromium-driver, as .ci/run does)")
    return None


@pytest.fixture(scope="module")
def browser():
    why = _missing_browser()
    if why:
        if os.environ.get("CI") == "true":
            pytest.fail(f"the report's browser tests need Chromium under CI: {why}")
        pytest.skip(f"no headless browser: {why}")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = shutil.which("chromium")
    profile = tempfile.mkdtemp(prefix="report-chromium-")
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
                 "--window-size=1200,1000", f"--user-data-dir={profile}"):
        opts.add_argument(flag)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=opts)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture(scope="module", params=list(CASES))
def page(request, browser, tmp_path_factory):
    """(the page's drawn facts, the JSON of the same `plan` run)."""
    path = tmp_path_factory.mktemp("report") / "plan.html"
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["plan", *CASES[request.param], "--report", str(path), "--json"]) == 0
    data = json.loads(out.getvalue())
    browser.get(path.as_uri())
    browser.get_log("browser")  # nothing before this page's load
    return browser.execute_script(_READ_PAGE), data, browser


# Everything read in one round trip: sections, charts (each text's box against the chart's
# viewBox, each row's label, segment widths by part, printed total), legend boxes, tables.
_READ_PAGE = """
const box = r => ({x: r.x, y: r.y, w: r.width, h: r.height});
const out = {sections: {}, charts: {}, tables: {}, scripts: document.scripts.length,
             scrollWidth: document.documentElement.scrollWidth, innerWidth: window.innerWidth,
             chosen: document.querySelector('#chosen') && document.querySelector('#chosen').innerText};
for (const s of document.querySelectorAll('section')) {
  out.sections[s.id] = {h: s.getBoundingClientRect().height, text: s.innerText.length};
}
for (const svg of document.querySelectorAll('svg.chart')) {
  const vb = svg.viewBox.baseVal;
  const chart = {view: {w: vb.width, h: vb.height}, client: box(svg.getBoundingClientRect()),
                 texts: [], rows: [], legend: [], rects: 0};
  for (const t of svg.querySelectorAll('text')) {
    chart.texts.push({text: t.textContent, box: box(t.getBBox())});
  }
  for (const r of svg.querySelectorAll('rect')) {
    if (r.getBBox().width > 0) chart.rects += 1;
  }
  for (const g of svg.querySelectorAll('g.row')) {
    const parts = {};
    for (const r of g.querySelectorAll('rect[data-part]')) {
      parts[r.dataset.part] = (parts[r.dataset.part] || 0) + r.getBBox().width;
    }
    chart.rows.push({label: g.dataset.label, drawn: g.querySelector('text.label').textContent,
                     labelBox: box(g.querySelector('text.label').getBBox()),
                     total: g.querySelector('text.total').textContent, parts: parts});
  }
  for (const g of svg.querySelectorAll('g.legend')) {
    chart.legend.push({part: g.dataset.part, box: box(g.getBBox())});
  }
  out.charts[svg.id] = chart;
}
for (const table of document.querySelectorAll('table')) {
  const id = table.id || table.closest('section').id;
  out.tables[id] = {right: table.getBoundingClientRect().right,
                    rows: [...table.rows].map(tr => ({term: tr.dataset.term,
                      cells: [...tr.cells].map(c => c.innerText.trim())}))};
}
out.fieldsBroken = [...document.querySelectorAll('td.plan .field')]
  .filter(f => f.getClientRects().length > 1).map(f => f.textContent);
out.bodyRight = document.body.getBoundingClientRect().right;
return out;
"""


def _figure(text: str) -> float:
    return float(re.match(r"[-\d.]+", text).group())


def _assert_drawn_to_scale(rows: list[dict], values: list[dict], unit: str):
    """Each row's segments are its values on one scale shared by the rows (3-decimal pixel
    coordinates), only the non-zero parts are drawn, and the printed total is the values' sum
    to its 4 significant figures."""
    scale = sum(rows[0]["parts"].values()) / sum(values[0].values())
    for row, want in zip(rows, values, strict=True):
        assert set(row["parts"]) == {k for k, v in want.items() if v > 0}, row["label"]
        for part, width in row["parts"].items():
            assert width == pytest.approx(want[part] * scale, abs=0.02), (row["label"], part)
        total = sum(want.values())
        assert row["total"].endswith(f" {unit}")
        assert _figure(row["total"]) == pytest.approx(total, rel=1e-3), row["label"]


def _plan_label(plan: dict) -> str:
    from core.plan import Plan

    return str(Plan(**plan))


def test_every_section_and_chart_is_drawn_without_errors(page):
    drawn, data, browser = page
    expected = {"summary", "step-terms", "candidates", "stages"} | (
        {"rejected"} if data["rejected"] else set())
    assert set(drawn["sections"]) == expected
    for name, section in drawn["sections"].items():
        assert section["h"] > 0 and section["text"] > 0, name
    assert set(drawn["charts"]) == set(CHARTS)
    for name, chart in drawn["charts"].items():
        assert chart["client"]["w"] > 0 and chart["client"]["h"] > 0 and chart["rects"], name
    errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert not errors and drawn["scripts"] == 0
    # the page needs no horizontal scrolling and the candidates' plans wrap between fields
    assert drawn["scrollWidth"] <= drawn["innerWidth"]
    assert not drawn["fieldsBroken"]
    assert drawn["tables"]["candidates"]["right"] <= drawn["bodyRight"] + 1


def test_no_text_is_cut_and_labels_are_whole_plans(page):
    drawn, data, _ = page
    for name, chart in drawn["charts"].items():
        view = chart["view"]
        for text in chart["texts"]:
            b = text["box"]
            assert b["x"] >= 0 and b["x"] + b["w"] <= view["w"], (name, text)
            assert b["y"] >= 0 and b["y"] + b["h"] <= view["h"], (name, text)
        # legend entries side by side never overlap
        boxes = [entry["box"] for entry in chart["legend"]]
        for i, a in enumerate(boxes):
            for b in boxes[i + 1:]:
                assert (a["x"] + a["w"] <= b["x"] or b["x"] + b["w"] <= a["x"] or
                        a["y"] + a["h"] <= b["y"] or b["y"] + b["h"] <= a["y"]), (name, a, b)
    for name in ("candidates-time", "candidates-memory"):
        labels = [row["drawn"] for row in drawn["charts"][name]["rows"]]
        assert labels == [f"#{i} {_plan_label(p['plan'])}" for i, p in enumerate(data["plans"])]
    cells = [row["cells"][1] for row in drawn["tables"]["candidates"]["rows"][1:]]
    assert [c.replace("\n", "") for c in cells] == [_plan_label(p["plan"])
                                                    for p in data["plans"]]


def test_step_time_terms_and_mfu_drawn_are_the_json(page):
    drawn, data, _ = page
    best = data["plans"][0]
    terms = best["step_terms_s"]
    assert sum(terms.values()) == pytest.approx(best["step_time_s"], rel=1e-12)
    (bar,) = drawn["charts"]["step-terms-bar"]["rows"]
    _assert_drawn_to_scale([bar], [terms], "s")
    table = {r["term"]: r["cells"] for r in drawn["tables"]["step-terms-table"]["rows"]
             if r["term"]}
    assert set(table) == {k for k, v in terms.items() if v > 0} | {"step"}
    for term, cells in table.items():
        want = best["step_time_s"] if term == "step" else terms[term]
        assert cells[1] == f"{want:.4f}", term
    assert table["step"][2] == f"MFU {best['mfu']:.1%}"
    assert f"{best['step_time_s']:.3f} s/step" in drawn["chosen"]
    assert f"MFU {best['mfu']:.1%}" in drawn["chosen"]
    rows = drawn["charts"]["candidates-time"]["rows"]
    _assert_drawn_to_scale(rows, [p["step_terms_s"] for p in data["plans"]], "s")
    for row, plan in zip(drawn["tables"]["candidates"]["rows"][1:], data["plans"],
                         strict=True):
        assert row["cells"][3] == f"{plan['step_time_s']:.3f}"
        assert row["cells"][5] == f"{plan['mfu']:.1%}"


def test_memory_per_stage_is_split_by_part_as_in_the_json(page):
    drawn, data, _ = page
    best = data["plans"][0]
    rows = drawn["charts"]["stage-memory"]["rows"]
    stages = {f"stage {s['stage']}": s["memory_gib"] for s in best["stages"]}
    assert len(rows) == min(len(stages), 32) and rows[0]["label"] == "stage 0"
    want = [{k: stages[row["label"]][k] for k in MEMORY_PARTS} for row in rows]
    _assert_drawn_to_scale(rows, want, "GiB")
    for row in rows:  # weights, gradients and optimizer state drawn apart from activations
        assert {"weights", "grads", "optimizer", "activations"} <= set(row["parts"])
        assert _figure(row["total"]) == pytest.approx(stages[row["label"]]["total"], rel=1e-3)
    cand = drawn["charts"]["candidates-memory"]["rows"]
    _assert_drawn_to_scale(cand, [{k: p["memory_breakdown_gib"][k] for k in MEMORY_PARTS}
                                  for p in data["plans"]], "GiB")
    times = {f"stage {s['stage']}": {"fwd": s["fwd_s"] * 1e3, "bwd": s["bwd_s"] * 1e3}
             for s in best["stages"]}
    rows = drawn["charts"]["stage-time"]["rows"]
    _assert_drawn_to_scale(rows, [times[row["label"]] for row in rows], "ms")
