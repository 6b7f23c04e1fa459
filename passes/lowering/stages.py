"""Cut the rewritten graph into pipeline stages: a parent GraphModule with one submodule per
stage, the shape `torch.fx.passes.split_module` returns.

`split_module` itself does not fit: it turns every parameter a partition reads into an input of
that partition (a placeholder fed by the parent's get_attr), whereas a stage must read its own
parameters, bound to the local shards of the rank that runs it (a tied embedding is read by two
stages on two ranks, each holding its own copy). So the parent is built here, the same way:
values used across stages become outputs of the producing stage and placeholders of every
consuming stage, named by value and sent directly from producer to consumer whatever the
distance; model inputs are placeholders of every stage that reads them (every rank has the
batch). The parent keeps the model's calling convention, so `parent(*args)` runs every stage in
one process.

Stage membership comes from `node.meta["pp.stage"]` (passes.pipeline_split); this runs last,
after recompute, kernels and device rewrote the one flat graph.
"""

from __future__ import annotations

import operator

import torch
from torch import fx

from core import meta
from core.schedules import placement
from passes import PassContext, PassError
from passes.lowering.program import Pipeline, Value, stage_module_name


def lower_stages(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    """The parent GraphModule of `plan.stages` stage submodules (`stage_0`, ...), with the
    `Pipeline` record in `gm.meta`; a one-stage plan keeps the graph whole."""
    num_stages = ctx.plan.stages
    if num_stages == 1:
        return gm
    graph = gm.graph
    stage_of = {n: n.meta[meta.PP_STAGE] for n in graph.nodes if meta.PP_STAGE in n.meta}
    placeholders = list(graph.find_nodes(op="placeholder"))
    out_leaves = list(graph.find_nodes(op="output")[0].args[0])
    values, consumers, needs = _crossings(graph, stage_of, placeholders, out_leaves, num_stages,
                                          _gradient_sources(graph, gm.meta[meta.LAYOUTS]))

    last = num_stages - 1
    parent = fx.Graph()
    parent._codegen = graph._codegen  # the model's own inputs and outputs
    parent_env = {node: parent.node_copy(node) for node in placeholders}
    submodules, stage_params = {}, {}
    stage_inputs, stage_outputs = {}, {}
    for s in range(num_stages):
        if s == last:
            returned = out_leaves
        else:
            returned = [n for n in graph.nodes if stage_of.get(n) == s and n.name in consumers]
        sub, params = _stage_graph(graph, stage_of, s, needs[s], returned)
        name = stage_module_name(s)
        submodules[name] = fx.GraphModule(gm, sub)
        submodules[name].meta.update(gm.meta)  # the passes' records (the loss path reads tp's)
        stage_params[s] = params
        stage_inputs[s] = [value.name for value in needs[s]]
        stage_outputs[s] = [n.name if isinstance(n, fx.Node) else n for n in returned]
        call = parent.call_module(name, tuple(parent_env[value] for value in needs[s]))
        call.meta[meta.PP_STAGE] = s
        for index, node in enumerate(returned):
            if isinstance(node, fx.Node):
                item = parent.call_function(operator.getitem, (call, index))
                item.meta = dict(node.meta)
                parent_env.setdefault(node, item)
    parent.output(tuple(parent_env[leaf] if isinstance(leaf, fx.Node) else leaf
                        for leaf in out_leaves))

    # Parameters no stage reads still belong to the model: the first stage keeps them.
    read = {name for names in stage_params.values() for name in names}
    stage_params[0] += [name for name in gm.meta[meta.LAYOUTS] if name not in read]
    cut = gm.meta.get(meta.PP_SPLIT_RECORD)
    pipeline = Pipeline(
        num_stages=num_stages, pp=ctx.plan.pp, values=values, consumers=consumers,
        output_names=[leaf.name if isinstance(leaf, fx.Node) else leaf for leaf in out_leaves],
        output_meta=[(tuple(leaf.meta["val"].shape), leaf.meta["val"].dtype)
                     if isinstance(leaf, fx.Node) else None for leaf in out_leaves],
        out_spec=graph._codegen.pytree_info.out_spec, stage_params=stage_params,
        stage_inputs=stage_inputs, stage_outputs=stage_outputs,
        stage_starts=cut.stage_starts if cut is not None else (),
        placement=placement(ctx.plan.schedule, ctx.plan.pp, ctx.plan.vpp))
    # fx's constructor generates the code of every graph module the parent holds again
    # (each stage's was generated when it was built): the parent is built around stand-ins,
    # then given its stages.
    lowered = fx.GraphModule({name: torch.nn.Module() for name in submodules}, parent,
                             class_name="StagedGraphModule")
    for name, stage in submodules.items():
        setattr(lowered, name, stage)
    lowered.meta = {**gm.meta, meta.PIPELINE_RECORD: pipeline}
    lowered.graph.lint()
    return lowered


def _gradient_sources(graph: fx.Graph, layouts: dict) -> set[fx.Node]:
    """The nodes a gradient can reach: those downstream of a floating model input or of a
    parameter that requires grad. A get_attr the layouts do not name is counted as one (a
    gradient kept that is not needed costs time; one dropped that is needed is wrong)."""
    reached: set[fx.Node] = set()
    for node in graph.nodes:
        if node.op == "placeholder":
            val = node.meta.get("val")
            source = isinstance(val, torch.Tensor) and val.dtype.is_floating_point
        elif node.op == "get_attr":
            layout = layouts.get(node.target)
            source = layout is None or (layout.requires_grad and not layout.is_buffer)
        else:
            source = any(arg in reached for arg in node.all_input_nodes)
        if source:
            reached.add(node)
    return reached


def _crossings(graph: fx.Graph, stage_of: dict, placeholders: list, out_leaves: list,
               num_stages: int, gradient_sources: set[fx.Node]):
    """(values, consumers, needs): every model input and stage-crossing value, the stages that
    read each crossing value, and the values each stage takes as placeholders."""
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
            val = value.meta.get("val")
            if not isinstance(val, torch.Tensor):
                raise PassError(f"lowering: value {value.name} ({val!r}) crosses a stage "
                                f"boundary but is not a tensor")
            values.setdefault(value.name, Value(value.name, producer, tuple(val.shape),
                                                val.dtype,
                                                gradient_source=value in gradient_sources))
            stages = consumers.setdefault(value.name, [])
            if stage not in stages:
                stages.append(stage)

    for node in graph.nodes:
        if node in stage_of:
            for arg in node.all_input_nodes:
                use(arg, stage_of[node])
    for leaf in out_leaves:
        if isinstance(leaf, fx.Node):
            use(leaf, num_stages - 1)
    return values, consumers, needs


def _stage_graph(graph: fx.Graph, stage_of: dict, stage: int, needs: list[fx.Node],
                 returned: list) -> tuple[fx.Graph, list[str]]:
    """Stage `stage`'s graph (its inputs `needs`, returning `returned` as a flat tuple) and the
    parameters and buffers it reads."""
    sub = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for value in needs:
        env[value] = sub.placeholder(value.name)
        env[value].meta = dict(value.meta)
    params: list[str] = []
    for node in graph.nodes:
        if stage_of.get(node) != stage:
            continue
        for arg in node.all_input_nodes:
            if arg.op == "get_attr" and arg not in env:
                env[arg] = sub.get_attr(arg.target)
                env[arg].meta = dict(arg.meta)
                params.append(arg.target)
        env[node] = sub.node_copy(node, lambda arg: env[arg])
    sub.output(tuple(env[n] if isinstance(n, fx.Node) else n for n in returned))
    sub.lint()
    return sub, params
