"""A bitsandbytes 4-bit weight dequantized to its compute dtype in one Triton kernel, bit for bit as bitsandbytes.

A checkpointed QLoRA step dequantizes every 4-bit weight three times (forward, recompute, backward; the 16-bit
copy is never kept). bitsandbytes 0.50 does it in three launches per weight when the scales are double-quantized:
the 8-bit scales to fp32 (``kDequantizeBlockwise<float>``), ``+ offset`` (a torch add), then the weight
(``kDequantizeBlockwise<bf16>``). In the H200 profile of a Llama-3.2-11B-Vision step at seq 2048 those took 40 ms
of GPU time per step, the weight kernel moving ~2 TB/s, under half the card's bandwidth; the two scale launches
alone were 1,000 of the step's small kernels (`scripts/results/h200_2026-12-02k_sixteenth/profile_2048/`).

This kernel reads the packed codes (half a byte per element) and the 8-bit scales, expands the scales (code table
x second-level scale, then ``+ offset``, in that order and unfused, as bitsandbytes rounds them), multiplies by
the 16-entry code table in fp32 and writes the compute dtype with round-to-nearest-even (for bf16 on the bits, so
the CPU interpreter rounds as the GPU does): the same bits as
``bitsandbytes.functional.dequantize_4bit(W, state).to(state.dtype)``. NF4 only (bitsandbytes computes FP4 through
a comparison tree of its own; FP4 weights take its call).

- ``nf4_dequantize(weight, quant_state)``: the op (Triton on CUDA or under ``TRITON_INTERPRET=1``; bitsandbytes
  otherwise, for layouts the kernel does not take, and while ``torch.compile`` traces);
- ``nf4_dequantize_ref(weight, quant_state)``: bitsandbytes' own call (what the tests compare with).

Layout (``Params4bit``): the ``[out, in]`` weight flattened row-major, two codes per byte, the first element in
the high nibble; one scale per ``blocksize`` consecutive elements (the last block may be partial).
"""

from __future__ import annotations

import torch

from ._utils import device_guarded, tl, triton, use_triton

__all__ = ["nf4_dequantize", "nf4_dequantize_ref", "supports"]

_OUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_ELEMENTS_PER_PROGRAM = 4096


def nf4_dequantize_ref(weight: torch.Tensor, quant_state) -> torch.Tensor:
    import bitsandbytes.functional as bnbf

    return bnbf.dequantize_4bit(weight.data, quant_state).to(quant_state.dtype)


@triton.jit
def _nf4_dequantize_kernel(
    W, ABSMAX, CODE, ABSMAX2, CODE2, OFFSET, OUT, NUMEL,
    BLOCKSIZE: tl.constexpr, BLOCKSIZE2: tl.constexpr, NESTED: tl.constexpr, BLOCK: tl.constexpr,
    BF16_BITS: tl.constexpr,
):
    # Program p writes elements [p*BLOCK, (p+1)*BLOCK): BLOCK // BLOCKSIZE whole scale blocks (BLOCK is a multiple
    # of BLOCKSIZE), each row of the 2-D tiles below one scale block: [blocks, BLOCKSIZE // 2] bytes.
    pid = tl.program_id(0).to(tl.int64)
    nblocks: tl.constexpr = BLOCK // BLOCKSIZE
    half: tl.constexpr = BLOCKSIZE // 2
    block = pid * nblocks + tl.arange(0, nblocks)  # global scale-block index
    byte = block[:, None] * half + tl.arange(0, half)[None, :]  # [nblocks, half]
    ok = byte * 2 < NUMEL
    packed = tl.load(W + byte, mask=ok, other=0).to(tl.int32)
    block_ok = block * BLOCKSIZE < NUMEL
    if NESTED:
        q = tl.load(ABSMAX + block, mask=block_ok, other=0).to(tl.int32)
        scale = tl.load(CODE2 + q) * tl.load(ABSMAX2 + block // BLOCKSIZE2, mask=block_ok, other=0.0)
        scale = scale + tl.load(OFFSET)  # a second rounding, as bitsandbytes' separate add (no FMA: see launch)
    else:
        scale = tl.load(ABSMAX + block, mask=block_ok, other=0.0)
    hi = tl.load(CODE + (packed >> 4)) * scale[:, None]
    lo = tl.load(CODE + (packed & 15)) * scale[:, None]
    vals = tl.reshape(tl.join(hi, lo), (nblocks, BLOCKSIZE))  # element order hi, lo, hi, lo, ...
    offs = block[:, None] * BLOCKSIZE + tl.arange(0, BLOCKSIZE)[None, :]
    if BF16_BITS:  # OUT is the bf16 result viewed as int16: round to nearest even on the bits (the interpreter's
        bits = vals.to(tl.uint32, bitcast=True)  # own bf16 cast truncates); values are finite
        vals = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).to(tl.int16)
    tl.store(OUT + offs, vals.to(OUT.dtype.element_ty), mask=offs < NUMEL)


def _args(weight: torch.Tensor, quant_state):
    """(packed, absmax, code, absmax2, code2, offset, shape, blocksize, blocksize2, nested) or None when the kernel
    cannot take this weight: a plain 2-D ``Params4bit`` layout with a 16-entry code table, a power-of-two block
    size, a half or fp32 compute dtype, everything on one device."""
    qs = quant_state
    shape = getattr(qs, "shape", None)
    code = getattr(qs, "code", None)
    blocksize = int(getattr(qs, "blocksize", 0) or 0)
    if (shape is None or len(shape) != 2 or weight.dtype != torch.uint8 or code is None or code.numel() != 16
            or getattr(qs, "dtype", None) not in _OUT_DTYPES or blocksize < 2 or blocksize & (blocksize - 1)
            or blocksize > _ELEMENTS_PER_PROGRAM or getattr(qs, "quant_type", None) != "nf4"):
        return None
    numel = int(shape[0]) * int(shape[1])
    if weight.numel() * 2 < numel or not weight.is_contiguous():
        return None
    if qs.nested:
        state2 = qs.state2
        b2 = int(getattr(state2, "blocksize", 0) or 0)
        if state2 is None or b2 < 1 or qs.absmax.dtype != torch.uint8 or state2.code.numel() != 256:
            return None
        offset = qs.offset if isinstance(qs.offset, torch.Tensor) else torch.tensor(float(qs.offset))
        tensors = (qs.absmax, code, state2.absmax, state2.code, offset)
        nested = True
    else:
        b2, nested = 1, False
        tensors = (qs.absmax, code, qs.absmax, code, qs.absmax)
    if any(t.device != weight.device for t in tensors):
        return None
    absmax, code, absmax2, code2, offset = tensors
    return (weight.reshape(-1), absmax, code.float(), absmax2.float(), code2.float(),
            offset.to(torch.float32).reshape(-1), (int(shape[0]), int(shape[1])), blocksize, b2, nested)


def supports(weight: torch.Tensor, quant_state) -> bool:
    """Whether `nf4_dequantize` runs the kernel for this weight (else it calls bitsandbytes)."""
    return (not _FAILED and use_triton(weight) and not torch.compiler.is_compiling()
            and _args(weight, quant_state) is not None)


def nf4_dequantize(weight: torch.Tensor, quant_state) -> torch.Tensor:
    """``dequantize_4bit(weight, quant_state).to(quant_state.dtype)``, bit for bit (see the module docstring)."""
    args = None
    if not _FAILED and use_triton(weight) and not torch.compiler.is_compiling():
        args = _args(weight, quant_state)
    if args is None:
        return nf4_dequantize_ref(weight, quant_state)
    try:
        return _launch(weight, quant_state, args)
    except Exception as exc:  # noqa: BLE001 - e.g. a Triton that cannot compile it: bitsandbytes from now on, loudly
        import logging

        _FAILED["reason"] = f"{type(exc).__name__}: {exc}"[:300]
        logging.getLogger(__name__).warning("nf4_dequantize kernel disabled (%s); bitsandbytes' dequantize_4bit "
                                            "instead", _FAILED["reason"])
        return nf4_dequantize_ref(weight, quant_state)


_FAILED: dict[str, str] = {}


def _launch(weight: torch.Tensor, quant_state, args: tuple) -> torch.Tensor:
    packed, absmax, code, absmax2, code2, offset, shape, blocksize, blocksize2, nested = args
    out = torch.empty(shape, dtype=quant_state.dtype, device=weight.device)
    numel = shape[0] * shape[1]
    grid = (triton.cdiv(numel, _ELEMENTS_PER_PROGRAM),)
    bf16 = out.dtype == torch.bfloat16
    device_guarded(_nf4_dequantize_kernel)[grid](
        packed, absmax, code, absmax2, code2, offset, out.view(torch.int16) if bf16 else out, numel,
        BLOCKSIZE=blocksize, BLOCKSIZE2=blocksize2, NESTED=nested, BLOCK=_ELEMENTS_PER_PROGRAM,
        BF16_BITS=bf16, num_warps=8,
        enable_fp_fusion=False,  # bitsandbytes rounds scale = code2[q] * absmax2, then + offset: no FMA
    )
    return out
