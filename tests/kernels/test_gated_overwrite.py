"""SwiGLU / GeGLU with ``overwrite_inputs=True``: the backward writes d_gate and d_up over the saved gate and up
(the patched MLP's memory saving), with the same values as the allocating backward."""

import pytest
import torch

from hf_fastvision.kernels import geglu, swiglu

OPS = {"swiglu": swiglu, "geglu": geglu}


def _producers(device, dtype, shape):
    x = torch.randn(shape, device=device, dtype=dtype) * 2
    w_g = torch.randn(shape[-1], shape[-1], device=device, dtype=dtype, requires_grad=True)
    w_u = torch.randn(shape[-1], shape[-1], device=device, dtype=dtype, requires_grad=True)
    return x, w_g, w_u


@pytest.mark.parametrize("name", sorted(OPS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_overwriting_backward_gives_the_same_gradients(device, name, dtype):
    op = OPS[name]
    x, w_g, w_u = _producers(device, dtype, (3, 37))
    grads, seen = [], []
    for overwrite in (False, True):
        gate, up = x @ w_g, x @ w_u  # temporaries owned by this "MLP", as in the patched forward
        y = op(gate, up, overwrite_inputs=overwrite)
        gate_before = gate.detach().clone()
        dy = torch.linspace(-1, 1, y.numel(), device=device, dtype=y.dtype).reshape(y.shape)
        grads.append(torch.autograd.grad(y, [w_g, w_u], dy))
        seen.append(torch.equal(gate.detach(), gate_before))
    for a, b in zip(*grads):
        assert torch.equal(a, b)
    assert seen == [True, False]  # the overwrite really reused gate's storage (and only when asked)


@pytest.mark.parametrize("name", sorted(OPS))
def test_a_second_backward_after_overwriting_is_refused(device, name):
    x, w_g, w_u = _producers(device, torch.float32, (2, 16))
    y = OPS[name](x @ w_g, x @ w_u, overwrite_inputs=True)
    y.sum().backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="ran twice"):
        y.sum().backward()


@pytest.mark.parametrize("name", sorted(OPS))
def test_shared_storages_are_never_overwritten(device, name):
    gu = torch.randn(4, 32, device=device, requires_grad=True)
    both = gu * 1.0
    y = OPS[name](both, both, overwrite_inputs=True)  # gate is up: writing both would race
    before = both.detach().clone()
    (g,) = torch.autograd.grad(y.sum(), gu)
    assert torch.equal(both.detach(), before)
    ref = OPS[name](gu.detach().clone().requires_grad_(True), gu.detach().clone().requires_grad_(True))
    assert g.shape == gu.shape and torch.isfinite(g).all() and ref.shape == y.shape


@pytest.mark.parametrize("name", sorted(OPS))
def test_another_saver_of_gate_fails_loudly_instead_of_reading_gradients(device, name):
    x, w_g, w_u = _producers(device, torch.float32, (2, 16))
    gate, up = x @ w_g, x @ w_u
    other = gate * w_g.sum()  # a second consumer that saves `gate` (the patched MLP has none), created first so
    y = OPS[name](gate, up, overwrite_inputs=True)  # autograd runs the activation's backward before it
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (y.sum() + other.sum()).backward()


@pytest.mark.parametrize("name", sorted(OPS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(3, 37), (2, 5, 1031)])
def test_graph_free_grads_equal_the_autograd_backward(device, name, dtype, shape):
    """`swiglu_grads` / `geglu_grads` (the lean MLP's activation backward, no graph) = the op's own backward,
    allocating or written over gate/up."""
    from hf_fastvision import kernels
    from hf_fastvision.tolerances import assert_close

    op, grads = OPS[name], getattr(kernels, f"{name}_grads")
    gate = (torch.randn(shape, device=device) * 3).to(dtype)
    up = torch.randn(shape, device=device).to(dtype)
    dy = torch.randn(shape, device=device).to(dtype)
    g, u = gate.clone().requires_grad_(), up.clone().requires_grad_()
    expected = torch.autograd.grad(op(g, u), (g, u), dy)
    for overwrite in (False, True):
        g2, u2 = gate.clone(), up.clone()
        dg, du = grads(dy, g2, u2, overwrite_inputs=overwrite)
        assert dg.dtype == dtype and dg.shape == gate.shape
        assert_close(dg, expected[0], dtype=dtype)
        assert_close(du, expected[1], dtype=dtype)
        if device.type == "cuda":  # the Triton path: the overwrite really wrote into the caller's gate
            assert (dg.data_ptr() == g2.data_ptr()) == overwrite
