import pytest
import torch
from transformers.models.llama import modeling_llama
from transformers.models.qwen2_vl import modeling_qwen2_vl
from transformers.models.qwen2_vl.configuration_qwen2_vl import Qwen2VLTextConfig
from transformers.models.qwen3_vl import modeling_qwen3_vl
from transformers.models.qwen3_vl.configuration_qwen3_vl import Qwen3VLTextConfig

from hf_fastvision.kernels import (
    apply_multimodal_rotary_pos_emb,
    apply_multimodal_rotary_pos_emb_ref,
    apply_rotary_pos_emb,
    apply_rotary_pos_emb_ref,
    apply_rotary_pos_emb_vision,
    apply_rotary_pos_emb_vision_ref,
    combine_mrope_ref,
    mrope_axis_map,
)
from hf_fastvision.kernels.rope import _apply_triton, _dense_like
from hf_fastvision.tolerances import assert_close

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _rope_triton(q, k, cos, sin, unsqueeze_dim=1):
    return _apply_triton(q, k, cos, sin, unsqueeze_dim, None)


def _mrope_triton(q, k, cos, sin, mrope_section, interleaved=False, unsqueeze_dim=1):
    axis = mrope_axis_map(q.shape[-1], mrope_section, interleaved)
    return _apply_triton(q, k, cos, sin, unsqueeze_dim, axis)


def _cos_sin(pos, head_dim, dtype, device, base=10000.0):
    """cat(freqs, freqs).cos()/sin() for integer positions of any leading shape."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float, device=device) / head_dim))
    freqs = pos[..., None].float() * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


# ----------------------------------------------------------------------------- plain RoPE
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bsz,n_qh,n_kh,seq,head_dim", [(2, 3, 1, 5, 10), (1, 4, 4, 3, 64)])
def test_rope_triton_matches_ref(compare, device, dtype, bsz, n_qh, n_kh, seq, head_dim):
    q = torch.randn(bsz, n_qh, seq, head_dim, device=device, dtype=dtype)
    k = torch.randn(bsz, n_kh, seq, head_dim, device=device, dtype=dtype)
    pos = torch.randint(0, 100, (bsz, seq), device=device)
    cos, sin = _cos_sin(pos, head_dim, dtype, device)
    compare(_rope_triton, apply_rotary_pos_emb_ref, (q, k, cos, sin), dtype=dtype, grad_args=(0, 1))


def test_rope_layouts(compare, device):
    # [B, S, H, D] with unsqueeze_dim=2, q/k non-contiguous (views of a fused qkv), batch-1 cos
    bsz, seq, n_qh, n_kh, d = 2, 5, 3, 1, 10
    qkv = torch.randn(bsz, seq, (n_qh + 2 * n_kh) * d, device=device)
    q = qkv[..., : n_qh * d].view(bsz, seq, n_qh, d)
    k = qkv[..., n_qh * d : (n_qh + n_kh) * d].view(bsz, seq, n_kh, d)
    pos = torch.arange(seq, device=device)[None]
    cos, sin = _cos_sin(pos, d, torch.float32, device)
    compare(_rope_triton, apply_rotary_pos_emb_ref, (q, k, cos, sin), dict(unsqueeze_dim=2), dtype=torch.float32,
            grad_args=(0, 1))
    # [B, H, S, D] from the usual view().transpose(1, 2)
    compare(_rope_triton, apply_rotary_pos_emb_ref, (q.transpose(1, 2), k.transpose(1, 2), cos, sin),
            dtype=torch.float32, grad_args=(0, 1))


@pytest.mark.parametrize("dtype", DTYPES)
def test_rope_ref_matches_transformers(device, dtype):
    q = torch.randn(2, 3, 5, 10, device=device, dtype=dtype)
    k = torch.randn(2, 1, 5, 10, device=device, dtype=dtype)
    cos, sin = _cos_sin(torch.randint(0, 50, (2, 5), device=device), 10, dtype, device)
    expected = modeling_llama.apply_rotary_pos_emb(q, k, cos, sin)
    for a, b in zip(apply_rotary_pos_emb_ref(q, k, cos, sin), expected):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    for a, b in zip(apply_rotary_pos_emb(q, k, cos, sin), expected):  # dispatched (Triton here)
        assert_close(a, b, dtype=dtype)


def test_rope_unused_output_grad(device):
    # only q_embed is used downstream: k's gradient must be zero, q's must match the reference
    q = torch.randn(1, 2, 3, 8, device=device)
    k = torch.randn(1, 1, 3, 8, device=device)
    cos, sin = _cos_sin(torch.arange(3, device=device)[None], 8, torch.float32, device)
    qt, kt = q.clone().requires_grad_(), k.clone().requires_grad_()
    _rope_triton(qt, kt, cos, sin)[0].pow(2).sum().backward()
    qr, kr = q.clone().requires_grad_(), k.clone().requires_grad_()
    apply_rotary_pos_emb_ref(qr, kr, cos, sin)[0].pow(2).sum().backward()
    assert_close(qt.grad, qr.grad, dtype=torch.float32)
    assert kt.grad is None or torch.count_nonzero(kt.grad) == 0


# ----------------------------------------------------------------------------- vision RoPE (Qwen-VL towers)
def _vision_qk(seq, heads, head_dim, dtype, device):
    """q and k as the vision attention takes them: strided slices of one fused qkv projection."""
    qkv = torch.randn(seq, 3 * heads * head_dim, device=device, dtype=dtype)
    q, k, _ = qkv.reshape(seq, 3, heads, head_dim).permute(1, 0, 2, 3).unbind(0)
    cos, sin = _cos_sin(torch.arange(seq, device=device), head_dim, torch.float32, device)
    return q, k, cos, sin


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("seq,heads,head_dim", [(7, 3, 10), (16, 2, 80)])
def test_vision_rope_matches_transformers(compare, device, dtype, seq, heads, head_dim):
    from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl

    q, k, cos, sin = _vision_qk(seq, heads, head_dim, dtype, device)
    expected = modeling_qwen2_5_vl.apply_rotary_pos_emb_vision(q, k, cos, sin)
    for a, b in zip(apply_rotary_pos_emb_vision_ref(q, k, cos, sin), expected):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    outs, _ = compare(apply_rotary_pos_emb_vision, apply_rotary_pos_emb_vision_ref, (q, k, cos, sin), dtype=dtype,
                      grad_args=(0, 1))
    # the outputs are contiguous [seq, heads, head_dim] (the attention reshapes them without a copy)
    assert all(o.is_contiguous() for o in outs), [o.stride() for o in outs]


def test_dense_like_keeps_the_dimension_order():
    base = torch.empty(4, 5, 6)
    for view in (base, base.transpose(0, 1), base[:, :, :3], base.permute(2, 0, 1)[1:]):
        out = _dense_like(view)
        rank = sorted(range(view.dim()), key=lambda i: -view.stride(i))
        assert out.shape == view.shape and sorted(range(out.dim()), key=lambda i: -out.stride(i)) == rank
        assert out.is_contiguous() == (rank == list(range(view.dim())))  # a slice in row order: contiguous
        assert out.untyped_storage().nbytes() == view.numel() * view.element_size()  # dense


# ----------------------------------------------------------------------------- M-RoPE
def _mrope_inputs(bsz, n_qh, n_kh, seq, head_dim, dtype, device):
    q = torch.randn(bsz, n_qh, seq, head_dim, device=device, dtype=dtype)
    k = torch.randn(bsz, n_kh, seq, head_dim, device=device, dtype=dtype)
    pos3 = torch.randint(0, 64, (3, bsz, seq), device=device)
    cos3, sin3 = _cos_sin(pos3, head_dim, dtype, device)  # [3, B, S, D]
    return q, k, pos3, cos3, sin3


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("head_dim,section", [(12, [1, 2, 3]), (16, [4, 2, 2])])
def test_mrope_triton_matches_ref(compare, device, dtype, interleaved, head_dim, section):
    q, k, _, cos3, sin3 = _mrope_inputs(2, 3, 1, 5, head_dim, dtype, device)
    kwargs = dict(mrope_section=section, interleaved=interleaved)
    compare(_mrope_triton, apply_multimodal_rotary_pos_emb_ref, (q, k, cos3, sin3), kwargs, dtype=dtype,
            grad_args=(0, 1))


def test_mrope_axis_map():
    assert mrope_axis_map(12, [1, 2, 3]) == [0, 1, 1, 2, 2, 2]
    # Qwen3-VL: THWTHW... for 3 * section[1|2] frequencies, T for the tail
    assert mrope_axis_map(16, [4, 2, 2], interleaved=True) == [0, 1, 2, 0, 1, 2, 0, 0]
    m = mrope_axis_map(128, [24, 20, 20], interleaved=True)
    assert m[:6] == [0, 1, 2, 0, 1, 2] and m[60:] == [0, 0, 0, 0] and m.count(1) == 20 and m.count(2) == 20
    with pytest.raises(ValueError):
        mrope_axis_map(12, [2, 2, 3])


def _qwen2vl_rotary(head_dim, section, device):
    cfg = Qwen2VLTextConfig(
        hidden_size=head_dim * 2, num_attention_heads=2, num_key_value_heads=1,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": list(section)},
    )
    return modeling_qwen2_vl.Qwen2VLRotaryEmbedding(cfg).to(device)


def _qwen3vl_rotary(head_dim, section, device):
    cfg = Qwen3VLTextConfig(
        hidden_size=head_dim * 2, num_attention_heads=2, num_key_value_heads=1, head_dim=head_dim,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": list(section)},
    )
    return modeling_qwen3_vl.Qwen3VLTextRotaryEmbedding(cfg).to(device)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "variant,head_dim,section",
    [("qwen2_vl", 12, [1, 2, 3]), ("qwen2_vl", 128, [16, 24, 24]),
     ("qwen3_vl", 16, [4, 2, 2]), ("qwen3_vl", 128, [24, 20, 20])],
)
def test_mrope_matches_transformers(device, dtype, variant, head_dim, section):
    """Our per-axis combination == transformers' M-RoPE; full op == transformers' attention path."""
    interleaved = variant == "qwen3_vl"
    rotary = (_qwen3vl_rotary if interleaved else _qwen2vl_rotary)(head_dim, section, device)
    q, k, pos3, _, _ = _mrope_inputs(2, 2, 1, 5, head_dim, torch.float32, device)
    # per-axis tables from the module's own inv_freq (pow on CPU vs CUDA may differ by an ulp)
    emb = pos3[..., None].float() * rotary.inv_freq.to(device)
    emb = torch.cat((emb, emb), dim=-1)
    cos3, sin3 = emb.cos(), emb.sin()
    x = torch.zeros(1, device=device, dtype=dtype)
    cos_tf, sin_tf = rotary(x, pos3)  # [B, S, D], M-RoPE recombined by transformers
    torch.testing.assert_close(combine_mrope_ref(cos3, section, interleaved).to(dtype), cos_tf, rtol=0, atol=0)
    torch.testing.assert_close(combine_mrope_ref(sin3, section, interleaved).to(dtype), sin_tf, rtol=0, atol=0)

    # transformers < 5.2x exposed the recombination as functions: check them when present
    legacy = getattr(modeling_qwen2_vl, "apply_multimodal_rotary_pos_emb", None)
    if legacy is not None and not interleaved:
        for a, b in zip(apply_multimodal_rotary_pos_emb_ref(q, k, cos3, sin3, section),
                        legacy(q, k, cos3, sin3, section)):
            torch.testing.assert_close(a, b, rtol=0, atol=0)

    q, k, cos3, sin3 = q.to(dtype), k.to(dtype), cos3.to(dtype), sin3.to(dtype)
    expected = modeling_qwen2_vl.apply_rotary_pos_emb(q, k, cos_tf, sin_tf)
    ref = apply_multimodal_rotary_pos_emb_ref(q, k, cos3, sin3, section, interleaved)
    for a, b in zip(ref, expected):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    fused = apply_multimodal_rotary_pos_emb(q, k, cos3, sin3, section, interleaved)  # Triton here
    for a, b in zip(fused, expected):
        assert_close(a, b, dtype=dtype)


def test_the_mrope_axis_map_is_built_once_per_device(device):
    from hf_fastvision.kernels.rope import _axis_tensor

    axis = tuple(mrope_axis_map(16, [4, 2, 2]))
    first = _axis_tensor(axis, torch.device(device))
    assert _axis_tensor(axis, torch.device(device)) is first  # no host-to-device copy per call (CUDA graphs)
    assert first.tolist() == list(axis) and first.dtype == torch.int32
