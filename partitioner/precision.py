"""Mixed precision on the face's side: the model captured at `param_dtype`, the check that its
weights can serve as fp32 main weights, and the single-device reference under the same policy.

Parameter casting (Megatron's Float16Module with main_grad, FSDP2's MixedPrecisionPolicy), not
autocast: the model is captured with its floating parameters in `param_dtype`, so its own code
runs in that dtype (its `x.dtype`-dependent casts included); `passes.mixed_precision` then keeps
norms, softmax and the loss in fp32. Buffers keep their dtype (FSDP2 casts parameters only).
"""

from __future__ import annotations

import copy
import dataclasses

import torch
from torch import nn

from core.plan import Plan, PlanError
from core.precision import MAIN_DTYPE, compute_dtype
from partitioner.capture import Captured, capture, input_key


def cast_clone(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """A copy of `model` whose floating parameters are `dtype` copies (tied ones stay tied);
    everything else is copied as it is. Only for capture: it is dropped after."""
    memo = {id(p): nn.Parameter(p.detach().to(dtype), requires_grad=p.requires_grad)
            for p in model.parameters() if p.is_floating_point()}
    return copy.deepcopy(model, memo)


def capture_cast(model: nn.Module, plan: Plan, args: tuple, kwargs: dict) -> Captured:
    """The capture the plan's program is compiled from: at `param_dtype` under mixed
    precision, with the parameters recorded in their main dtype (the layouts hold main
    weights; the graph reads compute copies)."""
    dtype = compute_dtype(plan)
    if dtype is None:
        return capture(model, args, kwargs)
    captured = capture(cast_clone(model, dtype), args, kwargs)
    mains = {name: (p.shape, p.dtype, p.requires_grad) for name, p in model.named_parameters()}
    return dataclasses.replace(captured, params=mains)


def check_model(model: nn.Module, plan: Plan) -> None:
    """Under param_dtype=bf16|fp16 the model's own floating weights become the fp32 main
    weights: refuse a model given in another dtype, and compile=on (not checked yet)."""
    dtype = compute_dtype(plan)
    if dtype is None:
        return
    others = sorted({str(p.dtype).removeprefix("torch.") for p in model.parameters()
                     if p.is_floating_point() and p.dtype != MAIN_DTYPE})
    if others:
        raise PlanError(
            f"param_dtype={plan.param_dtype} keeps fp32 main weights (what your optimizer "
            f"updates) and computes with {plan.param_dtype} copies of them, but the model's "
            f"parameters are {', '.join(others)}: pass the model in float32 (model.float()), "
            f"or leave param_dtype unset to train in the model's own dtype")


class CastReference(nn.Module):
    """The single-device model under the mixed-precision policy of `param_dtype`: the same
    capture at `param_dtype` and the same fp32 ops as every parallel plan, on one device.

    Its parameters are `model`'s own fp32 parameters (give it a copy): each forward computes
    with fresh `param_dtype` copies of them, and gradients reach their `.grad` in fp32. This
    is the reference every strategy is compared with under mixed precision (tests), since
    rounding to `param_dtype` differs from an fp32 run far more than any plan from another.

    A model that drops out draws the masks of a plan with `seed` (core/dropout.py), as
    `check.DropoutReference` does without casting: its program goes through the same dropout
    pass, and each call in training mode moves `dropout_step` on by one, so the k-th call
    here draws the masks of the k-th call of the parallel model.
    """

    def __init__(self, model: nn.Module, param_dtype: str, seed: int = 0) -> None:
        super().__init__()
        self.model = model
        self.plan = Plan(param_dtype=param_dtype, seed=seed).resolve(1)
        self.dtype = compute_dtype(self.plan)
        self.dropout_step = 0
        check_model(model, self.plan)
        self._programs: dict[tuple, torch.fx.GraphModule] = {}

    def _graph(self, args: tuple, kwargs: dict) -> torch.fx.GraphModule:
        from partitioner.compiler import compile_rank

        key = input_key(args, kwargs)
        if key not in self._programs:
            captured = capture_cast(self.model, self.plan, args, kwargs)
            device = next(self.model.parameters()).device
            self._programs[key] = compile_rank(captured, self.plan, 0, device).stages[0].gm
        return self._programs[key]

    def forward(self, *args, **kwargs):
        from partitioner.state import set_tensor

        gm = self._graph(args, kwargs)
        for node in gm.graph.find_nodes(op="get_attr"):
            name = node.target
            try:
                main = self.model.get_parameter(name)
            except AttributeError:
                set_tensor(gm, name, self.model.get_buffer(name), is_buffer=True)
                continue
            tensor = main.to(self.dtype) if main.is_floating_point() else main
            set_tensor(gm, name, tensor, is_buffer=True)
        if not self.model.training:
            return gm(*args, **kwargs)
        from core.dropout import DropoutKey, drawing

        key = DropoutKey(self.dropout_step, 0, True)
        self.dropout_step += 1
        with drawing(key):
            return gm(*args, **kwargs)
