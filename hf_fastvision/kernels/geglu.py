"""Fused GeGLU ``gelu_tanh(gate) * up`` (forward + backward) in Triton, with a pure-torch reference.

Gemma's MLP uses ``gelu_pytorch_tanh`` (``torch.nn.functional.gelu(x, approximate="tanh")``).
"""

from __future__ import annotations

import torch

from ._utils import device_guarded, tl, triton, use_triton
from ._utils import gated_grads as _gated_grads
from ._utils import grad_buffers as _grad_buffers
from ._utils import mark_overwritten as _mark_overwritten

__all__ = ["GeGLUFunction", "geglu", "geglu_grads", "geglu_ref"]

_BLOCK_SIZE = 1024


def geglu_ref(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``gelu_pytorch_tanh(gate) * up`` as transformers' GemmaMLP computes it."""
    return torch.nn.functional.gelu(gate, approximate="tanh") * up


@triton.jit
def _tanh(x):
    # overflow-free tanh from exp(-2|x|); portable across triton versions and the interpreter
    e = tl.exp(-2.0 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0, -t, t)


@triton.jit
def _geglu_fwd_kernel(G, U, Y, n_elements, BLOCK_SIZE: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = offs < n_elements
    g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + offs, mask=mask, other=0.0).to(tl.float32)
    t = _tanh(0.7978845608028654 * (g + 0.044715 * g * g * g))
    y = 0.5 * g * (1.0 + t) * u
    tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _geglu_bwd_kernel(DY, G, U, DG, DU, n_elements, BLOCK_SIZE: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = offs < n_elements
    dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + offs, mask=mask, other=0.0).to(tl.float32)
    g2 = g * g
    t = _tanh(0.7978845608028654 * (g + 0.044715 * g2 * g))
    gelu = 0.5 * g * (1.0 + t)
    dgelu = 0.5 * (1.0 + t) + 0.5 * g * (1.0 - t * t) * 0.7978845608028654 * (1.0 + 3.0 * 0.044715 * g2)
    tl.store(DG + offs, (dy * u * dgelu).to(DG.dtype.element_ty), mask=mask)
    tl.store(DU + offs, (dy * gelu).to(DU.dtype.element_ty), mask=mask)


def _backward_kernel(dy, g, u, dg, du) -> None:
    n = g.numel()
    if n:
        device_guarded(_geglu_bwd_kernel)[(triton.cdiv(n, _BLOCK_SIZE),)](dy, g, u, dg, du, n, BLOCK_SIZE=_BLOCK_SIZE)


def _check(gate: torch.Tensor, up: torch.Tensor) -> None:
    if gate.shape != up.shape:
        raise ValueError(f"gate {tuple(gate.shape)} and up {tuple(up.shape)} must have the same shape")


class GeGLUFunction(torch.autograd.Function):
    """Triton GeGLU (tanh approximation). ``apply(gate, up)``."""

    @staticmethod
    def forward(ctx, gate, up, overwrite_inputs=False):
        _check(gate, up)
        g, u = gate.contiguous(), up.contiguous()
        ctx.overwrite = bool(overwrite_inputs)
        y = torch.empty(g.shape, dtype=torch.promote_types(g.dtype, u.dtype), device=g.device)
        n = g.numel()
        if n:
            device_guarded(_geglu_fwd_kernel)[(triton.cdiv(n, _BLOCK_SIZE),)](g, u, y, n, BLOCK_SIZE=_BLOCK_SIZE)
        ctx.save_for_backward(g, u)
        return y

    @staticmethod
    def backward(ctx, dy):
        if ctx.overwrite == "done":
            raise RuntimeError(
                "GeGLU's backward ran twice on one graph (retain_graph) after writing its gradients over its saved "
                "inputs; load with patches={'mlp': False} for double backward through the fused MLP")
        g, u = ctx.saved_tensors
        dy = dy.contiguous()
        dg, du = _grad_buffers(ctx.overwrite, g, u, dy)
        if dg is g:
            ctx.overwrite = "done"
        _backward_kernel(dy, g, u, dg, du)
        if dg is g:
            _mark_overwritten(g, u)
        return dg, du, None


def geglu(gate: torch.Tensor, up: torch.Tensor, overwrite_inputs: bool = False) -> torch.Tensor:
    """``gelu_tanh(gate) * up``: Triton on CUDA (or under ``TRITON_INTERPRET=1``), torch otherwise.

    ``overwrite_inputs=True`` lets the Triton backward write the input gradients into ``gate`` and ``up`` (which
    then hold gradients, not activations): for callers whose ``gate``/``up`` are temporaries nothing else reads."""
    if use_triton(gate, up):
        return GeGLUFunction.apply(gate, up, overwrite_inputs)
    return geglu_ref(gate, up)


def geglu_grads(dy: torch.Tensor, gate: torch.Tensor, up: torch.Tensor,
                overwrite_inputs: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``(d gate, d up)`` of ``geglu(gate, up)`` for the output gradient ``dy``, without an autograd graph: the
    backward of a caller that ran the forward itself (the lean MLP recompute, `training/lean_mlp.py`).

    ``overwrite_inputs=True`` writes the gradients into ``gate`` and ``up`` where they are distinct contiguous
    storages (the caller's own temporaries). Triton where ``geglu`` uses it; autograd through the reference
    otherwise."""
    _check(gate, up)
    return _gated_grads(dy, gate, up, overwrite_inputs, _backward_kernel, geglu_ref)
