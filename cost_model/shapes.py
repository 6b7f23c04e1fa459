"""The model as the cost model sees it: a handful of integers, no torch modules.

Every transformer block of one kind costs the same, so a 128-layer model is analysed as one dense
block and (for MoE models) one expert block, each multiplied by its count.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class TransformerShape:
    layers: int
    """Transformer blocks."""
    hidden: int
    """Model width h."""
    heads: int
    """Query heads a."""
    vocab: int = 51200
    """Vocabulary (embedding rows, LM-head columns)."""
    seq: int = 2048
    """Training sequence length s."""
    kv_heads: int | None = None
    """Key/value heads (GQA); None means `heads`."""
    ffn: int | None = None
    """MLP inner width; None means 4h."""
    swiglu: bool = False
    """Gated MLP (two input projections)."""
    fused_qkv: bool = True
    """q, k and v come from one projection (Megatron's linear_qkv) rather than three: the same
    GEMM work, fewer ops of the captured graph."""
    fused_gate_up: bool = True
    """A gated MLP's gate and up come from one projection (with swiglu)."""
    norm: Literal["layernorm", "rmsnorm"] = "layernorm"
    bias: bool = True
    tie_embeddings: bool = True
    learned_positions: bool = True
    """A learned position table (GPT) instead of RoPE (Llama)."""
    experts: int = 0
    """Routed experts per MoE block; 0 = dense model."""
    topk: int = 2
    expert_ffn: int | None = None
    """Inner width of one expert; None means `ffn`."""
    dense_layers: int = 0
    """Leading blocks that stay dense in an MoE model."""
    dropout: bool = False
    """Dropout after attention probabilities and each residual branch (GPT-3/Megatron 2022)."""
    attention: Literal["flash", "unfused"] = "flash"
    """flash: fused kernel, no s x s tensors stored; unfused: Megatron 2022's baddbmm + fused
    softmax + bmm, which stores the s x s scores (the 5as/h term of Korthikanti et al.)."""

    def __post_init__(self) -> None:
        problems = []
        for name in ("layers", "hidden", "heads", "vocab", "seq"):
            if getattr(self, name) < 1:
                problems.append(f"{name}={getattr(self, name)} must be >= 1")
        if not problems and self.hidden % self.heads:
            problems.append(f"hidden={self.hidden} must be a multiple of heads={self.heads}")
        if not problems and self.heads % self.n_kv:
            problems.append(f"heads={self.heads} must be a multiple of kv_heads={self.n_kv}")
        if self.experts and not 1 <= self.topk <= self.experts:
            problems.append(f"topk={self.topk} must be in [1, experts={self.experts}]")
        if problems:
            raise ValueError("invalid TransformerShape: " + "; ".join(problems))

    # --- derived sizes ------------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def n_kv(self) -> int:
        return self.kv_heads or self.heads

    @property
    def kv_dim(self) -> int:
        return self.n_kv * self.head_dim

    @property
    def ffn_dim(self) -> int:
        return self.ffn or 4 * self.hidden

    @property
    def expert_ffn_dim(self) -> int:
        return self.expert_ffn or self.ffn_dim

    @property
    def moe_layers(self) -> int:
        return max(0, self.layers - self.dense_layers) if self.experts else 0

    @property
    def dense_block_count(self) -> int:
        return self.layers - self.moe_layers

    def is_moe_layer(self, index: int) -> bool:
        return self.experts > 0 and index >= self.dense_layers

    def with_seq(self, seq: int) -> "TransformerShape":
        return dataclasses.replace(self, seq=seq)

    # --- parameter counts (formulas identical to partitioner.models.GPTConfig) -------------
    def attn_params(self) -> int:
        h, kv = self.hidden, self.kv_dim
        return h * (h + 2 * kv) + h * h + ((h + 2 * kv + h) if self.bias else 0)

    def norm_params(self) -> int:
        return self.hidden * (2 if self.bias and self.norm == "layernorm" else 1)

    def mlp_params(self, inner: int, bias: bool) -> int:
        n_in = 2 if self.swiglu else 1
        return n_in * self.hidden * inner + inner * self.hidden + (
            (n_in * inner + self.hidden) if bias else 0)

    def dense_block_params(self) -> int:
        return self.attn_params() + self.mlp_params(self.ffn_dim, self.bias) + 2 * self.norm_params()

    def expert_params(self) -> int:
        """All routed experts of one MoE block (what ep*etp shards)."""
        return self.experts * self.mlp_params(self.expert_ffn_dim, bias=False)

    def moe_block_params(self) -> int:
        """Everything in an MoE block except the experts (attention, norms, router)."""
        return self.attn_params() + 2 * self.norm_params() + self.hidden * self.experts

    def embedding_params(self) -> int:
        pos = self.seq * self.hidden if self.learned_positions else 0
        return self.vocab * self.hidden + pos

    def head_params(self) -> int:
        """Final norm plus the LM head (counted once when tied)."""
        return self.norm_params() + (0 if self.tie_embeddings else self.vocab * self.hidden)

    def num_parameters(self) -> int:
        blocks = self.dense_block_count * self.dense_block_params() + self.moe_layers * (
            self.moe_block_params() + self.expert_params())
        return blocks + self.embedding_params() + self.head_params()

    def active_parameters(self) -> int:
        """Parameters one token touches (MoE: topk experts of each MoE block)."""
        if not self.experts:
            return self.num_parameters()
        unused = self.moe_layers * (self.experts - self.topk) * self.mlp_params(
            self.expert_ffn_dim, bias=False)
        return self.num_parameters() - unused

    def model_flops_per_token(self, seq: int | None = None) -> float:
        """DESIGN.md's model FLOPs: 6 x (active) parameters plus attention in full,
        12 x layers x hidden x seq, per token (forward + backward, no recomputation)."""
        s = seq or self.seq
        return 6.0 * self.active_parameters() + 12.0 * self.layers * self.hidden * s

    # --- constructors -------------------------------------------------------------------
    @classmethod
    def from_gpt_config(cls, cfg, seq: int | None = None, **overrides) -> "TransformerShape":
        """From any object with partitioner.models.GPTConfig's attributes."""
        n_experts = getattr(cfg, "n_experts", 0) or 0
        fields = dict(
            layers=cfg.n_layer, hidden=cfg.n_embd, heads=cfg.n_head, vocab=cfg.vocab_size,
            seq=seq or cfg.seq_len, kv_heads=getattr(cfg, "n_kv_head", None),
            ffn=getattr(cfg, "ffn_hidden", None), swiglu=bool(getattr(cfg, "swiglu", False)),
            fused_qkv=bool(getattr(cfg, "fused_qkv", True)),
            fused_gate_up=bool(getattr(cfg, "fused_gate_up", True)),
            norm=getattr(cfg, "norm", "layernorm"), bias=bool(getattr(cfg, "bias", True)),
            tie_embeddings=bool(getattr(cfg, "tie_embeddings", True)),
            learned_positions=getattr(cfg, "position", "learned") == "learned",
            experts=n_experts, topk=getattr(cfg, "topk", 2) if n_experts else 2,
            expert_ffn=getattr(cfg, "moe_ffn_hidden", None),
            dense_layers=getattr(cfg, "dense_layers", 0) if n_experts else 0)
        fields.update(overrides)
        return cls(**fields)

    @classmethod
    def megatron_gpt(cls, layers: int, hidden: int, heads: int, seq: int = 2048,
                     vocab: int = 51200) -> "TransformerShape":
        """The GPT of Megatron-LM 2021/2022 papers: dropout, unfused attention, tied head."""
        return cls(layers=layers, hidden=hidden, heads=heads, seq=seq, vocab=vocab,
                   dropout=True, attention="unfused")
