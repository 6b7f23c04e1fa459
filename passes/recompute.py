"""Activation recomputation (Megatron-Core's `recompute_granularity`).

- selective: the attention core (scaled_dot_product_attention: softmax and its inputs) keeps only
  q, k, v and is recomputed in backward; the rest of the block keeps its activations.
- full: every repeated block (the segments of passes.pipeline_split) becomes one checkpointed
  region: forward keeps only the block's inputs.

Runs after pipeline_split, so every new node inherits its region's stage.
"""

from __future__ import annotations

import operator

import torch
from torch import fx

from passes import PassContext
from passes.pipeline_split import block_prefix, segment_of_nodes
from runtime.recompute import CheckpointedRegion, checkpointed_attention

_ATTENTION_OPS = {torch.ops.aten.scaled_dot_product_attention.default}


def recompute(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    if ctx.plan.recompute == "selective":
        for node in gm.graph.nodes:
            if node.op == "call_function" and node.target in _ATTENTION_OPS:
                node.target = checkpointed_attention  # same arguments, same results
                node.meta["recompute"] = "selective"
    elif ctx.plan.recompute == "full":
        names, assignment = segment_of_nodes(gm)
        prefix = block_prefix(gm)
        for index, name in enumerate(names):
            if prefix is not None and name.startswith(prefix + "."):
                nodes = [n for n, seg in assignment.items() if seg == index]
                _checkpoint_region(gm, nodes, f"recompute_{name.replace('.', '_')}")
    gm.graph.lint()
    gm.recompile()
    return gm


def _checkpoint_region(gm: fx.GraphModule, nodes: list[fx.Node], name: str) -> None:
    """Replace `nodes` (contiguous in graph order) by one call of a checkpointed sub-graph."""
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
    gm.add_submodule(name, CheckpointedRegion(fx.GraphModule(gm, sub)))

    stage = nodes[0].meta.get("pp.stage")
    with gm.graph.inserting_before(nodes[0]):
        call = gm.graph.call_module(name, tuple(inputs))
        call.meta = {"nn_module_stack": nodes[0].meta.get("nn_module_stack", {}),
                     "recompute": "full"}
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
