"""Mllama's text cross-attention split (patch flag `cross_attention_split`, on by default): the compact mask stands for
the stock one exactly, the split equals masked SDPA, and a patched tiny model trains like the stock one."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hf_fastvision import FastVisionModel
from hf_fastvision.archs._mllama_cross_attention import compact_cross_mask, expand, split_cross_attention
from hf_fastvision.archs._mllama_vision_attention import varlen_reference
from hf_fastvision.archs.tiny import lora_step
from hf_fastvision.patching import patched_modules

TOKENS = 3  # vision tokens per tile (1601 in Llama 3.2 Vision)


def _stock_mask(tile_mask: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """transformers' own `_prepare_cross_attention_mask` from a processor-style `[B, S, images, tiles]` mask."""
    from transformers.models.mllama.modeling_mllama import _prepare_cross_attention_mask

    mask, _ = _prepare_cross_attention_mask(tile_mask, num_vision_tokens=TOKENS, dtype=dtype)
    return mask


def _one_image(rows: int, tiles: int, starts: list[int], real: list[int]) -> torch.Tensor:
    m = torch.zeros(len(starts), rows, 1, tiles, dtype=torch.long)
    for b, (s, r) in enumerate(zip(starts, real)):
        m[b, s:, 0, :r] = 1
    return m


@pytest.mark.parametrize("starts,real", [([0], [1]), ([3, 5], [1, 4]), ([7], [2]), ([2, 0], [4, 3])])
def test_one_image_masks_compact_exactly(starts, real):
    rows, tiles = 9, 4
    mask = _stock_mask(_one_image(rows, tiles, starts, real))
    compact = compact_cross_mask(mask)
    assert compact is not None and compact.dtype == torch.int32
    # rows before the image see every key (transformers zeroes fully masked rows); with all tiles real so do the
    # rows after it, and the whole sample is "all rows see all keys"
    assert compact.tolist() == [[s if r < tiles else rows, r * TOKENS] for s, r in zip(starts, real)]
    assert torch.equal(expand(compact, rows, tiles * TOKENS, mask.dtype), mask)


def test_other_masks_are_left_alone():
    two = torch.zeros(1, 6, 2, 2, dtype=torch.long)
    two[0, 1:, 0, :1] = 1
    two[0, 4:, 1, :2] = 1  # a second image: rows after it see a non-prefix set
    assert compact_cross_mask(_stock_mask(two)) is None
    assert compact_cross_mask(torch.randn(1, 1, 4, 6)) is None  # not a 0 / min mask
    assert compact_cross_mask(torch.zeros(1, 4, 6)) is None  # not 4-D


@pytest.mark.parametrize("heads,kv_heads,gqa_kernel", [(4, 4, True), (4, 2, True), (4, 2, False)])
def test_split_equals_masked_sdpa_forward_and_backward(heads, kv_heads, gqa_kernel):
    """With a kernel taking `enable_gqa` the kv heads are shared by the kernel, else repeated per query head."""
    torch.manual_seed(0)
    rows, tiles, dim = 9, 4, 8
    mask = _stock_mask(_one_image(rows, tiles, [3, 0], [1, 3]))
    q = torch.randn(2, heads, rows, dim, requires_grad=True)
    k = torch.randn(2, kv_heads, tiles * TOKENS, dim, requires_grad=True)
    v = torch.randn(2, kv_heads, tiles * TOKENS, dim, requires_grad=True)
    rep = heads // kv_heads
    ref = F.scaled_dot_product_attention(q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1), attn_mask=mask,
                                         scale=0.3).transpose(1, 2)
    seen_kv_heads = []

    def no_gqa(q_, k_, v_, cu_q, cu_k, max_q, max_k, *, scale=None):  # a varlen_attn without enable_gqa
        seen_kv_heads.append(k_.shape[1])
        return varlen_reference(q_, k_, v_, cu_q, cu_k, max_q, max_k, scale=scale)

    def with_gqa(q_, k_, v_, cu_q, cu_k, max_q, max_k, *, scale=None, enable_gqa=False):
        seen_kv_heads.append(k_.shape[1])
        return varlen_reference(q_, k_, v_, cu_q, cu_k, max_q, max_k, scale=scale, enable_gqa=enable_gqa)

    got = split_cross_attention(q, k, v, compact_cross_mask(mask), 0.3, varlen=with_gqa if gqa_kernel else no_gqa)
    assert seen_kv_heads == [kv_heads if gqa_kernel else heads]
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    g = torch.randn_like(ref)
    ref_grads = torch.autograd.grad(ref, [q, k, v], g)
    got_grads = torch.autograd.grad(got, [q, k, v], g)
    for a, b in zip(got_grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_patched_tiny_mllama_trains_like_stock(tiny_checkpoint, monkeypatch):
    import hf_fastvision.archs._mllama_cross_attention as ca

    monkeypatch.setattr(ca, "_varlen_kernel", lambda device: varlen_reference)
    calls = []
    real_split = ca.split_cross_attention
    monkeypatch.setattr(ca, "split_cross_attention", lambda *a, **k: calls.append(1) or real_split(*a, **k))
    folder = str(tiny_checkpoint("mllama"))
    split, loss_s, grads_s = lora_step(folder, "mllama", {"cross_attention_split": True}, dtype=torch.float32)
    stock, loss_r, grads_r = lora_step(folder, "mllama", {"cross_attention_split": False}, dtype=torch.float32)
    kinds = patched_modules(split)
    assert "cross_attention_split" in kinds.values() and "cross_attention_split" not in patched_modules(stock).values()
    assert calls, "the split path must really run"
    torch.testing.assert_close(loss_s, loss_r, rtol=1e-5, atol=1e-6)
    assert set(grads_s) == set(grads_r) and [n for n in grads_r if "language_model" in n and "cross_attn" in n]
    for n, g in grads_r.items():
        torch.testing.assert_close(grads_s[n], g, rtol=1e-4, atol=1e-6, msg=n)


def test_on_by_default_counted_and_off_on_request(tiny_checkpoint):
    from hf_fastvision.patching import apply_patches, unpatch

    folder = str(tiny_checkpoint("mllama"))
    model, _ = FastVisionModel.from_pretrained(folder, load_in_4bit=True, dtype=torch.float32)
    n_cross = sum(type(m).__name__ == "MllamaTextCrossAttention" for m in model.modules())
    kinds = patched_modules(model)
    assert kinds["model.language_model"] == "cross_attention_split"  # the text model hands out the compact mask
    assert list(kinds.values()).count("cross_attention_split") == n_cross + 1 > 1
    unpatch(model)
    assert apply_patches(model, options={"cross_attention_split": False})["cross_attention"] == 0
    assert "cross_attention_split" not in patched_modules(model).values()
    unpatch(model)
    assert apply_patches(model)["cross_attention"] == n_cross


def test_a_compact_mask_in_a_call_the_split_does_not_cover_runs_stock_exactly(tiny_checkpoint, monkeypatch):
    import hf_fastvision.archs._mllama_cross_attention as ca
    from hf_fastvision.patching import original_forward

    model, _ = FastVisionModel.from_pretrained(str(tiny_checkpoint("mllama")), load_in_4bit=True,
                                               dtype=torch.float32, patches={"cross_attention_split": True})
    attn = next(m for m in model.modules() if type(m).__name__ == "MllamaTextCrossAttention")
    rows, tiles = 7, 2
    tokens = model.config.vision_config.image_size // model.config.vision_config.patch_size
    tokens = tokens * tokens + 1  # vision tokens per tile (patches + class token)
    hidden = torch.randn(2, rows, attn.hidden_size)
    states = torch.randn(2 * tiles, tokens, attn.hidden_size)  # [B * images * tiles, tokens, hidden]
    tile_mask = torch.zeros(2, rows, 1, tiles, dtype=torch.long)
    tile_mask[0, 2:, 0, :1] = 1
    tile_mask[1, 0:, 0, :2] = 1
    from transformers.models.mllama.modeling_mllama import _prepare_cross_attention_mask

    mask = _prepare_cross_attention_mask(tile_mask, num_vision_tokens=tokens, dtype=torch.float32)[0]
    compact = compact_cross_mask(mask)
    assert compact is not None
    monkeypatch.setattr(ca, "_attention_dtype", lambda t: None)  # as for fp32 on CUDA: the split cannot run
    with torch.no_grad():
        got = attn(hidden_states=hidden, cross_attention_states=states, attention_mask=compact)[0]
        ref = original_forward(attn)(hidden_states=hidden, cross_attention_states=states, attention_mask=mask)[0]
    assert torch.equal(got, ref)


@pytest.mark.parametrize("rows,starts,real", [(9, [3, 0], [1, 1]), (80, [70], [2]), (9, [0], [4]), (9, [2, 5], [3, 3])])
@pytest.mark.parametrize("kv_heads", [4, 2])
def test_the_dense_split_equals_masked_sdpa_forward_and_backward(rows, starts, real, kv_heads):
    """Every sample sees the same K keys from its image token on: dense calls of host-known shapes (K, P)."""
    from hf_fastvision.archs._mllama_cross_attention import _unpack, head_rows, with_dense_shape

    torch.manual_seed(1)
    tiles, heads, dim = 4, 4, 8
    mask = _stock_mask(_one_image(rows, tiles, starts, real))
    compact = compact_cross_mask(mask)
    packed, shape = _unpack(with_dense_shape(compact, rows, tiles * TOKENS))
    assert packed is compact and shape is not None
    k_seen, head = shape.tolist()
    assert k_seen == real[0] * TOKENS
    p_max = max(p for p, _ in compact.tolist())
    assert head == (0 if real[0] == tiles else head_rows(p_max, rows)) and (head == 0 or p_max <= head <= rows)
    q = torch.randn(len(starts), heads, rows, dim, requires_grad=True)
    k = torch.randn(len(starts), kv_heads, tiles * TOKENS, dim, requires_grad=True)
    v = torch.randn(len(starts), kv_heads, tiles * TOKENS, dim, requires_grad=True)
    rep = heads // kv_heads
    ref = F.scaled_dot_product_attention(q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1), attn_mask=mask,
                                         scale=0.3).transpose(1, 2)
    got = split_cross_attention(q, k, v, compact, 0.3, dense=(k_seen, head))
    assert got.is_contiguous() or not head  # joined in [B, S, H, D] order: the caller's flatten copies nothing
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    g = torch.randn_like(ref)
    for a, b in zip(torch.autograd.grad(got, [q, k, v], g), torch.autograd.grad(ref, [q, k, v], g)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_dense_shape_needs_one_key_count_and_buckets_the_head_rows():
    from hf_fastvision.archs._mllama_cross_attention import head_rows, is_compact, with_dense_shape

    mixed = compact_cross_mask(_stock_mask(_one_image(9, 4, [1, 2], [1, 2])))
    assert with_dense_shape(mixed, 9, 4 * TOKENS) is mixed and is_compact(mixed)  # K differs: the varlen call
    assert [head_rows(p, 4096) for p in (0, 1, 63, 64, 65, 300, 5000)] == [0, 64, 64, 64, 128, 512, 4096]
    assert head_rows(10, 20) == 20
    assert is_compact(with_dense_shape(compact_cross_mask(_stock_mask(_one_image(9, 4, [1], [1]))), 9, 12))
    assert not is_compact((mixed, torch.zeros(3, dtype=torch.int32))) and not is_compact((mixed,))


@pytest.mark.parametrize("flag,n,path", [(True, 1, "dense"), ("varlen", 1, "varlen"), (True, 2, "varlen")])
def test_the_model_takes_the_dense_path_for_one_key_count(tiny_checkpoint, monkeypatch, flag, n, path):
    """One sample: dense calls (unless asked for varlen), also in the vision tower; the tiny batch of two has
    images of different tile counts: the varlen calls."""
    import hf_fastvision.archs._mllama_cross_attention as ca
    import hf_fastvision.archs._mllama_vision_attention as va

    monkeypatch.setattr(ca, "_varlen_kernel", lambda device: varlen_reference)
    paths, vision = [], []
    real_split, real_dense = ca.split_cross_attention, va.dense_split_attention
    monkeypatch.setattr(ca, "split_cross_attention",
                        lambda *a, **k: paths.append("dense" if k.get("dense") else "varlen") or real_split(*a, **k))
    monkeypatch.setattr(va, "dense_split_attention", lambda *a, **k: vision.append(1) or real_dense(*a, **k))
    folder = str(tiny_checkpoint("mllama"))
    patches = {"cross_attention_split": flag, "vision_attention_split": flag}
    _, loss_s, grads_s = lora_step(folder, "mllama", patches, dtype=torch.float32, samples=n)
    _, loss_r, grads_r = lora_step(folder, "mllama", {"cross_attention_split": False,
                                                      "vision_attention_split": False}, dtype=torch.float32, samples=n)
    assert paths and set(paths) == {path}
    assert bool(vision) == (path == "dense")
    torch.testing.assert_close(loss_s, loss_r, rtol=1e-5, atol=1e-6)
    for n, g in grads_r.items():
        torch.testing.assert_close(grads_s[n], g, rtol=1e-4, atol=1e-6, msg=n)
