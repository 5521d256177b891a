"""Mllama vision attention as an exact maskless split (`vision_attention_split`, on by default) == masked SDPA."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hf_fastvision import AutoFastVisionModel
from hf_fastvision.archs._mllama_vision_attention import (
    _attention_dtype,
    split_attention,
    varlen_reference,
    vision_mask,
)
from hf_fastvision.archs.tiny import sample_batch, tiny_processor
from hf_fastvision.patching import patched_modules


@pytest.mark.parametrize("valid_tiles", [[1], [4], [1, 3], [2, 0]])
def test_split_equals_masked_sdpa_with_gradients(valid_tiles):
    mask, real = vision_mask(valid_tiles, tiles=4, patches=9, padded=3)
    length = real.shape[1]
    torch.manual_seed(0)
    q, k, v = (torch.randn(len(valid_tiles), 2, length, 8, requires_grad=True) for _ in range(3))
    scale = 8**-0.5
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    got = split_attention(q, k, v, real, scale, varlen_reference)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)  # [2, 0]: an image without a real patch too
    grad = torch.randn_like(ref)
    # an image without a real patch: same forward (uniform attention), but its q/k gradients differ (the stock
    # softmax Jacobian at a uniform distribution vs none); in Mllama such an image never reaches the loss (the
    # cross-attention mask drops it), so its outputs get no gradient
    grad[torch.tensor(valid_tiles) == 0] = 0.0
    ref_grads = torch.autograd.grad(ref, (q, k, v), grad)
    got_grads = torch.autograd.grad(got, (q, k, v), grad)
    for a, b in zip(got_grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def _attention_modules(model):
    return [m for n, m in model.named_modules() if type(m).__name__ == "MllamaVisionAttention"]


def test_patch_is_on_by_default_and_exact_on_tiny_mllama(tiny_checkpoint):
    folder = tiny_checkpoint("mllama")
    stock = AutoFastVisionModel.from_pretrained(folder, load_in_16bit=True, dtype=torch.float32,
                                                patches={"vision_attention_split": False})
    assert not any(patched_modules(stock).get(n) for n, m in stock.named_modules()
                   if type(m).__name__ == "MllamaVisionAttention"), "the flag turns it off"
    split = AutoFastVisionModel.from_pretrained(folder, load_in_16bit=True, dtype=torch.float32)
    names = {n for n, m in split.named_modules() if type(m).__name__ == "MllamaVisionAttention"}
    assert names and all(patched_modules(split).get(n) == "vision_attention" for n in names)
    batch = sample_batch(tiny_processor("mllama"), "mllama", n=2)
    out_stock, out_split = stock(**batch), split(**batch)
    torch.testing.assert_close(out_split.logits, out_stock.logits, rtol=1e-4, atol=1e-5)
    out_stock.loss.backward()
    out_split.loss.backward()
    grads = {n: p.grad for n, p in stock.named_parameters() if p.grad is not None and "vision_model" in n}
    assert grads
    for n, p in split.named_parameters():
        if n in grads:
            torch.testing.assert_close(p.grad, grads[n], rtol=1e-3, atol=1e-5, msg=n)
    assert all(m.__dict__.get("_hffv_split_mask_ok") for m in _attention_modules(split))  # the form was checked


def test_mask_of_another_form_runs_the_stock_forward(tiny_checkpoint):
    model = AutoFastVisionModel.from_pretrained(tiny_checkpoint("mllama"), load_in_16bit=True, dtype=torch.float32,
                                                patches={"vision_attention_split": True})
    attn = _attention_modules(model)[0]
    torch.manual_seed(0)
    hidden = torch.randn(1, 12, attn.q_proj.in_features)
    causal = torch.triu(torch.full((12, 12), torch.finfo(torch.float32).min), 1)[None, None]
    expected = type(attn).forward(attn, hidden, attention_mask=causal)[0]
    torch.testing.assert_close(attn(hidden, attention_mask=causal)[0], expected)
    assert attn.__dict__["_hffv_split_mask_ok"] is False


def test_attention_runs_in_the_dtype_autocast_gives_sdpa(tiny_checkpoint):
    """varlen_attn has no autocast rule: the split casts q/k/v as SDPA's rule would (on CUDA the flash kernel takes
    16-bit only), so under bf16 autocast it matches the stock forward under the same autocast."""
    model = AutoFastVisionModel.from_pretrained(tiny_checkpoint("mllama"), load_in_16bit=True, dtype=torch.float32)
    attn = _attention_modules(model)[0]
    mask, _real = vision_mask([1, 3], tiles=4, patches=5, padded=2)
    torch.manual_seed(0)
    hidden = torch.randn(2, mask.shape[-1], attn.q_proj.in_features)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = type(attn).forward(attn, hidden, attention_mask=mask)[0]
        got = attn(hidden, attention_mask=mask)[0]
    assert attn.__dict__["_hffv_split_mask_ok"] is True  # the split ran, not the fallback
    assert got.dtype == expected.dtype == torch.bfloat16
    x = torch.zeros(2, 3)
    assert _attention_dtype(x) == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert _attention_dtype(x) == torch.bfloat16
    torch.testing.assert_close(got.float(), expected.float(), rtol=2e-2, atol=2e-2)


def test_a_varlen_attn_without_scale_gets_the_scale_folded_into_q(monkeypatch):
    """torch releases whose ``varlen_attn`` has no ``scale=`` (1/sqrt(dim) only) still compute Mllama's scale."""
    import torch.nn.attention.varlen as varlen_module

    from hf_fastvision.archs import _mllama_vision_attention as mva

    def early_varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k):
        return varlen_reference(q, k, v, cu_q, cu_k, max_q, max_k)  # its default scale: 1/sqrt(dim)

    monkeypatch.setattr(varlen_module, "varlen_attn", early_varlen_attn)
    kernel = mva._cuda_varlen.__wrapped__()
    assert kernel is not early_varlen_attn
    mask, real = vision_mask([1, 3], tiles=4, patches=5, padded=2)
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 2, real.shape[1], 8) for _ in range(3))
    for scale in (8**-0.5, 0.3):
        ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
        torch.testing.assert_close(split_attention(q, k, v, real, scale, kernel), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("valid_tiles", [[1], [4], [2, 2], [0]])
def test_the_dense_split_equals_masked_sdpa_with_gradients(valid_tiles):
    """The two dense calls (every image with the same count of real patches) compute the masked call too."""
    from hf_fastvision.archs._mllama_vision_attention import dense_split_attention, real_first

    mask, real = vision_mask(valid_tiles, tiles=4, patches=9, padded=3)
    n_real = {int(n) for n in real.sum(-1)}.pop()
    torch.manual_seed(1)
    q, k, v = (torch.randn(len(valid_tiles), 2, real.shape[1], 8, requires_grad=True) for _ in range(3))
    scale = 8**-0.5
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    perm, inv = real_first(real)

    def rows(t):
        return torch.take_along_dim(t.transpose(1, 2), perm[:, :, None, None], dim=1)

    out = dense_split_attention(rows(q), rows(k), rows(v), n_real, scale)
    assert out.is_contiguous() or n_real in (0, real.shape[1])  # joined in [B, L, H, D] order (one call: a view)
    got = torch.take_along_dim(out, inv[:, :, None, None], dim=1).transpose(1, 2)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    if n_real:  # (no real patch: same forward, stock q/k gradients differ, see above)
        grad = torch.randn_like(ref)
        for a, b in zip(torch.autograd.grad(got, (q, k, v), grad), torch.autograd.grad(ref, (q, k, v), grad)):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("valid_tiles, dense", [([2, 2], True), ([1, 3], False)])
@pytest.mark.parametrize("flag", [True, "varlen"])
def test_the_forward_takes_the_dense_calls_only_for_equal_known_counts(tiny_checkpoint, monkeypatch, valid_tiles,
                                                                        dense, flag):
    import hf_fastvision.archs._mllama_vision_attention as va

    model = AutoFastVisionModel.from_pretrained(tiny_checkpoint("mllama"), load_in_16bit=True, dtype=torch.float32,
                                                patches={"vision_attention_split": flag})
    attn = _attention_modules(model)[0]
    calls = []
    for name in ("dense_split_attention", "varlen_reference"):
        real_fn = getattr(va, name)
        monkeypatch.setattr(va, name, lambda *a, _f=real_fn, _n=name, **k: calls.append(_n) or _f(*a, **k))
    mask, _ = vision_mask(valid_tiles, tiles=4, patches=5, padded=2)
    torch.manual_seed(0)
    hidden = torch.randn(2, mask.shape[-1], attn.q_proj.in_features)
    with torch.no_grad():
        expected = type(attn).forward(attn, hidden, attention_mask=mask)[0]
        got = attn(hidden, attention_mask=va.with_real_counts(va.compact_vision_mask(mask)))[0]
        plain = attn(hidden, attention_mask=mask)[0]  # the stock mask carries no counts: the varlen call
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(plain, expected, rtol=1e-5, atol=1e-6)
    first = "dense_split_attention" if dense and flag is True else "varlen_reference"
    assert calls == [first, "varlen_reference"]


@pytest.mark.parametrize("contiguous", [True, False])
def test_permute_rows_equals_take_along_dim_with_gradients(contiguous):
    from hf_fastvision.archs._mllama_vision_attention import permute_rows, real_first

    g = torch.Generator().manual_seed(0)
    real = torch.rand(3, 24, generator=g) > 0.4
    real[2] = False  # an image without a real patch
    perm, inv = real_first(real)
    assert torch.equal(inv, torch.argsort(perm, dim=-1))  # the scatter gives the inverse a second sort would
    assert torch.equal(torch.take_along_dim(real, perm, dim=1).sum(-1), real.sum(-1))
    for b in range(3):  # real rows first, each group in its original order
        n = int(real[b].sum())
        assert bool(real[b, perm[b, :n]].all()) and not bool(real[b, perm[b, n:]].any())
        assert torch.equal(perm[b, :n], torch.sort(perm[b, :n]).values)
        assert torch.equal(perm[b, n:], torch.sort(perm[b, n:]).values)
    base = torch.randn(3, 4, 24, 5, generator=g, dtype=torch.float64)
    x = base.transpose(1, 2) if not contiguous else base.transpose(1, 2).contiguous()  # [3, 24, 4, 5]
    x_ref = x.detach().clone().requires_grad_(True)
    x_new = x.detach().clone().requires_grad_(True)
    ref = torch.take_along_dim(x_ref, perm[:, :, None, None], dim=1)
    got = permute_rows(x_new, perm, inv)
    assert torch.equal(got, ref)
    back = permute_rows(got, inv, perm)  # and back again
    assert torch.equal(back, x_new)
    grad = torch.randn(got.shape, generator=g, dtype=torch.float64)
    ref.backward(grad)
    got.backward(grad)
    assert torch.equal(x_new.grad, x_ref.grad)


@pytest.mark.parametrize("flag", [True, "varlen"])
@pytest.mark.parametrize("fallback", [False, True])
def test_rows_already_real_first_give_the_permuted_stock_output(tiny_checkpoint, monkeypatch, flag, fallback):
    """The encoder orders the rows once (`real_first_mask`): a layer then skips its own permutation, and its split
    and stock paths both give the stock output of the stock row order, permuted the same way."""
    import hf_fastvision.archs._mllama_vision_attention as va

    model = AutoFastVisionModel.from_pretrained(tiny_checkpoint("mllama"), load_in_16bit=True, dtype=torch.float32,
                                                patches={"vision_attention_split": flag})
    attn = _attention_modules(model)[0]
    mask, real = vision_mask([1, 3], tiles=4, patches=5, padded=2)
    torch.manual_seed(0)
    hidden = torch.randn(2, mask.shape[-1], attn.q_proj.in_features, requires_grad=True)
    compact, counts = va.with_real_counts(va.compact_vision_mask(mask))
    perm, inv = va.real_first(real)
    ordered = va.real_first_mask(torch.take_along_dim(compact, perm, dim=-1), counts)
    calls = []
    monkeypatch.setattr(va, "real_first", lambda *a: calls.append("sort") or pytest.fail("the layer sorted"))
    if fallback:  # e.g. fp32 on CUDA: the stock forward on the ordered rows, with the ordered mask expanded
        monkeypatch.setattr(va, "_attention_dtype", lambda t: None)
    expected = type(attn).forward(attn, hidden, attention_mask=mask)[0]
    got = attn(torch.take_along_dim(hidden, perm[:, :, None], dim=1), attention_mask=ordered)[0]
    torch.testing.assert_close(got, torch.take_along_dim(expected, perm[:, :, None], dim=1), rtol=1e-5, atol=1e-6)
    grad = torch.randn_like(got)
    (g_got,) = torch.autograd.grad(got, hidden, grad)
    (g_ref,) = torch.autograd.grad(expected, hidden, torch.take_along_dim(grad, inv[:, :, None], dim=1))
    torch.testing.assert_close(g_got, g_ref, rtol=1e-4, atol=1e-5)
    assert calls == []
