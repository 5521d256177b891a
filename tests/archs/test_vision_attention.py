"""Qwen-VL vision attention: equal-length chunks in one SDPA call == transformers' one call per chunk."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hf_fastvision import AutoFastVisionModel
from hf_fastvision.archs.tiny import sample_batch, tiny_processor
from hf_fastvision.patching import patched_modules, unpatched

QWEN = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")


def _attention_module(model):
    return next(m for n, m in model.named_modules() if n.startswith("model.visual") and type(m).__name__.endswith("VisionAttention"))


def _count_sdpa(monkeypatch) -> list[int]:
    calls = []
    real = F.scaled_dot_product_attention

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", counting)
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", counting)
    return calls


@pytest.mark.parametrize("name", QWEN)
@pytest.mark.parametrize("lengths", [[4, 4, 4, 4], [4, 6, 4, 2, 6, 1], [9]])
def test_grouped_equals_per_chunk(name, lengths, tiny_checkpoint, monkeypatch):
    model = AutoFastVisionModel.from_pretrained(tiny_checkpoint(name), load_in_16bit=True, dtype=torch.float32)
    attn = _attention_module(model)
    assert patched_modules(model).get(next(n for n, m in model.named_modules() if m is attn)) == "vision_attention"
    torch.manual_seed(0)
    seq = sum(lengths)
    dim = attn.qkv.in_features
    head_dim = dim // attn.num_heads
    x = torch.randn(seq, dim, requires_grad=True)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    emb = torch.randn(seq, head_dim)
    pos = (emb.cos(), emb.sin())
    calls = _count_sdpa(monkeypatch)
    out = attn(x, cu_seqlens=cu, position_embeddings=pos)
    assert len(calls) == len(set(lengths))  # one call per distinct length
    (g_fast,) = torch.autograd.grad(out.square().sum(), x)
    with unpatched(model):
        ref = attn(x, cu_seqlens=cu, position_embeddings=pos)
    (g_ref,) = torch.autograd.grad(ref.square().sum(), x)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g_fast, g_ref, rtol=1e-4, atol=1e-5)


def test_non_sdpa_implementation_runs_the_stock_forward(tiny_checkpoint, monkeypatch):
    model = AutoFastVisionModel.from_pretrained(tiny_checkpoint("qwen2_5_vl"), load_in_16bit=True, dtype=torch.float32)
    attn = _attention_module(model)
    attn.config._attn_implementation = "eager"
    try:
        calls = _count_sdpa(monkeypatch)
        seq, dim = 8, attn.qkv.in_features
        emb = torch.randn(seq, dim // attn.num_heads)
        attn(torch.randn(seq, dim), cu_seqlens=torch.tensor([0, 4, 8], dtype=torch.int32),
             position_embeddings=(emb.cos(), emb.sin()))
        assert not calls
    finally:
        attn.config._attn_implementation = "sdpa"


def test_whole_model_windowed_batch_matches(tiny_checkpoint):
    """Two images of different sizes (windows of several lengths) through the whole 4-bit-free model."""
    folder = tiny_checkpoint("qwen2_5_vl")
    model = AutoFastVisionModel.from_pretrained(folder, load_in_16bit=True, dtype=torch.float32)
    batch = sample_batch(tiny_processor("qwen2_5_vl"), "qwen2_5_vl", n=2)
    model.train()
    loss = model(**batch).loss
    with unpatched(model):
        ref = model(**batch).loss
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
