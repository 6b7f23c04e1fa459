"""Published training runs (cost_model/data/published_runs.json) and the cost model's prediction
of each: what the efficiency fit (fit.py `fit_published`) is fitted to and judged on.

A run is a model, a cluster, a batch and either a whole plan (the paper names every field that
matters) or the degrees it names (`fix`: the rest is searched, the published run having been
tuned). What was published is turned into seconds per step with the paper's own FLOP count:
Narayanan et al. 2021 divide equation (3)'s FLOPs by the step, Llama 3 counts model FLOPs,
Korthikanti et al. 2022 give the seconds. The runs are data, not code: every one carries the
source text it was read from, and the runs the cost model cannot express are listed apart with
the reason.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from core.plan import Plan
from cost_model.hardware import Cluster, Hardware, get_hardware
from cost_model.search import search
from cost_model.shapes import TransformerShape
from cost_model.step_time import Estimate, estimate

PUBLISHED_RUNS = Path(__file__).resolve().parent / "data" / "published_runs.json"


@dataclass(frozen=True)
class Source:
    paper: str
    table: str
    quote: str
    """The source text the run's numbers were read from, as the search tool found it."""


@dataclass(frozen=True)
class PublishedRun:
    name: str
    source: Source
    gpu: str
    """Profile name (hardware.PROFILES) of the cluster's device."""
    gpus: int
    shape: TransformerShape
    global_batch: int
    published_step_s: float
    """The step time the publication gives, or implies through its own FLOP count."""
    plan: Plan | None = None
    """The whole plan, where the publication names it."""
    fix: str = ""
    """Otherwise the degrees it names; the search picks the rest."""
    assumptions: tuple[str, ...] = ()
    """What the run's record takes that the quote does not say."""

    def __post_init__(self) -> None:
        if (self.plan is None) == (not self.fix):
            raise ValueError(f"published run {self.name}: give a plan or a fix, not both")
        if not self.source.quote.strip():
            raise ValueError(f"published run {self.name} has no quoted source text")


@dataclass(frozen=True)
class ExcludedRun:
    name: str
    source: Source
    reason: str


def _shape(model: dict) -> TransformerShape:
    kind = model["kind"]
    if kind == "megatron_gpt":
        return TransformerShape.megatron_gpt(layers=model["layers"], hidden=model["hidden"],
                                             heads=model["heads"], seq=model["seq"],
                                             vocab=model["vocab"])
    if kind == "llama":
        return TransformerShape(layers=model["layers"], hidden=model["hidden"],
                                heads=model["heads"], kv_heads=model["kv_heads"],
                                ffn=model["ffn"], seq=model["seq"], vocab=model["vocab"],
                                swiglu=True, norm="rmsnorm", bias=False, tie_embeddings=False,
                                learned_positions=False)
    if kind == "transformer":  # every field named in the record
        return TransformerShape(**{k: v for k, v in model.items() if k != "kind"})
    raise ValueError(f"unknown model kind {kind!r} in published runs")


def narayanan_eq3_flops(shape: TransformerShape, global_batch: int) -> float:
    """Narayanan et al. 2021 equation (3): the GEMM FLOPs of one step with full recomputation,
    96 B s l h^2 (1 + s/(6h) + V/(16 l h)) - the count their Table 1's FLOP/s divide."""
    B, s, l, h, V = global_batch, shape.seq, shape.layers, shape.hidden, shape.vocab
    return 96 * B * s * l * h * h * (1 + s / (6 * h) + V / (16 * l * h))


def _published_step_s(published: dict, shape: TransformerShape, global_batch: int,
                      gpus: int) -> float:
    if "step_time_s" in published:
        return float(published["step_time_s"])
    per_gpu = published["tflops_per_gpu"] * 1e12
    counts = {"narayanan2021_eq3": lambda: narayanan_eq3_flops(shape, global_batch),
              "model": lambda: shape.model_flops_per_token() * global_batch * shape.seq}
    return counts[published["flops"]]() / (per_gpu * gpus)


def _run(record: dict) -> PublishedRun:
    shape = _shape(record["model"])
    source = Source(**record["source"])
    step_s = _published_step_s(record["published"], shape, record["global_batch"],
                               record["gpus"])
    plan = Plan.parse(record["plan"]).resolve(record["gpus"]) if "plan" in record else None
    return PublishedRun(name=record["name"], source=source, gpu=record["gpu"],
                        gpus=record["gpus"], shape=shape, global_batch=record["global_batch"],
                        published_step_s=step_s, plan=plan, fix=record.get("fix", ""),
                        assumptions=tuple(record.get("assumptions", ())))


@dataclass(frozen=True)
class PublishedRuns:
    runs: tuple[PublishedRun, ...]
    """The runs the cost model is judged on."""
    excluded: tuple[ExcludedRun, ...]
    """The runs it cannot express, each with the reason."""


def load_published(path: str | Path = PUBLISHED_RUNS) -> PublishedRuns:
    data = json.loads(Path(path).read_text())
    return PublishedRuns(
        runs=tuple(_run(r) for r in data["runs"]),
        excluded=tuple(ExcludedRun(name=r["name"], source=Source(**r["source"]),
                                   reason=r["reason"]) for r in data.get("excluded", ())))


@dataclass(frozen=True)
class Prediction:
    run: PublishedRun
    estimate: Estimate

    @property
    def predicted_s(self) -> float:
        return self.estimate.step_time_s

    @property
    def error(self) -> float:
        """Predicted over published step time, less one (negative: predicted too fast)."""
        return self.predicted_s / self.run.published_step_s - 1.0


def predict_run(run: PublishedRun, profiles: dict[str, Hardware] | None = None) -> Prediction:
    """The cost model's step for `run`, on `profiles[run.gpu]` (default: hardware.PROFILES)."""
    hw = (profiles or {}).get(run.gpu) or get_hardware(run.gpu)
    cluster = Cluster(hardware=hw, num_gpus=run.gpus, gpus_per_node=hw.gpus_per_node)
    if run.plan is not None:
        est = estimate(run.shape, run.plan, cluster, run.global_batch)
    else:
        est = search(run.shape, cluster, run.global_batch, fixed=run.fix, top_k=1).chosen
    return Prediction(run, est)
