"""``x @ W^T`` for a bitsandbytes 4-bit ``W`` and few rows of ``x`` (decoding), dequantizing inside the kernel.

For a handful of tokens (a decode step of a batch of up to 16 sequences) bitsandbytes 0.50 dequantizes the whole
weight to 16-bit in global memory and then runs a GEMM on it (on sm90 its fused 4-bit GEMV is taken for one row
only), so every decoded token writes and reads back 2 bytes per parameter: on an H200 a batch-8 decode step of a
7B model took 18.5 ms against 8.6 ms at batch 1 (`scripts/bench_generate.py`, 2026-11-27). This kernel reads the
packed 4-bit weight (0.5 byte per parameter) once, expands it in registers with the 16-entry code table and the
block scales (double-quantized scales are expanded in the kernel too) and multiplies on the tensor cores.

- ``nf4_matmul(x, weight, quant_state, bias=None)``: the op (Triton on CUDA or under ``TRITON_INTERPRET=1``,
  the reference otherwise), registered as the custom op ``hf_fastvision::nf4_matmul`` so ``torch.compile`` and
  CUDA graphs treat it as one opaque kernel;
- ``nf4_matmul_ref(...)``: bitsandbytes' dequantization followed by ``F.linear`` (what the tests compare with).

Parallelism: the first version ran one program per 32-64 output columns over all of K, one program per SM, and was
latency-bound at ~35 GB/s of weight traffic on an H200 (10-25x slower than bitsandbytes,
`scripts/results/h200_2026-12-01b_nf4_kernel/`). K is now split so that about four programs run per SM, each
writing fp32 partial sums that the host adds in a fixed order (deterministic). Not measured since.

Layout (bitsandbytes' ``Params4bit``): the ``[out, in]`` weight flattened row-major, two 4-bit codes per byte,
the first element in the high nibble; one scale per ``blocksize`` consecutive elements. Works for nf4 and fp4
(the code table comes from the quant state). Inference only: no backward.
"""

from __future__ import annotations

import torch

from ._utils import device_guarded, tl, triton, triton_interpret, use_triton

__all__ = ["nf4_matmul", "nf4_matmul_ref", "MAX_ROWS"]

MAX_ROWS = 16
"""Rows of ``x`` up to which the kernel is used; more rows are compute-bound and go through dequantize + GEMM."""


def nf4_matmul_ref(x: torch.Tensor, weight: torch.Tensor, quant_state, bias: torch.Tensor | None = None):
    import bitsandbytes.functional as bnbf

    w = bnbf.dequantize_4bit(weight.data, quant_state).to(x.dtype)
    return torch.nn.functional.linear(x, w, bias.to(x.dtype) if bias is not None else None)


@triton.jit
def _nf4_matmul_kernel(
    X, W, ABSMAX, CODE, ABSMAX2, CODE2, OFFSET, PARTIAL,
    M, N, K, stride_xm, K_PER_SPLIT,
    BLOCKSIZE: tl.constexpr, BLOCKSIZE2: tl.constexpr, NESTED: tl.constexpr,
    IEEE: tl.constexpr, ROUND: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # Program (n, s) computes columns [n*BLOCK_N, ...) over the K range of split s and writes fp32 partial sums to
    # PARTIAL[s]; the host adds the splits in a fixed order (deterministic). BLOCK_K divides BLOCKSIZE and
    # BLOCKSIZE divides K: each row of a K-step lies in one scale block.
    pid = tl.program_id(0)
    split = tl.program_id(1)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    half_k = tl.arange(0, BLOCK_K // 2)
    n_ok = offs_n < N
    m_ok = offs_m < M
    if NESTED:
        offset = tl.load(OFFSET)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_lo = split * K_PER_SPLIT
    k_hi = tl.minimum(K, k_lo + K_PER_SPLIT)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        row_start = offs_n * K + k0  # flat index of element (n, k0)
        # bytes of elements (n, k0 + 2j) [high nibble] and (n, k0 + 2j + 1) [low nibble]
        packed = tl.load(W + (row_start[:, None] // 2 + half_k[None, :]), mask=n_ok[:, None], other=0).to(tl.int32)
        hi = tl.load(CODE + (packed >> 4))
        lo = tl.load(CODE + (packed & 15))
        vals = tl.reshape(tl.join(hi, lo), (BLOCK_N, BLOCK_K))  # element order hi, lo, hi, lo, ...
        block = row_start // BLOCKSIZE
        if NESTED:
            q = tl.load(ABSMAX + block, mask=n_ok, other=0).to(tl.int32)
            scale = tl.load(CODE2 + q) * tl.load(ABSMAX2 + block // BLOCKSIZE2, mask=n_ok, other=0.0) + offset
        else:
            scale = tl.load(ABSMAX + block, mask=n_ok, other=0.0)
        w = vals * scale[:, None]  # [BLOCK_N, BLOCK_K]
        if ROUND == 1:  # bitsandbytes dequantizes to the compute dtype first
            w = w.to(tl.bfloat16)
        elif ROUND == 2:
            w = w.to(tl.float16)
        w = w.to(X.dtype.element_ty)
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(X + offs_m[:, None] * stride_xm + offs_k[None, :], mask=m_ok[:, None], other=0.0)
        if IEEE:  # fp32 inputs, or the interpreter (whose bf16 tl.dot returns garbage on triton 3.8)
            acc += tl.dot(x.to(tl.float32), tl.trans(w.to(tl.float32)), input_precision="ieee")
        else:
            acc += tl.dot(x, tl.trans(w))
    out_ptrs = PARTIAL + split * M * N + offs_m[:, None] * N + offs_n[None, :]
    tl.store(out_ptrs, acc, mask=m_ok[:, None] & n_ok[None, :])


_SM_COUNT: dict[int, int] = {}


def _programs_wanted(device: torch.device) -> int:
    """About four programs per SM keep enough loads in flight (one program per SM was latency-bound: 35 GB/s)."""
    if device.type != "cuda":
        return 16  # the interpreter: enough to exercise several splits
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SM_COUNT:
        _SM_COUNT[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return 4 * _SM_COUNT[index]


def _split_k(n: int, k: int, block_n: int, block_k: int, wanted: int) -> tuple[int, int]:
    """(splits, K per split, a multiple of block_k) so that column blocks x splits reach `wanted` programs."""
    steps = triton.cdiv(k, block_k)
    splits = max(1, min(steps, triton.cdiv(wanted, triton.cdiv(n, block_n))))
    per = triton.cdiv(steps, splits) * block_k
    return triton.cdiv(k, per), per


def _launch(x2, packed, absmax, code, absmax2, code2, offset, bias, n, k, blocksize, blocksize2, nested, rounding):
    m = x2.shape[0]
    block_n, block_k = 64, min(blocksize, 128)
    splits, per = _split_k(n, k, block_n, block_k, _programs_wanted(x2.device))
    partial = torch.empty((splits, m, n), dtype=torch.float32, device=x2.device)
    device_guarded(_nf4_matmul_kernel)[(triton.cdiv(n, block_n), splits)](
        x2, packed, absmax, code, absmax2, code2, offset, partial,
        m, n, k, x2.stride(0), per,
        BLOCKSIZE=blocksize, BLOCKSIZE2=blocksize2, NESTED=nested,
        IEEE=x2.dtype == torch.float32 or triton_interpret(), ROUND=rounding, BLOCK_M=16, BLOCK_N=block_n,
        BLOCK_K=block_k, num_warps=4,
    )
    out = partial.sum(0) if splits > 1 else partial[0]
    if bias is not None:
        out = out + bias.float()
    return out.to(x2.dtype)


def _dequantize_torch(packed, absmax, code, absmax2, code2, offset, n, k, blocksize, blocksize2, nested, rounding,
                      dtype):
    """The kernel's dequantization in plain torch, from the same arguments (the fallback inside the op)."""
    flat = packed.reshape(-1).to(torch.int32)
    vals = torch.stack([code[flat >> 4], code[flat & 15]], dim=-1).reshape(-1, blocksize)
    if nested:
        scale = code2[absmax.to(torch.int64)] * absmax2.repeat_interleave(blocksize2)[: absmax.numel()] + offset
    else:
        scale = absmax
    w = (vals * scale[:, None]).reshape(n, k)
    w = w.to({1: torch.bfloat16, 2: torch.float16}.get(rounding, torch.float32))
    return w.to(dtype)


_FAILED: dict[str, str] = {}


@torch.library.custom_op("hf_fastvision::nf4_matmul", mutates_args=())
def _nf4_matmul_op(
    x2: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, absmax2: torch.Tensor,
    code2: torch.Tensor, offset: torch.Tensor, bias: torch.Tensor | None, n: int, k: int, blocksize: int,
    blocksize2: int, nested: bool, rounding: int,
) -> torch.Tensor:
    if not _FAILED and use_triton(x2):
        try:
            return _launch(x2, packed, absmax, code, absmax2, code2, offset, bias, n, k, blocksize, blocksize2,
                           nested, rounding)
        except Exception as exc:  # noqa: BLE001 - e.g. a Triton too old to compile it: fall back, once, loudly
            import logging

            _FAILED["reason"] = f"{type(exc).__name__}: {exc}"[:300]
            logging.getLogger(__name__).warning("nf4_matmul kernel disabled (%s); dequantize + matmul instead",
                                                _FAILED["reason"])
    w = _dequantize_torch(packed, absmax, code, absmax2, code2, offset, n, k, blocksize, blocksize2, nested,
                          rounding, x2.dtype)
    return torch.nn.functional.linear(x2, w, bias)


@_nf4_matmul_op.register_fake
def _(x2, packed, absmax, code, absmax2, code2, offset, bias, n, k, blocksize, blocksize2, nested, rounding):
    return x2.new_empty((x2.shape[0], n))


_ROUNDING = {torch.bfloat16: 1, torch.float16: 2}


def layer_args(weight: torch.Tensor, quant_state) -> tuple | None:
    """The op's weight-side arguments for one bnb 4-bit weight, or None when the kernel cannot take it.

    Computed once per layer (by `inference/decode_kernels.py` when it binds), so the traced decode step only
    passes tensors: no attribute lookups, host syncs or allocations per call.
    """
    qs = quant_state
    shape = getattr(qs, "shape", None)
    blocksize = int(getattr(qs, "blocksize", 0) or 0)
    if (
        shape is None or len(shape) != 2 or weight.dtype != torch.uint8 or getattr(qs, "code", None) is None
        or qs.code.numel() != 16 or blocksize < 16 or blocksize & (blocksize - 1) or shape[1] % blocksize
    ):
        return None
    n, k = int(shape[0]), int(shape[1])
    code = qs.code.float()
    if qs.nested:  # the offset stays a tensor: no host sync (decode steps run inside CUDA graphs)
        absmax, absmax2, code2 = qs.absmax, qs.state2.absmax.float(), qs.state2.code.float()
        blocksize2 = int(qs.state2.blocksize)
        offset = torch.as_tensor(qs.offset, dtype=torch.float32, device=code.device).reshape(1)
    else:
        absmax, absmax2, code2, blocksize2, offset = qs.absmax.float(), code, code, 1, code
    return (weight.data.reshape(-1), absmax, code, absmax2, code2, offset, n, k, blocksize, blocksize2,
            bool(qs.nested), _ROUNDING.get(qs.dtype, 0))


def nf4_matmul_with(x: torch.Tensor, args: tuple, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`nf4_matmul` with precomputed `layer_args` (what a bound layer calls on every decode step)."""
    packed, absmax, code, absmax2, code2, offset, n, k, blocksize, blocksize2, nested, rounding = args
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    b = bias.to(x.dtype) if bias is not None else None
    out = _nf4_matmul_op(x2, packed, absmax, code, absmax2, code2, offset, b, n, k, blocksize, blocksize2, nested,
                         rounding)
    return out.reshape(*x.shape[:-1], n)


def _call_args(x: torch.Tensor, weight: torch.Tensor, quant_state) -> tuple | None:
    """`layer_args` when the kernel computes this call (few rows, a half or fp32 input), else None."""
    rows = x.numel() // x.shape[-1] if x.dim() else 0
    shape = getattr(quant_state, "shape", None)
    if not (0 < rows <= MAX_ROWS and use_triton(x) and x.dtype in (torch.float16, torch.bfloat16, torch.float32)
            and shape is not None and len(shape) == 2 and x.shape[-1] == shape[1]):
        return None
    return layer_args(weight, quant_state)


def supports(x: torch.Tensor, weight: torch.Tensor, quant_state) -> bool:
    """Whether the kernel computes this call: few rows, a plain 2-D bnb 4-bit weight, a half or fp32 input."""
    return _call_args(x, weight, quant_state) is not None


def nf4_matmul(x: torch.Tensor, weight: torch.Tensor, quant_state, bias: torch.Tensor | None = None):
    """``F.linear(x, dequantize(W), bias)`` in ``x``'s dtype (see the module docstring)."""
    args = _call_args(x, weight, quant_state)
    if args is None:
        return nf4_matmul_ref(x, weight, quant_state, bias)
    return nf4_matmul_with(x, args, bias)
