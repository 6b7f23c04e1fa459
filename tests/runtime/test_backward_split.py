"""The backward split in an input-gradient step and a weight-gradient step (the zero-bubble
schedules) gives exactly the gradients of one backward, and the input step computes no weight
gradient."""

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from runtime.backward_split import backward_input


class _Stage(nn.Module):
    """A stage with what the split must get right: a weight used twice (the second use reached
    from the first through the input side), a bias-only path, a checkpointed block, a custom
    autograd Function and two outputs."""

    def __init__(self, recompute: bool) -> None:
        super().__init__()
        self.a = nn.Linear(6, 6)
        self.b = nn.Linear(6, 6, bias=False)
        self.scale = nn.Parameter(torch.randn(6, dtype=torch.float64))
        self.recompute = recompute

    def forward(self, x, ids):
        h = torch.tanh(self.a(x))
        h = checkpoint(self.b, h, use_reentrant=False) if self.recompute else self.b(h)
        h = self.a(h) * self.scale  # self.a again: its gradient has two parts
        return _Square.apply(h) + ids.double()[:, None], self.scale.sum() * h.mean(0)


class _Square(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * x

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return 2 * x * grad


@pytest.mark.parametrize("recompute", [False, True])
@pytest.mark.parametrize("with_input", [True, False])
def test_split_backward_equals_one_backward(recompute, with_input):
    torch.manual_seed(0)
    stage = _Stage(recompute).double()
    x = torch.randn(4, 6, dtype=torch.float64)
    ids = torch.arange(4)
    grads = [torch.randn(4, 6, dtype=torch.float64), torch.randn(6, dtype=torch.float64)]

    ref_x = x.clone().requires_grad_(with_input)
    torch.autograd.backward(list(stage(ref_x, ids)), grads)
    expected = {name: p.grad.clone() for name, p in stage.named_parameters()}
    stage.zero_grad(set_to_none=True)

    split_x = x.clone().requires_grad_(with_input)
    weights = backward_input(list(stage(split_x, ids)), grads,
                             [split_x] if with_input else [])
    assert all(p.grad is None for p in stage.parameters())  # no weight gradient yet
    if with_input:
        torch.testing.assert_close(split_x.grad, ref_x.grad, rtol=0, atol=1e-14)
    assert weights.groups  # the weight step has work
    weights.run()
    for name, p in stage.named_parameters():
        torch.testing.assert_close(p.grad, expected[name], rtol=0, atol=1e-14, msg=name)


def test_weight_step_accumulates_like_backward():
    layer = nn.Linear(3, 3).double()
    x = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    layer.weight.grad = torch.ones_like(layer.weight)
    out = layer(x)
    step = backward_input([out], [torch.ones_like(out)], [x])
    step.run()
    torch.testing.assert_close(layer.weight.grad, 1 + torch.ones(3, 1, dtype=torch.float64)
                               * x.detach().sum(0))


def test_each_step_runs_only_its_half_of_the_backward():
    """A chain of bias-free linears: a forward is one matmul per layer, and so is each step
    (the input step computes dX, the weight step dW; neither repeats the other's)."""
    from torch.utils.flop_counter import FlopCounterMode

    chain = nn.Sequential(*[nn.Linear(8, 8, bias=False) for _ in range(3)]).double()
    x = torch.randn(5, 8, dtype=torch.float64, requires_grad=True)
    with FlopCounterMode(display=False) as forward:
        out = chain(x)
    with FlopCounterMode(display=False) as inputs:
        step = backward_input([out], [torch.ones_like(out)], [x])
    with FlopCounterMode(display=False) as weights:
        step.run()
    assert inputs.get_total_flops() == weights.get_total_flops() == forward.get_total_flops()
