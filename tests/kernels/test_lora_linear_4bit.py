"""Fused 4-bit linear + LoRA op vs its plain-op reference: forward and gradients, over compute dtypes and shapes."""

from __future__ import annotations

import pytest
import torch

from hf_fastvision.kernels.lora_linear_4bit import lora_linear_4bit, lora_linear_4bit_ref
from hf_fastvision.tolerances import assert_close

bnbf = pytest.importorskip("bitsandbytes.functional")


def _quantized(out_f: int, in_f: int, dtype: torch.dtype, device, nested: bool):
    w = torch.randn(out_f, in_f, device=device) * 0.05
    packed, state = bnbf.quantize_4bit(w.to(dtype), quant_type="nf4", compress_statistics=nested, blocksize=64)
    return packed, state


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape,out_f,in_f,r", [((2, 5), 24, 64, 4), ((3, 7, 11), 40, 128, 8), ((1, 1), 64, 64, 16)])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("scaling", [2.0, 1.0])  # 1.0 (lora_alpha == r): the backward skips its scaling kernels
def test_forward_and_grads_match_reference(dtype, shape, out_f, in_f, r, with_bias, scaling, device):
    if dtype == torch.float16 and device.type == "cpu":
        pytest.skip("bitsandbytes' CPU dequantization has no fp16 path worth testing")
    packed, state = _quantized(out_f, in_f, dtype, device, nested=dtype != torch.float32)
    x = torch.randn(*shape, in_f, device=device, dtype=dtype)
    a = (torch.randn(r, in_f, device=device) * 0.1).requires_grad_()
    b = (torch.randn(out_f, r, device=device) * 0.1).requires_grad_()
    bias = torch.randn(out_f, device=device, dtype=dtype) if with_bias else None
    results = []
    for fn in (lora_linear_4bit, lora_linear_4bit_ref):
        xs = x.detach().clone().requires_grad_()
        a.grad = b.grad = None
        y = fn(xs, packed, state, a, b, scaling, bias)
        y.float().square().mean().backward()
        results.append((y.detach(), xs.grad, a.grad.clone(), b.grad.clone()))
    (y, dx, da, db), (y_ref, dx_ref, da_ref, db_ref) = results
    assert y.dtype == x.dtype and y.shape == (*shape, out_f)
    assert da.dtype == torch.float32 and db.dtype == torch.float32  # adapter grads in the adapter's dtype
    assert_close(y, y_ref, dtype=dtype)
    assert_close(dx, dx_ref, dtype=dtype)
    assert_close(da, da_ref, dtype=dtype)
    assert_close(db, db_ref, dtype=dtype)


def test_frozen_input_gets_no_grad_and_trainable_bias_is_refused(device):
    packed, state = _quantized(16, 64, torch.float32, device, nested=False)
    a = torch.randn(4, 64, device=device, requires_grad=True)
    b = torch.randn(16, 4, device=device, requires_grad=True)
    x = torch.randn(3, 64, device=device)  # no grad: dx is skipped, no dequantization in backward
    lora_linear_4bit(x, packed, state, a, b, 1.0).sum().backward()
    assert a.grad is not None and b.grad is not None
    with pytest.raises(ValueError, match="frozen"):
        lora_linear_4bit(x, packed, state, a, b, 1.0, torch.zeros(16, device=device, requires_grad=True))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("need_x", [True, False])
def test_grads_without_the_forward_equal_autograds(dtype, need_x, device):
    """`lora_linear_4bit_grads` (the lean MLP's backward: no forward, no graph) = the op's autograd backward;
    without ``need_x`` no input gradient, and a frozen adapter weight gets none."""
    from hf_fastvision.kernels.lora_linear_4bit import lora_linear_4bit_grads

    packed, state = _quantized(40, 128, dtype, device, nested=dtype != torch.float32)
    x = torch.randn(3, 7, 128, device=device, dtype=dtype, requires_grad=True)
    a = (torch.randn(8, 128, device=device) * 0.1).requires_grad_()
    b = (torch.randn(40, 8, device=device) * 0.1).requires_grad_(need_x)  # frozen lora_b in the second case
    dy = torch.randn(3, 7, 40, device=device, dtype=dtype)
    y = lora_linear_4bit(x, packed, state, a, b, 2.0)
    wrt = [x, a] + ([b] if b.requires_grad else [])
    expected = torch.autograd.grad(y, wrt, dy)
    dx, da, db = lora_linear_4bit_grads(x.detach(), packed, state, a, b, 2.0, dy, need_x=need_x)
    assert (dx is None) == (not need_x) and (db is None) == (not b.requires_grad)
    if need_x:
        assert dx.dtype == dtype and dx.shape == x.shape
        assert_close(dx, expected[0], dtype=dtype)
    assert_close(da, expected[1], dtype=dtype)
    if db is not None:
        assert_close(db, expected[2], dtype=dtype)


def test_grads_of_a_frozen_linear_without_adapter(device):
    """``lora_a = lora_b = None``: a plain frozen 4-bit linear, only the input gradient (or nothing)."""
    from hf_fastvision.kernels.lora_linear_4bit import dequantize, lora_linear_4bit_grads

    packed, state = _quantized(24, 64, torch.float32, device, nested=False)
    x = torch.randn(5, 64, device=device, requires_grad=True)
    dy = torch.randn(5, 24, device=device)
    (expected,) = torch.autograd.grad(x @ dequantize(packed, state).t(), [x], dy)
    dx, da, db = lora_linear_4bit_grads(x.detach(), packed, state, None, None, 0.0, dy)
    assert da is None and db is None
    assert_close(dx, expected, dtype=torch.float32)
    assert lora_linear_4bit_grads(x.detach(), packed, state, None, None, 0.0, dy, need_x=False) == (None, None, None)


def test_a_unit_scaling_costs_no_kernel(device):
    from hf_fastvision.kernels.lora_linear_4bit import _scaled

    t = torch.randn(3, 4, device=device)
    before = t.clone()
    assert _scaled(t, 1.0) is t and torch.equal(t, before)
    assert _scaled(t, 2.0) is t and torch.equal(t, before * 2.0)  # in place
