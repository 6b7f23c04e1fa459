"""dispatch.py picks the reference for CPU and float64 tensors (and the kernel on CUDA)."""

import pytest
import torch

from runtime.kernels import dispatch, reference


def test_use_triton_is_a_function_of_device_and_dtype():
    cpu = torch.ones(2)
    assert not dispatch.use_triton(cpu)
    assert not dispatch.use_triton(cpu.double())
    assert not dispatch.use_triton(None)
    assert not dispatch.use_triton(torch.ones(2, dtype=torch.int64))  # no float tensor at all


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_use_triton_on_cuda():
    assert dispatch.use_triton(torch.ones(2, device="cuda", dtype=torch.bfloat16), None)
    assert not dispatch.use_triton(torch.ones(2, device="cuda", dtype=torch.float64))
    assert not dispatch.use_triton(torch.ones(2, device="cuda"), torch.ones(2))  # mixed devices


CALLS = {
    "flash_attention": lambda f: f(*(torch.randn(1, 2, 4, 8) for _ in range(3)), causal=True),
    "rms_norm": lambda f: f(torch.randn(3, 8), torch.randn(8)),
    "layer_norm": lambda f: f(torch.randn(3, 8), None, None),
    "swiglu": lambda f: f(torch.randn(3, 8), torch.randn(3, 8)),
    "grouped_gemm": lambda f: f(torch.randn(4, 8), torch.randn(2, 8, 3), torch.tensor([1, 3])),
    "permute": lambda f: f(torch.randn(4, 8), torch.tensor([[0], [1], [0], [1]]), 2),
    "unpermute": lambda f: f(torch.randn(4, 8), torch.tensor([[0], [1], [2], [3]]), None),
}


@pytest.mark.parametrize("name", sorted(CALLS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cpu_calls_the_reference(name, dtype, monkeypatch):
    seen = []
    real = getattr(reference, name)

    def spy(*args, **kwargs):
        seen.append(name)
        return real(*args, **kwargs)

    monkeypatch.setattr(reference, name, spy)
    torch.set_default_dtype(dtype)
    try:
        CALLS[name](getattr(dispatch, name))
    finally:
        torch.set_default_dtype(torch.float32)
    assert seen == [name]
