"""The shared sharding-propagation table, rule by rule, on small aten graphs (captured with
torch.export as the passes see them: every node carries the FakeTensor shapes the rules
read)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from passes.propagation import NotCarried, carry, propagate, supports

aten = torch.ops.aten
B, S, H = 2, 8, 16


class _Fn(torch.nn.Module):
    def __init__(self, fn) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, *args):
        return self.fn(*args)


def _graph(fn, *shapes):
    args = tuple(torch.randn(shape) for shape in shapes)
    return torch.export.export(_Fn(fn), args, strict=False).graph_module


def _node(gm, target):
    (node,) = [n for n in gm.graph.nodes if n.target is target]
    return node


def _carry(fn, target, shapes, sharded: dict[int, int]):
    """carry() at the one `target` node of `fn`, its placeholders `sharded` {input: dim}."""
    gm = _graph(fn, *shapes)
    inputs = list(gm.graph.find_nodes(op="placeholder"))
    return carry(_node(gm, target), {inputs[i]: d for i, d in sharded.items()})


def test_elementwise_passes_the_first_operand_through():
    assert _carry(torch.relu, aten.relu.default, [(B, S, H)], {0: 1}) == 1
    assert _carry(lambda x: x.to(torch.float64), aten.to.dtype, [(B, S, H)], {0: 2}) == 2


def test_broadcasting_lines_operands_up_from_the_right():
    add = aten.add.Tensor
    assert _carry(torch.add, add, [(B, S, H), (H,)], {0: 1}) == 1  # a bias over the tokens
    assert _carry(torch.add, add, [(B, S, H), (S, H)], {0: 1, 1: 0}) == 1  # both sharded
    assert _carry(torch.add, add, [(B, S, H), (1, S, 1)], {0: 2}) == 2
    with pytest.raises(NotCarried, match="spans the sharded dimension 2"):
        _carry(torch.add, add, [(B, S, H), (H,)], {0: 2})  # an unsharded weight across it
    with pytest.raises(NotCarried, match="different dimensions"):
        _carry(torch.add, add, [(B, S, H), (B, S, H)], {0: 1, 1: 2})


def test_reshape_follows_the_sharded_dim_into_heads_and_back():
    view = aten.view.default
    heads = lambda x: x.view(B, S, 4, H // 4)  # noqa: E731  (B, S, nh, hd)
    assert _carry(heads, view, [(B, S, H)], {0: 2}) == 2  # features -> heads
    assert _carry(heads, view, [(B, S, H)], {0: 1}) == 1
    merge = lambda x: x.view(B, S, H)  # noqa: E731
    assert _carry(merge, view, [(B, S, 4, H // 4)], {0: 2}) == 2  # heads -> features
    flat = lambda x: x.view(B * S, H)  # noqa: E731
    assert _carry(flat, view, [(B, S, H)], {0: 0}) == 0  # the outer dim of a merge
    with pytest.raises(NotCarried, match="mixes the sharded dimension 1"):
        _carry(flat, view, [(B, S, H)], {0: 1})  # tokens inside batch*seq: not one chunk


def test_axes_ops_move_the_sharded_dim():
    assert _carry(lambda x: x.transpose(1, 2), aten.transpose.int, [(B, S, H)], {0: 1}) == 2
    assert _carry(lambda x: x.transpose(1, 2), aten.transpose.int, [(B, S, H)], {0: 0}) == 0
    assert _carry(lambda x: x.t(), aten.t.default, [(S, H)], {0: 0}) == 1
    assert _carry(lambda x: x.permute(2, 0, 1), aten.permute.default, [(B, S, H)], {0: 2}) == 0
    assert _carry(lambda x: x.unsqueeze(1), aten.unsqueeze.default, [(B, S, H)], {0: 1}) == 2
    assert _carry(lambda x: x.unsqueeze(-1), aten.unsqueeze.default, [(B, S, H)], {0: 1}) == 1
    assert _carry(lambda x: x.squeeze(0), aten.squeeze.dim, [(1, S, H)], {0: 2}) == 1
    assert _carry(lambda x: x.expand(B, S, H), aten.expand.default, [(S, 1)], {0: 0}) == 1


def test_select_and_slices_keep_the_sharded_dim_unless_they_cut_it():
    assert _carry(lambda x: x[:, 0], aten.select.int, [(B, S, H)], {0: 2}) == 1
    with pytest.raises(NotCarried, match="select"):
        _carry(lambda x: x[:, 0], aten.select.int, [(B, S, H)], {0: 1})
    assert _carry(lambda x: x[:, :-1], aten.slice.Tensor, [(B, S, H)], {0: 2}) == 2
    whole = lambda x: aten.slice.Tensor(x, 2, 0, H)  # noqa: E731
    assert _carry(whole, aten.slice.Tensor, [(B, S, H)], {0: 2}) == 2
    with pytest.raises(NotCarried, match="slices part of the sharded dimension 1"):
        _carry(lambda x: x[:, :-1], aten.slice.Tensor, [(B, S, H)], {0: 1})
    with pytest.raises(NotCarried, match="slices part"):
        _carry(lambda x: x.narrow(2, 0, 4), aten.narrow.default, [(B, S, H)], {0: 2})


def test_cat_and_split_along_another_dim():
    cat = lambda x, y: torch.cat([x, y], dim=-1)  # noqa: E731
    assert _carry(cat, aten.cat.default, [(B, S, H), (B, S, H)], {0: 1, 1: 1}) == 1
    with pytest.raises(NotCarried, match="cat along the sharded dimension"):
        _carry(cat, aten.cat.default, [(B, S, H), (B, S, H)], {0: 2, 1: 2})
    with pytest.raises(NotCarried, match="not all sharded"):
        _carry(cat, aten.cat.default, [(B, S, H), (B, S, H)], {0: 1})
    gm = _graph(lambda x: torch.split(x, [4, 12], dim=-1)[1] * 2, (B, S, H))
    (x,) = gm.graph.find_nodes(op="placeholder")
    split = _node(gm, aten.split_with_sizes.default)
    assert carry(split, {x: 1}) == (1, 1)
    piece = next(iter(split.users))
    assert carry(piece, {split: (1, 1)}) == 1
    with pytest.raises(NotCarried, match="splits the sharded dimension"):
        carry(split, {x: 2})


def test_reductions_softmax_and_norms_over_other_dims():
    assert _carry(lambda x: x.sum(-1), aten.sum.dim_IntList, [(B, S, H)], {0: 1}) == 1
    assert _carry(lambda x: x.sum(0), aten.sum.dim_IntList, [(B, S, H)], {0: 1}) == 0
    assert _carry(lambda x: x.mean(0, keepdim=True), aten.mean.dim, [(B, S, H)], {0: 1}) == 1
    with pytest.raises(NotCarried, match="reduces over the sharded dimension 2"):
        _carry(lambda x: x.amax(-1), aten.amax.default, [(B, S, H)], {0: 2})
    softmax = lambda x: x.softmax(-1)  # noqa: E731
    assert _carry(softmax, aten.softmax.int, [(B, S, H)], {0: 1}) == 1
    with pytest.raises(NotCarried, match="softmax over the sharded dimension"):
        _carry(softmax, aten.softmax.int, [(B, S, H)], {0: 2})
    norm = lambda x: F.layer_norm(x, (H,))  # noqa: E731
    assert _carry(norm, aten.layer_norm.default, [(B, S, H)], {0: 1}) == 1
    with pytest.raises(NotCarried, match="normalizes over the sharded dimension"):
        _carry(norm, aten.layer_norm.default, [(B, S, H)], {0: 2})
    stats = lambda x: aten.native_layer_norm.default(x, [H], None, None, 1e-5)  # noqa: E731
    assert _carry(stats, aten.native_layer_norm.default, [(B, S, H)], {0: 1}) == (1, 1, 1)


def test_matmul_and_attention_carry_batch_and_head_dims_only():
    bmm = aten.bmm.default
    assert _carry(torch.bmm, bmm, [(B, S, H), (B, H, S)], {0: 0, 1: 0}) == 0
    with pytest.raises(NotCarried, match="contracts"):
        _carry(torch.bmm, bmm, [(B, S, H), (B, H, S)], {0: 2, 1: 1})
    sdpa = aten.scaled_dot_product_attention.default
    attention = F.scaled_dot_product_attention
    shape = (B, 4, S, H // 4)  # (B, nh, S, hd)
    assert _carry(attention, sdpa, [shape] * 3, {0: 1, 1: 1, 2: 1}) == 1  # heads
    with pytest.raises(NotCarried, match="attention mixes"):
        _carry(attention, sdpa, [shape] * 3, {0: 2, 1: 2, 2: 2})  # the sequence


def test_unknown_ops_are_not_carried():
    gm = _graph(lambda x: torch.cumsum(x, 1), (B, S, H))
    (x,) = gm.graph.find_nodes(op="placeholder")
    node = _node(gm, aten.cumsum.default)
    assert not supports(node)
    with pytest.raises(NotCarried, match="no propagation rule"):
        carry(node, {x: 2})


def test_propagate_follows_a_graph_and_says_where_and_why_it_stops():
    def block(x, w):
        h = (x + w).relu().view(B, S, 4, H // 4).transpose(1, 2)  # (B, nh, S, hd)
        return h.softmax(-1).sum(-1), h.cumsum(-1) * 2

    gm = _graph(block, (B, S, H), (S, 1))
    x, _ = gm.graph.find_nodes(op="placeholder")
    found = propagate(gm.graph.nodes, {x: 2})
    dims = {n.target: d for n, d in found.dims.items() if n.op == "call_function"}
    assert dims[aten.view.default] == 2 and dims[aten.transpose.int] == 1
    assert dims[aten.sum.dim_IntList] == 1
    stopped = {n.target: str(why) for n, why in found.stopped.items()}
    assert stopped == {aten.cumsum.default: "no propagation rule for aten.cumsum.default"}
    (scaled,) = [n for n in gm.graph.nodes if n.target is aten.mul.Tensor]
    assert scaled in found.blocked and scaled not in found.dims  # downstream of the stop
