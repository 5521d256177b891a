"""Mllama's text cross-attention split on CUDA (GPU machine): torch's flash varlen kernel == masked SDPA at the
real head layout (32 query / 8 kv heads, dim 128), with gradients, and the call captures in a CUDA graph."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hf_fastvision.archs._mllama_cross_attention import compact_cross_mask, split_cross_attention

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

TOKENS = 64  # vision tokens per tile (1601 on the real model; smaller keeps the test quick)


def _mask(rows, tiles, starts, real):
    from transformers.models.mllama.modeling_mllama import _prepare_cross_attention_mask

    m = torch.zeros(len(starts), rows, 1, tiles, dtype=torch.long, device="cuda")
    for b, (s, r) in enumerate(zip(starts, real)):
        m[b, s:, 0, :r] = 1
    return _prepare_cross_attention_mask(m, num_vision_tokens=TOKENS, dtype=torch.bfloat16)[0]


@pytest.mark.parametrize("starts,real", [([5], [1]), ([0, 17], [2, 4]), ([30], [3])])
def test_varlen_cross_split_equals_masked_sdpa(starts, real):
    pytest.importorskip("torch.nn.attention.varlen")
    rows, tiles, heads, kv_heads, dim = 96, 4, 32, 8, 128
    mask = _mask(rows, tiles, starts, real)
    compact = compact_cross_mask(mask)
    assert compact is not None
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(len(starts), heads, rows, dim, device="cuda", dtype=torch.bfloat16, generator=g)
    k, v = (torch.randn(len(starts), kv_heads, tiles * TOKENS, dim, device="cuda", dtype=torch.bfloat16, generator=g)
            for _ in range(2))
    q, k, v = (t.requires_grad_(True) for t in (q, k, v))
    rep = heads // kv_heads
    ref = F.scaled_dot_product_attention(q.float(), k.float().repeat_interleave(rep, 1),
                                         v.float().repeat_interleave(rep, 1), attn_mask=mask.float(),
                                         scale=dim**-0.5).transpose(1, 2)
    got = split_cross_attention(q, k, v, compact, dim**-0.5)
    torch.testing.assert_close(got.float(), ref, rtol=2e-2, atol=2e-2)
    grad = torch.randn_like(ref)
    for a, b in zip(torch.autograd.grad(got.float(), (q, k, v), grad), torch.autograd.grad(ref, (q, k, v), grad)):
        torch.testing.assert_close(a.float(), b.float(), rtol=5e-2, atol=5e-2)


def test_cross_split_captures_in_a_cuda_graph():
    pytest.importorskip("torch.nn.attention.varlen")
    mask = _mask(64, 4, [7], [2])
    compact = compact_cross_mask(mask)
    q = torch.randn(1, 8, 64, 64, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, 2, 4 * TOKENS, 64, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    eager = split_cross_attention(q, k, v, compact, 0.125)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        split_cross_attention(q, k, v, compact, 0.125)  # warm-up on the capture stream
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = split_cross_attention(q, k, v, compact, 0.125)
    graph.replay()
    torch.testing.assert_close(out, eager, rtol=0, atol=0)
