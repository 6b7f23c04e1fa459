"""A ring over a process group: rank r sends to r+1 and receives from r-1 (ranks of the group),
posted now and waited later, so a transfer overlaps the compute between (ring attention's K/V
blocks, async TP's chunks)."""

from __future__ import annotations

import torch
import torch.distributed as dist


class Ring:
    """This rank's neighbours in the ring of `group` (a ProcessGroup)."""

    def __init__(self, group) -> None:
        self.group = group
        self.size, self.rank = group.size(), group.rank()
        self.next = dist.get_global_rank(group, (self.rank + 1) % self.size)
        self.prev = dist.get_global_rank(group, (self.rank - 1) % self.size)

    def shift(self, *sends: torch.Tensor) -> tuple[list, list[torch.Tensor]]:
        """Start sending each tensor to the next rank and receiving one of the same shape from
        the previous (tag i for the i-th, so two tensors in one step never cross); returns the
        handles and the receive buffers, valid once `wait(handles)`."""
        received = [torch.empty_like(t) for t in sends]
        p2p = []
        for tag, (send, recv) in enumerate(zip(sends, received, strict=True)):
            p2p.append(dist.P2POp(dist.isend, send.contiguous(), self.next, self.group, tag))
            p2p.append(dist.P2POp(dist.irecv, recv, self.prev, self.group, tag))
        return dist.batch_isend_irecv(p2p), received


def wait(works) -> None:
    for work in works:
        work.wait()
