"""nf4_dequantize (one Triton kernel) against bitsandbytes' dequantize_4bit: the same bits, every layout."""

from __future__ import annotations

import pytest
import torch

from hf_fastvision.kernels import nf4_dequantize as nd

bnbf = pytest.importorskip("bitsandbytes.functional")


def _quantized(n, k, device, *, nested=True, blocksize=64, dtype=torch.bfloat16, quant_type="nf4", scale=1.0):
    w = (torch.randn(n, k, device=device, dtype=torch.float32) * scale).to(dtype)
    return bnbf.quantize_4bit(w, blocksize=blocksize, quant_type=quant_type, compress_statistics=nested)


@pytest.mark.parametrize("n,k", [(64, 128), (96, 192), (3, 40), (257, 320)])  # (3, 40): one partial block
@pytest.mark.parametrize("nested", [True, False])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_the_same_bits_as_bitsandbytes(n, k, nested, dtype, device):
    packed, state = _quantized(n, k, device, nested=nested, dtype=dtype, scale=3.0)
    assert nd.supports(packed, state)
    got = nd.nf4_dequantize(packed, state)
    ref = nd.nf4_dequantize_ref(packed, state)
    assert got.shape == (n, k) and got.dtype == dtype == ref.dtype
    assert torch.equal(got.view(torch.int16 if dtype != torch.float32 else torch.int32),
                       ref.view(torch.int16 if dtype != torch.float32 else torch.int32))


@pytest.mark.parametrize("blocksize", [128, 256, 4096])
def test_other_block_sizes(blocksize, device):
    packed, state = _quantized(40, 512, device, blocksize=blocksize)
    assert torch.equal(nd.nf4_dequantize(packed, state), nd.nf4_dequantize_ref(packed, state))


def test_more_than_one_program_and_a_long_second_level(device):
    # 24,576 elements: 6 programs; 384 scale blocks: two second-level blocks of 256
    packed, state = _quantized(96, 256, device)
    assert state.nested and state.absmax.numel() > state.state2.blocksize
    assert torch.equal(nd.nf4_dequantize(packed, state), nd.nf4_dequantize_ref(packed, state))


def test_rounding_ties_go_to_even(device):
    """A product exactly between two bf16 values whose upper neighbour is even: the kernel must round up, as a CUDA
    cast does (the CPU interpreter's own bf16 cast truncates, which would give the lower one)."""
    packed, state = _quantized(8, 64, device, nested=False)
    state.absmax = torch.full_like(state.absmax, 1.0 + 3 * 2.0 ** -8)  # code 1.0 x this: a tie, rounded up
    got = nd.nf4_dequantize(packed, state)
    ref = nd.nf4_dequantize_ref(packed, state)
    flat = packed.reshape(-1).to(torch.int64)
    codes = torch.stack([flat >> 4, flat & 15], dim=-1).reshape(got.shape)
    ones = state.code[codes] == 1.0  # products exactly 1 + 3 * 2^-8
    assert ones.any() and bool((got[ones].float() == 1.0 + 2.0 ** -6).all())
    assert torch.equal(got, ref)


def test_layouts_the_kernel_does_not_take_go_to_bitsandbytes(device, monkeypatch):
    packed, state = _quantized(16, 64, device, quant_type="fp4")
    assert not nd.supports(packed, state)
    called = []
    monkeypatch.setattr(nd, "nf4_dequantize_ref", lambda w, s: called.append(1) or bnbf.dequantize_4bit(w, s))
    nd.nf4_dequantize(packed, state)
    assert called == [1]


def test_the_fused_lora_op_dequantizes_with_the_kernel(device, monkeypatch):
    from hf_fastvision.kernels import lora_linear_4bit as ll

    packed, state = _quantized(64, 128, device)
    calls = []
    real = nd.nf4_dequantize
    monkeypatch.setattr(nd, "nf4_dequantize", lambda w, s: calls.append(1) or real(w, s))
    assert torch.equal(ll.dequantize(packed, state), nd.nf4_dequantize_ref(packed, state)) and calls == [1]
