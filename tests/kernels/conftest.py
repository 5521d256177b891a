"""Kernel tests: compiled Triton on CUDA, Triton interpreter (TRITON_INTERPRET=1) on CPU.

The environment variable must be set before triton / the kernel modules are imported, which
is why it is done at conftest import time.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from hf_fastvision.tolerances import assert_close  # noqa: E402

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.fixture(scope="session")
def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(autouse=True)
def _triton_enabled(monkeypatch):
    """The root conftest routes model tests to the references; kernel tests exercise Triton itself."""
    monkeypatch.delenv("HF_FASTVISION_DISABLE_TRITON", raising=False)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _leaves(tensors, dtype=None, grad_args=None):
    out = []
    for i, t in enumerate(tensors):
        if isinstance(t, torch.Tensor) and t.is_floating_point():
            t = t.detach().clone()
            if dtype is not None:
                t = t.to(dtype)
            out.append(t.requires_grad_(grad_args is None or i in grad_args))
        else:
            out.append(t)
    return out


def run_fwd_bwd(fn, args, kwargs=None, grad_outputs=None, dtype=None, grad_args=None):
    """Run ``fn(*args)`` on fresh leaf copies; backprop ``grad_outputs`` (random if None).

    ``grad_args``: indices of the args that require grad (default: all floating args).
    Returns (outputs tuple, grads list aligned with the grad-requiring args, grad_outputs).
    """
    kwargs = kwargs or {}
    leaves = _leaves(args, dtype, grad_args)
    out = fn(*leaves, **kwargs)
    outs = out if isinstance(out, tuple) else (out,)
    if grad_outputs is None:
        grad_outputs = tuple(torch.randn_like(o) for o in outs)
    torch.autograd.backward(outs, tuple(g.to(o.dtype) for g, o in zip(grad_outputs, outs)))
    grads = [t.grad for t in leaves if isinstance(t, torch.Tensor) and t.requires_grad]
    return outs, grads, grad_outputs


@pytest.fixture
def compare():
    """``compare(fn, ref, args, kwargs=None, dtype=..., grad_args=None)``: forward + grads of fn vs ref,
    with the tolerance of ``dtype`` from ``hf_fastvision.tolerances``."""

    def _compare(fn, ref, args, kwargs=None, dtype=None, grad_args=None):
        outs, grads, gos = run_fwd_bwd(fn, args, kwargs, grad_args=grad_args)
        routs, rgrads, _ = run_fwd_bwd(ref, args, kwargs, grad_outputs=gos, grad_args=grad_args)
        assert len(outs) == len(routs)
        for i, (o, r) in enumerate(zip(outs, routs)):
            assert o.shape == r.shape, f"output {i}: shape {o.shape} vs {r.shape}"
            assert o.dtype == r.dtype, f"output {i}: dtype {o.dtype} vs {r.dtype}"
            assert_close(o, r, dtype=dtype, msg=lambda m, i=i: f"output {i}: {m}")
        assert len(grads) == len(rgrads)
        for i, (g, r) in enumerate(zip(grads, rgrads)):
            assert (g is None) == (r is None), f"grad {i}: presence differs"
            if g is not None:
                assert g.shape == r.shape and g.dtype == r.dtype, f"grad {i}: {g.shape}/{g.dtype} vs {r.shape}/{r.dtype}"
                assert_close(g, r, dtype=dtype, msg=lambda m, i=i: f"grad {i}: {m}")
        return outs, grads

    return _compare
