"""Retarget a captured graph to the device it will run on.

Export bakes the capture device into factory ops (`arange(..., device=cpu)`,
`to(..., device=meta)`); a graph captured on the meta device must create its tensors on the
rank's device instead.
"""

from __future__ import annotations

import torch
from torch import fx


def retarget_device(gm: fx.GraphModule, device: torch.device) -> fx.GraphModule:
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        if isinstance(node.kwargs.get("device"), torch.device):
            node.kwargs = {**node.kwargs, "device": device}
        if any(isinstance(arg, torch.device) for arg in node.args):
            node.args = tuple(device if isinstance(arg, torch.device) else arg
                              for arg in node.args)
    gm.graph.lint()
    gm.recompile()
    return gm
