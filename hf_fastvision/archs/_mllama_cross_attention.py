"""Mllama's text cross-attention without its ``[S, V]`` mask (patch flag ``cross_attention_split``, on by default).

Stock: every cross-attention layer runs SDPA with a float mask ``[B, 1, S, V]`` (``V`` = images x tiles x 1601
vision tokens). ``_prepare_cross_attention_mask`` builds it from the processor's per-token tile mask: ``min``
where a text row may not see a tile, then rows that see nothing are zeroed (they attend to every key). So rows
*before* the image token attend to all ``V`` keys and, with one image per sample, rows from the image token on
attend to the first ``K`` keys (the image's real tiles). Padding tiles are the rest: with 1 of 4 tiles real, 3/4
of the stock attention work is spent on keys whose weight is exactly 0.

When every sample's mask has that form (rows ``[0, p)`` see all keys, rows ``[p, S)`` see a prefix ``[0, K)``),
the same function is one flash varlen call with three segments per sample, as in the vision split
(``_mllama_vision_attention``): query rows ``[before | after | none]`` against key rows
``[copy 0: all | copy 1: prefix | copy 1: rest]``. No mask is materialised in the layers and the shapes stay
static, so the layers stay CUDA-graph capturable.

How it is wired: the text model's forward (patched) checks the form once per call, with one host sync, and then
hands its layers a compact ``int32 [B, 2]`` tensor of ``(p, K)`` instead of the float mask; where every sample
sees the same ``K``, with ``(K, P)`` attached (`with_dense_shape`), and the layers then run dense SDPA calls of
those static shapes (`dense_cross_attention`, which cuDNN can take) instead of the varlen call. The patched
cross-attention recognises it; any other call (generation with a cache, dropout, another attention
implementation) gets the exact stock mask rebuilt from it (`expand`). A mask of another form (several images in
one sample, a non-prefix tile pattern) is passed on unchanged and runs stock.

Exact up to kernel rounding (flash vs the masked kernel): keys masked with ``min`` get softmax weight 0 exactly.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from hf_fastvision.archs._mllama_vision_attention import _VARLEN_ONLY, _attention_dtype, _varlen_kernel

__all__ = ["compact_cross_mask", "expand", "split_cross_attention", "cross_attention_forward",
           "text_model_forward", "is_compact", "with_dense_shape", "dense_cross_attention", "head_rows"]

_READY = "_hffv_cross_split_ready"


def is_compact(mask: Any) -> bool:
    return _unpack(mask)[0] is not None


def _is_pk(mask: Any) -> bool:
    return isinstance(mask, torch.Tensor) and mask.dtype == torch.int32 and mask.dim() == 2 and mask.shape[-1] == 2


def _unpack(mask: Any) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``((p, K) per sample, dense shape or None)`` of a compact mask (alone or `with_dense_shape`), else Nones."""
    if _is_pk(mask):
        return mask, None
    if (isinstance(mask, tuple) and len(mask) == 2 and _is_pk(mask[0]) and isinstance(mask[1], torch.Tensor)
            and mask[1].dtype == torch.int32 and mask[1].shape == (2,)):
        return mask
    return None, None


def head_rows(p: int, rows: int) -> int:
    """The leading rows the dense call gives every key: ``p`` rounded up to a power of two (at least 64, at most
    ``rows``), so that CUDA graphs, which key on it, see few distinct values while the image token moves."""
    return 0 if p <= 0 else min(rows, max(64, 1 << (p - 1).bit_length()))


def with_dense_shape(compact: torch.Tensor, rows: int, keys: int) -> Any:
    """The compact mask with ``int32 [2]`` ``(K, P)`` attached where every sample sees the same ``K`` keys from the
    image token on (the dense path of `split_cross_attention`; ``P``: `head_rows` of the largest ``p``, 0 when
    ``K`` is every key); else the compact mask alone. One host sync."""
    pk = compact.tolist()
    ks = {k for _, k in pk}
    if len(ks) != 1:
        return compact
    k = ks.pop()
    shape = (k, 0 if k == keys else head_rows(max(p for p, _ in pk), rows))
    return compact, torch.tensor(shape, dtype=torch.int32).to(compact.device, non_blocking=True)


def compact_cross_mask(mask: torch.Tensor) -> torch.Tensor | None:
    """``(p, K)`` per sample (``int32 [B, 2]``) when ``mask`` (``[B, 1, S, V]``, 0 / ``min``) has the split form,
    else None. One host sync."""
    if not (isinstance(mask, torch.Tensor) and mask.is_floating_point() and mask.dim() == 4 and mask.shape[1] == 1):
        return None
    _, _, rows, keys = mask.shape
    if rows == 0 or keys == 0:
        return None
    m = mask[:, 0]
    zero = m == 0  # [B, S, V]: the key is visible
    only_two_values = (zero | (m <= torch.finfo(mask.dtype).min / 2)).all()
    n = zero.sum(-1)  # [B, S] visible keys per row
    key_idx = torch.arange(keys, device=mask.device)
    prefix = (zero == (key_idx < n[..., None])).all()  # every row sees a prefix of the keys
    p = (n == keys).to(torch.int64).cumprod(-1).sum(-1)  # leading rows that see all keys
    after = torch.arange(rows, device=mask.device)[None, :] >= p[:, None]
    k_after = torch.where(p < rows, n.gather(1, p.clamp(max=rows - 1)[:, None])[:, 0], torch.full_like(p, keys))
    same_after = ((n == k_after[:, None]) | ~after).all()
    if not bool(torch.stack([only_two_values, prefix, same_after, (n > 0).all()]).all()):  # the one host sync
        return None
    return torch.stack([p, k_after], dim=-1).to(torch.int32)


def expand(compact: torch.Tensor, rows: int, keys: int, dtype: torch.dtype) -> torch.Tensor:
    """The stock float mask ``[B, 1, rows, keys]`` that ``compact`` stands for (exactly)."""
    p, k = compact[:, 0].long(), compact[:, 1].long()
    row_idx = torch.arange(rows, device=compact.device)
    key_idx = torch.arange(keys, device=compact.device)
    visible = (row_idx[None, :, None] < p[:, None, None]) | (key_idx[None, None, :] < k[:, None, None])
    mask = torch.zeros(visible.shape, dtype=dtype, device=compact.device)
    return mask.masked_fill(~visible, torch.finfo(dtype).min)[:, None]


def split_cross_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, compact: torch.Tensor, scale: float,
                          varlen: Any = None, dense: tuple[int, int] | None = None) -> torch.Tensor:
    """``[B, Hq, S, D]`` queries against ``[B, Hkv, V, D]`` keys/values under the mask ``compact`` stands for;
    returns ``[B, S, Hq, D]`` (the layout transformers' attention functions return). ``dense``: ``(K, P)`` known on
    the host (`with_dense_shape`): `dense_cross_attention` instead of the varlen call."""
    if dense is not None:
        return dense_cross_attention(q, k, v, compact, dense[0], dense[1], scale)
    batch, heads, rows, dim = q.shape
    keys = k.shape[2]
    varlen = varlen or _varlen_kernel(q.device)
    gqa = k.shape[1] != heads and _accepts_gqa(varlen)  # the kernel shares each kv head itself: 1/4 of the k/v
    if k.shape[1] != heads and not gqa:  # grouped-query attention: one copy of each kv head per query head
        k = k.repeat_interleave(heads // k.shape[1], dim=1)
        v = v.repeat_interleave(heads // v.shape[1], dim=1)
    kv_heads = k.shape[1]
    p, kk = compact[:, 0], compact[:, 1]
    b = torch.arange(batch, device=q.device, dtype=torch.int32)
    q_ends = torch.stack([b * rows + p, (b + 1) * rows, (b + 1) * rows], dim=-1)
    k_ends = torch.stack([2 * b * keys + keys, 2 * b * keys + keys + kk, 2 * (b + 1) * keys], dim=-1)
    zero = torch.zeros(1, device=q.device, dtype=torch.int32)
    cu_q = torch.cat([zero, q_ends.reshape(-1).to(torch.int32)])
    cu_k = torch.cat([zero, k_ends.reshape(-1).to(torch.int32)])
    kt, vt = k.transpose(1, 2), v.transpose(1, 2)  # [B, V, H, D]
    packed_k = torch.cat([kt, kt], dim=1).reshape(2 * batch * keys, kv_heads, dim)
    packed_v = torch.cat([vt, vt], dim=1).reshape(2 * batch * keys, kv_heads, dim)
    out = varlen(q.transpose(1, 2).reshape(batch * rows, heads, dim), packed_k, packed_v, cu_q, cu_k, rows, keys,
                 scale=scale, **({"enable_gqa": True} if gqa else {}))
    return out.reshape(batch, rows, heads, dim)


def dense_cross_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, compact: torch.Tensor, keys: int,
                          head: int, scale: float) -> torch.Tensor:
    """The split as dense SDPA calls, where every sample sees the first ``keys`` keys from its image token ``p``
    on: every row against those keys, and the first ``head`` rows (``head >= p``, host-known) against all keys,
    taken for rows ``< p``. Static shapes for a given ``(keys, head)``, and SDPA may take cuDNN, which on an H200
    ran the text self-attention (the same head_dim 128) at ~1.7x flash's rate
    (`scripts/results/h200_2026-12-01h_attention/`). ``[B, S, Hq, D]`` out."""
    gqa = k.shape[1] != q.shape[1]
    out = F.scaled_dot_product_attention(q, k[:, :, :keys], v[:, :, :keys], scale=scale, enable_gqa=gqa)
    if head:
        full = F.scaled_dot_product_attention(q[:, :, :head], k, v, scale=scale, enable_gqa=gqa)
        before = torch.arange(head, device=q.device)[None, :] < compact[:, :1]  # [B, head]: rows that see all keys
        fixed = torch.where(before[:, None, :, None], full, out[:, :, :head])
        # joined in the [B, S, H, D] order the caller flattens (SDPA's outputs are laid out so: plain slices)
        return torch.cat([fixed.transpose(1, 2), out.transpose(1, 2)[:, head:]], dim=1)
    return out.transpose(1, 2)


def _accepts_gqa(varlen: Any) -> bool:
    """Whether the varlen kernel takes ``enable_gqa`` (torch's ``varlen_attn`` in newer releases, the reference)."""
    try:
        return "enable_gqa" in inspect.signature(varlen).parameters
    except (TypeError, ValueError):
        return False


def cross_attention_forward(self: nn.Module, hidden_states: torch.Tensor,
                            cross_attention_states: torch.Tensor | None = None, *args: Any,
                            attention_mask: torch.Tensor | None = None, **kwargs: Any):
    """Drop-in ``forward`` for ``MllamaTextCrossAttention``: the split where the mask is compact, else stock.
    The cache argument is ``past_key_values`` (transformers 5.17) or ``cache`` (5.24); both pass through."""
    from hf_fastvision.patching import original_forward

    compact, dense = _unpack(attention_mask)
    dtype = _attention_dtype(hidden_states)
    usable = (
        compact is not None and cross_attention_states is not None and not args
        and all(value is None or value is False for value in kwargs.values())  # no cache, no use_cache
        and dtype is not None and self.config._attn_implementation == "sdpa"
        and not (self.training and self.dropout)
    )
    if not usable:
        if compact is not None:  # a call the split does not cover: the exact stock mask
            if cross_attention_states is None:
                raise ValueError("cross_attention_split: a compact mask needs cross_attention_states")
            # the states come as [B * images * tiles, tokens, hidden]; the layer views them as [B, V, ...]
            keys = cross_attention_states.shape[:-1].numel() // hidden_states.shape[0]
            attention_mask = expand(compact, hidden_states.shape[1], keys, _mask_dtype(hidden_states))
        return original_forward(self)(hidden_states, cross_attention_states, *args, attention_mask=attention_mask,
                                      **kwargs)
    bsz, q_len, _ = hidden_states.shape
    # q_norm / k_norm normalise each head's row: applied before the transpose (as stock does after it) they read
    # and write contiguous rows, and the varlen call below takes q in that [B, S, H, D] layout without a copy
    q = self.q_norm(self.q_proj(hidden_states).view(bsz, q_len, self.num_heads, self.head_dim)).transpose(1, 2)
    k = self.k_norm(self.k_proj(cross_attention_states).view(bsz, -1, self.num_key_value_heads, self.head_dim))
    k = k.transpose(1, 2)
    v = self.v_proj(cross_attention_states).view(bsz, -1, self.num_key_value_heads, self.head_dim).transpose(1, 2)
    q, k, v = (t.to(dtype) for t in (q, k, v))  # what SDPA's autocast rule does (varlen_attn has none)
    if dense is not None and not self.__dict__.get(_VARLEN_ONLY):
        from hf_fastvision.training.cuda_graphs import host_values

        dense = tuple(host_values(dense))  # one host sync per tensor (cached), none inside a CUDA graph
    else:
        dense = None
    out = split_cross_attention(q, k, v, compact, self.scaling, dense=dense)
    return self.o_proj(out.reshape(bsz, q_len, -1).contiguous()), None


def _mask_dtype(hidden_states: torch.Tensor) -> torch.dtype:
    return hidden_states.dtype if hidden_states.is_floating_point() else torch.float32


def text_model_forward(self: nn.Module, *args: Any, **kwargs: Any):
    """Drop-in ``forward`` for ``MllamaTextModel``: hands its layers the compact mask where the form allows."""
    from hf_fastvision.archs._mllama_model import INJECTED_MASKS
    from hf_fastvision.patching import original_forward

    injected = self.__dict__.get(INJECTED_MASKS)
    if injected is not None and kwargs.get("cross_attention_mask") is None:  # prepared by the model's forward
        kwargs["cross_attention_mask"], kwargs["full_text_row_masked_out_mask"] = injected
        return original_forward(self)(*args, **kwargs)
    mask = kwargs.get("cross_attention_mask")
    no_cache = all(kwargs.get(k) is None for k in ("past_key_values", "cache"))  # 5.17 / 5.24 names
    if (mask is not None and self.training and no_cache and _all_layers_split(self)
            and not (mask.is_cuda and torch.cuda.is_current_stream_capturing())):
        compact = compact_cross_mask(mask)
        if compact is not None:
            kwargs["cross_attention_mask"] = with_dense_shape(compact, mask.shape[2], mask.shape[3])
    return original_forward(self)(*args, **kwargs)


def _all_layers_split(text_model: nn.Module) -> bool:
    """Whether every cross-attention module under this text model runs `cross_attention_forward` (checked once:
    a stock one would get the compact tensor as its mask)."""
    ready = text_model.__dict__.get(_READY)
    if ready is None:
        from hf_fastvision.patching import patched_modules

        kinds = patched_modules(text_model)
        cross = [n for n, m in text_model.named_modules() if type(m).__name__.endswith("TextCrossAttention")]
        ready = bool(cross) and all(kinds.get(n) == "cross_attention_split" for n in cross)
        text_model.__dict__[_READY] = ready
    return ready

