"""Fused SwiGLU ``silu(gate) * up`` (forward + backward) in Triton, with a pure-torch reference."""

from __future__ import annotations

import torch

from ._utils import device_guarded, tl, triton, use_triton
from ._utils import gated_grads as _gated_grads
from ._utils import grad_buffers as _grad_buffers
from ._utils import mark_overwritten as _mark_overwritten

__all__ = ["SwiGLUFunction", "swiglu", "swiglu_grads", "swiglu_ref"]

_BLOCK_SIZE = 1024


def swiglu_ref(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``act_fn(gate_proj(x)) * up_proj(x)`` as transformers' LlamaMLP computes it (silu)."""
    return torch.nn.functional.silu(gate) * up


@triton.jit
def _swiglu_fwd_kernel(G, U, Y, n_elements, BLOCK_SIZE: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = offs < n_elements
    g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + offs, mask=mask, other=0.0).to(tl.float32)
    y = g * tl.sigmoid(g) * u
    tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd_kernel(DY, G, U, DG, DU, n_elements, BLOCK_SIZE: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = offs < n_elements
    dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + offs, mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(g)
    silu = g * sig
    du = dy * silu
    dg = dy * u * sig * (1.0 + g * (1.0 - sig))
    tl.store(DG + offs, dg.to(DG.dtype.element_ty), mask=mask)
    tl.store(DU + offs, du.to(DU.dtype.element_ty), mask=mask)


def _backward_kernel(dy, g, u, dg, du) -> None:
    n = g.numel()
    if n:
        device_guarded(_swiglu_bwd_kernel)[(triton.cdiv(n, _BLOCK_SIZE),)](dy, g, u, dg, du, n, BLOCK_SIZE=_BLOCK_SIZE)


def _check(gate: torch.Tensor, up: torch.Tensor) -> None:
    if gate.shape != up.shape:
        raise ValueError(f"gate {tuple(gate.shape)} and up {tuple(up.shape)} must have the same shape")


class SwiGLUFunction(torch.autograd.Function):
    """Triton SwiGLU. ``apply(gate, up)``; output dtype = ``torch.promote_types(gate, up)``."""

    @staticmethod
    def forward(ctx, gate, up, overwrite_inputs=False):
        _check(gate, up)
        g, u = gate.contiguous(), up.contiguous()
        ctx.overwrite = bool(overwrite_inputs)
        y = torch.empty(g.shape, dtype=torch.promote_types(g.dtype, u.dtype), device=g.device)
        n = g.numel()
        if n:
            device_guarded(_swiglu_fwd_kernel)[(triton.cdiv(n, _BLOCK_SIZE),)](g, u, y, n, BLOCK_SIZE=_BLOCK_SIZE)
        ctx.save_for_backward(g, u)
        return y

    @staticmethod
    def backward(ctx, dy):
        if ctx.overwrite == "done":
            raise RuntimeError(
                "SwiGLU's backward ran twice on one graph (retain_graph) after writing its gradients over its saved "
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


def swiglu(gate: torch.Tensor, up: torch.Tensor, overwrite_inputs: bool = False) -> torch.Tensor:
    """``silu(gate) * up``: Triton on CUDA (or under ``TRITON_INTERPRET=1``), torch otherwise.

    ``overwrite_inputs=True`` lets the Triton backward write the input gradients into ``gate`` and ``up`` (which
    then hold gradients, not activations): for callers whose ``gate``/``up`` are temporaries nothing else reads."""
    if use_triton(gate, up):
        return SwiGLUFunction.apply(gate, up, overwrite_inputs)
    return swiglu_ref(gate, up)


def swiglu_grads(dy: torch.Tensor, gate: torch.Tensor, up: torch.Tensor,
                 overwrite_inputs: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``(d gate, d up)`` of ``swiglu(gate, up)`` for the output gradient ``dy``, without an autograd graph: the
    backward of a caller that ran the forward itself (the lean MLP recompute, `training/lean_mlp.py`).

    ``overwrite_inputs=True`` writes the gradients into ``gate`` and ``up`` where they are distinct contiguous
    storages (the caller's own temporaries). Triton where ``swiglu`` uses it; autograd through the reference
    otherwise."""
    _check(gate, up)
    return _gated_grads(dy, gate, up, overwrite_inputs, _backward_kernel, swiglu_ref)
