"""Fused rotary position embeddings (forward + backward) in Triton, with pure-torch references.

Conventions follow transformers:

* ``q``: ``[batch, q_heads, seq, head_dim]``, ``k``: ``[batch, kv_heads, seq, head_dim]``
  (``unsqueeze_dim=1``; with ``unsqueeze_dim=2`` the layout is ``[batch, seq, heads, head_dim]``).
* ``cos`` / ``sin``: ``[batch, seq, head_dim]`` (batch may be 1), the ``rotate_half`` layout, i.e.
  ``cat(freqs, freqs)``: ``out = x * cos + rotate_half(x) * sin``.
* Multimodal RoPE (Qwen2-VL family): ``cos`` / ``sin`` of shape ``[3, batch, seq, head_dim]``, one
  slice per position axis (temporal, height, width), combined along ``head_dim`` by
  ``mrope_section`` (``sum(mrope_section) == head_dim // 2``):

  - sectioned (Qwen2-VL / Qwen2.5-VL, ``apply_multimodal_rotary_pos_emb``): within each half of
    ``head_dim`` the first ``mrope_section[0]`` frequencies come from axis T, the next
    ``mrope_section[1]`` from H, the last ``mrope_section[2]`` from W;
  - interleaved (Qwen3-VL, ``apply_interleaved_mrope``): frequency ``j`` comes from H if
    ``j % 3 == 1 and j < 3 * mrope_section[1]``, from W if ``j % 3 == 2 and
    j < 3 * mrope_section[2]``, from T otherwise.

  (transformers >= 5.2x does this recombination inside the rotary embedding module and hands
  ``[batch, seq, head_dim]`` to ``apply_rotary_pos_emb``; both entry points are offered here.)

The Triton kernel reads the per-axis tables directly through a per-frequency axis map, so the
combined ``cos`` / ``sin`` are never materialised.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ._utils import device_guarded, next_power_of_2, tl, triton, use_triton

__all__ = [
    "RoPEFunction",
    "apply_rotary_pos_emb",
    "apply_rotary_pos_emb_ref",
    "apply_rotary_pos_emb_vision",
    "apply_rotary_pos_emb_vision_ref",
    "apply_multimodal_rotary_pos_emb",
    "apply_multimodal_rotary_pos_emb_ref",
    "combine_mrope_ref",
    "mrope_axis_map",
    "rotate_half",
]


# --------------------------------------------------------------------------------------
# references
# --------------------------------------------------------------------------------------
def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """Rotates half the hidden dims of the input (transformers' ``rotate_half``)."""
    x1 = x[..., : x.shape[-1] // 2]
    x2 = x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary_pos_emb_ref(q, k, cos, sin, unsqueeze_dim: int = 1):
    """Pure torch, identical to ``transformers.models.llama.modeling_llama.apply_rotary_pos_emb``."""
    cos = cos.unsqueeze(unsqueeze_dim)
    sin = sin.unsqueeze(unsqueeze_dim)
    q_embed = (q * cos) + (rotate_half(q) * sin)
    k_embed = (k * cos) + (rotate_half(k) * sin)
    return q_embed, k_embed


def apply_rotary_pos_emb_vision_ref(q, k, cos, sin):
    """Pure torch, identical to the Qwen-VL vision towers' ``apply_rotary_pos_emb_vision``: ``q``/``k``
    ``[seq, heads, head_dim]``, ``cos``/``sin`` ``[seq, head_dim]``, computed in fp32, returned in q/k's dtype."""
    cos, sin = cos.unsqueeze(-2).float(), sin.unsqueeze(-2).float()
    q_embed = q.float() * cos + rotate_half(q.float()) * sin
    k_embed = k.float() * cos + rotate_half(k.float()) * sin
    return q_embed.to(q.dtype), k_embed.to(k.dtype)


def _check_mrope_section(head_dim: int, mrope_section: Sequence[int]) -> list[int]:
    sec = [int(s) for s in mrope_section]
    if len(sec) != 3:
        raise ValueError(f"mrope_section must have 3 entries (T, H, W), got {sec}")
    if head_dim % 2 or sum(sec) != head_dim // 2:
        raise ValueError(f"sum(mrope_section)={sum(sec)} must equal head_dim // 2 = {head_dim // 2}")
    return sec


def mrope_axis_map(head_dim: int, mrope_section: Sequence[int], interleaved: bool = False) -> list[int]:
    """For each of the ``head_dim // 2`` frequencies, the position axis (0=T, 1=H, 2=W) it uses."""
    sec = _check_mrope_section(head_dim, mrope_section)
    half = head_dim // 2
    if interleaved:
        axis = [0] * half
        for dim, offset in ((1, 1), (2, 2)):
            for j in range(offset, min(sec[dim] * 3, half), 3):
                axis[j] = dim
        return axis
    return [0] * sec[0] + [1] * sec[1] + [2] * sec[2]


def combine_mrope_ref(freqs: torch.Tensor, mrope_section: Sequence[int], interleaved: bool = False) -> torch.Tensor:
    """Combine per-axis ``[3, batch, seq, head_dim]`` cos (or sin) into ``[batch, seq, head_dim]``.

    Sectioned: the code of transformers' ``apply_multimodal_rotary_pos_emb`` (Qwen2-VL).
    Interleaved: transformers' ``apply_interleaved_mrope`` (Qwen3-VL) applied to each half.
    """
    head_dim = freqs.shape[-1]
    sec = _check_mrope_section(head_dim, mrope_section)
    if not interleaved:
        sec2 = sec * 2
        return torch.cat([m[i % 3] for i, m in enumerate(freqs.split(sec2, dim=-1))], dim=-1)
    half = head_dim // 2

    def _interleave(f):
        out = f[0].clone()
        for dim, offset in ((1, 1), (2, 2)):
            idx = slice(offset, sec[dim] * 3, 3)
            out[..., idx] = f[dim, ..., idx]
        return out

    return torch.cat((_interleave(freqs[..., :half]), _interleave(freqs[..., half:])), dim=-1)


def apply_multimodal_rotary_pos_emb_ref(
    q, k, cos, sin, mrope_section: Sequence[int], interleaved: bool = False, unsqueeze_dim: int = 1
):
    """Pure torch multimodal RoPE: combine the ``[3, ...]`` tables, then ``apply_rotary_pos_emb_ref``."""
    cos = combine_mrope_ref(cos, mrope_section, interleaved)
    sin = combine_mrope_ref(sin, mrope_section, interleaved)
    return apply_rotary_pos_emb_ref(q, k, cos, sin, unsqueeze_dim)


# --------------------------------------------------------------------------------------
# triton kernel
# --------------------------------------------------------------------------------------
@triton.jit
def _rope_apply(
    X, xsb, xsh, xss, xsd,
    O, osb, osh, oss, osd,
    b, s, n_heads, half_dim,
    c1, c2, s1, s2, d, dmask,
    BLOCK_H: tl.constexpr,
):
    h = tl.arange(0, BLOCK_H)
    mask = (h < n_heads)[:, None] & dmask[None, :]
    xp = X + b * xsb + s * xss + h[:, None] * xsh + d[None, :] * xsd
    x1 = tl.load(xp, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(xp + half_dim * xsd, mask=mask, other=0.0).to(tl.float32)
    o1 = x1 * c1[None, :] - x2 * s1[None, :]
    o2 = x2 * c2[None, :] + x1 * s2[None, :]
    op = O + b * osb + s * oss + h[:, None] * osh + d[None, :] * osd
    tl.store(op, o1.to(O.dtype.element_ty), mask=mask)
    tl.store(op + half_dim * osd, o2.to(O.dtype.element_ty), mask=mask)


@triton.jit
def _rope_kernel(
    Q, qsb, qsh, qss, qsd,
    K, ksb, ksh, kss, ksd,
    QO, qosb, qosh, qoss, qosd,
    KO, kosb, kosh, koss, kosd,
    COS, SIN, csa, csb, css, csd,
    AXIS,
    seq_len, n_qh, n_kh, half_dim,
    HAS_AXIS: tl.constexpr,
    BACKWARD: tl.constexpr,
    BLOCK_QH: tl.constexpr,
    BLOCK_KH: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    b = pid // seq_len
    s = pid % seq_len
    d = tl.arange(0, BLOCK_D)
    dmask = d < half_dim
    if HAS_AXIS:
        ax = tl.load(AXIS + d, mask=dmask, other=0).to(tl.int64)
        coff = b * csb + s * css + ax * csa + d * csd
    else:
        coff = b * csb + s * css + d * csd
    c1 = tl.load(COS + coff, mask=dmask, other=0.0).to(tl.float32)
    c2 = tl.load(COS + coff + half_dim * csd, mask=dmask, other=0.0).to(tl.float32)
    s1 = tl.load(SIN + coff, mask=dmask, other=0.0).to(tl.float32)
    s2 = tl.load(SIN + coff + half_dim * csd, mask=dmask, other=0.0).to(tl.float32)
    if BACKWARD:
        # transpose of (x -> x*cos + rotate_half(x)*sin): use sin' = (-sin2, -sin1)
        t1 = -s2
        s2 = -s1
        s1 = t1
    _rope_apply(Q, qsb, qsh, qss, qsd, QO, qosb, qosh, qoss, qosd, b, s, n_qh, half_dim,
                c1, c2, s1, s2, d, dmask, BLOCK_H=BLOCK_QH)
    _rope_apply(K, ksb, ksh, kss, ksd, KO, kosb, kosh, koss, kosd, b, s, n_kh, half_dim,
                c1, c2, s1, s2, d, dmask, BLOCK_H=BLOCK_KH)


def _dense_like(t: torch.Tensor) -> torch.Tensor:
    """An empty dense tensor with `t`'s shape and dimension order (outermost = largest stride). Unlike
    `empty_like`, also for a strided slice (q out of a fused qkv): the output is then contiguous in the caller's
    layout, not in this view's."""
    order = sorted(range(t.dim()), key=lambda i: (t.stride(i), t.shape[i]), reverse=True)
    strides, step = [0] * t.dim(), 1
    for i in reversed(order):
        strides[i] = step
        step *= t.shape[i]
    return torch.empty_strided(t.shape, strides, dtype=t.dtype, device=t.device)


def _launch(q, k, cos4, sin4, axis, backward: bool):
    """q, k: [B, H, S, D] (any strides); cos4/sin4: [A, B, S, D] views with equal strides."""
    bsz, n_qh, seq, head_dim = q.shape
    n_kh = k.shape[1]
    q_out = _dense_like(q)
    k_out = _dense_like(k)
    half = head_dim // 2
    n_prog = bsz * seq
    if n_prog == 0:
        return q_out, k_out
    block_d = next_power_of_2(half)
    block_qh = next_power_of_2(n_qh)
    block_kh = next_power_of_2(n_kh)
    elems = max(block_qh, block_kh) * block_d
    num_warps = 4 if elems <= 2048 else 8
    device_guarded(_rope_kernel)[(n_prog,)](
        q, *q.stride(),
        k, *k.stride(),
        q_out, *q_out.stride(),
        k_out, *k_out.stride(),
        cos4, sin4, *cos4.stride(),
        axis if axis is not None else cos4,
        seq, n_qh, n_kh, half,
        HAS_AXIS=axis is not None,
        BACKWARD=backward,
        BLOCK_QH=block_qh,
        BLOCK_KH=block_kh,
        BLOCK_D=block_d,
        num_warps=num_warps,
    )
    return q_out, k_out


class RoPEFunction(torch.autograd.Function):
    """Triton RoPE on ``[B, H, S, D]`` q/k.

    ``apply(q, k, cos4, sin4, axis)`` with ``cos4``/``sin4`` of shape ``[A, B, S, D]`` (A=1 for
    plain RoPE, A=3 for M-RoPE; broadcast dims may have stride 0) and ``axis`` an int32 tensor of
    ``D // 2`` axis indices (or None when A == 1). No gradient flows to cos/sin.
    """

    @staticmethod
    def forward(ctx, q, k, cos4, sin4, axis=None):
        q_out, k_out = _launch(q, k, cos4, sin4, axis, backward=False)
        ctx.save_for_backward(cos4, sin4, axis)
        ctx.q_meta = (q.shape, q.dtype)
        ctx.k_meta = (k.shape, k.dtype)
        return q_out, k_out

    @staticmethod
    def backward(ctx, dq, dk):
        cos4, sin4, axis = ctx.saved_tensors
        if dq is None:  # output unused downstream
            dq = torch.zeros(ctx.q_meta[0], dtype=ctx.q_meta[1], device=cos4.device)
        if dk is None:
            dk = torch.zeros(ctx.k_meta[0], dtype=ctx.k_meta[1], device=cos4.device)
        dq_in, dk_in = _launch(dq, dk, cos4, sin4, axis, backward=True)
        return dq_in, dk_in, None, None, None


def _prep_tables(cos, sin, bsz, seq, head_dim, n_axes):
    if cos.shape != sin.shape:
        raise ValueError(f"cos {tuple(cos.shape)} and sin {tuple(sin.shape)} must have the same shape")
    want = 4 if n_axes == 3 else 3
    if cos.dim() == want - 1:  # no batch dim
        cos, sin = cos.unsqueeze(-3), sin.unsqueeze(-3)
    if cos.dim() != want:
        raise ValueError(f"cos/sin must be {want}-D, got shape {tuple(cos.shape)}")
    if n_axes == 1:
        cos, sin = cos.unsqueeze(0), sin.unsqueeze(0)
    elif cos.shape[0] != 3:
        raise ValueError(f"multimodal cos/sin must have 3 position axes first, got {tuple(cos.shape)}")
    cos = cos.expand(n_axes, bsz, seq, head_dim)
    sin = sin.expand(n_axes, bsz, seq, head_dim)
    if cos.stride() != sin.stride():
        cos, sin = cos.contiguous(), sin.contiguous()
    return cos, sin


def _to_bhsd(t, unsqueeze_dim):
    if unsqueeze_dim == 1:
        return t
    if unsqueeze_dim == 2:
        return t.transpose(1, 2)
    raise ValueError(f"unsqueeze_dim must be 1 ([B,H,S,D]) or 2 ([B,S,H,D]), got {unsqueeze_dim}")


_AXIS_TENSORS: dict[tuple, torch.Tensor] = {}


def _axis_tensor(axis: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """The per-frequency axis map on `device`, built once per (map, device): a host-to-device copy per call would
    be a sync inside a CUDA graph capture."""
    key = (axis, str(device))
    found = _AXIS_TENSORS.get(key)
    if found is None:
        found = _AXIS_TENSORS[key] = torch.tensor(axis, dtype=torch.int32, device=device)
    return found


def _apply_triton(q, k, cos, sin, unsqueeze_dim, axis_list):
    qb, kb = _to_bhsd(q, unsqueeze_dim), _to_bhsd(k, unsqueeze_dim)
    bsz, _, seq, head_dim = qb.shape
    if kb.shape[0] != bsz or kb.shape[2] != seq or kb.shape[3] != head_dim or head_dim % 2:
        raise ValueError(f"incompatible q {tuple(q.shape)} / k {tuple(k.shape)}")
    n_axes = 1 if axis_list is None else 3
    cos4, sin4 = _prep_tables(cos, sin, bsz, seq, head_dim, n_axes)
    axis = None if axis_list is None else _axis_tensor(tuple(axis_list), q.device)
    qo, ko = RoPEFunction.apply(qb, kb, cos4, sin4, axis)
    return _to_bhsd(qo, unsqueeze_dim), _to_bhsd(ko, unsqueeze_dim)


def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim: int = 1):
    """Drop-in for transformers' ``apply_rotary_pos_emb``; Triton on CUDA / under the interpreter."""
    if use_triton(q, k, cos, sin):
        return _apply_triton(q, k, cos, sin, unsqueeze_dim, None)
    return apply_rotary_pos_emb_ref(q, k, cos, sin, unsqueeze_dim)


def apply_rotary_pos_emb_vision(q, k, cos, sin):
    """Drop-in for the Qwen-VL vision towers' ``apply_rotary_pos_emb_vision`` (``[seq, heads, head_dim]``, fp32
    math, q/k's dtype out): one Triton pass per tensor and direction, on CUDA / under the interpreter."""
    if use_triton(q, k, cos, sin):
        qo, ko = _apply_triton(q[None], k[None], cos[None], sin[None], 2, None)
        return qo[0], ko[0]
    return apply_rotary_pos_emb_vision_ref(q, k, cos, sin)


def apply_multimodal_rotary_pos_emb(
    q, k, cos, sin, mrope_section: Sequence[int], interleaved: bool = False, unsqueeze_dim: int = 1
):
    """M-RoPE with per-axis ``cos``/``sin`` of shape ``[3, batch, seq, head_dim]``.

    ``interleaved=False``: Qwen2-VL / Qwen2.5-VL sectioned layout; ``True``: Qwen3-VL interleaved.
    """
    if use_triton(q, k, cos, sin):
        axis_list = mrope_axis_map(q.shape[-1], mrope_section, interleaved)
        return _apply_triton(q, k, cos, sin, unsqueeze_dim, axis_list)
    return apply_multimodal_rotary_pos_emb_ref(q, k, cos, sin, mrope_section, interleaved, unsqueeze_dim)
