"""Mllama's split vision attention on CUDA (GPU machine): torch's flash varlen kernel == the masked SDPA call, with
gradients, at the real head size, and the forward can be captured in a CUDA graph (no host sync)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hf_fastvision.archs._mllama_vision_attention import split_attention, vision_mask

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _case(valid_tiles, patches=200, padded=7, heads=4, dim=80):
    mask, real = vision_mask(valid_tiles, 4, patches, padded, torch.bfloat16, "cuda")
    g = torch.Generator(device="cuda").manual_seed(0)
    qkv = [torch.randn(len(valid_tiles), heads, real.shape[1], dim, device="cuda", dtype=torch.bfloat16, generator=g)
           for _ in range(3)]
    return qkv, mask, real, dim**-0.5


@pytest.mark.parametrize("valid_tiles", [[1], [4], [1, 3], [0, 2]])
def test_varlen_split_equals_masked_sdpa(valid_tiles):
    pytest.importorskip("torch.nn.attention.varlen")
    (q, k, v), mask, real, scale = _case(valid_tiles)
    q, k, v = (t.requires_grad_(True) for t in (q, k, v))
    ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask.float(), scale=scale)
    got = split_attention(q, k, v, real, scale)
    # an image without a real patch: CUDA's fused SDPA kernels disagree with the math definition there (some give 0
    # for rows that are all `min`), and such an image never reaches the loss; compare the images that have patches
    some = real.any(-1)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.float()[some], ref[some], rtol=2e-2, atol=2e-2)
    grad = torch.randn_like(ref)
    ref_grads = torch.autograd.grad(ref, (q, k, v), grad)
    got_grads = torch.autograd.grad(got.float(), (q, k, v), grad)
    for a, b in zip(got_grads, ref_grads):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a.float()[some], b.float()[some], rtol=5e-2, atol=5e-2)


def test_varlen_split_captures_in_a_cuda_graph():
    pytest.importorskip("torch.nn.attention.varlen")
    (q, k, v), _mask, real, scale = _case([2])
    expected = split_attention(q, k, v, real, scale)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = split_attention(q, k, v, real, scale)
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(out, expected)
