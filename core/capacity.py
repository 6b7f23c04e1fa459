"""Expert capacity: which (token, choice) pairs an MoE layer keeps under `capacity_factor`.

The rule (GShard's and Switch Transformer's position priority), applied to the tokens one
dp rank runs in one microbatch (the ranks of a dp group hold different tokens, so "the tokens
that compete" are a dp shard's): each expert takes at most

    capacity = ceil(capacity_factor * tokens * topk / num_experts)

pairs, in token order and, within a token, in choice order; a pair past its expert's capacity
is dropped: its expert output is zero, the token keeps its other choices and the residual, and
the router weights of the kept choices are not renormalized. Plain torch on the indices only,
so the runtime (`core.ops.expert_capacity`) and a single-device reference (the in-repo MoE's
`capacity_factor`) apply one definition.
"""

from __future__ import annotations

import math

import torch


def expert_capacity(tokens: int, topk: int, num_experts: int, factor: float) -> int:
    """Pairs each expert keeps out of `tokens` tokens routed top-`topk`."""
    return math.ceil(factor * tokens * topk / num_experts)


def within_capacity(indices: torch.Tensor, num_experts: int, capacity: int) -> torch.Tensor:
    """For expert choices `indices` (..., topk) of one shard's tokens in token order: True for
    the pairs their expert keeps (its first `capacity` pairs in token, then choice, order)."""
    flat = indices.reshape(-1)
    chosen = torch.nn.functional.one_hot(flat, num_experts)  # (pairs, E)
    position = (torch.cumsum(chosen, 0) - chosen).gather(1, flat[:, None]).squeeze(1)
    return (position < capacity).view_as(indices)
