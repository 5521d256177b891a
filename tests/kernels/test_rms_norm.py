import pytest
import torch
from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from hf_fastvision.kernels import RMSNormFunction, rms_norm, rms_norm_ref, use_triton
from hf_fastvision.tolerances import assert_close

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SHAPES = [(2, 5, 67), (3, 128), (1, 1, 7)]


def _triton(x, w, eps=1e-6, offset=0.0, casting_mode=None):
    return RMSNormFunction.apply(x, w, eps, offset, casting_mode)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("offset,mode", [(0.0, None), (1.0, None), (0.0, "gemma"), (1.0, "llama")])
def test_triton_matches_ref(compare, device, dtype, shape, offset, mode):
    x = torch.randn(shape, device=device, dtype=dtype) * 2
    w = torch.randn(shape[-1], device=device, dtype=dtype) * 0.5 + (0.0 if offset else 1.0)
    compare(_triton, rms_norm_ref, (x, w), dict(eps=1e-6, offset=offset, casting_mode=mode), dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fp32_weight_half_input(compare, device, dtype):
    # QLoRA keeps norm weights in fp32: Llama semantics promote the output to fp32
    x = torch.randn(4, 67, device=device, dtype=dtype)
    w = torch.randn(67, device=device, dtype=torch.float32)
    outs, grads = compare(_triton, rms_norm_ref, (x, w), dtype=dtype)
    assert outs[0].dtype == torch.float32
    assert grads[0].dtype == dtype and grads[1].dtype == torch.float32


def test_non_contiguous_input(compare, device):
    x = torch.randn(67, 6, device=device).t()  # rows are strided
    w = torch.randn(67, device=device)
    compare(_triton, rms_norm_ref, (x, w), dtype=torch.float32)


@pytest.mark.parametrize("dtype", DTYPES)
def test_ref_matches_llama_rmsnorm(device, dtype):
    mod = LlamaRMSNorm(67, eps=1e-5).to(device=device, dtype=dtype)
    with torch.no_grad():
        mod.weight.normal_()
    x = torch.randn(2, 5, 67, device=device, dtype=dtype, requires_grad=True)
    y_tf = mod(x)
    y_ref = rms_norm_ref(x, mod.weight, eps=1e-5)
    assert y_ref.dtype == y_tf.dtype
    torch.testing.assert_close(y_ref, y_tf, rtol=0, atol=0)
    go = torch.randn_like(y_tf)
    g_tf = torch.autograd.grad(y_tf, (x, mod.weight), go)
    g_ref = torch.autograd.grad(y_ref, (x, mod.weight), go)
    for a, b in zip(g_ref, g_tf):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    # and the dispatched op agrees with transformers within the tolerance table
    y = rms_norm(x, mod.weight, eps=1e-5)
    assert_close(y, y_tf, dtype=dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_ref_matches_gemma3_rmsnorm(device, dtype):
    mod = Gemma3RMSNorm(67, eps=1e-6).to(device=device, dtype=dtype)
    with torch.no_grad():
        mod.weight.normal_()
    x = torch.randn(2, 5, 67, device=device, dtype=dtype, requires_grad=True)
    y_tf = mod(x)
    y_ref = rms_norm_ref(x, mod.weight, eps=1e-6, offset=1.0)
    assert y_ref.dtype == y_tf.dtype
    torch.testing.assert_close(y_ref, y_tf, rtol=0, atol=0)
    go = torch.randn_like(y_tf)
    g_tf = torch.autograd.grad(y_tf, (x, mod.weight), go)
    g_ref = torch.autograd.grad(y_ref, (x, mod.weight), go)
    for a, b in zip(g_ref, g_tf):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    y = rms_norm(x, mod.weight, eps=1e-6, offset=1.0)
    assert_close(y, y_tf, dtype=dtype)


def test_dispatch(device):
    x = torch.randn(3, 8, device=device)
    assert use_triton(x)  # CUDA or interpreter in this test session
    w = torch.ones(8, device=device, requires_grad=True)
    y = rms_norm(x, w)
    assert y.grad_fn is not None and "RMSNormFunction" in type(y.grad_fn).__name__


def test_bad_casting_mode(device):
    with pytest.raises(ValueError):
        rms_norm_ref(torch.randn(2, 4), torch.ones(4), casting_mode="bogus")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("offset", [0.0, 1.0])
def test_a_frozen_weight_takes_one_program_per_row_with_the_same_input_gradient(device, dtype, offset, monkeypatch):
    """LoRA freezes the norm weights: the backward then skips the weight's gradient and runs one program per row
    (instead of a few persistent ones summing it); the input's gradient is bitwise the same."""
    import importlib

    rn = importlib.import_module("hf_fastvision.kernels.rms_norm")  # the package's `rms_norm` is the function
    grids = []
    kernel = rn._rms_norm_bwd_kernel

    class Spy:
        def __getitem__(self, grid):
            grids.append(grid[0])
            return kernel[grid]

    monkeypatch.setattr(rn, "_rms_norm_bwd_kernel", Spy())
    rows = rn.num_programs(torch.device(device), 1 << 20) + 5  # more rows than persistent programs (an H200: 132)
    x = torch.randn(rows, 67, device=device, dtype=dtype)
    w = torch.randn(67, device=device, dtype=dtype) * 0.5 + 1.0
    dy = torch.randn(rows, 67, device=device, dtype=dtype)
    grads = []
    for train_weight in (True, False):
        xl, wl = x.clone().requires_grad_(True), w.clone().requires_grad_(train_weight)
        _triton(xl, wl, 1e-6, offset).backward(dy)
        grads.append(xl.grad)
        assert (wl.grad is not None) == train_weight
    assert grids[0] == rn.num_programs(x.device, rows) < rows and grids[1] == rows
    assert torch.equal(grads[0], grads[1])
    ref_x = x.clone().requires_grad_(True)
    rms_norm_ref(ref_x, w, 1e-6, offset).backward(dy)
    assert_close(grads[1], ref_x.grad, dtype=dtype)
