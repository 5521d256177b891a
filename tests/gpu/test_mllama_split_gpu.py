"""Mllama's split attention on CUDA (GPU machine): torch's flash varlen kernel and the dense SDPA calls (vision and
text cross-attention) == the masked SDPA call, with gradients, at the real head size, and each can be captured in a
CUDA graph (no host sync)."""

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


def _dense_vision(q, k, v, real, n_real, scale):  # n_real: known on the host (no sync inside the capture)
    from hf_fastvision.archs._mllama_vision_attention import dense_split_attention, real_first

    perm, inv = real_first(real)
    rows = [torch.take_along_dim(t.transpose(1, 2), perm[:, :, None, None], dim=1) for t in (q, k, v)]
    out = dense_split_attention(*rows, n_real, scale)
    return torch.take_along_dim(out, inv[:, :, None, None], dim=1).transpose(1, 2)


@pytest.mark.parametrize("valid_tiles", [[1], [4], [2, 2]])
def test_dense_vision_split_equals_masked_sdpa_and_captures(valid_tiles):
    (q, k, v), mask, real, scale = _case(valid_tiles)
    q, k, v = (t.requires_grad_(True) for t in (q, k, v))
    ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask.float(), scale=scale)
    n_real = int(real.sum(-1)[0])
    got = _dense_vision(q, k, v, real, n_real, scale)
    torch.testing.assert_close(got.float(), ref, rtol=2e-2, atol=2e-2)
    grad = torch.randn_like(ref)
    for a, b in zip(torch.autograd.grad(got.float(), (q, k, v), grad), torch.autograd.grad(ref, (q, k, v), grad)):
        torch.testing.assert_close(a.float(), b.float(), rtol=5e-2, atol=5e-2)
    with torch.no_grad():
        expected = _dense_vision(q, k, v, real, n_real, scale)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = _dense_vision(q, k, v, real, n_real, scale)
        graph.replay()
        torch.cuda.synchronize()
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("start,real_tiles", [(5, 1), (150, 2)])
def test_dense_cross_attention_equals_masked_sdpa_and_captures(start, real_tiles):
    from transformers.models.mllama.modeling_mllama import _prepare_cross_attention_mask

    from hf_fastvision.archs._mllama_cross_attention import compact_cross_mask, split_cross_attention, with_dense_shape

    rows, tiles, tokens, heads, kv_heads, dim = 512, 4, 201, 8, 2, 128
    tile_mask = torch.zeros(1, rows, 1, tiles, dtype=torch.long, device="cuda")
    tile_mask[0, start:, 0, :real_tiles] = 1
    mask, _ = _prepare_cross_attention_mask(tile_mask, num_vision_tokens=tokens, dtype=torch.bfloat16)
    compact = compact_cross_mask(mask)
    _, shape = with_dense_shape(compact, rows, tiles * tokens)
    dense = tuple(shape.tolist())
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(1, heads, rows, dim, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_(True)
    k, v = (torch.randn(1, kv_heads, tiles * tokens, dim, device="cuda", dtype=torch.bfloat16, generator=g)
            .requires_grad_(True) for _ in range(2))
    rep = heads // kv_heads
    ref = F.scaled_dot_product_attention(q.float(), k.float().repeat_interleave(rep, 1),
                                         v.float().repeat_interleave(rep, 1), attn_mask=mask.float(),
                                         scale=dim**-0.5).transpose(1, 2)
    got = split_cross_attention(q, k, v, compact, dim**-0.5, dense=dense)
    torch.testing.assert_close(got.float(), ref, rtol=2e-2, atol=2e-2)
    grad = torch.randn_like(ref)
    for a, b in zip(torch.autograd.grad(got.float(), (q, k, v), grad), torch.autograd.grad(ref, (q, k, v), grad)):
        torch.testing.assert_close(a.float(), b.float(), rtol=5e-2, atol=5e-2)
    with torch.no_grad():
        expected = split_cross_attention(q, k, v, compact, dim**-0.5, dense=dense)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = split_cross_attention(q, k, v, compact, dim**-0.5, dense=dense)
        graph.replay()
        torch.cuda.synchronize()
    torch.testing.assert_close(out, expected)
