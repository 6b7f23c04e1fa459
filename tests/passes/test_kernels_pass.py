import copy

import pytest
import torch
import torch.utils._pytree as pytree
from torch import nn

from partitioner.capture import capture
from partitioner.models import RMSNorm, tiny, tiny_llama
from passes.kernels import use_kernels
from core import ops
from runtime.kernels import dispatch


def _bound_graph(model, ids):
    """The captured graph running on the model's own parameters and buffers (capture leaves
    them on the meta device)."""
    gm = capture(model, (ids,)).gm
    for name, p in model.named_parameters():
        owner, _, leaf = name.rpartition(".")
        (gm.get_submodule(owner) if owner else gm)._parameters[leaf] = p
    for name, b in model.named_buffers():
        owner, _, leaf = name.rpartition(".")
        (gm.get_submodule(owner) if owner else gm)._buffers[leaf] = b
    return gm


def _folded(model, *inputs):
    """(the captured graph, the kernels pass's copy of it (linted), its rms_norm nodes)."""
    plain = _bound_graph(model, *inputs)
    fused = use_kernels(copy.deepcopy(plain))
    fused.graph.lint()
    return plain, fused, [n for n in fused.graph.nodes if n.target is ops.rms_norm]


def _folded_norms(model, ids, norm_type, folds_each: int):
    """`_folded`, checking one rms_norm per `norm_type` module, each in place of at least
    `folds_each` + 1 nodes."""
    plain, fused, found = _folded(model, ids)
    norms = sum(isinstance(m, norm_type) for m in model.modules())
    assert len(found) == norms > 0
    assert len(_targets(plain)) - len(_targets(fused)) >= folds_each * norms
    return plain, fused, found


def _targets(gm):
    return [n.target for n in gm.graph.nodes if n.op == "call_function"]


def _assert_same_numbers(plain, fused, *inputs):
    """Outputs and every parameter's gradient bit-identical (on CPU the dispatch runs aten)."""
    outs, refs = (pytree.tree_leaves(gm(*inputs)) for gm in (fused, plain))
    floats = [(o, r) for o, r in zip(outs, refs, strict=True) if isinstance(r, torch.Tensor)
              and r.dtype.is_floating_point]
    assert floats and all(torch.equal(o, r) for o, r in floats)
    sum(r.sum() for _, r in floats).backward()
    sum(o.sum() for o, _ in floats).backward()
    grads = {name: p.grad for name, p in plain.named_parameters()}
    for name, p in fused.named_parameters():
        assert torch.equal(p.grad, grads[name]), name


def test_hot_ops_point_at_the_kernel_dispatch_and_keep_cpu_numbers():
    for factory, expected in ((tiny, {ops.scaled_dot_product_attention,
                                      ops.layer_norm}),
                              (tiny_llama, {ops.scaled_dot_product_attention,
                                            ops.silu_mul})):
        model, (ids,) = factory()
        model = model.double()
        plain = _bound_graph(model, ids)
        fused = use_kernels(copy.deepcopy(plain))
        targets = {n.target for n in fused.graph.nodes if n.op == "call_function"}
        assert expected <= targets
        assert torch.ops.aten.scaled_dot_product_attention.default not in targets
        if factory is tiny_llama:
            assert torch.ops.aten.silu.default not in targets  # folded into silu_mul
        out, ref = fused(ids), plain(ids)
        assert torch.equal(out, ref)  # on CPU the dispatch runs the aten ops themselves
        out.sum().backward()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_hand_written_rms_norm_of_the_in_repo_llama_is_folded(dtype):
    model, (ids,) = tiny_llama()
    # x * rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight: 5 aten nodes each become 1
    plain, fused, found = _folded_norms(model.to(dtype), ids, RMSNorm, folds_each=4)
    assert torch.ops.aten.rsqrt.default not in _targets(fused)
    for node in found:
        x, weight, eps = node.args
        assert weight.op == "get_attr" and eps == model.config.norm_eps
        assert node.kwargs == {"compute_dtype": None, "output_dtype": None}
        assert node.meta["kernel"] == "rms_norm"
    _assert_same_numbers(plain, fused, ids)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_hugging_face_llama_rms_norm_with_its_casts_is_folded(dtype):
    pytest.importorskip("transformers")
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    from tests.model_zoo import hf_llama

    model, (ids,) = hf_llama()
    # pow, mean, add, rsqrt, mul, .to(input dtype), weight mul -> 1 node, and the
    # hidden.to(float32) before them unless the graph reads it elsewhere
    plain, fused, found = _folded_norms(model.to(dtype), ids, LlamaRMSNorm, folds_each=6)
    for node in found:
        assert node.kwargs["output_dtype"] == dtype
        x = node.args[0]
        if node.kwargs["compute_dtype"] is None:
            # float32.to(float32) returns its input, so export hands the later readers of the
            # norm's input (the residual add) this cast node: it stays and feeds the norm
            assert x.target is torch.ops.aten.to.dtype and x.args[1] == torch.float32
            assert dtype == torch.float32 and len(x.users) > 1
        else:
            assert node.kwargs["compute_dtype"] == torch.float32
    _assert_same_numbers(plain, fused, ids)


class _NormWithSideOutputs(nn.Module):
    """An RMSNorm whose variance or float32 copy is also used elsewhere."""

    def __init__(self, keep: str):
        super().__init__()
        self.keep = keep
        self.weight = nn.Parameter(torch.linspace(0.5, 1.5, 8, dtype=torch.float64))

    def forward(self, x):
        h = x.to(torch.float32)
        variance = h.pow(2).mean(-1, keepdim=True)
        y = self.weight * (h * torch.rsqrt(variance + 1e-6)).to(x.dtype)
        side = {"variance": variance, "cast": h, "none": 0}[self.keep]
        return y, side


@pytest.mark.parametrize("keep,folded", [("none", True), ("cast", True), ("variance", False)])
def test_rms_norm_folds_only_nodes_no_one_else_reads(keep, folded):
    x = torch.randn(2, 3, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    plain, fused, found = _folded(_NormWithSideOutputs(keep), x)
    assert len(found) == int(folded)
    if keep == "cast":  # the float32 copy stays in the graph and is the norm's input
        assert found[0].kwargs["compute_dtype"] is None
        assert found[0].args[0].target is torch.ops.aten.to.dtype
    _assert_same_numbers(plain, fused, x)


def test_decomposed_rms_norm_computes_what_the_pattern_computes():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3, 5, 16, dtype=torch.bfloat16, generator=gen)
    w = torch.randn(16, dtype=torch.bfloat16, generator=gen)
    h = x.to(torch.float32)
    want = w * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)).to(torch.bfloat16)
    got = dispatch.decomposed_rms_norm(x, w, 1e-6, compute_dtype=torch.float32,
                                       output_dtype=torch.bfloat16)
    assert got.dtype == want.dtype and torch.equal(got, want)
    plain = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5)
    assert torch.equal(dispatch.decomposed_rms_norm(x, None, 1e-5), plain)


def test_rms_norm_kernel_is_chosen_only_where_it_computes_the_pattern():
    # the Triton kernel returns x's dtype and takes a 1-D weight of the last dim; on CUDA the
    # dispatch takes it only then (this machine may have no GPU: the choice is checked alone)
    pytest.importorskip("triton")
    applies = dispatch._rms_kernel_applies
    bf16, f32 = torch.bfloat16, torch.float32
    x = torch.empty(2, 8, dtype=bf16)
    assert applies(x, torch.empty(8, dtype=bf16), f32, bf16)  # HF Llama in bf16
    assert applies(x, None, None, None)
    assert not applies(x, torch.empty(8, dtype=f32), f32, bf16)  # fp32 weight: fp32 result
    assert not applies(x, torch.empty(8, dtype=bf16), f32, None)  # y stays fp32
    assert not applies(x, torch.empty(2, 8, dtype=bf16), None, None)  # not a 1-D weight
    assert not applies(x, torch.empty(4, dtype=bf16), None, None)
