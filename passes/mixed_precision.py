"""Keep norms, softmax and the loss in fp32 under mixed precision (param_dtype bf16 or fp16).

The graph was captured with the parameters in `param_dtype` (the runtime binds compute copies
of the fp32 main weights), so every op runs in that dtype as the model's own code says. This
pass moves the ops whose accuracy needs more bits into fp32, as Megatron and Hugging Face do:

- the ops of `FP32_OPS` (layer/RMS norm, softmax, log-softmax, cross-entropy, NLL): their
  floating inputs are cast up, the op runs in fp32, its result is cast back to the dtype it had
  for readers outside the set (a log-softmax feeding an NLL loss hands it fp32);
- a hand-written RMSNorm core `h * rsqrt(mean(h^2, -1) + eps)` (the kernels pass's pattern):
  its statistics and normalization in fp32, cast back before the weight multiplies;
- the model's floating outputs are returned in fp32, so a `loss_fn` on them (cross-entropy of
  the logits) computes in fp32.

Attention (`scaled_dot_product_attention` and its ring/all-to-all forms) keeps its inputs in
`param_dtype`: its kernels accumulate the softmax in fp32 themselves.

The pass runs on the flat, sharded graph before the pipeline split, so a cast lands in the
stage of the op it serves and stage boundaries carry `param_dtype` activations.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import fx
from torch._guards import detect_fake_mode
from torch.utils import _pytree as pytree

from core import meta
from core.precision import MAIN_DTYPE, compute_dtype
from passes import PassContext, recompile

aten = torch.ops.aten

FP32_OPS = {
    aten.layer_norm.default: "layer_norm",
    aten.rms_norm.default: "rms_norm",
    aten.softmax.int: "softmax",
    aten._softmax.default: "softmax",
    aten.log_softmax.int: "log_softmax",
    aten._log_softmax.default: "log_softmax",
    aten.cross_entropy_loss.default: "cross_entropy",
    aten.nll_loss.default: "nll_loss",
    aten.nll_loss_forward.default: "nll_loss",
}
"""Ops computed in fp32 under mixed precision (their floating inputs cast up)."""


@dataclass(frozen=True)
class MixedPrecisionRecord:
    dtype: str
    """The compute dtype of the parameters."""
    kept: tuple[tuple[str, int], ...]
    """(op kind, nodes run in fp32), most first."""
    outputs: int
    """Model outputs cast up to fp32."""

    def summary(self) -> str:
        kept = ", ".join(f"{kind} x{count}" for kind, count in self.kept) or "none"
        return (f"parameters compute in {self.dtype}; in fp32: {kept}; "
                f"outputs returned in fp32: {self.outputs}")


def keep_fp32(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    low = compute_dtype(ctx.plan)
    counts: dict[str, int] = {}
    for node in list(gm.graph.nodes):
        if node.op != "call_function":
            continue
        kind = FP32_OPS.get(node.target)
        if kind is not None:
            if _run_in_fp32(gm.graph, node, [node], _floating_inputs(node)):
                counts[kind] = counts.get(kind, 0) + 1
            continue
        chain = _rms_chain(node)
        if chain is not None and _run_in_fp32(gm.graph, node, chain, [chain[0].args[0]]):
            counts["rms_norm"] = counts.get("rms_norm", 0) + 1
    outputs = _outputs_to_fp32(gm.graph)
    gm.graph.lint()
    recompile(gm)
    gm.meta[meta.MIXED_PRECISION_RECORD] = MixedPrecisionRecord(
        str(low).removeprefix("torch."), tuple(sorted(counts.items(), key=lambda kv: -kv[1])),
        outputs)
    return gm


def _floating_inputs(node: fx.Node) -> list[fx.Node]:
    return [arg for arg in node.all_input_nodes if _is_low(arg)]


def _is_low(node: fx.Node) -> bool:
    val = node.meta.get(meta.VAL)
    return (isinstance(val, torch.Tensor) and val.is_floating_point()
            and val.dtype.itemsize < MAIN_DTYPE.itemsize)


def _run_in_fp32(graph: fx.Graph, last: fx.Node, chain: list[fx.Node],
                 inputs: list[fx.Node]) -> bool:
    """Cast `inputs` up where `chain` reads them, recompute the chain's values in fp32 and cast
    `last` back to its dtype for its readers outside the fp32 ops. False: nothing to do."""
    if not inputs:
        return False
    before = last.meta.get(meta.VAL)
    for source in dict.fromkeys(inputs):
        with graph.inserting_before(chain[0]):
            up = graph.call_function(aten.to.dtype, (source, MAIN_DTYPE))
        up.meta = {**chain[0].meta, meta.VAL: _cast_val(source.meta[meta.VAL], MAIN_DTYPE)}
        if meta.TP_PLACEMENT in source.meta:
            up.meta[meta.TP_PLACEMENT] = source.meta[meta.TP_PLACEMENT]
        for reader in chain:
            reader.replace_input_with(source, up)
    if last.target in (aten._softmax.default, aten._log_softmax.default):
        last.args = (*last.args[:2], False)  # half_to_float: the input is fp32 now
    for node in chain:
        _repropagate(node)
    after = last.meta.get(meta.VAL)
    if (isinstance(before, torch.Tensor) and isinstance(after, torch.Tensor)
            and before.dtype != after.dtype):
        readers = [user for user in last.users if user.target not in FP32_OPS]
        if readers:
            with graph.inserting_after(last):
                down = graph.call_function(aten.to.dtype, (last, before.dtype))
            down.meta = {**last.meta, meta.VAL: _cast_val(after, before.dtype)}
            for reader in readers:
                reader.replace_input_with(last, down)
    return True


def _outputs_to_fp32(graph: fx.Graph) -> int:
    output = graph.output_node()
    count = 0

    def up(arg):
        nonlocal count
        if not isinstance(arg, fx.Node) or not _is_low(arg):
            return arg
        with graph.inserting_before(output):
            cast = graph.call_function(aten.to.dtype, (arg, MAIN_DTYPE))
        cast.meta = {**arg.meta, meta.VAL: _cast_val(arg.meta[meta.VAL], MAIN_DTYPE)}
        count += 1
        return cast

    output.args = pytree.tree_map(up, output.args)
    return count


def _rms_chain(node: fx.Node) -> list[fx.Node] | None:
    """[pow, mean, add, rsqrt, node] when `node` is `h * rsqrt(mean(h^2, -1) + eps)` of a
    low-precision `h` (the kernels pass's RMSNorm core)."""
    from passes.kernels import _rms_core  # one matcher of the pattern for both passes

    parts = _rms_core(node) if node.target is aten.mul.Tensor else None
    if parts is None or not _is_low(parts[0]):
        return None
    h = parts[0]
    rsqrt = next(arg for arg in node.args if arg is not h)
    add = rsqrt.args[0]
    mean = add.args[0]
    power = mean.args[0]
    return [power, mean, add, rsqrt, node]


def _cast_val(val: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    with _fake_mode([val]):
        return val.to(dtype)


def _repropagate(node: fx.Node) -> None:
    """node.meta["val"] again from its inputs' values (after an input changed dtype)."""
    args, kwargs = fx.node.map_arg((node.args, node.kwargs), lambda n: n.meta.get(meta.VAL))
    with _fake_mode(pytree.tree_leaves((args, kwargs))):
        node.meta[meta.VAL] = node.target(*args, **kwargs)


def _fake_mode(values):
    mode = detect_fake_mode([v for v in values if isinstance(v, torch.Tensor)])
    return mode if mode is not None else contextlib.nullcontext()
