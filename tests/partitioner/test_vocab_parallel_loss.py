"""`step` with vocab-parallel logits (rules=lm_head:vocab) against one device on real gloo ranks:
the cross-entropy runs on logits shards (the gathering all_gather never runs in step), with dp,
pp (interleaved too), ZeRO-1, microbatches, token-weighted losses and padded vocabularies; a loss
that reads the logits otherwise gathers them and still matches. One spawn per world size."""

from __future__ import annotations

import copy
import logging

import torch
import torch.nn.functional as F

from partitioner import models
from ranks import on_ranks

V = 511  # padded to 512 over tp=2


class _Paths(logging.Handler):
    """Collects the loss-path lines partitioner.api logs at the first step."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record) -> None:
        if "step loss path" in record.getMessage():
            self.lines.append(record.getMessage().split("step loss path: ", 1)[1])


def _listen() -> _Paths:
    handler = _Paths()
    logger = logging.getLogger("partitioner.api")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    return handler


def _check_cases(cases, steps: int):
    from partitioner.check import check_rank

    paths = _listen()
    results = []
    for name, plan, dtype, kwargs in cases:
        report = check_rank(models.tiny_llama, plan, dtype=dtype, steps=steps, **kwargs)
        results.append((name, report, list(paths.lines)))
        paths.lines.clear()
    return results


def _assert_vocab_parallel_and_equal(per_rank, cases, deciders: int):
    """Every case passed on every rank, and `deciders` ranks (those with the last stage) logged
    the vocab-parallel path, no rank the gathered one."""
    bad = []
    for index, (name, *_rest) in enumerate(cases):
        rows = [results[index] for results in per_rank]
        bad += [f"{name}:\n{report}" for _, report, _ in rows if not report.passed]
        lines = [line for _, _, logged in rows for line in logged]
        if len(lines) != deciders or not all(l.startswith("vocab-parallel") for l in lines):
            bad.append(f"{name}: loss paths {lines}")
    assert not bad, "\n".join(bad)


# --- two ranks: check_rank, and custom losses with the all_gather counted -----------------------

def _shifted_label_smoothing(logits, target):
    return F.cross_entropy(logits[:, :-1].reshape(-1, V), target[:, 1:].reshape(-1),
                           label_smoothing=0.1)


def _token_weighted_plus_constant(logits, target):
    """(sum, count) with a term that does not read the logits: the loss is mean CE + 0.5."""
    flat = target.reshape(-1)
    total = F.cross_entropy(logits.reshape(-1, V), flat, reduction="sum")
    count = (flat != -100).sum()
    return total + 0.5 * count, count


def _mse(logits, target):
    return F.mse_loss(logits, torch.zeros_like(logits))


def _z_loss(logits, target):
    loss = F.cross_entropy(logits.reshape(-1, V), target.reshape(-1))
    return loss + 1e-3 * torch.logsumexp(logits, -1).pow(2).mean()


CUSTOM = [  # name, loss_fn, vocab-parallel expected, ignored tokens in the target
    ("shifted labels with label smoothing", _shifted_label_smoothing, True, False),
    ("token weighted plus a target-only term", _token_weighted_plus_constant, True, True),
    ("mse on logits", _mse, False, False),
    ("z-loss", _z_loss, False, False),
]


def _custom_loss_case(loss_fn, ignored: bool, plan: str):
    """(loss error, gradient error, all_gathers in forward, all_gathers in step, explain)."""
    from partitioner import parallelize
    from partitioner.check import relative_error
    from runtime import collectives

    torch.manual_seed(0)
    model, (ids,) = models.tiny_llama(vocab_size=V)
    model = model.double()
    target = torch.randint(0, V, ids.shape, generator=torch.Generator().manual_seed(1))
    if ignored:
        target[:, :3] = -100
    reference = copy.deepcopy(model)
    result = loss_fn(reference(ids), target)
    ref_loss = result[0] / result[1] if isinstance(result, tuple) else result
    ref_loss.backward()

    pm = parallelize(model, plan, example_inputs=(ids,), loss_fn=loss_fn)
    gathers = []
    gather = collectives._all_gather  # what all_gather runs forward (no sp here: only it)

    def counting(*args):
        gathers.append(args)
        return gather(*args)

    collectives._all_gather = counting
    try:
        pm(ids)
        in_forward = len(gathers)
        loss = pm.step(ids, target=target)
        in_step = len(gathers) - in_forward
    finally:
        collectives._all_gather = gather
    grads = pm.full_grad_dict()
    grad_err = max(relative_error(grads[name], p.grad)
                   for name, p in reference.named_parameters())
    return relative_error(loss, ref_loss), grad_err, in_forward, in_step, pm.explain()


def _two_rank_worker(check_cases):
    results = _check_cases(check_cases, steps=2)
    custom = [_custom_loss_case(loss_fn, ignored, "tp=2,mb=2,rules=lm_head:vocab")
              for _, loss_fn, _, ignored in CUSTOM]
    return results, custom


TWO_RANK_CASES = [
    ("tp=2 f64", "tp=2,rules=lm_head:vocab", torch.float64, {}),
    ("tp=2 padded vocab token-weighted f64", "tp=2,rules=lm_head:vocab", torch.float64,
     dict(token_weighted=True, factory_kwargs=dict(vocab_size=V))),
    ("tp=2 padded vocab f32 mb=2", "tp=2,mb=2,rules=lm_head:vocab", torch.float32,
     dict(factory_kwargs=dict(vocab_size=V))),
]


def test_two_ranks_vocab_parallel_loss_matches_one_device_without_gathering():
    per_rank = on_ranks(2, _two_rank_worker, TWO_RANK_CASES, timeout=300)
    _assert_vocab_parallel_and_equal([checks for checks, _ in per_rank], TWO_RANK_CASES,
                                     deciders=2)
    bad = []
    for rank, (_, custom) in enumerate(per_rank):
        for (name, _, fast, _), (loss_err, grad_err, forward, step, explain) in zip(
                CUSTOM, custom, strict=True):
            if loss_err > 1e-10 or grad_err > 1e-9:
                bad.append(f"rank {rank} {name}: loss {loss_err:.1e}, gradients {grad_err:.1e}")
            # forward gathers the logits once; step runs 2 microbatches: none or both gather
            if forward != 1 or step != (0 if fast else 2):
                bad.append(f"rank {rank} {name}: all_gathers forward {forward}, step {step}")
            lines = [line for line in explain.splitlines() if line.startswith("step loss path: ")]
            want = "step loss path: " + ("vocab-parallel" if fast else "gathered logits")
            if len(lines) != 1 or not lines[0].startswith(want):
                bad.append(f"rank {rank} {name}: explain's loss path lines are {lines!r}")
    assert not bad, "\n".join(bad)


# --- four ranks: dp, pp (interleaved), ZeRO-1 -----------------------------------------------------

PADDED = dict(vocab_size=V)
FOUR_RANK_CASES = [
    ("tp=2 dp=2 token-weighted padded f64", "tp=2,dp=2,mb=2,rules=lm_head:vocab", torch.float64,
     dict(token_weighted=True, factory_kwargs=PADDED)),
    ("tp=2 pp=2 token-weighted padded f64", "tp=2,pp=2,mb=2,rules=lm_head:vocab", torch.float64,
     dict(token_weighted=True, factory_kwargs=PADDED)),
    ("tp=2 pp=2 interleaved padded f64",
     "tp=2,pp=2,vpp=2,schedule=interleaved-1f1b,mb=2,rules=lm_head:vocab", torch.float64,
     dict(factory_kwargs=dict(PADDED, n_layer=4))),
    ("tp=2 dp=2 zero=1 padded f32", "tp=2,dp=2,mb=2,zero=1,rules=lm_head:vocab", torch.float32,
     dict(token_weighted=True, factory_kwargs=PADDED)),
]


def _four_rank_worker(cases):
    return _check_cases(cases, steps=1)


def test_four_ranks_dp_pp_zero_match_one_device():
    per_rank = on_ranks(4, _four_rank_worker, FOUR_RANK_CASES, timeout=600)
    for index, (name, plan, *_rest) in enumerate(FOUR_RANK_CASES):
        # with pp only the two ranks of the last stage choose a loss path
        deciders = 2 if "pp=2" in plan else 4
        _assert_vocab_parallel_and_equal([results[index:index + 1] for results in per_rank],
                                         FOUR_RANK_CASES[index:index + 1], deciders)
