import resource

import pytest
import torch
from torch import nn

from core.fx_utils import module_path
from partitioner.capture import CaptureError, capture, shared_captures
from partitioner.models import build, tiny, tiny_llama
from model_zoo import hf_gpt2, hf_llama


def _assert_well_formed(captured, model):
    gm = captured.gm
    gm.graph.lint()
    calls = [n for n in gm.graph.nodes if n.op == "call_function"]
    assert calls, "empty graph"
    for node in calls:
        if node.target is not torch.ops.aten._assert_tensor_metadata.default:
            assert "val" in node.meta, node
    assert any(module_path(n) for n in calls), "module paths were lost"
    names = {n.target for n in gm.graph.find_nodes(op="get_attr")}
    assert names <= set(captured.params) | set(captured.buffers)
    assert set(captured.params) == {name for name, _ in model.named_parameters()}
    for node in gm.graph.find_nodes(op="get_attr"):  # the graph holds no real memory
        owner, _, leaf = node.target.rpartition(".")
        assert getattr(gm.get_submodule(owner) if owner else gm, leaf).is_meta


@pytest.mark.parametrize("factory", [tiny, tiny_llama], ids=["gpt", "llama"])
@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_in_repo_models_capture_on_cpu_and_meta(factory, device):
    with torch.device(device):
        model, (ids,) = factory()
    captured = capture(model, (ids.to(device),))
    _assert_well_formed(captured, model)
    if device == "cpu":
        gm = captured.gm
        for name, p in model.named_parameters():  # bind real tensors to run the graph
            owner, _, leaf = name.rpartition(".")
            (gm.get_submodule(owner) if owner else gm)._parameters[leaf] = p
        torch.testing.assert_close(gm(ids), model(ids), rtol=0, atol=0)


def test_tied_weights_read_through_one_canonical_name():
    model, (ids,) = tiny()  # GPT ties lm_head.weight to wte.weight
    captured = capture(model, (ids,))
    assert captured.aliases == {"lm_head.weight": "wte.weight"}
    targets = [n.target for n in captured.gm.graph.find_nodes(op="get_attr")]
    assert "lm_head.weight" not in targets and targets.count("wte.weight") == 1


def test_a_shared_capture_is_reused_only_for_its_key_and_input_shapes(monkeypatch):
    import partitioner.capture as capture_module

    exports = []
    real_export = capture_module._export
    monkeypatch.setattr(capture_module, "_export",
                        lambda *a: exports.append(a[1][0].shape) or real_export(*a))
    (first, (ids,)), (second, _) = tiny_llama(), tiny_llama()
    with torch.device("meta"):
        on_meta, _ = tiny_llama()
    with shared_captures(("tiny_llama", 0)):
        captured = capture(first, (ids,))
        assert capture(second, (ids,)) is captured  # another instance of the same model
        assert capture(second, (ids[:1],)) is not captured  # another input shape
        assert capture(on_meta, (ids.to("meta"),)) is not captured  # another device
    with shared_captures(("tiny_llama", 1)):
        assert capture(second, (ids,)) is not captured
    with shared_captures(None):  # nothing vouches for the model: export every time
        capture(first, (ids,))
        capture(first, (ids,))
    assert capture(first, (ids,)) is not captured  # outside any scope
    assert len(exports) == 7


@pytest.mark.parametrize("factory", [hf_llama, hf_gpt2], ids=["llama", "gpt2"])
@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_hugging_face_models_capture(factory, device):
    with torch.device(device):
        model, (ids,) = factory()
    captured = capture(model, (ids.to(device),))
    _assert_well_formed(captured, model)
    if factory is hf_gpt2:
        assert captured.aliases == {"lm_head.weight": "transformer.wte.weight"}


def test_gpt3_shaped_96_layers_capture_on_meta_without_weights():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    model, (ids,) = build("gpt3-175b", batch=1, seq=128, device="meta")
    captured = capture(model, (ids,))
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert len(captured.params) == 4 + 96 * 16  # wte, wpe, ln_f.{w,b}; 16 tensors per block
    assert sum(torch.Size(s).numel() for s, _, _ in captured.params.values()) > 170e9
    assert grown_mib < 2048, f"capture allocated {grown_mib:.0f} MiB"  # the weights are 700 GB


class _DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = nn.Sequential(nn.Linear(4, 4), _Branchy())

    def forward(self, x):
        return self.inner(x)


class _Branchy(nn.Module):
    def forward(self, x):
        if x.sum() > 0:  # data-dependent Python control flow cannot be exported
            return x * 2
        return x


def test_export_failure_names_the_module_and_what_to_try():
    with pytest.raises(CaptureError) as info:
        capture(_DataDependent(), (torch.randn(2, 4),))
    message = str(info.value)
    assert "'inner.1'" in message and "_Branchy" in message
    assert "torch.cond" in message and "use_cache=False" in message


def test_the_captured_module_is_plain_and_compiling_it_in_place_gives_the_copy_s_program():
    """A capture holds no export hooks (they would check a shard against the full shapes);
    Programs compiles its own capture in place (reuse_graph), which gives the program a copy
    gives, and a shared capture is never rewritten."""
    from core.plan import Plan
    from partitioner.compiler import compile_rank

    model, (ids,) = tiny_llama()
    plan = Plan.parse("tp=2,sp=on").resolve(2)
    captured = capture(model, (ids,))
    assert not captured.gm._forward_pre_hooks and not captured.gm._forward_hooks
    assert captured.gm.code == captured.gm.graph.python_code(root_module="self").src
    copied = compile_rank(captured, plan, 1, "meta")
    assert not captured.shared and captured.gm.graph.find_nodes(
        op="call_function", target=torch.ops.aten.embedding.default)  # untouched by the copy
    in_place = compile_rank(captured, plan, 1, "meta", reuse_graph=True)
    assert in_place.stages[0].gm is captured.gm
    assert in_place.stages[0].gm.code == copied.stages[0].gm.code
    assert [(n.name, str(n.target), n.meta.get("tp.placement"))
            for n in in_place.stages[0].gm.graph.nodes] == [
        (n.name, str(n.target), n.meta.get("tp.placement"))
        for n in copied.stages[0].gm.graph.nodes]
    with shared_captures(("llama", 0)):
        shared = capture(model, (ids,))
    assert shared.shared
    with pytest.raises(ValueError, match="shared capture"):
        compile_rank(shared, plan, 0, "meta", reuse_graph=True)
