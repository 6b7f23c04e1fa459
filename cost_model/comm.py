"""Alpha-beta collective costs over the node hierarchy, and where a plan puts each group.

Bandwidth terms follow NCCL's bus-bandwidth accounting (published-runs.md): for n ranks and S
bytes, all-reduce moves S 2(n-1)/n over the slowest link, reduce-scatter / all-gather / all-to-all
S (n-1)/n, broadcast and send/recv S. Each ring step adds a latency alpha. A group that spans
nodes runs hierarchically: the intra-node part over NVLink, the inter-node part over the per-GPU
NICs (one rail per local rank, so k ranks of a node share the traffic k ways). Which ranks of a
group share a node is read from core.layout.RankLayout, the layout the runtime builds its
process groups from.

Libraries differ from the ring formulas where the profile says so: gloo builds reduce-scatter
from a full all-reduce (`Hardware.reduce_scatter_is_all_reduce`) and moves all-gather at its own
fitted bandwidth (`Hardware.all_gather_eff`). `collective_parts` splits a collective's seconds
into latency (waiting) and transfer (on a CPU host, work for the cores).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import NamedTuple

from core.layout import RankLayout
from cost_model.hardware import Hardware

COLLECTIVES = ("all_reduce", "reduce_scatter", "all_gather", "all_to_all", "broadcast", "send")


@dataclass(frozen=True)
class GroupPlacement:
    """A process group of `size` ranks: `per_node` of them share each of `nodes` nodes."""

    size: int
    per_node: int

    @property
    def nodes(self) -> int:
        return max(1, self.size // max(1, self.per_node))

    @property
    def intra_node(self) -> bool:
        return self.nodes == 1


class CollectiveCost(NamedTuple):
    """One collective's seconds, split by what the time is spent on."""

    latency: float
    """Per-step alpha terms: waiting on peers, during which a shared core can run another rank."""
    transfer: float
    """Bytes over the bus bandwidth: on a CPU host the cores copy them, so it is work."""

    @property
    def seconds(self) -> float:
        return self.latency + self.transfer


def collective_parts(kind: str, nbytes: float, group: GroupPlacement,
                     hw: Hardware) -> CollectiveCost:
    """Latency and transfer seconds of one collective of `nbytes` (the full buffer; for all-gather
    the output, for reduce-scatter the input) over `group`."""
    n = group.size
    if n <= 1 or nbytes <= 0:
        return CollectiveCost(0.0, 0.0)
    if kind not in COLLECTIVES:
        raise ValueError(f"unknown collective {kind!r}; known: {COLLECTIVES}")
    intra_bw = hw.intra_bw * hw.intra_eff
    inter_bw = hw.inter_bw * hw.inter_eff
    if kind == "reduce_scatter" and hw.reduce_scatter_is_all_reduce:
        kind = "all_reduce"  # the whole buffer is all-reduced, then this rank keeps its chunk
    if kind == "all_gather":
        intra_bw, inter_bw = intra_bw * hw.all_gather_eff, inter_bw * hw.all_gather_eff
    k, nodes = min(group.per_node, n), group.nodes
    if kind == "send":
        bw, alpha = (intra_bw, hw.intra_latency) if nodes == 1 else (inter_bw, hw.inter_latency)
        return CollectiveCost(alpha, nbytes / bw)
    if kind == "broadcast":
        bw, alpha = (intra_bw, hw.intra_latency) if nodes == 1 else (inter_bw, hw.inter_latency)
        return CollectiveCost(alpha * (n - 1) ** 0.5, nbytes / bw)
    if kind == "all_to_all":
        # each rank sends (n-1)/n of its buffer: (k-1)/n inside its node, (n-k)/n outside
        return CollectiveCost(hw.intra_latency * (k - 1) + hw.inter_latency * (n - k),
                              (k - 1) / n * nbytes / intra_bw + (n - k) / n * nbytes / inter_bw)
    steps = 2 if kind == "all_reduce" else 1  # all-reduce = reduce-scatter + all-gather
    latency = transfer = 0.0
    if k > 1:  # intra-node phase over the full buffer
        transfer += steps * nbytes / intra_bw * (k - 1) / k
        latency += steps * hw.intra_latency * (k - 1)
    if nodes > 1:  # inter-node phase: each of the k rails carries 1/k of the buffer
        transfer += steps * nbytes / k / inter_bw * (nodes - 1) / nodes
        latency += steps * hw.inter_latency * (nodes - 1)
    return CollectiveCost(latency, transfer)


def overlapped_transfer(cost: CollectiveCost, window: float, steps: int) -> float:
    """Seconds of `cost`'s transfer still exposed when the collective is decomposed into
    `steps` ring steps, each overlapped with the matmul of one chunk, `window` seconds of
    matmul in all (async TP; Megatron-Core's tp_comm_overlap): the part longer than the matmul,
    plus one step that nothing overlaps (an all-gather's last chunk is multiplied after it
    arrives; a reduce-scatter's last partial sum is sent after its matmul), a 1/steps share of
    whichever of the two is shorter. The matmuls' slowdown from sharing the device with the
    transfer is not counted."""
    x = cost.transfer
    return max(0.0, x - window) + min(x, window) / steps


def collective_time(kind: str, nbytes: float, group: GroupPlacement, hw: Hardware) -> float:
    """Seconds for one collective of `nbytes` (the full buffer; for all-gather the output, for
    reduce-scatter the input) over `group`."""
    return collective_parts(kind, nbytes, group, hw).seconds


def ring_time(kind: str, nbytes: float, n: int, bw: float, alpha: float) -> float:
    """The plain ring formula (one link class), used by tests and calibration fits."""
    factor = {"all_reduce": 2 * (n - 1) / n, "reduce_scatter": (n - 1) / n,
              "all_gather": (n - 1) / n, "all_to_all": (n - 1) / n, "broadcast": 1.0,
              "send": 1.0}[kind]
    steps = {"all_reduce": 2 * (n - 1), "broadcast": 1, "send": 1}.get(kind, n - 1)
    return steps * alpha + nbytes / bw * factor


# --- placement from the plan's rank layout ------------------------------------------------
def group_placement(layout: RankLayout, dim: str, gpus_per_node: int) -> GroupPlacement:
    """Where the group of mesh dimension `dim` lies: its ranks stride apart by the layout's
    stride along `dim` (the group containing rank 0; every group of a dimension is laid out
    alike)."""
    return _placement(layout.size(dim), layout.stride(dim), gpus_per_node)


@lru_cache(maxsize=65536)
def _placement(size: int, stride: int, gpus_per_node: int) -> GroupPlacement:
    nodes = len({(i * stride) // gpus_per_node for i in range(size)})
    return GroupPlacement(size=size, per_node=max(1, size // nodes))
