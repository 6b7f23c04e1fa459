"""What one rank runs: its stage graphs, the pipeline around them and its parameter layouts.

Plain records, read off the lowered graph by `RankProgram.read` (pure: no process group), so
`dump` builds every rank's program in one process and the runtime builds only its own. The
runtime's pipeline executor reads `Pipeline` and `Stage` by attribute; reports render them
(partitioner/report/program.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import fx

from core import meta
from core.layout import mesh_sizes
from core.placement import ParamLayout
from core.plan import Plan
from passes import recompile_stale


def stage_module_name(stage: int) -> str:
    """The parent GraphModule's attribute holding stage `stage`'s graph."""
    return f"stage_{stage}"


@dataclass
class Stage:
    """One pipeline stage's graph on this rank.

    Without pipelining there is one stage: the whole graph with the model's own calling
    convention. With pipelining a stage graph takes flat `inputs` (model input leaves and values
    made by earlier stages, by node name) and returns the flat tuple `outputs` (values later
    stages use; for the last stage, the leaves of the model's output).
    """

    index: int
    gm: fx.GraphModule
    inputs: list[str] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Value:
    """A value that crosses a stage boundary (or a model input leaf, producer -1)."""

    name: str
    producer: int
    shape: tuple[int, ...]
    dtype: torch.dtype
    input_index: int | None = None
    """Position among the flattened model inputs, for model inputs."""
    gradient_source: bool = True
    """Whether a trainable parameter or a floating model input lies upstream of it. Values
    made from constants and buffers alone (RoPE tables, masks, positions) have no gradient
    to send back, so the consuming stage does not differentiate through them."""

    @property
    def differentiable(self) -> bool:
        """Whether a gradient flows back through it across the stages."""
        return (self.dtype.is_floating_point or self.dtype.is_complex) and self.gradient_source


@dataclass
class Pipeline:
    """The whole pipeline, the same on every rank: who makes and who uses each value."""

    num_stages: int
    pp: int
    values: dict[str, Value]
    consumers: dict[str, list[int]]
    """Value name -> the stages that read it (model inputs: every stage reads its own copy)."""
    output_names: list
    """The model output's flat leaves: value names (or constants), in `out_spec` order."""
    output_meta: list
    """(shape, dtype) of each output leaf (None for constants): how other ranks receive it."""
    out_spec: object
    stage_params: dict[int, list[str]]
    """Stage -> canonical names of the parameters and buffers it reads."""
    stage_inputs: dict[int, list[str]] = field(default_factory=dict)
    """Stage -> the values its graph takes, in placeholder order."""
    stage_outputs: dict[int, list[str]] = field(default_factory=dict)
    """Stage -> the values its graph returns, in order."""
    stage_starts: tuple[str, ...] = ()
    """The segment each stage starts with (pass it to compile_rank to cut another input shape
    the same way)."""
    placement: tuple[int, ...] = ()
    """pp coordinate of every stage: the schedule's (core.schedules.placement): stage s on
    rank s % pp (Megatron's interleaving), or the V of zb-v."""

    def rank_of(self, stage: int) -> int:
        """pp coordinate of a (virtual) stage."""
        return self.placement[stage]

    def holders(self, name: str) -> list[int]:
        """pp coordinates holding a parameter (two for embeddings tied across stages)."""
        return sorted({self.rank_of(s) for s, names in self.stage_params.items() if name in names})

    def summary(self) -> str:
        crossing = sum(value.producer >= 0 for value in self.values.values())
        tied = sum(len(self.holders(name)) > 1
                   for name in {n for names in self.stage_params.values() for n in names})
        return (f"{self.num_stages} stage submodules on {self.pp} pp ranks; values sent between "
                f"stages: {crossing}; tensors read on several pp ranks: {tied}")


@dataclass
class RankProgram:
    """Everything one rank runs, and what reports show about it."""

    plan: Plan
    rank: int
    coords: dict[str, int]
    stages: list[Stage]
    layouts: dict[str, ParamLayout]
    """Canonical name -> layout, for every parameter and buffer this rank holds."""
    sizes: dict[str, int] = field(default_factory=dict)
    """Size of every mesh dimension."""
    all_layouts: dict[str, ParamLayout] = field(default_factory=dict)
    """Every parameter and buffer of the model (other pipeline ranks' included)."""
    pipeline: Pipeline | None = None
    """None without pipelining."""
    passes: tuple = ()
    """What each pass of the registry did (passes.registry.PassOutcome), in order."""
    stale: set = field(default_factory=set)
    """Graph modules of this program's stages rewritten since their code was generated (a
    program compiled with `generate_code=False`): `generate_code()` before they run."""

    @classmethod
    def read(cls, gm: fx.GraphModule, plan: Plan, rank: int,
             coords: dict[str, int]) -> "RankProgram":
        """This rank's program from the registry's result: the whole graph (one stage) or this
        pp rank's stage submodules of the lowered parent."""
        all_layouts = gm.meta[meta.LAYOUTS]
        sizes = mesh_sizes(plan)
        outcomes = gm.meta.get(meta.PASS_LOG, ())
        pipeline: Pipeline | None = gm.meta.get(meta.PIPELINE_RECORD)
        if pipeline is None:
            layouts = {name: layout for name, layout in all_layouts.items()
                       if layout.held_at(coords)}
            return cls(plan=plan, rank=rank, coords=coords, stages=[Stage(0, gm)],
                       layouts=layouts, sizes=sizes, all_layouts=all_layouts,
                       passes=outcomes)
        mine = [Stage(s, gm.get_submodule(stage_module_name(s)), pipeline.stage_inputs[s],
                      pipeline.stage_outputs[s])
                for s in range(pipeline.num_stages) if pipeline.rank_of(s) == coords["pp"]]
        used = {name for stage in mine for name in pipeline.stage_params[stage.index]}
        layouts = {name: layout for name, layout in all_layouts.items()
                   if name in used and layout.held_at(coords)}
        return cls(plan=plan, rank=rank, coords=coords, stages=mine, layouts=layouts,
                   sizes=sizes, all_layouts=all_layouts, pipeline=pipeline, passes=outcomes)

    def generate_code(self) -> None:
        """Regenerate the code of the stage graph modules rewritten since (`stale`), once."""
        for stage in self.stages:
            recompile_stale(stage.gm, self.stale)
        self.stale.clear()

    def nodes(self):
        for stage in self.stages:
            for node in stage.gm.graph.nodes:
                yield stage.index, node

    def local_numel(self) -> int:
        return sum(l.local_numel(self.sizes) for l in self.layouts.values() if not l.is_buffer)
