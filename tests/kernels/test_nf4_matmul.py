"""nf4_matmul (few-row x @ W^T with W dequantized inside the kernel) against bitsandbytes' dequantize + linear."""

from __future__ import annotations

import pytest
import torch

from hf_fastvision.kernels.nf4_matmul import MAX_ROWS, nf4_matmul, nf4_matmul_ref, supports

bnbf = pytest.importorskip("bitsandbytes.functional")


def _assert_matmul_close(out, x, packed, state, bias=None):
    """Against dequantize + fp32 matmul: a half output may differ by its rounding, relative to the output scale."""
    ref = nf4_matmul_ref(x.float(), packed, state, None if bias is None else bias.float())
    err = (out.float() - ref).abs().max() / ref.abs().max().clamp_min(1e-6)
    # (the interpreter rounds fp32 -> bf16 toward zero, the GPU to nearest: half weights allow half rounding)
    exact = out.dtype == torch.float32 and state.dtype == torch.float32
    assert err < (1e-5 if exact else 1e-2), float(err)


def _quantized(n, k, device, quant_type="nf4", nested=True, blocksize=64, dtype=torch.bfloat16):
    w = torch.randn(n, k, device=device, dtype=torch.float32).to(dtype)
    packed, state = bnbf.quantize_4bit(w, blocksize=blocksize, quant_type=quant_type, compress_statistics=nested)
    return packed, state


@pytest.mark.parametrize("m", [1, 3, 8, MAX_ROWS])
@pytest.mark.parametrize("n,k", [(32, 64), (96, 192), (200, 256)])
@pytest.mark.parametrize("quant_type,nested", [("nf4", True), ("nf4", False), ("fp4", True)])
def test_matches_dequantize_then_linear(m, n, k, quant_type, nested, device):
    packed, state = _quantized(n, k, device, quant_type, nested)
    x = torch.randn(m, k, device=device, dtype=torch.bfloat16)
    assert supports(x, packed, state)
    out = nf4_matmul(x, packed, state)
    assert out.shape == (m, n) and out.dtype == x.dtype
    _assert_matmul_close(out, x, packed, state)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_dtypes_bias_and_batch_shape(dtype, device):
    packed, state = _quantized(64, 128, device)
    x = torch.randn(2, 3, 128, device=device, dtype=dtype)  # [batch, tokens, in]: 6 rows
    bias = torch.randn(64, device=device, dtype=torch.bfloat16)
    out = nf4_matmul(x, packed, state, bias)
    assert out.shape == (2, 3, 64) and out.dtype == dtype
    _assert_matmul_close(out, x, packed, state, bias)


@pytest.mark.parametrize("nested", [True, False])
def test_torch_fallback_dequantizes_like_bitsandbytes(nested, device):
    from hf_fastvision.kernels.nf4_matmul import _dequantize_torch, layer_args

    packed, state = _quantized(48, 128, device, nested=nested)
    args = layer_args(packed, state)
    w = _dequantize_torch(*args, torch.float32)
    torch.testing.assert_close(w, bnbf.dequantize_4bit(packed, state).float(), rtol=0, atol=0)


def test_a_kernel_failure_falls_back_to_dequantize_and_matmul(device, monkeypatch):
    import hf_fastvision.kernels.nf4_matmul as op

    def broken(*args):
        raise RuntimeError("triton cannot compile this here")

    monkeypatch.setattr(op, "_launch", broken)
    monkeypatch.setattr(op, "_FAILED", {})
    packed, state = _quantized(64, 128, device)
    x = torch.randn(3, 128, device=device, dtype=torch.bfloat16)
    _assert_matmul_close(nf4_matmul(x, packed, state), x, packed, state)
    assert "cannot compile" in op._FAILED["reason"]


def test_fp32_weights_are_exact(device):
    packed, state = _quantized(64, 128, device, dtype=torch.float32)
    x = torch.randn(5, 128, device=device)
    _assert_matmul_close(nf4_matmul(x, packed, state), x, packed, state)


def test_larger_blocksize(device):
    packed, state = _quantized(48, 512, device, blocksize=256)
    x = torch.randn(4, 512, device=device, dtype=torch.bfloat16)
    _assert_matmul_close(nf4_matmul(x, packed, state), x, packed, state)


def test_many_rows_and_odd_shapes_take_the_reference(device):
    packed, state = _quantized(32, 64, device)
    assert not supports(torch.randn(MAX_ROWS + 1, 64, device=device), packed, state)
    odd_packed, odd_state = _quantized(16, 96, device, blocksize=64)  # 96 is not a multiple of the block size
    x = torch.randn(2, 96, device=device)
    assert not supports(x, odd_packed, odd_state)
    torch.testing.assert_close(nf4_matmul(x, odd_packed, odd_state), nf4_matmul_ref(x, odd_packed, odd_state))


def test_decode_kernels_keep_greedy_generation_identical(tiny_checkpoint, monkeypatch):
    """Bound onto a tiny 4-bit model's linears, decode steps go through the kernel and greedy tokens are unchanged."""
    import hf_fastvision.kernels.nf4_matmul as op
    from hf_fastvision import FastVisionModel
    from hf_fastvision.archs.tiny import sample_batch
    from hf_fastvision.inference.decode_kernels import bind_decode_kernels, decode_kernels_bound, unbind_decode_kernels

    model, processor = FastVisionModel.from_pretrained(str(tiny_checkpoint("qwen2_5_vl")), max_seq_length=256)
    FastVisionModel.for_inference(model)
    batch = sample_batch(processor, "qwen2_5_vl", 2, with_labels=False)
    kwargs = dict(max_new_tokens=6, do_sample=False, min_new_tokens=6)
    ref = model.generate(**batch, **kwargs)
    launches = []
    real = op._launch
    monkeypatch.setattr(op, "_launch", lambda *a: launches.append(a[0].shape[0]) or real(*a))
    if model.device.type == "cpu":
        assert bind_decode_kernels(model) == 0  # CPU weights: nothing to do outside tests
        assert decode_kernels_bound(model) == 0
    n = bind_decode_kernels(model, force=True)
    assert n == decode_kernels_bound(model) > 0
    out = model.generate(**batch, **kwargs)
    assert launches and max(launches) <= op.MAX_ROWS  # decode steps (2 rows) ran the kernel; prefill did not
    assert torch.equal(out, ref)
    assert unbind_decode_kernels(model) == n and decode_kernels_bound(model) == 0


def test_bound_layer_traces_into_one_graph(device):
    """The decode step is compiled with fullgraph=True by transformers: the bound forward must not graph-break."""
    import bitsandbytes as bnb

    from hf_fastvision.inference.decode_kernels import bind_decode_kernels

    layer = bnb.nn.Linear4bit(128, 64, bias=True, compute_dtype=torch.bfloat16, quant_type="nf4")
    layer.load_state_dict(torch.nn.Linear(128, 64).state_dict())
    layer = layer.to(device)  # quantizes (CPU and CUDA backends of bitsandbytes)
    layer.eval()
    x = torch.randn(4, 128, device=device, dtype=torch.bfloat16)
    expected = layer(x)  # bitsandbytes' own forward
    assert bind_decode_kernels(layer, force=True) == 1
    compiled = torch.compile(lambda t: layer(t), fullgraph=True, backend="eager")
    out = compiled(x)
    torch.testing.assert_close(out.float(), expected.float(), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("n,k,wanted", [(3584, 3584, 528), (18944, 3584, 528), (3584, 18944, 528), (512, 3584, 528),
                                        (64, 64, 16), (48, 512, 16)])
def test_split_k_plan_covers_k_in_block_multiples(n, k, wanted):
    """K is cut into equal ranges of whole K-steps that cover it, enough of them to reach ~`wanted` programs."""
    from hf_fastvision.kernels.nf4_matmul import _split_k

    block_n, block_k = 64, 64
    splits, per = _split_k(n, k, block_n, block_k, wanted)
    assert per % block_k == 0 and splits * per >= k and (splits - 1) * per < k  # no empty split
    columns, steps = -(-n // block_n), -(-k // block_k)
    assert columns * splits >= 0.75 * min(wanted, columns * steps)  # rounding to whole K-steps may lose a few
