"""How a sequence is laid over the cp ranks: which global positions each rank holds.

Causal attention over contiguous chunks gives the last rank all the work (its queries see every
key) and the first almost none, so ring attention with a causal mask uses the load-balanced
layout of Megatron-Core and Transformer Engine: the sequence in 2*cp chunks, rank i holding
chunks i and 2*cp-1-i, so every rank has one early and one late chunk and the same number of
visible (query, key) pairs. All-to-all attention gathers the whole sequence per head group and
uses contiguous chunks. Pure index arithmetic: passes, the runtime and reports share it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from core.divisibility import nearest_multiples


@dataclass(frozen=True)
class SequenceLayout:
    """A sequence of `length` tokens over `cp` ranks, `balanced` (2*cp chunks) or contiguous."""

    length: int
    cp: int
    balanced: bool

    def __post_init__(self) -> None:
        if self.length % self.chunks:
            below, above = nearest_multiples(self.length, self.chunks)
            raise ValueError(
                f"sequence length {self.length} does not split into {self.chunks} equal chunks "
                f"({'2*cp' if self.balanced else 'cp'} with cp={self.cp}); the nearest lengths "
                f"that do are {below} and {above}")

    @property
    def chunks(self) -> int:
        return 2 * self.cp if self.balanced else self.cp

    @property
    def chunk(self) -> int:
        """Tokens per chunk."""
        return self.length // self.chunks

    @property
    def local(self) -> int:
        """Tokens per rank."""
        return self.length // self.cp

    def chunk_ids(self, rank: int) -> tuple[int, ...]:
        """The chunks rank `rank` holds, in the order it stores them."""
        return (rank, self.chunks - 1 - rank) if self.balanced else (rank,)

    def positions(self, rank: int, device=None) -> torch.Tensor:
        """Global positions of this rank's tokens, in local order (int64, shape (local,))."""
        return torch.cat([torch.arange(c * self.chunk, (c + 1) * self.chunk, device=device)
                          for c in self.chunk_ids(rank)])

    def shard(self, x: torch.Tensor, dim: int, rank: int) -> torch.Tensor:
        """This rank's tokens of a full-length `x` along `dim` (a copy)."""
        pieces = x.split(self.chunk, dim=dim)
        return torch.cat([pieces[c] for c in self.chunk_ids(rank)], dim=dim)

    def unshard(self, locals_: list[torch.Tensor], dim: int) -> torch.Tensor:
        """Every rank's local tokens (in rank order) -> the full sequence along `dim`."""
        chunks: list[torch.Tensor | None] = [None] * self.chunks
        for rank, local in enumerate(locals_):
            for piece, c in zip(local.split(self.chunk, dim=dim), self.chunk_ids(rank),
                                strict=True):
                chunks[c] = piece
        return torch.cat(chunks, dim=dim)
