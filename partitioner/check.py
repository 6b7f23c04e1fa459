"""Equivalence checks: a plan on real ranks against the single-device model.

This is the project's correctness principle as a function: the same inputs go through the
single-device model and the parallelized one; outputs, loss, every gathered gradient, the global
gradient norm and the weights after a few AdamW steps must match. Tests, `partitioner check` and
the demo all call `check_rank` (on every rank, inside `runtime.spawn` or torchrun).
"""

from __future__ import annotations

import copy
import importlib
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from torch.utils import _pytree as pytree

from partitioner.batches import batch_size, split_batch
from partitioner.capture import shared_captures
from partitioner.precision import CastReference

class DropoutReference:
    """The single-device model with the plan's dropout generator: what a plan with `seed`
    equals when the model drops (core/dropout.py).

    `reference(*args, **kwargs)` runs `model` captured (torch.export) at these inputs with every
    dropout drawn by the counter generator for `seed`, on the whole batch, at step
    `dropout_step`; gradients reach `model`'s own parameters. Like `ParallelModel`, a call in
    training mode (`model.training`) moves `dropout_step` on by one, so the k-th call of each
    draws the same masks: `pm(x)` or `pm.step(x, ...)` against `reference(x)`. A model in eval
    mode runs as it is.
    """

    def __init__(self, model: nn.Module, seed: int = 0) -> None:
        self.model = model
        self.seed = seed
        self.dropout_step = 0
        self._graphs: dict[tuple, nn.Module] = {}

    def __call__(self, *args, **kwargs):
        if not self.model.training:
            return self.model(*args, **kwargs)
        from core.dropout import DropoutKey, drawing

        key = DropoutKey(self.dropout_step, 0, True)
        self.dropout_step += 1
        with drawing(key):
            return self._graph(args, kwargs)(*args, **kwargs)

    def _graph(self, args: tuple, kwargs: dict) -> nn.Module:
        from partitioner.capture import input_key

        key = input_key(args, kwargs)
        if key not in self._graphs:
            importlib.import_module("runtime")  # registers what dropout_mask does
            from core.layout import rank_coords
            from core.plan import Plan
            from passes import PassContext
            from passes.dropout import dropout

            gm = torch.export.export(self.model, tuple(args), dict(kwargs), strict=False).module()
            plan = Plan(seed=self.seed).resolve(1)
            device = next(iter(self.model.parameters())).device
            self._graphs[key] = dropout(gm, PassContext(plan=plan, coords=rank_coords(plan, 0),
                                                        device=device))
        return self._graphs[key]


def drops(model: nn.Module) -> bool:
    """Whether `model` (in training mode) has a dropout module with p > 0."""
    return model.training and any(
        isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0 for m in model.modules())


TOLERANCES = {torch.float64: 1e-9, torch.float32: 1e-3}
"""Largest allowed max|a-b| / (max|b| + 1e-12) per dtype."""


def lm_logits(output) -> torch.Tensor:
    return output.logits if hasattr(output, "logits") else output


def lm_loss(output, target: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of a causal LM's logits (or HF output with .logits)."""
    logits = lm_logits(output)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1))


def lm_loss_sum(output, target: torch.Tensor):
    """Token-weighted cross-entropy: (sum over non-ignored tokens, their count); -100 ignored."""
    logits = lm_logits(output)
    flat = target.reshape(-1)
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), flat, ignore_index=-100,
                           reduction="sum")
    return loss, (flat != -100).sum()


def global_microbatches(args: tuple, kwargs: dict, dp: int,
                        microbatches: int) -> list[tuple[tuple, dict]]:
    """The single-device reference's batches for a model that reduces over its batch inside the
    forward (a router's load-balancing loss; passes/batch_statistics makes it whole over dp).

    `step` splits the global batch into dp shares and each share into `microbatches`; the
    j-th microbatches of all dp ranks run together and their statistics are reduced over dp.
    One device must therefore run, for each j, the j-th microbatches of the dp shares put
    together, and average the losses over j (as `step` does). With one microbatch that is
    the global batch itself."""
    batch = batch_size(args, kwargs)
    shares = [split_batch(share, microbatches, batch // dp)
              for share in split_batch((tuple(args), dict(kwargs)), dp, batch)]
    piece = batch // (dp * microbatches)
    together = []
    for j in range(microbatches):
        parts = [pytree.tree_leaves(share[j]) for share in shares]
        leaves = [torch.cat(column) if isinstance(column[0], torch.Tensor)
                  and column[0].dim() > 0 and column[0].shape[0] == piece else column[0]
                  for column in zip(*parts)]
        together.append(pytree.tree_unflatten(leaves, pytree.tree_structure(shares[0][j])))
    return together


def load_factory(spec: str):
    """`pkg.module:factory` -> the factory callable."""
    module, sep, name = spec.partition(":")
    if not sep:
        raise ValueError(f"model factory {spec!r} must look like pkg.module:factory")
    return getattr(importlib.import_module(module), name)


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max|actual - expected| / max|expected| (inf when the shapes differ)."""
    diff, scale = _abs_error(actual, expected)
    return diff / (scale + 1e-30)


def _abs_error(actual: torch.Tensor, expected: torch.Tensor) -> tuple[float, float]:
    actual, expected = actual.detach().double().cpu(), expected.detach().double().cpu()
    if actual.shape != expected.shape:
        return math.inf, 0.0
    return (actual - expected).abs().max().item(), expected.abs().max().item()


@dataclass
class EquivalenceReport:
    rank: int
    dtype: str
    errors: dict[str, float] = field(default_factory=dict)
    """Check name -> max abs difference over its tensors / max abs expected value over them
    (one scale per kind, so a gradient that is zero up to rounding does not count as 100%)."""
    tolerance: float = 0.0

    @property
    def passed(self) -> bool:
        return all(err <= self.tolerance for err in self.errors.values())

    def worst(self) -> tuple[str, float]:
        return max(self.errors.items(), key=lambda item: item[1])

    def __str__(self) -> str:
        lines = [f"rank {self.rank} ({self.dtype}, tolerance {self.tolerance:.0e}): "
                 f"{'PASS' if self.passed else 'FAIL'}"]
        for name, err in self.errors.items():
            mark = "ok " if err <= self.tolerance else "BAD"
            lines.append(f"  {mark} {name:<24} rel.err {err:.2e}")
        return "\n".join(lines)


class _Errors:
    """Accumulates (max abs difference, max abs expected) per kind of check."""

    def __init__(self) -> None:
        self.diff: dict[str, float] = {}
        self.scale: dict[str, float] = {}

    def add(self, name: str, actual, expected) -> None:
        diff, scale = _abs_error(actual, expected)
        self.diff[name] = max(self.diff.get(name, 0.0), diff)
        self.scale[name] = max(self.scale.get(name, 0.0), scale)

    def relative(self) -> dict[str, float]:
        return {name: self.diff[name] / (self.scale[name] + 1e-30) for name in self.diff}


def check_rank(factory, plan, *, dtype: torch.dtype = torch.float64, steps: int = 2,
               lr: float = 1e-2, token_weighted: bool = False, meta: bool = False,
               factory_kwargs: dict | None = None, seed: int = 0,
               weights_every_step: bool = False) -> EquivalenceReport:
    """On this rank: compare the plan with the single-device model (see module docstring).

    `factory` is a callable or `pkg.module:factory` returning (model, (input_ids,)). With
    `meta=True` the parallel model is built on the meta device and filled with
    `load_full_state_dict` from the reference model's state dict. `weights_every_step`
    compares every weight after each AdamW step, not only after the last (a gathered state
    dict per step).
    """
    factory = load_factory(factory) if isinstance(factory, str) else factory
    casting = _casting(plan)
    if casting is not None:  # fp32 main weights, compared with one device under the same casting
        dtype = torch.float32
    torch.manual_seed(seed)
    model, (ids,) = factory(**(factory_kwargs or {}))
    model = model.to(dtype)
    generator = torch.Generator().manual_seed(seed + 1)
    vocab = _vocab_size(model)
    target = torch.randint(0, vocab, ids.shape, generator=generator)
    if token_weighted:
        target[:, :2] = -100  # ignored tokens make the per-microbatch counts matter
    loss_fn = lm_loss_sum if token_weighted else lm_loss
    reference = copy.deepcopy(model)
    # a model that drops equals one device drawing the plan's masks (the same k-th call);
    # under casting the reference's own program draws them
    if casting is not None:
        reference = forward = CastReference(reference, casting, seed=plan_seed(plan))
    elif drops(reference):
        forward = DropoutReference(reference, plan_seed(plan))
    else:
        forward = reference

    def reference_loss(out):
        if token_weighted:
            total, count = lm_loss_sum(out, target)
            return total / count
        return lm_loss(out, target)

    if meta:
        with torch.device("meta"):
            parallel_source = factory(**(factory_kwargs or {}))[0].to(dtype)
    else:
        parallel_source = model
    # one model, many plans: capture once per input shape (see shared_captures)
    with shared_captures(_model_key(factory, factory_kwargs, dtype, seed)):
        return _check(parallel_source, reference, forward, ids, target, plan, dtype=dtype,
                      steps=steps,
                      lr=lr, meta=meta, loss_fn=loss_fn, reference_loss=reference_loss,
                      weights_every_step=weights_every_step)


def _model_key(factory, factory_kwargs: dict | None, dtype: torch.dtype, seed: int):
    """What builds the checked model, when that says everything about it: a module-level
    factory (not a lambda or a closure, whose captured state a name does not show) and its
    arguments by value."""
    name = f"{getattr(factory, '__module__', '')}:{getattr(factory, '__qualname__', '')}"
    if "<" in name or name.startswith(":") or name.endswith(":"):
        return None
    return (name, repr(sorted((factory_kwargs or {}).items())), str(dtype), seed)


def plan_seed(plan) -> int:
    """The dropout seed of a plan given as a Plan, a plan string or a dict."""
    from core.plan import coerce_plan

    return 0 if isinstance(plan, str) and plan.strip() == "auto" else coerce_plan(plan).seed


def _check(parallel_source: nn.Module, reference: nn.Module, forward, ids, target, plan, *,
           dtype,
           steps, lr, meta, loss_fn, reference_loss, weights_every_step) -> EquivalenceReport:
    """check_rank's comparison, once both models exist."""
    import torch.distributed as dist

    from partitioner.api import parallelize

    pm = parallelize(parallel_source, plan, example_inputs=(ids,), loss_fn=loss_fn)
    if meta:
        pm.load_full_state_dict(reference.state_dict())

    casting = reference.plan.param_dtype if isinstance(reference, CastReference) else None
    ref_model = reference.model if casting is not None else reference
    errors = _Errors()
    ref_out = lm_logits(forward(ids))
    errors.add("output", lm_logits(pm(ids)), ref_out)

    ref_loss = reference_loss(forward(ids))
    ref_loss.backward()
    loss = pm.step(ids, target=target)
    errors.add("loss", loss, ref_loss)
    grads = pm.full_grad_dict()
    for name, p in ref_model.named_parameters():
        if p.grad is not None:
            errors.add("gradients", grads.get(name, torch.full((1,), math.inf)), p.grad)
    ref_norm = torch.nn.utils.clip_grad_norm_(reference.parameters(), 1e9)
    errors.add("grad_norm", pm.clip_grad_norm_(1e9), ref_norm)

    # Under casting, SGD: AdamW's first steps move every weight by about +-lr whatever its
    # gradient, so a gradient that is rounding noise would move its weight as far as a real one.
    optimizer = torch.optim.SGD if casting is not None else torch.optim.AdamW
    stepped = "sgd" if casting is not None else "adamw"
    ref_opt = optimizer(reference.parameters(), lr=lr)
    opt = optimizer(pm.parameters(), lr=lr)
    for step in range(steps):
        if step > 0:  # the first step reuses the gradients checked above
            ref_opt.zero_grad()
            opt.zero_grad()
            reference_loss(forward(ids)).backward()
            pm.step(ids, target=target)
        torch.nn.utils.clip_grad_norm_(reference.parameters(), 1.0)
        pm.clip_grad_norm_(1.0)
        ref_opt.step()
        opt.step()
        if weights_every_step or step == steps - 1:
            _compare_weights(errors, pm, ref_model, f"weights_after_{stepped}")
    if steps == 0:
        _compare_weights(errors, pm, ref_model, f"weights_after_{stepped}")
    errors.add(f"output_after_{stepped}", lm_logits(pm(ids)), lm_logits(forward(ids)))
    if casting is not None:
        return EquivalenceReport(rank=dist.get_rank(), dtype=f"{casting} casting",
                                 errors=errors.relative(), tolerance=cast_tolerance(casting))
    return EquivalenceReport(rank=dist.get_rank(), dtype=str(dtype).removeprefix("torch."),
                             errors=errors.relative(), tolerance=TOLERANCES[dtype])


CAST_TOLERANCE_EPS = 4
"""Under param_dtype casting, plans match the single-device model under the same casting
within this many machine epsilons of the compute dtype: a plan rounds in other places (tp's
partial sums, microbatch sums, cp's block merges), one rounding each (see
tests/partitioner/test_mixed_precision.py for the measured 1-2 eps)."""


def cast_tolerance(param_dtype: str) -> float:
    from core.precision import DTYPES

    return CAST_TOLERANCE_EPS * torch.finfo(DTYPES[param_dtype]).eps


def _casting(plan) -> str | None:
    """The plan's param_dtype when it casts (bf16/fp16), else None."""
    from core.plan import coerce_plan
    from core.precision import compute_dtype

    if isinstance(plan, str) and plan.strip() == "auto":
        return None
    plan = coerce_plan(plan)
    return plan.param_dtype if compute_dtype(plan) is not None else None


def _compare_weights(errors: _Errors, pm, reference: nn.Module, kind: str) -> None:
    state = pm.full_state_dict()
    for name, value in reference.state_dict().items():
        errors.add(kind, state.get(name, torch.full((1,), math.inf)), value)


def _vocab_size(model: nn.Module) -> int:
    config = getattr(model, "config", None)
    for attr in ("vocab_size",):
        if config is not None and hasattr(config, attr):
            return getattr(config, attr)
    embedding = next(m for m in model.modules() if isinstance(m, nn.Embedding))
    return embedding.num_embeddings
