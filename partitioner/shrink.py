"""A large model shrunk for `partitioner check`: the same structure and the same divisibility
facts under the plan, at a size CPU ranks can run.

`check` compares a plan on CPU ranks with one device, so a 70B preset would be killed for memory
long before it says anything about the plan. What a plan can get wrong with a model is
structural (which ops are split, which collectives run, which stage holds what) and
arithmetic (which counts the degrees divide): so every flag of the config is kept (norm,
positions, SwiGLU, bias, tying, fusion, experts, dense leading layers), and every count a degree
splits (heads, kv heads, vocabulary, MLP and expert widths, experts, the sequence) is replaced
by the smallest one that every product of the plan's degrees divides exactly when it divides
the original, and that divides them exactly when the original does (kv heads replicated when
they divide tp). Layers are cut to what the pipeline needs.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

from core.divisibility import divisors
from core.plan import Plan
from partitioner.models import GPTConfig

MAX_CHECK_PARAMETERS = 20_000_000
"""Above this a model is shrunk for `check` (a few CPU ranks each hold a copy, float64)."""

_HEAD_DIM = 8  # even, for RoPE's rotate-half; no degree splits it
_SMALLEST = {"vocab_size": 64, "ffn_hidden": 32, "moe_ffn_hidden": 16, "seq_len": 16}
"""Lower bounds of the shrunk counts, so the small model is not degenerate."""


@dataclass(frozen=True)
class Shrunk:
    """A shrunk config and what changed (`field: before -> after`)."""

    config: GPTConfig
    changes: tuple[str, ...]

    def __str__(self) -> str:
        return ", ".join(self.changes)


def _splitting_degrees(plan: Plan, config: GPTConfig) -> int:
    """A number every degree that splits a count of the model divides, with every product of
    them that splits one (tp*cp: heads under a2a; ep*etp: the experts' ranks), and no more: so
    keeping divisibility by its divisors keeps it for each of them."""
    experts = plan.ep * plan.expert_tp if config.n_experts else 1
    return math.lcm(plan.tp * plan.cp, experts)


def _sequence_degrees(plan: Plan) -> int:
    """Ring/hybrid CP cuts the sequence into 2*cp chunks; sp splits it over tp."""
    return 2 * plan.cp * plan.tp


def same_divisibility(n: int, m: int, product: int, *, divides_too: bool = False) -> bool:
    """Whether every divisor d of `product` divides m exactly when it divides n (and, with
    `divides_too`, m divides d exactly when n does: kv heads that divide tp are replicated)."""
    return all((n % d == 0) == (m % d == 0)
               and (not divides_too or (d % n == 0) == (d % m == 0))
               for d in divisors(product))


def smallest_alike(n: int, product: int, *, at_least: int = 1, step: int = 1,
                   divides_too: bool = False, ok=lambda m: True) -> int:
    """The smallest multiple of `step`, from `at_least`, with n's divisibility facts under
    `product` (n itself when none is smaller)."""
    for m in itertools.count(max(step, -(-at_least // step) * step), step):
        if m >= n:
            return n
        if same_divisibility(n, m, product, divides_too=divides_too) and ok(m):
            return m
    raise AssertionError("unreachable: itertools.count is endless")


def shrink(config: GPTConfig, plan: Plan) -> Shrunk:
    """`config` at a size CPU ranks run, with the same structure and divisibility facts under
    `plan` (see the module docstring)."""
    product = _splitting_degrees(plan, config)
    kv = smallest_alike(config.kv_heads, product, divides_too=True)
    gqa = config.kv_heads < config.n_head
    heads = smallest_alike(config.n_head, product, at_least=kv, step=kv,
                           ok=lambda h: (h > kv) == gqa)
    small = dict(
        n_layer=_layers(config, plan),
        n_head=heads,
        n_kv_head=None if config.n_kv_head is None else kv,
        n_embd=heads * min(_HEAD_DIM, config.head_dim),
        vocab_size=smallest_alike(config.vocab_size, product,
                                  at_least=_SMALLEST["vocab_size"]),
        seq_len=smallest_alike(config.seq_len, _sequence_degrees(plan),
                               at_least=_SMALLEST["seq_len"]),
    )
    small["ffn_hidden"] = smallest_alike(config.ffn, product, at_least=_SMALLEST["ffn_hidden"])
    if config.n_experts:
        experts = smallest_alike(config.n_experts, product,
                                 at_least=min(config.topk + 1, config.n_experts))
        small.update(n_experts=experts, topk=min(config.topk, experts),
                     dense_layers=min(config.dense_layers, 1),
                     moe_ffn_hidden=smallest_alike(config.expert_ffn, product,
                                                   at_least=_SMALLEST["moe_ffn_hidden"]))
    shrunk = config.replace(**small)
    changes = tuple(f"{name} {read(config)} -> {read(shrunk)}" for name, read in _SIZES
                    if read(config) != read(shrunk))
    return Shrunk(shrunk, changes)


_SIZES = (("layers", lambda c: c.n_layer), ("heads", lambda c: c.n_head),
          ("kv heads", lambda c: c.kv_heads), ("hidden", lambda c: c.n_embd),
          ("ffn", lambda c: c.ffn), ("vocab", lambda c: c.vocab_size),
          ("seq", lambda c: c.seq_len), ("experts", lambda c: c.n_experts),
          ("topk", lambda c: c.topk if c.n_experts else None),
          ("expert ffn", lambda c: c.expert_ffn if c.n_experts else None),
          ("dense layers", lambda c: c.dense_layers if c.n_experts else None))
"""The sizes a shrink may change, by the names users know them (the `gpt:` keys)."""


def _layers(config: GPTConfig, plan: Plan) -> int:
    """Enough layers for every (virtual) pipeline stage, and an MoE layer after the dense ones;
    a plan's own per-stage layer counts fix the total."""
    if plan.stage_layers:
        return sum(plan.stage_layers)
    dense = min(config.dense_layers, 1) if config.n_experts else 0
    return min(config.n_layer, max(2, plan.pp * plan.vpp, dense + 1))


def needs_shrinking(config: GPTConfig) -> bool:
    return config.num_parameters() > MAX_CHECK_PARAMETERS


def parameters_text(count: int) -> str:
    """70553706496 -> '70.6B'."""
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if count >= scale:
            return f"{count / scale:.1f}{unit}"
    return str(count)


