"""A bitsandbytes 4-bit linear layer plus its LoRA adapter as one autograd op.

``y = x W^T + b + s (x A^T) B^T`` with ``W`` dequantized from nf4/fp4 on the fly, in forward and again in backward
(never stored). peft composes this from ~10 autograd nodes per call (the 4-bit matmul, a defensive clone, the two
LoRA linears with their autocast casts, the scale and the add), and a checkpointed QLoRA step runs each layer's
forward twice and its backward once: on a 7B model that is tens of thousands of small launches per step, and the
step is bound by the host issuing them (`scripts/profile_step.py`). This op issues the dequantization, one matmul
and one fused ``addmm`` for the adapter in forward, and six matmuls in backward.

- ``lora_linear_4bit(x, weight, quant_state, lora_a, lora_b, scaling, bias)``: the fused op;
- ``lora_linear_4bit_ref(...)``: the same function composed of plain ops (the reference the tests compare with).

Computation runs in the quantization's compute dtype (``quant_state.dtype``, bf16 for our loads); the adapter's
fp32 weights are cast to it and their gradients come back in fp32. The output has ``x``'s dtype, as bitsandbytes'
``Linear4bit`` returns. Frozen ``W`` and ``bias`` get no gradient.
"""

from __future__ import annotations

import os

import torch

__all__ = ["LoRALinear4bitFunction", "lora_linear_4bit", "lora_linear_4bit_grads", "lora_linear_4bit_ref", "dequantize"]


def dequantize(weight: torch.Tensor, quant_state) -> torch.Tensor:
    """The ``[out, in]`` weight of a bitsandbytes ``Params4bit`` in its compute dtype: bitsandbytes' values, from
    one Triton kernel where it takes the layout (`nf4_dequantize`; ``HF_FASTVISION_NF4_DEQUANTIZE=bitsandbytes``
    calls bitsandbytes itself)."""
    if os.environ.get("HF_FASTVISION_NF4_DEQUANTIZE", "").lower() in ("bitsandbytes", "bnb", "0", "off"):
        import bitsandbytes.functional as bnbf

        return bnbf.dequantize_4bit(weight.data, quant_state).to(quant_state.dtype)
    from hf_fastvision.kernels import nf4_dequantize

    return nf4_dequantize.nf4_dequantize(weight.data, quant_state)


def lora_linear_4bit_ref(x, weight, quant_state, lora_a, lora_b, scaling: float, bias=None):
    """Plain-op reference: dequantize, linear, LoRA branch, all in the compute dtype."""
    dtype = quant_state.dtype
    xc = x.to(dtype)
    out = torch.nn.functional.linear(xc, dequantize(weight, quant_state), bias.to(dtype) if bias is not None else None)
    out = out + torch.nn.functional.linear(torch.nn.functional.linear(xc, lora_a.to(dtype)), lora_b.to(dtype)) * scaling
    return out.to(x.dtype)


class LoRALinear4bitFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, quant_state, lora_a, lora_b, scaling, bias):
        with torch.autocast(x.device.type, enabled=False):  # dtypes are explicit: the quantization's compute dtype
            return LoRALinear4bitFunction._forward(ctx, x, weight, quant_state, lora_a, lora_b, scaling, bias)

    @staticmethod
    def _forward(ctx, x, weight, quant_state, lora_a, lora_b, scaling, bias):
        dtype = quant_state.dtype
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).to(dtype)
        a, b = lora_a.to(dtype), lora_b.to(dtype)
        w = dequantize(weight, quant_state)
        h = x2 @ a.t()  # [tokens, r]
        if bias is not None:
            out = torch.addmm(bias.to(dtype), x2, w.t())
        else:
            out = x2 @ w.t()
        del w
        out.addmm_(h, b.t(), alpha=scaling)
        ctx.save_for_backward(x2, h, a, b, weight)
        ctx.quant_state, ctx.scaling = quant_state, scaling
        ctx.x_shape, ctx.x_dtype = shape, x.dtype
        ctx.a_dtype, ctx.b_dtype = lora_a.dtype, lora_b.dtype
        return out.reshape(*shape[:-1], out.shape[-1]).to(x.dtype)

    @staticmethod
    def backward(ctx, dy):
        with torch.autocast(dy.device.type, enabled=False):
            return LoRALinear4bitFunction._backward(ctx, dy)

    @staticmethod
    def _backward(ctx, dy):
        x2, h, a, b, weight = ctx.saved_tensors
        need_x, _, _, need_a, need_b, _, _ = ctx.needs_input_grad
        dx, da, db = _grads(x2, h, a, b, weight, ctx.quant_state, ctx.scaling, dy, need_x, need_a, need_b,
                            ctx.a_dtype, ctx.b_dtype)
        if dx is not None:
            dx = dx.reshape(ctx.x_shape).to(ctx.x_dtype)
        return dx, None, None, da, db, None, None


def _grads(x2, h, a, b, weight, quant_state, s, dy, need_x, need_a, need_b, a_dtype, b_dtype):
    """(dx [tokens, in], d lora_a, d lora_b) of ``lora_linear_4bit`` from its saved values (compute dtype)."""
    dy2 = dy.reshape(-1, dy.shape[-1]).to(x2.dtype)
    db = _scaled(dy2.t() @ h, s).to(b_dtype) if need_b else None  # [out, r]
    dh = _scaled(dy2 @ b, s)  # [tokens, r]
    da = (dh.t() @ x2).to(a_dtype) if need_a else None  # [r, in]
    dx = None
    if need_x:
        w = dequantize(weight, quant_state)
        dx = (dy2 @ w).addmm_(dh, a)
        del w
    return dx, da, db


def _scaled(t: torch.Tensor, s: float) -> torch.Tensor:
    """``t * s`` in place; no kernel for ``s == 1`` (``lora_alpha == r``, the usual set-up), bitwise the same."""
    return t if s == 1.0 else t.mul_(s)


def lora_linear_4bit_grads(x, weight, quant_state, lora_a, lora_b, scaling: float, dy, need_x: bool = True):
    """The backward of ``lora_linear_4bit(x, ...)`` for the output gradient ``dy``, without running its forward:
    ``(dx, d lora_a, d lora_b)`` (``dx`` in ``x``'s shape and dtype, None without ``need_x``; the adapter grads in
    the adapter's dtypes, None for a frozen one). Used where the forward's output is not needed, only its
    gradients (the lean MLP recompute). ``lora_a = lora_b = None``: a frozen 4-bit linear without an adapter."""
    with torch.autocast(x.device.type, enabled=False):
        dtype = quant_state.dtype
        if lora_a is None:
            if not need_x:
                return None, None, None
            dx = dy.reshape(-1, dy.shape[-1]).to(dtype) @ dequantize(weight, quant_state)
            return dx.reshape(x.shape).to(x.dtype), None, None
        x2 = x.reshape(-1, x.shape[-1]).to(dtype)
        a, b = lora_a.to(dtype), lora_b.to(dtype)
        dx, da, db = _grads(x2, x2 @ a.t(), a, b, weight, quant_state, float(scaling), dy, need_x,
                            lora_a.requires_grad, lora_b.requires_grad, lora_a.dtype, lora_b.dtype)
        return (dx.reshape(x.shape).to(x.dtype) if dx is not None else None), da, db


def lora_linear_4bit(x, weight, quant_state, lora_a, lora_b, scaling: float, bias=None):
    """``x W^T + b + scaling (x A^T) B^T`` for a 4-bit ``W`` (see the module docstring)."""
    if bias is not None and bias.requires_grad:
        raise ValueError("lora_linear_4bit keeps the base bias frozen; use the unfused path to train it")
    return LoRALinear4bitFunction.apply(x, weight, quant_state, lora_a, lora_b, float(scaling), bias)
