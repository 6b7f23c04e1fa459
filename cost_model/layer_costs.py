"""One transformer block's costs as sympy expressions of the parallel degrees, lambdified.

A block is a table of ops (GEMMs, batched attention matmuls, memory-bound kernels), each with its
per-rank shape written over the symbols
    t  tensor-parallel degree       c  context-parallel degree     b  microbatch size
    sp 1 if sequence parallel       e  expert-parallel degree      et expert tensor-parallel
and costed with the hardware roofline. The expressions are built once per (shape, hardware)
and turned into plain Python functions, so the search evaluates thousands of plans without
touching sympy again, and a 128-layer model costs the analysis of one block of each kind.

Results are per rank, per microbatch, per block: forward seconds, backward seconds, the extra
forward of selective recomputation, activation bytes stored for backward per recompute mode, and
the message sizes of the block's TP / CP / EP collectives (timed later in comm.py, because they
depend on where the plan places each group).

Memory traffic and messages count `hw.elem_bytes` per activation element (2 for 16-bit training
on GPUs, 4 for float32 on CPU profiles); stored activations (memory) stay Korthikanti's 16-bit.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable

import sympy

from cost_model.hardware import Hardware
from cost_model.shapes import TransformerShape

t, c, b, sp, e, et = sympy.symbols("t c b sp e et", positive=True)
ARGS = (t, c, b, sp, e, et)

# Backward/forward cost ratios of memory-bound kernels (bytes moved in backward / forward).
_BWD_NORM = 2.0      # reads x, dy, stats; writes dx and partial weight grads
_BWD_ACT = 1.5       # gelu/silu backward reads input and grad, writes grad
_BWD_SOFTMAX = 1.5   # reads output and grad, writes grad


@dataclass(frozen=True)
class Op:
    name: str
    fwd: sympy.Expr
    """Forward seconds (per rank, per microbatch)."""
    bwd: sympy.Expr
    """Backward seconds."""
    flops: sympy.Expr
    """Forward FLOPs executed on this rank."""
    attention_core: bool = False
    """Recomputed by selective recomputation (Korthikanti et al.)."""


def _rep():
    """Share of a hidden-size activation a rank holds outside the TP region: 1/t with sequence
    parallelism, the whole tensor without it."""
    return sp / t + (1 - sp)


def _residual_bytes(shape: TransformerShape, hw: Hardware) -> int:
    """Bytes per element of a residual add: read both branches, write the sum, and with dropout
    write its 1-byte mask."""
    return 3 * hw.elem_bytes + (1 if shape.dropout else 0)


def _gemm(hw: Hardware, name, m, n, k, batch=1, nodes=1) -> Op:
    """A (batched) matmul; `nodes`: the ops of the captured graph it takes (the linear, and the
    views and splits around it), each paying the profile's per-op overhead."""
    fwd = hw.gemm_time(m, n, k, batch)
    over_f, over_b = hw.graph_ops_time(nodes)
    # backward = dgrad (m,k,n) + wgrad (k,n,m): the same FLOPs and shape efficiency twice
    return Op(name, fwd + over_f, 2 * fwd + over_b, 2 * batch * m * n * k)


def _mem(hw: Hardware, name, nbytes, bwd_ratio, attention_core=False, elements=None,
         nodes=1) -> Op:
    """A memory-bound kernel moving `nbytes` forward and `bwd_ratio` times that backward; with
    `elements`, one doing per-element math over that many elements (and the same ratio of
    them backward), bounded by the profile's math rate too."""
    over_f, over_b = hw.graph_ops_time(nodes)
    if elements is None:
        fwd, bwd = hw.memory_time(nbytes), hw.memory_time(bwd_ratio * nbytes)
    else:
        fwd = hw.math_time(nbytes, elements)
        bwd = hw.math_time(bwd_ratio * nbytes, bwd_ratio * elements)
    return Op(name, fwd + over_f, bwd + over_b, sympy.Integer(0), attention_core)


# Ops of the captured graph (torch.export of partitioner.models, after passes/kernels.py fuses
# norms and swiglu) that each table op takes; they matter where the profile has an op overhead.
_QKV_VIEWS = 6     # q, k, v: view to (B, S, heads, hd) and transpose to (B, heads, S, hd)
_ROPE = 20         # q and k: chunk, 2 getitem, 3 cat, neg, 2 mul, add
_ATTN_OUT = 2      # context: transpose back and reshape to (B, S, h)


def _qkv_nodes(shape: TransformerShape) -> int:
    """The projection (one linear, a split and 3 getitems; or 3 linears), the views, and the
    repeat_interleave of k and v under grouped-query attention."""
    project = 5 if shape.fused_qkv else 3
    return project + _QKV_VIEWS + (2 if shape.n_kv < shape.heads else 0)


def _mlp_in_nodes(shape: TransformerShape) -> int:
    """up (GeLU MLP); gate and up (swiglu); one gate_up, a chunk and 2 getitems (fused)."""
    if not shape.swiglu:
        return 1
    return 4 if shape.fused_gate_up else 2


def attention_ops(shape: TransformerShape, hw: Hardware) -> list[Op]:
    s, h, a, hd = shape.seq, shape.hidden, shape.heads, shape.head_dim
    sl = s / c  # local queries per rank under context parallelism
    T = b * sl
    rep = _rep()
    eb = hw.elem_bytes
    ops = [
        _mem(hw, "norm_1", 2 * eb * T * h * rep, _BWD_NORM, elements=T * h * rep),
        _gemm(hw, "qkv_proj", T, (h + 2 * shape.kv_dim) / t, h, nodes=_qkv_nodes(shape)),
    ]
    if not shape.learned_positions:
        ops.append(_mem(hw, "rope", 2 * eb * T * (h + shape.kv_dim) / t, 1.0, nodes=_ROPE))
    heads = b * a / t
    if shape.attention == "unfused":
        elems = heads * sl * s
        qk = _gemm(hw, "scores_bmm", sl, s, hd, heads)
        ops += [
            Op(qk.name, qk.fwd, qk.bwd, qk.flops, True),
            _mem(hw, "scale_mask_softmax", 2 * eb * elems, _BWD_SOFTMAX, True, elements=elems),
        ]
        if shape.dropout:
            ops.append(_mem(hw, "attention_dropout", (2 * eb + 1) * elems, 1.0, True))
        av = _gemm(hw, "context_bmm", sl, hd, s, heads, nodes=1 + _ATTN_OUT)
        ops.append(Op(av.name, av.fwd, av.bwd, av.flops, True))
    else:
        # flash attention: QK^T and PV in one kernel, the causal half skipped, no s x s tensor;
        # backward recomputes the scores (2.5x forward FLOPs)
        flops = 4 * heads * sl * s * hd / 2
        fwd = hw.attention_time(flops, sl, s, hd)
        over_f, over_b = hw.graph_ops_time(1 + _ATTN_OUT)
        ops.append(Op("flash_attention", fwd + over_f, 2.5 * fwd + over_b, flops, True))
    ops.append(_gemm(hw, "out_proj", T, h, h / t))
    ops.append(_mem(hw, "residual_1", _residual_bytes(shape, hw) * T * h * rep, 1.0))
    return ops


def mlp_ops(shape: TransformerShape, hw: Hardware) -> list[Op]:
    h, f = shape.hidden, shape.ffn_dim
    T = b * shape.seq / c
    rep = _rep()
    eb = hw.elem_bytes
    n_in = 2 if shape.swiglu else 1
    return [
        _mem(hw, "norm_2", 2 * eb * T * h * rep, _BWD_NORM, elements=T * h * rep),
        _gemm(hw, "mlp_in", T, n_in * f / t, h, nodes=_mlp_in_nodes(shape)),
        _mem(hw, "activation", (n_in + 1) * eb * T * f / t, _BWD_ACT, elements=T * f / t),
        _gemm(hw, "mlp_out", T, h, f / t),
        _mem(hw, "residual_2", _residual_bytes(shape, hw) * T * h * rep, 1.0),
    ]


def moe_ops(shape: TransformerShape, hw: Hardware) -> list[Op]:
    """Router, permutation and grouped expert GEMMs of one MoE MLP. Tokens entering the layer on
    this rank: T et / t (tensor-parallel ranks share tokens only within an expert-TP group);
    after dispatch each of the E/e local experts sees T et/t * k e / E tokens on average."""
    h, f, E, k = shape.hidden, shape.expert_ffn_dim, shape.experts, shape.topk
    T = b * shape.seq / c
    Tm = T * et / t
    rep = _rep()
    n_in = 2 if shape.swiglu else 1
    per_expert = Tm * k * e / E
    local = E / e
    eb = hw.elem_bytes
    return [
        _mem(hw, "norm_2", 2 * eb * T * h * rep, _BWD_NORM, elements=T * h * rep),
        _gemm(hw, "router", Tm, E, h),
        _mem(hw, "permute", 2 * eb * Tm * k * h, 1.0),
        _gemm(hw, "experts_in", per_expert, n_in * f / et, h, local),
        _mem(hw, "activation", (n_in + 1) * eb * Tm * k * f / et, _BWD_ACT,
             elements=Tm * k * f / et),
        _gemm(hw, "experts_out", per_expert, h, f / et, local),
        _mem(hw, "unpermute", 3 * eb * Tm * k * h, 1.0),
        _mem(hw, "residual_2", _residual_bytes(shape, hw) * T * h * rep, 1.0),
    ]


def activation_bytes(shape: TransformerShape, moe: bool) -> dict[str, sympy.Expr]:
    """Bytes one block stores for backward, per rank and microbatch (16-bit activations, 1-byte
    dropout masks), by recompute mode. For a GPT block (4h MLP, dropout, unfused attention)
    these are exactly Korthikanti et al.'s s b h (10 + 24/t + 5as/(ht)) family."""
    s, h, a = shape.seq, shape.hidden, shape.heads
    sl = s / c
    sbh = sl * b * h
    rep = _rep()
    mask = 1 if shape.dropout else 0
    replicated = (2 * 2 + 2 + 2 + 2 * mask) * sbh * rep  # norm inputs, qkv and mlp inputs, masks
    qkv = 2 * sl * b * (h + 2 * shape.kv_dim) / t
    out_in = 2 * sbh / t
    if moe:
        f, k = shape.expert_ffn_dim, shape.topk
        tokens = b * sl * et / t * k
        mlp = ((4 if shape.swiglu else 2) + 2) * tokens * f / et + 2 * tokens * h * 2
    else:
        f = shape.ffn_dim
        mlp = ((4 if shape.swiglu else 2) + 2) * sl * b * f / t
    if shape.attention == "unfused":
        core = (5 if shape.dropout else 2) * a * sl * s * b / t
    else:
        core = 4 * a * sl * b / t  # softmax statistics (fp32) kept by flash attention
    none = replicated + qkv + out_in + mlp + core
    selective = none - (core if shape.attention == "unfused" else 0)
    full = 2 * sbh * rep
    return {"none": none, "selective": selective, "full": full}


@dataclass(frozen=True)
class BlockCosts:
    """Lambdified costs of one block kind; each callable takes (t, c, b, sp, e, et)."""

    fwd: Callable[..., float]
    bwd: Callable[..., float]
    recompute_selective: Callable[..., float]
    attention_fwd: Callable[..., float]
    flops_fwd: Callable[..., float]
    act_none: Callable[..., float]
    act_selective: Callable[..., float]
    act_full: Callable[..., float]
    tp_bytes: Callable[..., float]
    """One TP all-reduce (or all-gather + reduce-scatter with sp) message; 2 per forward."""
    cp_bytes: Callable[..., float]
    """K and V of this rank's sequence chunk (ring: passed c-1 times per forward)."""
    ep_bytes: Callable[..., float]
    """One dispatch (or combine) all-to-all buffer; 2 per forward."""
    tp_windows: tuple[Callable[..., float], ...]
    """Forward seconds of the GEMMs beside the block's four tensor-parallel collectives, in
    their order: attention's column projection (after its all-gather), its row projection
    (before its reduce-scatter), the MLP's column and row projections. What async TP hides
    the collectives behind (terms/tp.py); 0 for an MoE block's MLP, whose expert GEMMs run after
    the dispatch, not beside the tensor-parallel collectives."""
    symbolic: dict
    """The sympy expressions behind the callables, with the profile's fitted efficiencies
    (EFFICIENCY_FIELDS) still symbols."""
    efficiencies: tuple
    """The profile's values of EFFICIENCY_FIELDS the callables were bound to."""

    @property
    def expressions(self) -> dict:
        """The expressions with the profile's efficiencies put in (for reports and tests)."""
        values = dict(zip(EFFICIENCY_SYMBOLS, self.efficiencies, strict=True))
        return {name: _each(expr, lambda e: e.subs(values) if isinstance(e, sympy.Basic) else e)
                for name, expr in self.symbolic.items() if name != "ops"}

    def activation(self, recompute: str, *args) -> float:
        return {"none": self.act_none, "selective": self.act_selective,
                "full": self.act_full}[recompute](*args)


def block_expressions(shape: TransformerShape, hw: Hardware, moe: bool) -> dict:
    ops = attention_ops(shape, hw) + (moe_ops(shape, hw) if moe else mlp_ops(shape, hw))
    act = activation_bytes(shape, moe)
    T = b * shape.seq / c
    tokens_moe = T * et / t * shape.topk
    gemm = {op.name: op.fwd for op in ops}
    zero = sympy.Integer(0)
    return {
        "ops": ops,
        "tp_windows": (gemm["qkv_proj"], gemm["out_proj"], gemm.get("mlp_in", zero),
                       gemm.get("mlp_out", zero)),
        "fwd": sum(op.fwd for op in ops),
        "bwd": sum(op.bwd for op in ops),
        "recompute_selective": sum(op.fwd for op in ops if op.attention_core)
        if shape.attention == "unfused" else sympy.Integer(0),
        "attention_fwd": sum(op.fwd for op in ops if op.attention_core),
        "flops_fwd": sum(op.flops for op in ops),
        "act_none": act["none"], "act_selective": act["selective"], "act_full": act["full"],
        "tp_bytes": hw.elem_bytes * T * shape.hidden,
        "cp_bytes": 2 * hw.elem_bytes * T * shape.kv_dim / t,
        "ep_bytes": hw.elem_bytes * tokens_moe * shape.hidden if moe else sympy.Integer(0),
    }


EFFICIENCY_FIELDS = ("gemm_eff", "gemm_half", "mem_eff")
"""Hardware fields fitted to published runs (fit.py): the block expressions keep them as
symbols and the lambdified functions take them as arguments, so a fit that tries thousands of
values builds each block's expressions once."""
EFFICIENCY_SYMBOLS = sympy.symbols(" ".join(EFFICIENCY_FIELDS))


@lru_cache(maxsize=64)
def _lambdified(shape: TransformerShape, symbolic_hw: Hardware, moe: bool):
    exprs = block_expressions(shape, symbolic_hw, moe)
    fns = {name: _each(expr, lambda e: sympy.lambdify((*EFFICIENCY_SYMBOLS, *ARGS), e,
                                                      modules="math"))
           for name, expr in exprs.items() if name != "ops"}
    return exprs, fns


def _each(value, fn):
    """fn(value), or for a tuple of expressions (tp_windows) fn of each."""
    return tuple(fn(v) for v in value) if isinstance(value, tuple) else fn(value)


def block_costs(shape: TransformerShape, hw: Hardware, moe: bool = False) -> BlockCosts:
    symbolic_hw = dataclasses.replace(hw, **dict(zip(EFFICIENCY_FIELDS, EFFICIENCY_SYMBOLS,
                                                     strict=True)))
    exprs, fns = _lambdified(shape, symbolic_hw, moe)
    values = tuple(getattr(hw, name) for name in EFFICIENCY_FIELDS)
    return BlockCosts(symbolic=exprs, efficiencies=values,
                      **{name: _each(fn, lambda f: functools.partial(f, *values))
                         for name, fn in fns.items()})


# --- the ends of the model (first and last stage) -----------------------------------------
_ROPE_TABLES = 13  # cos/sin computed in the graph: aranges, div, pow, reciprocal, outer, casts
_EMBED_LEARNED = 3  # position ids, the position table's lookup, the add
_HEAD = 4          # final norm, LM head, and the loss: log-softmax and NLL


def embedding_time(shape: TransformerShape, hw: Hardware, tp: int, cp: int, mbs: int,
                   sp: bool) -> tuple[float, float]:
    """(forward, backward) seconds of the token (+position) embedding on the first stage."""
    T = mbs * shape.seq / cp
    out = hw.elem_bytes * T * shape.hidden * (1 / tp if sp else 1)
    over_f, over_b = hw.graph_ops_time(
        1 + (_EMBED_LEARNED if shape.learned_positions else _ROPE_TABLES))
    fwd = hw.memory_time(2 * out + hw.elem_bytes * T * shape.hidden, kernels=2)
    bwd = hw.memory_time(4 * out, kernels=2)  # scatter-add into the (vocab-parallel) table
    return fwd + over_f, bwd + over_b


def head_time(shape: TransformerShape, hw: Hardware, tp: int, cp: int, mbs: int,
              sp: bool) -> tuple[float, float]:
    """(forward, backward) seconds of final norm, LM head and vocab-parallel cross entropy."""
    T = mbs * shape.seq / cp
    v = -(-shape.vocab // tp)  # a rank's columns of the vocabulary padded to a multiple of tp
    gemm = hw.gemm_time(T, v, shape.hidden)
    norm_elements = T * shape.hidden * (1 / tp if sp else 1)
    norm = hw.math_time(2 * hw.elem_bytes * norm_elements, norm_elements)
    # logits read, fp32 softmax, grad; the exp and log of every logit
    ce = hw.math_time(T * v * (hw.elem_bytes + 4 + 4), T * v)
    over_f, over_b = hw.graph_ops_time(_HEAD)
    return gemm + norm + ce + over_f, 2 * gemm + 2 * norm + ce + over_b
