"""Fused RMSNorm (forward + backward) in Triton, with a pure-torch reference.

    y = x * rsqrt(mean(x**2, -1) + eps) * (offset + w)

``casting_mode``:

* ``"llama"`` (default when ``offset == 0``): normalise in fp32, cast the normalised row
  back to ``x.dtype``, then multiply by the weight -- exactly ``LlamaRMSNorm`` (output
  dtype is ``torch.promote_types(x.dtype, w.dtype)``, as in transformers).
* ``"gemma"`` (default when ``offset != 0``): everything in fp32, ``x_normed * (offset + w)``,
  cast back to ``x.dtype`` -- ``Gemma3RMSNorm`` with ``offset=1.0``.
"""

from __future__ import annotations

import torch

from ._utils import calculate_settings, device_guarded, num_programs, tl, triton, use_triton

__all__ = ["RMSNormFunction", "rms_norm", "rms_norm_ref"]

_CASTING_MODES = ("llama", "gemma")


def _resolve_casting_mode(casting_mode: str | None, offset: float) -> str:
    if casting_mode is None:
        return "llama" if offset == 0.0 else "gemma"
    if casting_mode not in _CASTING_MODES:
        raise ValueError(f"casting_mode must be one of {_CASTING_MODES}, got {casting_mode!r}")
    return casting_mode


def _output_dtype(x: torch.Tensor, weight: torch.Tensor, mode: str) -> torch.dtype:
    return torch.promote_types(x.dtype, weight.dtype) if mode == "llama" else x.dtype


# --------------------------------------------------------------------------------------
# reference
# --------------------------------------------------------------------------------------
def rms_norm_ref(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float = 1e-6,
    offset: float = 0.0,
    casting_mode: str | None = None,
) -> torch.Tensor:
    """Pure-torch RMSNorm, numerically identical to LlamaRMSNorm / Gemma3RMSNorm."""
    mode = _resolve_casting_mode(casting_mode, offset)
    xf = x.to(torch.float32)
    normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if mode == "llama":
        w = weight + offset if offset != 0.0 else weight
        return w * normed.to(x.dtype)
    return (normed * (offset + weight.to(torch.float32))).to(x.dtype)


# --------------------------------------------------------------------------------------
# triton kernels
# --------------------------------------------------------------------------------------
@triton.jit
def _rms_norm_fwd_kernel(
    Y,
    y_row_stride,
    X,
    x_row_stride,
    W,
    RSTD,
    n_cols,
    eps,
    offset,
    CASTING_LLAMA: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_SIZE)
    mask = cols < n_cols

    x = tl.load(X + row * x_row_stride + cols, mask=mask, other=0.0)
    xf = x.to(tl.float32)
    mean_sq = tl.sum(xf * xf, axis=0) / n_cols
    rstd = tl.rsqrt(mean_sq + eps)
    tl.store(RSTD + row, rstd)
    normed = xf * rstd

    w = tl.load(W + cols, mask=mask, other=0.0)
    if CASTING_LLAMA:
        # (w + offset) rounded to w's dtype, normed rounded to x's dtype; their product in
        # fp32 is exact for 16-bit operands, so one final rounding equals torch's.
        w_eff = (w.to(tl.float32) + offset).to(w.dtype).to(tl.float32)
        y = normed.to(x.dtype).to(tl.float32) * w_eff
    else:
        y = normed * (w.to(tl.float32) + offset)
    tl.store(Y + row * y_row_stride + cols, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _rms_norm_bwd_kernel(
    DY,
    dy_row_stride,
    DX,
    dx_row_stride,
    X,
    x_row_stride,
    W,
    RSTD,
    DW,
    dw_row_stride,
    n_rows,
    n_cols,
    offset,
    rows_per_program,
    CASTING_LLAMA: tl.constexpr,
    COMPUTE_DW: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    pid = tl.program_id(0)
    row_start = pid * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, n_rows)
    cols = tl.arange(0, BLOCK_SIZE)
    mask = cols < n_cols

    w = tl.load(W + cols, mask=mask, other=0.0)
    if CASTING_LLAMA:
        w_eff = (w.to(tl.float32) + offset).to(w.dtype).to(tl.float32)
    else:
        w_eff = w.to(tl.float32) + offset
    dw_acc = tl.zeros((BLOCK_SIZE,), dtype=tl.float32)

    start64 = row_start.to(tl.int64)
    X += start64 * x_row_stride
    DY += start64 * dy_row_stride
    DX += start64 * dx_row_stride
    RSTD += start64
    for _ in range(row_start, row_end):
        x = tl.load(X + cols, mask=mask, other=0.0)
        xf = x.to(tl.float32)
        dy = tl.load(DY + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD)
        normed = xf * rstd
        if COMPUTE_DW:
            if CASTING_LLAMA:
                dw_acc += dy * normed.to(x.dtype).to(tl.float32)
            else:
                dw_acc += dy * normed
        dn = dy * w_eff
        dot = tl.sum(dn * normed, axis=0) / n_cols
        dx = rstd * (dn - normed * dot)
        tl.store(DX + cols, dx.to(DX.dtype.element_ty), mask=mask)
        X += x_row_stride
        DY += dy_row_stride
        DX += dx_row_stride
        RSTD += 1

    if COMPUTE_DW:
        tl.store(DW + pid * dw_row_stride + cols, dw_acc, mask=mask)


def _as_rows(t: torch.Tensor) -> torch.Tensor:
    t2 = t.reshape(-1, t.shape[-1])
    if t2.stride(-1) != 1:
        t2 = t2.contiguous()
    return t2


class RMSNormFunction(torch.autograd.Function):
    """Triton RMSNorm. ``apply(x, weight, eps, offset, casting_mode)``."""

    @staticmethod
    def forward(ctx, x, weight, eps=1e-6, offset=0.0, casting_mode=None):
        mode = _resolve_casting_mode(casting_mode, offset)
        shape = x.shape
        n_cols = shape[-1]
        if weight.shape != (n_cols,):
            raise ValueError(f"weight shape {tuple(weight.shape)} does not match hidden size {n_cols}")
        x2 = _as_rows(x)
        n_rows = x2.shape[0]
        weight = weight.contiguous()
        y = torch.empty((n_rows, n_cols), dtype=_output_dtype(x, weight, mode), device=x.device)
        rstd = torch.empty(n_rows, dtype=torch.float32, device=x.device)
        block, num_warps = calculate_settings(n_cols)
        if n_rows > 0:
            device_guarded(_rms_norm_fwd_kernel)[(n_rows,)](
                y, y.stride(0), x2, x2.stride(0), weight, rstd, n_cols, float(eps), float(offset),
                CASTING_LLAMA=(mode == "llama"), BLOCK_SIZE=block, num_warps=num_warps,
            )
        ctx.save_for_backward(x2, weight, rstd)
        ctx.offset = float(offset)
        ctx.mode = mode
        ctx.block, ctx.num_warps = block, num_warps
        ctx.x_shape, ctx.x_dtype = shape, x.dtype
        return y.view(*shape[:-1], n_cols)

    @staticmethod
    def backward(ctx, dy):
        x2, weight, rstd = ctx.saved_tensors
        n_rows, n_cols = x2.shape
        dy2 = _as_rows(dy)
        dx = torch.empty((n_rows, n_cols), dtype=ctx.x_dtype, device=x2.device)
        want_dw = ctx.needs_input_grad[1]
        # the weight's gradient sums over rows: a few persistent programs, each looping over a block of rows; a
        # frozen weight (LoRA) needs none, and then one program per row keeps every SM's memory pipes busy
        if want_dw:
            n_prog = num_programs(x2.device, n_rows)
            alloc = torch.empty if n_rows > 0 else torch.zeros  # no rows: no kernel writes the partial sums
            dw_partial = alloc((n_prog, n_cols), dtype=torch.float32, device=x2.device)
        else:
            n_prog, dw_partial = max(n_rows, 1), None
        if n_rows > 0:
            dw_out = dw_partial if want_dw else dx  # never written without COMPUTE_DW (a valid pointer all the same)
            device_guarded(_rms_norm_bwd_kernel)[(n_prog,)](
                dy2, dy2.stride(0), dx, dx.stride(0), x2, x2.stride(0), weight, rstd,
                dw_out, dw_out.stride(0), n_rows, n_cols, ctx.offset, triton.cdiv(n_rows, n_prog),
                CASTING_LLAMA=(ctx.mode == "llama"), COMPUTE_DW=want_dw, BLOCK_SIZE=ctx.block,
                num_warps=ctx.num_warps,
            )
        dw = dw_partial.sum(0).to(weight.dtype) if want_dw else None
        return dx.view(ctx.x_shape), dw, None, None, None


def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float = 1e-6,
    offset: float = 0.0,
    casting_mode: str | None = None,
) -> torch.Tensor:
    """RMSNorm over the last dim: Triton on CUDA (or under ``TRITON_INTERPRET=1``), torch otherwise.

    ``offset=1.0`` gives Gemma's ``x_normed * (1 + w)``.
    """
    if use_triton(x, weight):
        return RMSNormFunction.apply(x, weight, eps, offset, casting_mode)
    return rms_norm_ref(x, weight, eps, offset, casting_mode)
