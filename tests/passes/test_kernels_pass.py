import copy

import torch

from partitioner.capture import capture
from partitioner.models import tiny, tiny_llama
from passes.kernels import use_kernels
from runtime.kernels import dispatch


def _bound_graph(model, ids):
    gm = capture(model, (ids,)).gm
    for name, p in model.named_parameters():
        owner, _, leaf = name.rpartition(".")
        (gm.get_submodule(owner) if owner else gm)._parameters[leaf] = p
    return gm


def test_hot_ops_point_at_the_kernel_dispatch_and_keep_cpu_numbers():
    for factory, expected in ((tiny, {dispatch.scaled_dot_product_attention,
                                      dispatch.aten_layer_norm}),
                              (tiny_llama, {dispatch.scaled_dot_product_attention,
                                            dispatch.silu_mul})):
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
