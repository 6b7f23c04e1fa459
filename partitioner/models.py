"""The reference transformer behind the presets, the inline `gpt:` shapes and the demo.

One decoder-only model covers the families the planner cares about: GPT-style (LayerNorm, GeLU,
learned positions, biases) and Llama-style (RMSNorm, RoPE, SwiGLU, grouped-query attention), with
optional fused q/k/v and gate/up projections and optional mixture-of-experts MLPs. It is ordinary
single-device PyTorch: parallelism is added by the compiler, never by this file.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from core.capacity import expert_capacity, within_capacity


@dataclass(frozen=True)
class GPTConfig:
    vocab_size: int = 512
    """Vocabulary entries (embedding rows and LM-head columns)."""
    n_layer: int = 2
    """Number of transformer blocks."""
    n_head: int = 4
    """Attention (query) heads."""
    n_embd: int = 64
    """Hidden size; must be a multiple of n_head."""
    n_kv_head: int | None = None
    """Key/value heads for grouped-query attention; None means n_head (plain multi-head)."""
    ffn_hidden: int | None = None
    """MLP inner size; None means 4 * n_embd (the GPT-3 ratio)."""
    seq_len: int = 64
    """Maximum sequence length (learned position table size, RoPE cache length)."""
    norm: Literal["layernorm", "rmsnorm"] = "layernorm"
    position: Literal["learned", "rope"] = "learned"
    swiglu: bool = False
    """silu(gate) * up MLP (Llama) instead of GeLU (GPT)."""
    bias: bool = True
    """Biases on linear layers and LayerNorm (GPT-2 has them, Llama does not)."""
    tie_embeddings: bool = True
    """LM head shares the token-embedding weight (GPT-2) or has its own (Llama)."""
    fused_qkv: bool = False
    """One projection produces q, k and v concatenated (Megatron's linear_qkv)."""
    fused_gate_up: bool = False
    """One projection produces gate and up concatenated (needs swiglu)."""
    n_experts: int = 0
    """Experts per MoE MLP; 0 means dense MLPs."""
    topk: int = 2
    """Experts each token is routed to (MoE only)."""
    moe_ffn_hidden: int | None = None
    """Inner size of one expert; None means ffn_hidden."""
    dense_layers: int = 0
    """Leading blocks that keep a dense MLP in an MoE model (DeepSeek-V3 keeps 3)."""
    router: Literal["softmax", "sigmoid"] = "softmax"
    """MoE routing: softmax over the experts, top-k renormalized (Mixtral), or sigmoid scores
    with a selection bias added for the top-k choice only, the chosen scores renormalized
    (DeepSeek-V3's auxiliary-loss-free balancing; the bias is the buffer `expert_bias`)."""
    shared_experts: int = 0
    """Always-on MLPs beside the routed experts (DeepSeek's shared experts), one MLP of
    shared_experts * expert inner size; they stay dense."""
    aux_loss_coef: float = 0.0
    """Weight of the load-balancing loss each MoE layer computes over the batch's tokens
    (Switch Transformer's n_experts * sum_i f_i * P_i: the fraction of top-k choices and the
    mean router probability per expert), added when `forward` is given labels."""
    capacity_factor: float | None = None
    """Expert capacity (core/capacity.py's rule on each forward's tokens): what a plan's
    `capacity_factor` does, written into the model as the single-device reference of one dp
    shard. None: dropless."""
    bias_update_rate: float = 0.0
    """DeepSeek-V3's auxiliary-loss-free balancing (router="sigmoid"): in training, each forward
    moves `expert_bias` by this rate towards balance, from the batch's token counts per expert
    (a buffer changed outside the gradient)."""
    norm_eps: float = 1e-5
    dropout: float = 0.0
    """Dropout on the embeddings and on each attention and MLP output before the residual add
    (nanoGPT's embedding and residual dropouts); 0 builds none, so the graph has no dropout."""

    def __post_init__(self) -> None:
        problems = []
        for name in ("vocab_size", "n_layer", "n_head", "n_embd", "seq_len"):
            if getattr(self, name) < 1:
                problems.append(f"{name}={getattr(self, name)} must be >= 1")
        if self.n_embd % self.n_head:
            problems.append(f"n_embd={self.n_embd} must be a multiple of n_head={self.n_head}")
        if self.kv_heads < 1 or self.n_head % self.kv_heads:
            problems.append(f"n_head={self.n_head} must be a multiple of n_kv_head={self.kv_heads}")
        if self.fused_gate_up and not self.swiglu:
            problems.append("fused_gate_up needs swiglu=True")
        if not 0.0 <= self.dropout < 1.0:
            problems.append(f"dropout={self.dropout} must be in [0, 1)")
        if self.n_experts and not 1 <= self.topk <= self.n_experts:
            problems.append(f"topk={self.topk} must be in [1, n_experts={self.n_experts}]")
        if self.bias_update_rate and self.router != "sigmoid":
            problems.append(f"bias_update_rate={self.bias_update_rate} updates the selection "
                            f"bias of router='sigmoid' (got router={self.router!r})")
        if problems:
            raise ValueError("invalid GPTConfig: " + "; ".join(problems))

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def kv_heads(self) -> int:
        return self.n_kv_head or self.n_head

    @property
    def ffn(self) -> int:
        return self.ffn_hidden or 4 * self.n_embd

    @property
    def expert_ffn(self) -> int:
        return self.moe_ffn_hidden or self.ffn

    def is_moe_layer(self, index: int) -> bool:
        return self.n_experts > 0 and index >= self.dense_layers

    def replace(self, **changes) -> "GPTConfig":
        return dataclasses.replace(self, **changes)

    def num_parameters(self) -> int:
        """Parameter count (tied embeddings counted once), without building the model."""
        h, v = self.n_embd, self.vocab_size
        kv = self.kv_heads * self.head_dim
        attn = h * (h + 2 * kv) + h * h + (h + 2 * kv + h if self.bias else 0)
        norm = h * (2 if self.bias and self.norm == "layernorm" else 1)

        def mlp(inner: int, bias: bool) -> int:
            n_in = 2 if self.swiglu else 1
            return n_in * h * inner + inner * h + ((n_in * inner + h) if bias else 0)

        total = 0
        for i in range(self.n_layer):
            ffn = mlp(self.ffn, self.bias) if not self.is_moe_layer(i) else (
                self.n_experts * mlp(self.expert_ffn, bias=False) + h * self.n_experts
                + (mlp(self.shared_experts * self.expert_ffn, self.bias)
                   if self.shared_experts else 0))
            total += attn + ffn + 2 * norm
        total += v * h + norm + (0 if self.tie_embeddings else v * h)
        if self.position == "learned":
            total += self.seq_len * h
        return total


# Published shapes (DeepSeek-V3's multi-head latent attention is modelled as GQA of equal size).
PRESETS: dict[str, GPTConfig] = {
    "gpt3-175b": GPTConfig(vocab_size=51200, n_layer=96, n_head=96, n_embd=12288, seq_len=2048),
    "llama3-8b": GPTConfig(
        vocab_size=128256, n_layer=32, n_head=32, n_kv_head=8, n_embd=4096, ffn_hidden=14336,
        seq_len=8192, norm="rmsnorm", position="rope", swiglu=True, bias=False,
        tie_embeddings=False),
    "llama3-70b": GPTConfig(
        vocab_size=128256, n_layer=80, n_head=64, n_kv_head=8, n_embd=8192, ffn_hidden=28672,
        seq_len=8192, norm="rmsnorm", position="rope", swiglu=True, bias=False,
        tie_embeddings=False),
    "llama3-405b": GPTConfig(
        vocab_size=128256, n_layer=126, n_head=128, n_kv_head=8, n_embd=16384, ffn_hidden=53248,
        seq_len=8192, norm="rmsnorm", position="rope", swiglu=True, bias=False,
        tie_embeddings=False),
    "mixtral-8x7b": GPTConfig(
        vocab_size=32000, n_layer=32, n_head=32, n_kv_head=8, n_embd=4096, ffn_hidden=14336,
        seq_len=4096, norm="rmsnorm", position="rope", swiglu=True, bias=False,
        tie_embeddings=False, n_experts=8, topk=2),
    "deepseek-v3": GPTConfig(
        vocab_size=129280, n_layer=61, n_head=128, n_embd=7168, ffn_hidden=18432,
        seq_len=4096, norm="rmsnorm", position="rope", swiglu=True, bias=False,
        tie_embeddings=False, n_experts=256, topk=8, moe_ffn_hidden=2048, dense_layers=3),
}

# Keys of the inline shape `gpt:layers=96,hidden=12288,...` -> GPTConfig fields.
_INLINE_KEYS = {
    "layers": "n_layer", "hidden": "n_embd", "heads": "n_head", "seq": "seq_len",
    "vocab": "vocab_size", "ffn": "ffn_hidden", "kv_heads": "n_kv_head", "experts": "n_experts",
    "topk": "topk", "swiglu": "swiglu", "moe_ffn": "moe_ffn_hidden",
}


def parse_inline(spec: str) -> GPTConfig:
    """`gpt:layers=96,hidden=12288,heads=96,seq=2048,vocab=51200[,ffn=,kv_heads=,experts=,topk=,swiglu=on]`."""
    body = spec.split(":", 1)[1] if spec.startswith("gpt:") else spec
    fields: dict[str, object] = {}
    for item in filter(None, (part.strip() for part in body.split(","))):
        key, sep, value = item.partition("=")
        if not sep or key not in _INLINE_KEYS:
            raise ValueError(
                f"bad inline model item {item!r} in {spec!r}: expected key=value with key one of "
                f"{sorted(_INLINE_KEYS)}")
        if key == "swiglu":
            if value not in ("on", "off", "true", "false", "1", "0"):
                raise ValueError(f"swiglu={value!r} in {spec!r}: use on or off")
            fields[_INLINE_KEYS[key]] = value in ("on", "true", "1")
            continue
        try:
            fields[_INLINE_KEYS[key]] = int(value)
        except ValueError:
            raise ValueError(f"{key}={value!r} in {spec!r} must be an integer") from None
    missing = [k for k in ("layers", "hidden", "heads") if _INLINE_KEYS[k] not in fields]
    if missing:
        raise ValueError(f"inline model {spec!r} lacks {', '.join(missing)}")
    if fields.get("swiglu"):
        # Llama-style block: the usual companions of SwiGLU.
        fields.setdefault("norm", "rmsnorm")
        fields.setdefault("position", "rope")
        fields.setdefault("bias", False)
        fields.setdefault("tie_embeddings", False)
    fields.setdefault("vocab_size", 51200)
    fields.setdefault("seq_len", 2048)
    return GPTConfig(**fields)


def resolve_config(name: str) -> GPTConfig:
    """A preset name or an inline `gpt:` shape."""
    if name in PRESETS:
        return PRESETS[name]
    if name.startswith("gpt:"):
        return parse_inline(name)
    raise ValueError(f"unknown model {name!r}: use a preset ({', '.join(PRESETS)}) or gpt:...")


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def _norm(config: GPTConfig) -> nn.Module:
    if config.norm == "rmsnorm":
        return RMSNorm(config.n_embd, config.norm_eps)
    return nn.LayerNorm(config.n_embd, eps=config.norm_eps, bias=config.bias)


def rope_tables(seq_len: int, head_dim: int, *, device=None, dtype=torch.float32,
                base: float = 10000.0):
    exponents = torch.arange(0, head_dim, 2, device=device, dtype=torch.float64) / head_dim
    inv_freq = 1.0 / base ** exponents  # (hd/2,)
    positions = torch.arange(seq_len, device=device, dtype=torch.float64)
    angles = torch.outer(positions, inv_freq)  # (S, hd/2)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)  # (B, nh, S, hd/2) each: rotate-half convention (Llama)
    cos = torch.cat([cos, cos], dim=-1)
    sin = torch.cat([sin, sin], dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


class Attention(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        h, kv = config.n_embd, config.kv_heads * config.head_dim
        if config.fused_qkv:
            self.qkv_proj = nn.Linear(h, h + 2 * kv, bias=config.bias)
        else:
            self.q_proj = nn.Linear(h, h, bias=config.bias)
            self.k_proj = nn.Linear(h, kv, bias=config.bias)
            self.v_proj = nn.Linear(h, kv, bias=config.bias)
        self.o_proj = nn.Linear(h, h, bias=config.bias)

    def forward(self, x: torch.Tensor, cos=None, sin=None) -> torch.Tensor:
        c = self.config
        B, S, _ = x.shape
        kv = c.kv_heads * c.head_dim
        if c.fused_qkv:
            q, k, v = self.qkv_proj(x).split([c.n_embd, kv, kv], dim=-1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = q.view(B, S, c.n_head, c.head_dim).transpose(1, 2)  # (B, nh, S, hd)
        k = k.view(B, S, c.kv_heads, c.head_dim).transpose(1, 2)  # (B, nkv, S, hd)
        v = v.view(B, S, c.kv_heads, c.head_dim).transpose(1, 2)  # (B, nkv, S, hd)
        if cos is not None:
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if c.kv_heads != c.n_head:
            repeat = c.n_head // c.kv_heads
            k = k.repeat_interleave(repeat, dim=1)  # (B, nh, S, hd)
            v = v.repeat_interleave(repeat, dim=1)  # (B, nh, S, hd)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, nh, S, hd)
        y = y.transpose(1, 2).reshape(B, S, c.n_embd)  # (B, S, h)
        return self.o_proj(y)


class MLP(nn.Module):
    def __init__(self, config: GPTConfig, inner: int) -> None:
        super().__init__()
        self.config = config
        h = config.n_embd
        if config.swiglu and config.fused_gate_up:
            self.gate_up_proj = nn.Linear(h, 2 * inner, bias=config.bias)
        elif config.swiglu:
            self.gate_proj = nn.Linear(h, inner, bias=config.bias)
            self.up_proj = nn.Linear(h, inner, bias=config.bias)
        else:
            self.up_proj = nn.Linear(h, inner, bias=config.bias)
        self.down_proj = nn.Linear(inner, h, bias=config.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.config.swiglu:
            return self.down_proj(F.gelu(self.up_proj(x)))
        if self.config.fused_gate_up:
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(F.silu(gate) * up)


class MoE(nn.Module):
    """Top-k routed experts with stacked weights (E, in, out).

    Written densely (every expert sees every token, weighted by a routing mask that is zero
    outside the top-k) so that it exports with static shapes; the numbers are those of sparse
    dispatch, which the expert-parallel pass substitutes.
    """

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        h, f, e = config.n_embd, config.expert_ffn, config.n_experts
        self.router = nn.Linear(h, e, bias=False)
        n_in = 2 if config.swiglu else 1
        self.w_in = nn.Parameter(torch.randn(e, h, n_in * f) / math.sqrt(h))
        self.w_out = nn.Parameter(torch.randn(e, f, h) / math.sqrt(f))
        if config.router == "sigmoid":
            self.register_buffer("expert_bias", torch.zeros(e))
        self.shared = (MLP(config, config.shared_experts * f) if config.shared_experts
                       else None)

    def forward(self, x: torch.Tensor):
        """The routed (and shared) experts' output; with `aux_loss_coef`, also the layer's
        load-balancing loss: (output, aux)."""
        c = self.config
        logits = self.router(x)  # (B, S, E)
        if c.router == "sigmoid":
            scores = logits.sigmoid()
            top_i = (scores + self.expert_bias).topk(c.topk, dim=-1).indices  # (B, S, k)
            top_p = scores.gather(-1, top_i)
        else:
            scores = logits.softmax(dim=-1)
            top_p, top_i = scores.topk(c.topk, dim=-1)
        if c.bias_update_rate and self.training:
            with torch.no_grad():  # more tokens than the mean: a lower bias, and the reverse
                load = F.one_hot(top_i, c.n_experts).to(scores.dtype).sum(dim=(0, 1, 2))
                self.expert_bias.add_(c.bias_update_rate * torch.sign(load.mean() - load))
        top_p = top_p / top_p.sum(dim=-1, keepdim=True)
        if c.capacity_factor is not None:  # pairs past their expert's capacity give nothing
            capacity = expert_capacity(top_i.shape[0] * top_i.shape[1], c.topk, c.n_experts,
                                       c.capacity_factor)
            top_p = top_p * within_capacity(top_i, c.n_experts, capacity)
        weights = torch.zeros_like(scores).scatter(-1, top_i, top_p)  # (B, S, E)
        hidden = torch.einsum("bsh,ehf->bsef", x, self.w_in)  # (B, S, E, n_in*f)
        if c.swiglu:
            gate, up = hidden.chunk(2, dim=-1)
            hidden = F.silu(gate) * up
        else:
            hidden = F.gelu(hidden)
        out = torch.einsum("bsef,efh->bseh", hidden, self.w_out)  # (B, S, E, h)
        routed = torch.einsum("bseh,bse->bsh", out, weights)
        routed = routed if self.shared is None else routed + self.shared(x)
        if not c.aux_loss_coef:
            return routed
        # of the top-k choices, per expert: (B, S, k, E) averaged over everything but E
        fraction = F.one_hot(top_i, c.n_experts).to(scores.dtype).mean(dim=(0, 1, 2))
        probability = scores.mean(dim=(0, 1))  # mean router score per expert
        return routed, c.n_experts * (fraction * probability).sum()


class Block(nn.Module):
    def __init__(self, config: GPTConfig, index: int) -> None:
        super().__init__()
        self.ln_1 = _norm(config)
        self.attn = Attention(config)
        self.ln_2 = _norm(config)
        self.mlp = MoE(config) if config.is_moe_layer(index) else MLP(config, config.ffn)
        self.drop = _dropout(config)

    def forward(self, x: torch.Tensor, cos=None, sin=None):
        """The block's output; an MoE block with `aux_loss_coef` also returns its
        load-balancing loss: (output, aux)."""
        x = x + self.drop(self.attn(self.ln_1(x), cos, sin))
        mlp = self.mlp(self.ln_2(x))
        if isinstance(mlp, tuple):
            return x + self.drop(mlp[0]), mlp[1]
        return x + self.drop(mlp)


def _dropout(config: GPTConfig) -> nn.Module:
    return nn.Dropout(config.dropout) if config.dropout else nn.Identity()


class GPT(nn.Module):
    """Decoder-only transformer: `forward(input_ids (B, S)) -> logits (B, S, vocab)`; given
    `labels` (B, S), the scalar loss: mean cross-entropy of the logits against the labels, plus
    `aux_loss_coef` times the MoE layers' load-balancing losses."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        if config.position == "learned":
            self.wpe = nn.Embedding(config.seq_len, config.n_embd)
        self.drop = _dropout(config)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.ln_f = _norm(config)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.wte.weight
        if not any(p.is_meta for p in self.parameters()):
            self.apply(init_weights)

    def forward(self, input_ids: torch.Tensor,
                labels: torch.Tensor | None = None) -> torch.Tensor:
        B, S = input_ids.shape
        x = self.wte(input_ids)  # (B, S, h)
        cos = sin = None
        if self.config.position == "learned":
            x = x + self.wpe(torch.arange(S, device=input_ids.device))
        else:
            # Computed, not a buffer: a model built on the meta device needs no re-init.
            cos, sin = rope_tables(S, self.config.head_dim, device=input_ids.device,
                                   dtype=x.dtype)  # (S, hd/2) each
        x = self.drop(x)
        aux = []
        for block in self.blocks:
            x = block(x, cos, sin)
            if isinstance(x, tuple):
                x, layer_aux = x
                aux.append(layer_aux)
        logits = self.lm_head(self.ln_f(x))
        if labels is None:
            return logits
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))
        return loss + self.config.aux_loss_coef * sum(aux) if aux else loss


def init_weights(module: nn.Module) -> None:
    """GPT-2's initialization: N(0, 0.02) for matrices and embeddings, zero biases."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, std=0.02)
        if getattr(module, "bias", None) is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, MoE):
        nn.init.normal_(module.w_in, std=0.02)
        nn.init.normal_(module.w_out, std=0.02)


def build(config: GPTConfig | str, *, batch: int = 2, seq: int | None = None, device=None,
          dtype: torch.dtype | None = None, seed: int = 0):
    """The model and one example batch of token ids: the `pkg.module:factory` contract."""
    if isinstance(config, str):
        config = resolve_config(config)
    seq = seq or config.seq_len
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        # No device given: the ambient one (`with torch.device("meta"): tiny()` builds on meta).
        with torch.device(device) if device is not None else contextlib.nullcontext():
            model = GPT(config)
            ids = torch.randint(0, config.vocab_size, (batch, seq))
    if dtype is not None:
        model = model.to(dtype)
    return model, (ids,)


def tiny(batch: int = 4, seq: int = 16, **overrides) -> tuple[nn.Module, tuple[torch.Tensor]]:
    """Factory for `partitioner.models:tiny`: a 2-layer GPT small enough for CPU ranks."""
    return build(GPTConfig(**overrides), batch=batch, seq=seq)


def tiny_moe(batch: int = 4, seq: int = 16, **overrides) -> tuple[nn.Module, tuple[torch.Tensor]]:
    """Factory for `partitioner.models:tiny_moe`: tiny_llama with 8 routed experts top-2 in
    every block (softmax router); `router="sigmoid", shared_experts=1` is the DeepSeek style."""
    fields = dict(n_experts=8, topk=2, moe_ffn_hidden=32)
    fields.update(overrides)
    return tiny_llama(batch, seq, **fields)


def tiny_llama(batch: int = 4, seq: int = 16,
               **overrides) -> tuple[nn.Module, tuple[torch.Tensor]]:
    """Factory for `partitioner.models:tiny_llama`: RMSNorm, RoPE, SwiGLU, GQA."""
    fields = dict(norm="rmsnorm", position="rope", swiglu=True, bias=False,
                  tie_embeddings=False, n_kv_head=2)
    fields.update(overrides)
    return build(GPTConfig(**fields), batch=batch, seq=seq)
