"""Activation recomputation (Megatron-Core's `recompute_granularity`), and sp's gathered inputs.

- selective: the attention core (scaled_dot_product_attention: softmax and its inputs) keeps only
  q, k, v and is recomputed in backward; the rest of the block keeps its activations.
- full: every repeated block (the segments of passes.pipeline_split) becomes one checkpointed
  region: forward keeps only the block's inputs.
- sp (`save_gathered_as_shards`, applied when a program is lowered to run, whatever the
  granularity): what `gather_for_region` gathers is saved for backward as this rank's sequence
  shard and gathered again in backward, as Megatron's sequence-parallel linears keep their
  local input, so the column linears' inputs cost 1/tp of the activation memory.
  Each gather and the ops reading what it gathered become one checkpointed region whose
  backward redoes one all-gather (shared by q, k and v) and no matmul. With several readers
  (q, k and v's linears) the checkpoint is selective: it recomputes only the gather and views
  of it and keeps the readers' outputs (attention keeps them anyway). With one reader (fc1, the
  LM head) it is plain: the recomputation stops once the reader's saved inputs are rebuilt
  (torch.utils.checkpoint's early stop saves inputs before computing), so that reader is never
  run again and its output is not kept longer than its users keep it (the LM head's logits).
  This is torch.utils.checkpoint, which torch.compile traces, where saved-tensor hooks keyed on
  storages could not be. Reports (unlowered programs) keep the gathers in view.

Runs after pipeline_split, so every new node inherits its region's stage.
"""

from __future__ import annotations

import operator

import torch
from torch import fx

from core import meta, ops
from core.ops import CheckpointedRegion
from passes import PassContext, recompile
from passes.pipeline_split import block_prefix, segment_of_nodes

_ATTENTION_OPS = {torch.ops.aten.scaled_dot_product_attention.default,
                  ops.scaled_dot_product_attention}


def recompute(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    if ctx.plan.recompute == "selective":
        for node in gm.graph.nodes:
            if node.op == "call_function" and node.target in _ATTENTION_OPS:
                node.target = ops.checkpointed_attention  # same arguments, same results
                node.meta[meta.RECOMPUTE] = "selective"
    elif ctx.plan.recompute == "full":
        names, assignment = segment_of_nodes(gm)
        prefix = block_prefix(gm)
        for index, name in enumerate(names):
            if prefix is not None and name.startswith(prefix + "."):
                nodes = [n for n, seg in assignment.items() if seg == index]
                _checkpoint_region(gm, nodes, f"recompute_{name.replace('.', '_')}")
    gm.graph.lint()
    recompile(gm)
    return gm


def save_gathered_as_shards(gm: fx.GraphModule) -> list[str]:
    """Each gather_for_region, the views of what it gathered and their readers (same stage)
    become one region that gathers again in backward (see the module docstring;
    passes.lowering.collectives applies it to the programs that run).
    Returns the gathers so treated."""
    gathers = [n for n in gm.graph.nodes  # sp's, over tp (cp's gathers read whole sequences)
               if n.op == "call_function" and n.target is ops.gather_for_region
               and n.args[1] == "tp"]
    treated = []
    for gather in gathers:
        stage = gather.meta.get("pp.stage")
        members, frontier = {gather}, [gather]
        while frontier:  # through views, which share the gathered storage
            for user in frontier.pop().users:
                if user.op == "call_function" and user.meta.get("pp.stage") == stage \
                        and user not in members:
                    members.add(user)
                    if isinstance(user.target, torch._ops.OpOverload) and user.target.is_view:
                        frontier.append(user)
        nodes = sorted(members)  # in graph order (nodes of one graph compare by position)
        readers = [n for n in nodes
                   if n is not gather and not getattr(n.target, "is_view", False)]
        if readers:  # else nothing here saves the gathered value
            recomputed = (ops.gather_for_region,) if len(readers) > 1 else ()
            _checkpoint_region(gm, nodes, f"sp_{gather.name}", recomputed)
            treated.append(gather.name)
    return treated


def _checkpoint_region(gm: fx.GraphModule, nodes: list[fx.Node], name: str,
                       recomputed: tuple = ()) -> None:
    """Replace `nodes` (in graph order) by one call of a checkpointed sub-graph, placed after
    the last of them; `recomputed`: see CheckpointedRegion."""
    members = set(nodes)
    inputs: list[fx.Node] = []
    for node in nodes:
        for arg in node.all_input_nodes:
            if arg not in members and arg not in inputs:
                inputs.append(arg)
    outputs = [n for n in nodes if any(user not in members for user in n.users)]

    sub = fx.Graph()
    env = {}
    for value in inputs:
        env[value] = sub.placeholder(value.name)
        env[value].meta = dict(value.meta)
    for node in nodes:
        env[node] = sub.node_copy(node, lambda arg: env[arg])
    sub.output(tuple(env[n] for n in outputs))
    gm.add_submodule(name, CheckpointedRegion(fx.GraphModule(gm, sub), recomputed))

    _defer_readers(nodes)
    stage = nodes[0].meta.get("pp.stage")
    with gm.graph.inserting_before(nodes[-1].next):
        call = gm.graph.call_module(name, tuple(inputs))
        call.meta = {"nn_module_stack": nodes[0].meta.get("nn_module_stack", {}),
                     meta.RECOMPUTE: "full" if not recomputed else "sp"}
        replacements = []
        for i, node in enumerate(outputs):
            item = gm.graph.call_function(operator.getitem, (call, i))
            item.meta = dict(node.meta)
            replacements.append(item)
    if stage is not None:
        call.meta["pp.stage"] = stage
    for node, item in zip(outputs, replacements, strict=True):
        node.replace_all_uses_with(item, delete_user_cb=lambda user: user not in members)
    for node in reversed(nodes):
        gm.graph.erase_node(node)


def _defer_readers(nodes: list[fx.Node]) -> None:
    """Nodes lying between the region's first and last node that read its values (directly or
    not) move after its last node, where the region's call will be (order kept)."""
    members, reads_region, moved = set(nodes), set(nodes), []
    node = nodes[0]
    while node is not nodes[-1]:
        node = node.next
        if node not in members and any(arg in reads_region for arg in node.all_input_nodes):
            reads_region.add(node)
            moved.append(node)
    anchor = nodes[-1]
    for node in moved:
        anchor.append(node)
        anchor = node
