"""Small models for equivalence tests: in-repo GPTs and Hugging Face models from tiny configs
(random weights, no downloads). Module-level factories so spawned ranks can import them."""

from __future__ import annotations

import functools

import torch


@functools.lru_cache(maxsize=None)
def capture_once(factory, **overrides):
    """The capture of a model and its example batch, once per process: graph-level tests
    compile one model under many plans. `factory` is a name in partitioner.models or a
    callable. compile_rank copies the graph; a test must not change it."""
    from partitioner import models
    from partitioner.capture import capture

    factory = getattr(models, factory) if isinstance(factory, str) else factory
    model, (ids,) = factory(**overrides)
    return capture(model, (ids,))


def _ids(vocab: int, batch: int, seq: int) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(7))


def hf_llama(batch: int = 4, seq: int = 16, **overrides):
    from transformers import LlamaConfig, LlamaForCausalLM

    fields = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, vocab_size=256,
                  max_position_embeddings=64, use_cache=False, attention_dropout=0.0)
    fields.update(overrides)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**fields))
    return model, (_ids(fields["vocab_size"], batch, seq),)


def hf_gpt2(batch: int = 4, seq: int = 16, **overrides):
    from transformers import GPT2Config, GPT2LMHeadModel

    fields = dict(n_layer=2, n_embd=64, n_head=4, vocab_size=256, n_positions=64,
                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, use_cache=False,
                  bos_token_id=0, eos_token_id=0)
    fields.update(overrides)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(**fields))
    return model, (_ids(fields["vocab_size"], batch, seq),)


def starved_moe(batch: int = 4, seq: int = 16, **overrides):
    """The DeepSeek-style tiny MoE whose selection bias keeps every token away from expert 0
    and from experts 4..7: under ep=2 one expert of rank 0 and all of rank 1 receive nothing."""
    from partitioner.models import tiny_moe

    model, inputs = tiny_moe(batch, seq, router="sigmoid", shared_experts=1, **overrides)
    with torch.no_grad():
        for block in model.blocks:
            block.mlp.expert_bias[0] = -1e4
            block.mlp.expert_bias[4:] = -1e4
    return model, inputs


def hf_mixtral(batch: int = 4, seq: int = 16, experts_implementation: str = "grouped_mm",
               **overrides):
    """Mixtral with 8 experts top-2; `experts_implementation` picks how Hugging Face runs the
    experts ("grouped_mm", its default, exports as the opaque grouped-GEMM fallback op on CPU;
    "batched_mm" as index + bmm)."""
    from transformers import MixtralConfig, MixtralForCausalLM

    fields = dict(hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, vocab_size=256,
                  num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=64,
                  use_cache=False, attention_dropout=0.0)
    fields.update(overrides)
    config = MixtralConfig(**fields)
    config._experts_implementation = experts_implementation
    torch.manual_seed(0)
    model = MixtralForCausalLM(config)
    return model, (_ids(fields["vocab_size"], batch, seq),)


class _ExpertMLP(torch.nn.Module):
    """One SwiGLU expert, as hand-written MoE code has them (nn.Linear)."""

    def __init__(self, hidden: int, ffn: int, bias: bool = False) -> None:
        super().__init__()
        self.w1 = torch.nn.Linear(hidden, ffn, bias=bias)
        self.w3 = torch.nn.Linear(hidden, ffn, bias=bias)
        self.w2 = torch.nn.Linear(ffn, hidden, bias=bias)

    def forward(self, x):
        return self.w2(torch.nn.functional.silu(self.w1(x)) * self.w3(x))


class _LoopedMoE(torch.nn.Module):
    """Experts as a ModuleList run in a Python loop: each expert on every token, weighted by
    its gate (the token's top-k weight for it, zero when it is not among the top-k)."""

    def __init__(self, hidden: int, ffn: int, experts: int, topk: int, bias: bool) -> None:
        super().__init__()
        self.topk = topk
        self.router = torch.nn.Linear(hidden, experts, bias=False)
        self.experts = torch.nn.ModuleList([_ExpertMLP(hidden, ffn, bias)
                                            for _ in range(experts)])

    def forward(self, x):
        batch, seq, hidden = x.shape
        x = x.reshape(-1, hidden)  # (T, h)
        probs = self.router(x).softmax(dim=-1)
        weights, chosen = probs.topk(self.topk, dim=-1)  # (T, k)
        weights = weights / weights.sum(dim=-1, keepdim=True)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            gate = (weights * (chosen == e)).sum(dim=-1, keepdim=True)  # (T, 1)
            out = out + gate * expert(x)
        return out.reshape(batch, seq, hidden)


class _LoopedMoEModel(torch.nn.Module):
    """Embedding, blocks of RMSNorm -> looped MoE (residual), head: no attention."""

    def __init__(self, vocab: int, hidden: int, ffn: int, experts: int, topk: int,
                 layers: int, bias: bool) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, hidden)
        self.norms = torch.nn.ModuleList([torch.nn.RMSNorm(hidden) for _ in range(layers)])
        self.moes = torch.nn.ModuleList([_LoopedMoE(hidden, ffn, experts, topk, bias)
                                         for _ in range(layers)])
        self.head = torch.nn.Linear(hidden, vocab, bias=False)

    def forward(self, ids):
        x = self.embed(ids)
        for norm, moe in zip(self.norms, self.moes, strict=True):
            x = x + moe(norm(x))
        return self.head(x)


def looped_moe(batch: int = 4, seq: int = 8, experts: int = 4, topk: int = 2,
               bias: bool = False):
    """A MoE whose experts are an nn.ModuleList of MLPs run in a loop (2 layers)."""
    torch.manual_seed(0)
    model = _LoopedMoEModel(vocab=64, hidden=16, ffn=24, experts=experts, topk=topk, layers=2,
                            bias=bias)
    return model, (_ids(64, batch, seq),)
