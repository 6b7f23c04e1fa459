"""Retarget a captured graph to the device it will run on.

Export bakes the capture device into factory ops (`arange(..., device=cpu)`,
`to(..., device=meta)`); a graph captured on the meta device must create its tensors on the
rank's device (`PassContext.device`) instead. Checkpointed regions are graphs of their own and
are retargeted too.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx

from core import meta
from passes import PassContext, recompile


@dataclass(frozen=True)
class DeviceRecord:
    device: str
    retargeted: int
    """Nodes whose device argument now names `device`."""

    def summary(self) -> str:
        return f"device arguments set to {self.device}: {self.retargeted} nodes"


def retarget_device(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    device = torch.device(ctx.device)
    count = 0
    for module in gm.modules():
        if isinstance(module, fx.GraphModule):
            count += _retarget(module, device)
    gm.meta[meta.DEVICE_RECORD] = DeviceRecord(str(device), count)
    return gm


def _retarget(gm: fx.GraphModule, device: torch.device) -> int:
    count, changed = 0, False
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        named = False
        if isinstance(node.kwargs.get("device"), torch.device):
            changed |= node.kwargs["device"] != device
            node.kwargs = {**node.kwargs, "device": device}
            named = True
        if any(isinstance(arg, torch.device) for arg in node.args):
            changed |= any(isinstance(arg, torch.device) and arg != device
                           for arg in node.args)
            node.args = tuple(device if isinstance(arg, torch.device) else arg
                              for arg in node.args)
            named = True
        count += named
    if changed:  # (captured on the device it runs on, the graph keeps its code)
        gm.graph.lint()
        recompile(gm)
    return count
