"""Lower: a captured graph + a resolved plan + one rank's coordinates -> that rank's program.

`compile_rank` is a pure function (no process group, no memory: the graph holds meta tensors),
so the CLI builds every rank's program in one process and the runtime builds only its own.
A `RankProgram` is what reports read: its stages, every node's placement and inserted
collective, and the layout of every parameter this rank holds.
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass, field

import torch
from torch import fx

from core.layout import mesh_sizes, rank_coords
from core.placement import ParamLayout
from core.plan import Plan
from core.fx_utils import module_path
from core.ops import COLLECTIVE_KINDS
from partitioner.capture import Captured
from passes import PassContext, run_passes
from passes.device import retarget_device
from passes.kernels import use_kernels
from passes.pipeline_split import stage_starts as starts_of_stages


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

    @property
    def differentiable(self) -> bool:
        return self.dtype.is_floating_point or self.dtype.is_complex


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
    stage_starts: tuple[str, ...] = ()
    """The segment each stage starts with (pass it to compile_rank to cut another input shape
    the same way)."""

    def rank_of(self, stage: int) -> int:
        """pp coordinate of a (virtual) stage: Megatron's interleaving, stage s on rank s % pp."""
        return stage % self.pp

    def holders(self, name: str) -> list[int]:
        """pp coordinates holding a parameter (two for embeddings tied across stages)."""
        return sorted({self.rank_of(s) for s, names in self.stage_params.items() if name in names})


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

    def nodes(self):
        for stage in self.stages:
            for node in stage.gm.graph.nodes:
                yield stage.index, node

    def node_rows(self) -> list[dict]:
        """One row per node: the `dump --format json` node schema."""
        rows = []
        for stage, node in self.nodes():
            val = node.meta.get("val")
            shape = list(val.shape) if isinstance(val, torch.Tensor) else None
            rows.append({
                "name": node.name, "op": node.op, "target": _target_name(node),
                "shape": shape, "placement": node_placement(node, self.layouts),
                "collective": collective_kind(node) or self._p2p_kind(stage, node),
                "stage": stage, "module": module_path(node),
            })
        return rows

    def _p2p_kind(self, stage: int, node: fx.Node) -> str | None:
        """recv for a stage input made by another stage, send for a stage's outputs."""
        if self.pipeline is None:
            return None
        value = self.pipeline.values.get(node.name)
        if node.op == "placeholder" and value is not None and value.producer >= 0:
            return "recv"
        if node.op == "output" and stage != self.pipeline.num_stages - 1 and node.args[0]:
            return "send"
        return None

    def cut_summary(self) -> list[str]:
        """One line per value crossing a stage boundary: producer -> consumers, shape."""
        if self.pipeline is None:
            return []
        lines = []
        for name, value in self.pipeline.values.items():
            if value.producer < 0:
                continue
            consumers = self.pipeline.consumers[name]
            lines.append(f"  {name}: stage {value.producer} -> stage(s) "
                         f"{', '.join(map(str, consumers))}  {'x'.join(map(str, value.shape))} "
                         f"{str(value.dtype).removeprefix('torch.')}")
        return lines

    def explain(self) -> str:
        rows = self.node_rows()
        header = (f"rank {self.rank}  coords {self.coords}  plan {self.plan}\n"
                  f"{len(self.stages)} stage(s), {sum(1 for _ in rows)} nodes, "
                  f"{sum(r['collective'] is not None for r in rows)} inserted collectives, "
                  f"{len([l for l in self.layouts.values() if not l.is_buffer])} parameters "
                  f"({self.local_numel():,} local elements)")
        widths = (28, 14, 40, 20, 12, 6, 16)
        title = ("node", "op", "target", "shape", "placement", "stage", "collective")
        lines = [header, _row(title, widths), _row(["-" * (w - 1) for w in widths], widths)]
        for r in rows:
            shape = "x".join(map(str, r["shape"])) if r["shape"] is not None else ""
            lines.append(_row((r["name"], r["op"], r["target"], shape, r["placement"],
                               str(r["stage"]), r["collective"] or ""), widths))
        cuts = self.cut_summary()
        if cuts:
            lines += ["values crossing stage cuts (sent producer -> consumer rank):", *cuts]
        return "\n".join(lines)

    def local_numel(self) -> int:
        return sum(l.local_numel(self.sizes) for l in self.layouts.values() if not l.is_buffer)


def _row(cells, widths) -> str:
    return "".join(str(c)[: w - 1].ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()


def _target_name(node: fx.Node) -> str:
    if node.op == "call_function":
        return getattr(node.target, "__name__", str(node.target)) if not isinstance(
            node.target, torch._ops.OpOverload) else str(node.target)
    return str(node.target)


def collective_kind(node: fx.Node) -> str | None:
    """The collective a node performs (DESIGN.md's names), or None."""
    if node.op != "call_function":
        return None
    return node.meta.get("collective") or COLLECTIVE_KINDS.get(node.target)


def node_placement(node: fx.Node, layouts: dict[str, ParamLayout]) -> str:
    if node.op == "get_attr" and node.target in layouts:
        return str(layouts[node.target].placements)
    return node.meta.get("tp.placement", "R")


def layouts_from_capture(captured: Captured) -> dict[str, ParamLayout]:
    """Every parameter and buffer replicated: the layout before any sharding pass."""
    aliases: dict[str, list[str]] = {}
    for alias, target in captured.aliases.items():
        aliases.setdefault(target, []).append(alias)
    layouts = {}
    for name, (shape, dtype, requires_grad) in captured.params.items():
        layouts[name] = ParamLayout(name, tuple(shape), dtype, requires_grad,
                                    aliases=tuple(aliases.get(name, ())))
    for name, (shape, dtype, persistent) in captured.buffers.items():
        layouts[name] = ParamLayout(name, tuple(shape), dtype, False,
                                    aliases=tuple(aliases.get(name, ())), is_buffer=True,
                                    persistent=persistent)
    return layouts


def compile_rank(captured: Captured, plan: Plan, rank: int, device: torch.device | str = "cpu",
                 stage_starts: tuple[str, ...] | None = None) -> RankProgram:
    """Run the passes for one rank and lower the result to its program (pure, no groups).

    `stage_starts` (an earlier program's `pipeline.stage_starts`) fixes the pipeline cut, so
    every input shape of one model keeps each parameter on the same stage.
    """
    coords = rank_coords(plan, rank)
    with warnings.catch_warnings():  # torch's own pytree spec deprecation, raised by deepcopy
        warnings.simplefilter("ignore", FutureWarning)
        gm = copy.deepcopy(captured.gm)
    # Sharding passes start from "everything replicated" with the capture's tied names (the
    # graph alone cannot tell a tied alias from an unused parameter) and update this key.
    gm.meta["partitioner.layouts"] = layouts_from_capture(captured)
    gm = run_passes(gm, PassContext(plan=plan, coords=coords, stage_starts=stage_starts))
    gm = use_kernels(gm)
    gm = retarget_device(gm, torch.device(device))
    all_layouts = gm.meta["partitioner.layouts"]
    sizes = mesh_sizes(plan)
    if plan.stages == 1:
        return RankProgram(plan=plan, rank=rank, coords=coords, stages=[Stage(0, gm)],
                           layouts=all_layouts, sizes=sizes, all_layouts=all_layouts)
    stages, pipeline = split_stages(gm, plan.stages, plan.pp)
    pipeline.stage_starts = starts_of_stages(gm)
    # Parameters no stage reads still belong to the model: the first stage keeps them.
    read = {name for names in pipeline.stage_params.values() for name in names}
    pipeline.stage_params[0] += [name for name in all_layouts if name not in read]
    mine = [stage for stage in stages if pipeline.rank_of(stage.index) == coords["pp"]]
    used = {name for stage in mine for name in pipeline.stage_params[stage.index]}
    layouts = {name: layout for name, layout in all_layouts.items() if name in used}
    return RankProgram(plan=plan, rank=rank, coords=coords, stages=mine, layouts=layouts,
                       sizes=sizes, all_layouts=all_layouts, pipeline=pipeline)


def split_stages(gm: fx.GraphModule, num_stages: int, pp: int) -> tuple[list[Stage], Pipeline]:
    """One graph per stage from `meta["pp.stage"]` (set by passes.pipeline_split).

    Values used across stages become outputs of the producing stage and placeholders of every
    consuming stage (sent directly from producer to consumer, whatever the distance); model
    inputs are placeholders of every stage that reads them (every rank has the batch).
    """
    graph = gm.graph
    placeholders = list(graph.find_nodes(op="placeholder"))
    output_node = graph.find_nodes(op="output")[0]
    out_leaves = list(output_node.args[0])
    last = num_stages - 1
    stage_of = {n: n.meta["pp.stage"] for n in graph.nodes if "pp.stage" in n.meta}
    values: dict[str, Value] = {}
    for index, node in enumerate(placeholders):
        val = node.meta.get("val")
        values[node.name] = Value(node.name, -1, tuple(getattr(val, "shape", ())),
                                  getattr(val, "dtype", torch.float32), input_index=index)

    consumers: dict[str, list[int]] = {}
    needs: dict[int, list[fx.Node]] = {s: [] for s in range(num_stages)}

    def use(value: fx.Node, stage: int) -> None:
        if value.op == "get_attr":
            return
        producer = -1 if value.op == "placeholder" else stage_of[value]
        if producer == stage:
            return
        if value not in needs[stage]:
            needs[stage].append(value)
        if value.op != "placeholder":
            if not isinstance(value.meta.get("val"), torch.Tensor):
                raise ValueError(f"value {value.name} ({value.meta.get('val')!r}) crosses a "
                                 f"stage boundary but is not a tensor")
            val = value.meta["val"]
            values.setdefault(value.name, Value(value.name, producer, tuple(val.shape),
                                                val.dtype))
            stages = consumers.setdefault(value.name, [])
            if stage not in stages:
                stages.append(stage)

    for node in graph.nodes:
        if node in stage_of:
            for arg in node.all_input_nodes:
                use(arg, stage_of[node])
    for leaf in out_leaves:
        if isinstance(leaf, fx.Node):
            use(leaf, last)

    stages, stage_params = [], {}
    for s in range(num_stages):
        sub = fx.Graph()
        env: dict[fx.Node, fx.Node] = {}
        for value in needs[s]:
            env[value] = sub.placeholder(value.name)
            env[value].meta = dict(value.meta)
        params: list[str] = []
        for node in graph.nodes:
            if stage_of.get(node) != s:
                continue
            for arg in node.all_input_nodes:
                if arg.op == "get_attr" and arg not in env:
                    env[arg] = sub.get_attr(arg.target)
                    env[arg].meta = dict(arg.meta)
                    params.append(arg.target)
            env[node] = sub.node_copy(node, lambda arg: env[arg])
        if s == last:
            outputs = [leaf.name if isinstance(leaf, fx.Node) else leaf for leaf in out_leaves]
            sub.output(tuple(env[leaf] if isinstance(leaf, fx.Node) else leaf
                             for leaf in out_leaves))
        else:
            made = [n for n in graph.nodes if stage_of.get(n) == s and n.name in consumers]
            outputs = [n.name for n in made]
            sub.output(tuple(env[n] for n in made))
        sub.lint()
        stages.append(Stage(s, fx.GraphModule(gm, sub), inputs=[v.name for v in needs[s]],
                            outputs=outputs))
        stage_params[s] = params
    pipeline = Pipeline(num_stages=num_stages, pp=pp, values=values, consumers=consumers,
                        output_names=[leaf.name if isinstance(leaf, fx.Node) else leaf
                                      for leaf in out_leaves],
                        output_meta=[(tuple(leaf.meta["val"].shape), leaf.meta["val"].dtype)
                                     if isinstance(leaf, fx.Node) else None
                                     for leaf in out_leaves],
                        out_spec=graph._codegen.pytree_info.out_spec,
                        stage_params=stage_params)
    return stages, pipeline
