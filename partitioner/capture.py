"""Capture: an ordinary nn.Module and one example batch -> one aten-level torch.fx graph.

torch.export (non-strict) traces the model with fake tensors, so capture costs no parameter
memory and works on the meta device. Every node keeps `meta["val"]` (a FakeTensor: shape, dtype)
and `meta["nn_module_stack"]` (its module path); parameters keep their original fully qualified
names, so local shards map back to the user's state dict. Tied parameters (one tensor under
several names, like GPT-2's wte/lm_head) are read through one canonical name.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import traceback
import warnings
from collections import OrderedDict
from contextvars import ContextVar
from dataclasses import dataclass, field

import torch
from torch import fx, nn
from torch.export.graph_signature import InputKind, OutputKind
from torch.fx.graph import _PyTreeCodeGen, _PyTreeInfo
from torch.utils import _pytree as pytree

from core.fx_utils import eliminate_dead_code

log = logging.getLogger(__name__)


class CaptureError(RuntimeError):
    """The model could not be captured; the message says where and what to try."""


@dataclass
class Captured:
    """One captured graph and the names that tie it back to the user's module."""

    gm: fx.GraphModule
    """Aten graph; get_attr nodes read parameters/buffers by their canonical names. A plain
    graph module (none of export's input-checking hooks), holding meta tensors."""
    params: dict[str, tuple[torch.Size, torch.dtype, bool]]
    """Canonical parameter name -> (full shape, dtype, requires_grad), in module order."""
    buffers: dict[str, tuple[torch.Size, torch.dtype, bool]]
    """Canonical buffer name -> (shape, dtype, persistent)."""
    aliases: dict[str, str] = field(default_factory=dict)
    """Every state-dict name of a tied tensor -> its canonical name (identity entries omitted)."""
    input_key: tuple = ()
    """What the example inputs looked like (see `input_key`)."""
    shared: bool = False
    """Kept by `shared_captures` for later calls: compile a copy of its graph, never the graph."""


def input_key(args: tuple, kwargs: dict) -> tuple:
    """Cache key of a call: pytree structure, tensor shapes/dtypes, other leaves by value."""
    leaves, spec = pytree.tree_flatten((tuple(args), dict(kwargs)))
    described = tuple(
        ("T", tuple(leaf.shape), leaf.dtype) if isinstance(leaf, torch.Tensor) else ("V", leaf)
        for leaf in leaves)
    return (str(spec), described)


_SHARED_LIMIT = 64
"""Captures kept for `shared_captures` scopes (each a meta graph: no parameter memory)."""
_shared: OrderedDict[tuple, Captured] = OrderedDict()
_shared_model: ContextVar[tuple | None] = ContextVar("shared_model", default=None)


@contextlib.contextmanager
def shared_captures(model_key: tuple):
    """Inside, `capture` reuses what it captured before, in this process, for `model_key`
    and the same input shapes, dtypes and device, instead of exporting again.

    The caller vouches that every model captured under one key is built by the same code
    with the same arguments (`check.check_rank`: one factory, its kwargs, one dtype). The
    graph depends only on that and on the inputs (capture detaches it from the weights, and
    compiling copies it), so a reused capture is the one a new export would give; export
    costs most of a small model's `parallelize`, and a test process checks one model under
    many plans."""
    token = _shared_model.set(model_key)
    try:
        yield
    finally:
        _shared_model.reset(token)


def capture(model: nn.Module, args: tuple, kwargs: dict | None = None) -> Captured:
    """Export `model(*args, **kwargs)` to one aten fx graph (inputs may be fake or meta)."""
    kwargs = dict(kwargs or {})
    model_key = _shared_model.get()
    if model_key is None:
        return _export(model, args, kwargs)
    devices = tuple(str(leaf.device) for leaf in pytree.tree_leaves((args, kwargs))
                    if isinstance(leaf, torch.Tensor))
    # the same model captured with its parameters cast (mixed precision) is another graph
    dtypes = tuple(sorted({str(p.dtype) for p in model.parameters()}))
    key = (model_key, input_key(args, kwargs), devices, dtypes)
    if key in _shared:
        _shared.move_to_end(key)
        return _shared[key]
    captured = _shared[key] = _export(model, args, kwargs)
    captured.shared = True
    if len(_shared) > _SHARED_LIMIT:
        _shared.popitem(last=False)
    return captured


def _export(model: nn.Module, args: tuple, kwargs: dict) -> Captured:
    try:
        with _no_stack_traces():
            exported = torch.export.export(model, tuple(args), kwargs, strict=False)
    except Exception as error:  # noqa: BLE001 - re-raised with context below
        raise CaptureError(_describe_export_failure(model, error)) from error
    canonical, aliases = _canonical_names(model)
    gm = _unlift(exported, canonical)
    params = {name: (p.shape, p.dtype, p.requires_grad)
              for name, p in model.named_parameters()}
    persistent = set(model.state_dict().keys())
    buffers = {name: (b.shape, b.dtype, name in persistent) for name, b in model.named_buffers()}
    return Captured(gm=gm, params=params, buffers=buffers, aliases=aliases,
                    input_key=input_key(args, kwargs))


_LIFTED = {InputKind.PARAMETER, InputKind.BUFFER, InputKind.CONSTANT_TENSOR}
"""Inputs export lifts out of the module that the graph reads back as get_attr nodes."""
_MUTATIONS = {OutputKind.BUFFER_MUTATION, OutputKind.USER_INPUT_MUTATION,
              OutputKind.PARAMETER_MUTATION}
"""Outputs that carry a mutated buffer or input back: copied into it in the graph instead."""


def _unlift(exported: torch.export.ExportedProgram, canonical: dict[str, str]) -> fx.GraphModule:
    """The exported graph as a plain graph module that reads parameters and buffers through
    get_attr nodes (by their canonical names), holding meta tensors of their shapes, with the
    model's pytree calling convention: what `exported.module()` gives, without its input
    checks and with its code generated once.

    `module()` generates the code three times and builds two graph modules, then a deep copy
    sheds its hooks (together as much as all the passes cost); here the graph is rewritten
    and cleaned first, and one graph module is built around it. Programs this does not
    rewrite itself (effect tokens, script objects, a dialect other than training) take
    `module()`.
    """
    signature = exported.graph_signature
    if (exported.verifiers[0].dialect != "TRAINING"
            or any(spec.kind not in _LIFTED | {InputKind.USER_INPUT}
                   for spec in signature.input_specs)
            or any(spec.kind not in _MUTATIONS | {OutputKind.USER_OUTPUT}
                   for spec in signature.output_specs)):
        return _unlift_by_module(exported, canonical)
    # A copy (nodes and their metadata dicts, shallow), as module() takes: export's own graph
    # remembers names its passes dropped, so nodes made here would be named otherwise.
    graph = copy.deepcopy(exported.graph)
    held = nn.Module()  # what the graph module copies its attributes from
    reads, inputs = {}, {}
    for node, spec in zip(graph.find_nodes(op="placeholder"), signature.input_specs,
                          strict=True):
        if spec.kind == InputKind.USER_INPUT:
            inputs[node.name] = node
            continue
        name = canonical.get(spec.target, spec.target)  # `_clean` merges reads of one tensor
        with graph.inserting_after(node):
            read = graph.get_attr(name)
        node.replace_all_uses_with(read)
        read.meta = node.meta
        graph.erase_node(node)
        reads[spec.target] = read
        _hold(held, name, _held_value(exported, spec))
    output = graph.output_node()
    user_outputs, copies = [], {}
    for value, spec in zip(pytree.tree_leaves(output.args), signature.output_specs,
                           strict=True):
        if spec.kind == OutputKind.USER_OUTPUT:
            user_outputs.append(value)
            continue
        target = reads.get(spec.target, inputs.get(spec.target))
        if target is None:
            raise CaptureError(f"export returned a mutation of {spec.target!r}, which is "
                               f"neither a buffer nor an input of the graph")
        with graph.inserting_before(output):
            copies[value] = graph.call_function(torch.ops.aten.copy_.default, (target, value))
    # a user output that is also a mutated value reads its copy, as module() has it
    output.args = (tuple(copies.get(leaf, leaf) for leaf in user_outputs),)
    call = exported.module_call_graph[0].signature
    graph._codegen = _PyTreeCodeGen(_PyTreeInfo(
        _argument_names(exported.call_spec.in_spec, call.forward_arg_names if call else None),
        exported.call_spec.in_spec, exported.call_spec.out_spec))
    _clean(graph, canonical)
    lifted = {canonical.get(target, target) for target in reads}
    for node in graph.find_nodes(op="get_attr"):  # the sub-graphs of higher-order ops
        if node.target not in lifted:
            _hold(held, node.target, exported.graph_module.get_submodule(node.target))
    # Copied in the graph's order (the model's); tensors that are not parameters become
    # buffers, constants too, as the deep copy that shed module()'s hooks made them.
    gm = fx.GraphModule(held, graph)  # the code is generated here, once
    gm.meta.update(exported.graph_module.meta)
    return gm


def _held_value(exported: torch.export.ExportedProgram, spec):
    """What the graph module holds for a lifted input: a meta tensor like a parameter or
    buffer (local state binds its own), a constant's value (the graph computes with it)."""
    if spec.kind == InputKind.PARAMETER:
        value = exported.state_dict[spec.target]
        return nn.Parameter(torch.empty_like(value, device="meta"),
                            requires_grad=value.requires_grad)
    if spec.kind == InputKind.BUFFER:
        value = (exported.state_dict[spec.target] if spec.persistent
                 else exported.constants[spec.target])
        return torch.empty_like(value, device="meta")
    value = exported.constants[spec.target]
    # a tensor attribute that asks for gradients is a constant all the same (module() warns)
    return value.detach() if isinstance(value, torch.Tensor) else value


def _hold(root: nn.Module, name: str, value) -> None:
    """root.<name> = value, with empty container modules along the path."""
    *path, leaf = name.split(".")
    for part in path:
        child = root._modules.get(part)
        if child is None:
            child = root._modules[part] = nn.Module()
        root = child
    if isinstance(value, nn.Parameter):
        root._parameters[leaf] = value
    elif isinstance(value, torch.Tensor):
        root._buffers[leaf] = value
    elif isinstance(value, nn.Module):
        root._modules[leaf] = value
    else:
        setattr(root, leaf, value)


def _argument_names(in_spec, forward_arg_names: list[str] | None) -> list[str]:
    """The generated forward's parameter names, as `module()` names them."""
    if forward_arg_names:
        return list(forward_arg_names)
    if (in_spec.type is tuple and in_spec.num_children == 2
            and in_spec.child(0).type is tuple and in_spec.child(1).type is dict):
        return ([f"arg_{i}" for i in range(in_spec.child(0).num_children)]
                + list(in_spec.child(1).context))
    return [f"arg_{i}" for i in range(in_spec.num_children)]


def _unlift_by_module(exported, canonical: dict[str, str]) -> fx.GraphModule:
    """torch's own unlift (`module()`), for programs `_unlift` does not rewrite itself."""
    # No `_guards_fn` submodule (its code generated, then dropped by `_clean`): the graph
    # runs on inputs of other shapes (shards) anyway.
    gm = exported.module(check_guards=False)
    _clean(gm.graph, canonical)
    if hasattr(gm, "_guards_fn"):
        delattr(gm, "_guards_fn")
    _detach_from_model(gm)
    return _standalone(gm)


@contextlib.contextmanager
def _no_stack_traces():
    """Export without each node's Python stack trace: nothing here reads `stack_trace`
    (errors name nodes and module paths), and symbolizing a traceback per traced op is about a
    fifth of a small model's export."""
    config = torch.fx.config
    if not hasattr(config, "do_not_emit_stack_traces"):  # older torch: traces are recorded
        yield
        return
    before = config.do_not_emit_stack_traces
    config.do_not_emit_stack_traces = True
    try:
        yield
    finally:
        config.do_not_emit_stack_traces = before


def _canonical_names(model: nn.Module) -> tuple[dict[str, str], dict[str, str]]:
    """Map every name of every parameter/buffer to the first name of the same tensor."""
    first: dict[int, str] = {}
    canonical: dict[str, str] = {}
    for name, tensor in list(model.named_parameters(remove_duplicate=False)) + list(
            model.named_buffers(remove_duplicate=False)):
        canonical[name] = first.setdefault(id(tensor), name)
    aliases = {name: target for name, target in canonical.items() if name != target}
    return canonical, aliases


def _clean(graph: fx.Graph, canonical: dict[str, str]) -> None:
    """Drop export's guards and metadata asserts; read tied tensors through one name."""
    assert_metadata = torch.ops.aten._assert_tensor_metadata.default
    for node in list(graph.nodes):
        if node.op == "call_module" and node.target == "_guards_fn":
            graph.erase_node(node)
        elif node.op == "call_function" and node.target is assert_metadata:
            graph.erase_node(node)
    # One get_attr per canonical tensor: merge aliases into the first read of that tensor.
    seen: dict[str, fx.Node] = {}
    for node in list(graph.find_nodes(op="get_attr")):
        name = canonical.get(node.target, node.target)
        if name in seen:
            node.replace_all_uses_with(seen[name])
            graph.erase_node(node)
        else:
            node.target = name
            seen[name] = node
    eliminate_dead_code(graph)  # (which lints the graph)


def _standalone(gm: fx.GraphModule) -> fx.GraphModule:
    """`gm` without what export hangs on its module (forward hooks that check inputs against
    the captured shapes, train/eval that raise), as a deep copy makes it, but keeping the same
    graph (nodes and metadata are not copied). Its code is generated here, once."""
    with warnings.catch_warnings():  # torch's own pytree spec deprecation, raised by deepcopy
        warnings.simplefilter("ignore", FutureWarning)
        return copy.deepcopy(gm, {id(gm.graph): gm.graph})


def _detach_from_model(gm: fx.GraphModule) -> None:
    """Swap every tensor the graph module holds (aliases of tied weights included) for a meta
    tensor of the same shape.

    The captured graph then holds no memory and copies for free; a ParallelModel binds its own
    local shards to the same names.
    """
    for module in gm.modules():
        for leaf, value in list(module._parameters.items()):
            if value is not None:
                module._parameters[leaf] = nn.Parameter(
                    torch.empty_like(value, device="meta"), requires_grad=value.requires_grad)
        for leaf, value in list(module._buffers.items()):
            if value is not None:
                module._buffers[leaf] = torch.empty_like(value, device="meta")


def _describe_export_failure(model: nn.Module, error: Exception) -> str:
    """One message: the export error, the innermost module it happened in, what to try."""
    names = {id(module): name for name, module in model.named_modules()}
    where = None
    for frame, _ in traceback.walk_tb(error.__traceback__):
        owner = frame.f_locals.get("self")
        if isinstance(owner, nn.Module) and id(owner) in names:
            where = (names[id(owner)] or "<root>", type(owner).__name__, frame.f_code.co_filename,
                     frame.f_lineno)
    first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    location = (f" in module {where[0]!r} ({where[1]}, {where[2]}:{where[3]})" if where else "")
    return (f"torch.export could not capture {type(model).__name__}{location}: "
            f"{type(error).__name__}: {first_line}. Try: pass use_cache=False (or set "
            f"config.use_cache = False) for Hugging Face models, replace data-dependent Python "
            f"control flow in that module with torch.where/torch.cond, and check that the "
            f"example inputs are the ones forward() expects.")
