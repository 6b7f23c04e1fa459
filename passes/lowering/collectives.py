"""Fix each collective's process group: the mesh dimension a pass wrote becomes this rank's group.

Passes insert the collectives of `core.ops` naming a mesh dimension (`all_reduce(x, "tp")`), so
they stay pure functions of the plan and the rank's coordinates. When the runtime lowers its own
program it gives `PassContext.group_names` (mesh dimension -> c10d group name, from
`Mesh.group_names()`), and this pass writes the name in place of the dimension, with the group
size for the ops whose shape depends on it. The program then carries everything its collectives
need, in forward and in backward (no group looked up in ambient state, which torch.compile could
not trace). A collective over a dimension of size 1 communicates nothing and is removed: its
users read its input. Without group names (dump, reports) the graph is left as it is.

A program that runs also keeps what sp's `gather_for_region` gathers as this rank's shard for
backward, gathering it again there (`passes.recompute.save_gathered_as_shards`): how a value is
saved for backward is the running program's business, so reports still show the gathers.

A program that runs eagerly (not `compile=on`, whose inductor reorders collectives itself; not
under a zero-bubble schedule, whose backward splits input from weight gradients) also has each
column region's entry read only by linears fused with them (`passes.async_tp.
overlap_column_backward`): the backward all-reduce of the input gradient is started before the
weight gradients are computed and waited after, as Megatron's async gradient all-reduce.

The result record (`LoweredCollectives`, in `gm.meta[core.meta.LOWERED_COLLECTIVES]`) says
which groups were fixed and which collectives were removed.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import fx

from core import meta, ops
from core.layout import mesh_sizes
from passes import PassContext, recompile
from passes.async_tp import overlap_column_backward
from passes.recompute import save_gathered_as_shards


@dataclass(frozen=True)
class LoweredCollectives:
    """What `lower_collectives` did to one rank's program."""

    groups: tuple[tuple[str, str], ...]
    """(mesh dimension, c10d group name) for every dimension the collectives named."""
    fixed: int
    """Collectives now naming their process group."""
    removed: tuple[str, ...]
    """Collectives over a dimension of size 1, removed (their users read their input)."""
    saved_as_shards: tuple[str, ...] = ()
    """The gather_for_region nodes whose gathered value backward gathers again."""
    overlapped: tuple[str, ...] = ()
    """The copy_to_region nodes fused with their linears (backward all-reduce overlapped)."""

    def summary(self) -> str:
        groups = ", ".join(f"{dim}={name}" for dim, name in self.groups) or "none"
        return (f"{self.fixed} collectives name their process group ({groups}), "
                f"{len(self.removed)} over size-1 dims removed, {len(self.saved_as_shards)} "
                f"gathers saved as shards, {len(self.overlapped)} column entries overlap their "
                f"gradient all-reduce")


def lower_collectives(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    if ctx.group_names is None:
        return gm
    sizes = mesh_sizes(ctx.plan)
    saved_as_shards = save_gathered_as_shards(gm)
    overlapped = overlap_column_backward(gm) if _eager_backward(ctx.plan) else {}
    groups: dict[str, str] = {}
    fixed, removed = 0, []
    for module in gm.modules():  # stage and checkpointed-region graphs are graphs of their own
        if not isinstance(module, fx.GraphModule):
            continue
        before = (fixed, len(removed))
        for node in list(module.graph.nodes):
            if node.op != "call_function" or node.target not in ops.GROUPED:
                continue
            at = ops.group_arg(node.target)
            x, dim = node.args[0], node.args[at]
            if dim not in sizes:
                raise ValueError(f"collective {node.name} names {dim!r}, which is not a mesh "
                                 f"dimension of {sorted(sizes)} (lowered twice?)")
            if sizes[dim] == 1 and node.target in ops.COLLECTIVES:
                node.replace_all_uses_with(x)
                module.graph.erase_node(node)
                removed.append(node.name)
                continue
            if dim not in ctx.group_names:
                raise ValueError(f"collective {node.name} runs over {dim!r} (size {sizes[dim]}) "
                                 f"but group_names has no group for it: {ctx.group_names}")
            groups[dim] = ctx.group_names[dim]
            node.args = (*node.args[:at], groups[dim], *node.args[at + 1:])
            if node.target in ops.GROUP_SIZED:
                node.kwargs = {**node.kwargs, "group_size": sizes[dim]}
            fixed += 1
        if ((fixed, len(removed)) != before or (module is gm and saved_as_shards)
                or module in overlapped):  # (a graph this pass did not change keeps its code)
            module.graph.lint()
            recompile(module)
    gm.meta[meta.LOWERED_COLLECTIVES] = LoweredCollectives(
        groups=tuple(sorted(groups.items())), fixed=fixed, removed=tuple(removed),
        saved_as_shards=tuple(saved_as_shards),
        overlapped=tuple(name for names in overlapped.values() for name in names))
    return gm


def _eager_backward(plan) -> bool:
    """Whether the program's backward runs eagerly in one piece per stage (see the module
    docstring)."""
    return not plan.compile and not plan.schedule.startswith("zb")
