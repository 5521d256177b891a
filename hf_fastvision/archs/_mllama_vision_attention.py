"""Mllama's vision attention without its L x L mask: an exact split (flag ``vision_attention_split``, on by default).

Mllama's vision encoder attends over 4 tiles x 1608 patches with the additive mask that
``_prepare_aspect_ratio_attention_mask`` builds: ``mask[i, j] = min`` exactly when patch i *and* patch j are padding
(padded tiles, and the 7 padding patches of every tile). So

- a real patch's query attends to every key, unmasked;
- a padding patch's query attends to the real keys only, unmasked (when an image has no real patch at all, every
  score gets ``min`` and the stock softmax is uniform: the mean of the values, which this forward returns too;
  such an image's query/key gradients are zero here, but it never reaches the loss: Mllama's cross-attention
  mask drops padded images).

On an H200 the masked cuDNN kernels of these 40 layers took 36% of a Llama-3.2-11B-Vision QLoRA step's GPU time
(`scripts/results/h200_2026-12-01b_profile_llama/`). This forward computes the same function as one variable-length
flash call with static shapes (CUDA-graph friendly, no host sync): rows permuted real-first and the keys packed
twice; per image three segments, query rows ``[real | padding | none]`` against key rows ``[copy 0: all |
copy 1: real | copy 1: padding]``, so real queries see every key and padding queries the real keys. Only the
``cu_seq`` offsets depend on the image (device tensors); no ``seqused_k``, which torch 2.11's ``varlen_attn`` lacks.
On an image using 1 of 4 tiles that is 44% of the masked call's work. The forward permutes the layer's input
rows once, before the q/k/v projections (row-wise, so the order commutes with them), and the attention output back
before ``o_proj``: two gathers per layer instead of four (`permuted_split_attention`), each a row selection whose
backward selects by the inverse permutation (`permute_rows`: no scatter-add; one sort per layer call).

`varlen_reference` computes the varlen call in plain torch (CPU, and the tests); CUDA uses
``torch.nn.attention.varlen.varlen_attn``. Anything unexpected (another attention implementation, a mask of
another form, no varlen kernel) runs the stock forward. `scripts/bench_mllama_vision_attention.py` times it
(on by default; `patches={"vision_attention_split": False}` turns it off).
"""

from __future__ import annotations

import functools
import inspect
import logging
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from hf_fastvision.archs._autocast_narrowing import autocast_dtype, narrows_to

__all__ = ["split_vision_attention_forward", "split_attention", "permuted_split_attention", "real_first",
           "varlen_reference", "vision_mask", "compact_vision_mask", "expand_vision_mask", "is_compact_vision_mask",
           "dense_split_attention", "with_real_counts", "permute_rows", "real_first_mask", "REAL_FIRST"]

logger = logging.getLogger(__name__)
_CHECKED = "_hffv_split_mask_ok"
_VARLEN_ONLY = "_hffv_split_varlen"  # set by the patch for `vision_attention_split` / `cross_attention_split="varlen"`
REAL_FIRST = "real_first"  # tags a compact mask whose rows (and the hidden states') are already real-first


def vision_mask(valid_tiles: list[int], tiles: int, patches: int, padded: int, dtype=torch.float32, device=None):
    """``(mask, real)`` as Mllama builds them (`_prepare_aspect_ratio_attention_mask`) for images using
    ``valid_tiles[b]`` of ``tiles`` tiles of ``patches`` real + ``padded`` padding patches: the additive
    ``[batch, 1, L, L]`` mask and the ``[batch, L]`` bool of real patches (for tests and benchmarks)."""
    length = patches + padded
    real = torch.zeros(len(valid_tiles), tiles, length, device=device)
    for b, n in enumerate(valid_tiles):
        real[b, :n, :patches] = 1.0
    pad = (1.0 - real).reshape(len(valid_tiles), tiles * length, 1).to(dtype)
    mask = (pad @ pad.transpose(-1, -2) * torch.finfo(dtype).min).unsqueeze(1)
    return mask, real.reshape(len(valid_tiles), -1).bool()


def varlen_reference(q, k, v, cu_q, cu_k, max_q, max_k, *, scale=None, enable_gqa=False):
    """``varlen_attn``'s result in plain torch: query rows ``cu_q[i]:cu_q[i+1]`` attend to key rows
    ``cu_k[i]:cu_k[i+1]``; ``[tokens, heads, dim]`` layout (``enable_gqa``: fewer kv heads, each shared by a group
    of query heads); a segment without keys gives 0."""
    out = torch.zeros_like(q)
    bq, bk = cu_q.tolist(), cu_k.tolist()
    for i in range(len(bq) - 1):
        q0, q1, k0, k1 = bq[i], bq[i + 1], bk[i], bk[i + 1]
        if q1 > q0 and k1 > k0:
            part = F.scaled_dot_product_attention(q[q0:q1].transpose(0, 1), k[k0:k1].transpose(0, 1),
                                                  v[k0:k1].transpose(0, 1), scale=scale, enable_gqa=enable_gqa)
            out[q0:q1] = part.transpose(0, 1).to(out.dtype)
    return out


def _varlen_kernel(device: torch.device) -> Any:
    return _cuda_varlen() if device.type == "cuda" else varlen_reference


@functools.lru_cache(maxsize=1)
def _cuda_varlen() -> Any:
    """torch's flash varlen call, with ``scale=`` (an early ``varlen_attn`` without it gets the scale folded into q);
    ImportError on a torch without it (the caller falls back). Resolved once: forwards call it per layer."""
    from torch.nn.attention.varlen import varlen_attn

    if "scale" in inspect.signature(varlen_attn).parameters:
        return varlen_attn

    def default_scale(q, k, v, cu_q, cu_k, max_q, max_k, *, scale=None):  # 1/sqrt(dim) only
        if scale is not None:
            q = q * (scale * q.shape[-1] ** 0.5)
        return varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k)

    return default_scale


def split_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, real: torch.Tensor, scale: float,
                    varlen: Any = None) -> torch.Tensor:
    """Mllama vision attention for ``[batch, heads, L, dim]`` inputs and ``real`` (``[batch, L]`` bool): the
    result of the masked SDPA call, with static shapes and no host sync (see the module docstring)."""
    perm, inv = real_first(real)

    def rows(t: torch.Tensor) -> torch.Tensor:  # [batch, L, heads, dim], rows permuted
        return permute_rows(t.transpose(1, 2), perm, inv)

    out = permuted_split_attention(rows(q), rows(k), rows(v), real, scale, varlen)
    return permute_rows(out, inv, perm).transpose(1, 2)  # [batch, heads, L, dim]


def real_first(real: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(perm, inv)``: per image, the row order with the real patches first (their order kept), and its inverse
    (a scatter of the positions, not a second sort)."""
    perm = torch.argsort((~real).to(torch.int8), dim=-1, stable=True)
    positions = torch.arange(perm.shape[-1], device=perm.device, dtype=perm.dtype).expand_as(perm)
    return perm, torch.empty_like(perm).scatter_(-1, perm, positions)


def permute_rows(x: torch.Tensor, perm: torch.Tensor, inv: torch.Tensor) -> torch.Tensor:
    """``x[b, perm[b, i]]`` along dim 1 (``perm``: ``[batch, L]`` permutations, ``inv`` their inverses), as
    ``take_along_dim`` computes it; the backward gathers the gradient by ``inv`` instead of scatter-adding it into
    zeros, and both directions select whole rows instead of reading an int64 index per element."""
    batch, length = perm.shape
    offsets = torch.arange(batch, device=perm.device, dtype=perm.dtype)[:, None] * length
    return _RowPermutation.apply(x, (perm + offsets).reshape(-1), (inv + offsets).reshape(-1))


def _select_rows(x: torch.Tensor, flat: torch.Tensor) -> torch.Tensor:
    return x.reshape(x.shape[0] * x.shape[1], *x.shape[2:]).index_select(0, flat).view(x.shape)


class _RowPermutation(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, perm_flat: torch.Tensor, inv_flat: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(inv_flat)
        return _select_rows(x, perm_flat)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (inv_flat,) = ctx.saved_tensors
        return _select_rows(grad, inv_flat), None, None


def permuted_split_attention(qp: torch.Tensor, kp: torch.Tensor, vp: torch.Tensor, real: torch.Tensor, scale: float,
                             varlen: Any = None, n_real: int | None = None) -> torch.Tensor:
    """`split_attention` on rows already in `real_first` order: ``[batch, L, heads, dim]`` in and out (the
    forward permutes the layer's input once instead of q, k and v). ``n_real``: every image's count of real
    patches, where the host knows it and it is the same for all: then two dense SDPA calls (`dense_split_attention`)
    instead of the varlen call."""
    if n_real is not None:
        return dense_split_attention(qp, kp, vp, n_real, scale)
    batch, length, heads, dim = qp.shape
    varlen = varlen or _varlen_kernel(qp.device)
    n_real = real.sum(-1).to(torch.int32)  # [batch]
    n_keys = torch.where(n_real == 0, length, n_real)  # no empty key segment (such an image is replaced below)
    b = torch.arange(batch, device=qp.device, dtype=torch.int32)
    # per image: query rows [real | padding | none], key rows [copy 0: all | copy 1: real | copy 1: padding]
    q_ends = torch.stack([b * length + n_real, (b + 1) * length, (b + 1) * length], dim=-1)
    k_ends = torch.stack([2 * b * length + length, 2 * b * length + length + n_keys, 2 * (b + 1) * length], dim=-1)
    zero = torch.zeros(1, device=qp.device, dtype=torch.int32)
    cu_q = torch.cat([zero, q_ends.reshape(-1)])
    cu_k = torch.cat([zero, k_ends.reshape(-1)])
    keys = torch.cat([kp, kp], dim=1).reshape(2 * batch * length, heads, dim)
    values = torch.cat([vp, vp], dim=1).reshape(2 * batch * length, heads, dim)
    out = varlen(qp.reshape(batch * length, heads, dim), keys, values, cu_q, cu_k, length, length, scale=scale)
    out = out.reshape(batch, length, heads, dim)
    # an image without a real patch: the stock mask makes every score `min`, i.e. uniform attention
    mean_v = vp.mean(dim=1, keepdim=True)  # [batch, 1, heads, dim] (the mean is order-free)
    return torch.where((n_real == 0)[:, None, None, None], mean_v.to(out.dtype), out)


def dense_split_attention(qp: torch.Tensor, kp: torch.Tensor, vp: torch.Tensor, n_real: int,
                          scale: float) -> torch.Tensor:
    """The split as two maskless SDPA calls, for real-first rows where every image has ``n_real`` real patches:
    rows ``:n_real`` over all keys, rows ``n_real:`` over keys ``:n_real``. Static shapes once ``n_real`` is known
    on the host, and SDPA may take cuDNN, which runs head_dim 80 unpadded (the varlen flash call pads it to 96):
    on an H200, fwd+bwd of one Llama-3.2-11B-Vision layer's attention, 1 of 4 tiles, 3.58 ms against 4.05
    (`scripts/results/h200_2026-12-01h_attention/`). ``[batch, L, heads, dim]`` in and out."""
    q, k, v = (t.transpose(1, 2) for t in (qp, kp, vp))  # [batch, heads, L, dim] views, as transformers hands SDPA
    length = q.shape[2]
    if n_real == 0:  # no real patch: the stock mask makes every score `min`, i.e. uniform attention
        return v.mean(dim=2, keepdim=True).expand_as(q).transpose(1, 2)
    out = F.scaled_dot_product_attention(q[:, :, :n_real], k, v, scale=scale).transpose(1, 2)
    if n_real < length:
        pad = F.scaled_dot_product_attention(q[:, :, n_real:], k[:, :, :n_real], v[:, :, :n_real], scale=scale)
        out = torch.cat([out, pad.transpose(1, 2)], dim=1)  # joined in [batch, L, heads, dim] order, contiguous
    return out


def _mask_has_split_form(mask: torch.Tensor, real: torch.Tensor) -> bool:
    """Once per module, eagerly: is ``mask`` exactly ``min`` where both patches pad and 0 elsewhere?"""
    pad = ~real
    both = pad[:, :, None] & pad[:, None, :]
    m = mask[:, 0]
    lowest = torch.finfo(mask.dtype).min / 2
    return bool(((m <= lowest) == both).all()) and bool((m[~both] == 0).all())


def _attention_dtype(x: torch.Tensor) -> torch.dtype | None:
    """The dtype SDPA would compute in: autocast's, else the input's; None where the flash kernel cannot run it."""
    dtype = autocast_dtype(x) or x.dtype
    if x.device.type == "cuda" and dtype not in (torch.float16, torch.bfloat16):
        return None
    return dtype


def compact_vision_mask(mask: Any) -> torch.Tensor | None:
    """The mask's diagonal ``[B, L]`` (0 for a real patch, ``min`` for padding) when ``mask`` is exactly
    ``max(c_i, c_j)`` of it, i.e. has the split form; else None. One host sync. The encoder hands its layers this
    instead of the ``[B, 1, L, L]`` mask (`_mllama_vision_encoder`), so no layer saves or copies the big one."""
    if not (isinstance(mask, torch.Tensor) and mask.is_floating_point() and mask.dim() == 4 and mask.shape[1] == 1
            and mask.shape[-1] == mask.shape[-2]):
        return None
    compact = mask[:, 0].diagonal(dim1=-2, dim2=-1).contiguous()
    return compact if bool((expand_vision_mask(compact) == mask).all()) else None


def expand_vision_mask(compact: torch.Tensor) -> torch.Tensor:
    """The ``[B, 1, L, L]`` mask a compact one stands for: ``min`` where both patches pad, 0 elsewhere."""
    return torch.maximum(compact[:, :, None], compact[:, None, :])[:, None]


def with_real_counts(compact: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The compact mask with each image's count of real patches (``int32 [B]``), the form the encoder hands its
    layers: graphed layers key on the counts' values (`training.cuda_graphs`), so a layer can use them as shapes."""
    return compact, (compact == 0).sum(-1, dtype=torch.int32)


def real_first_mask(compact: torch.Tensor, counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, str]:
    """The mask form for rows the encoder already put in `real_first` order (`_mllama_vision_encoder`): the
    compact mask (in that order) and the counts, tagged so the layers skip their own permutation."""
    return compact, counts, REAL_FIRST


def _unpack_compact(mask: Any) -> tuple[torch.Tensor | None, torch.Tensor | None, bool]:
    """``(compact, counts, rows_real_first)`` of a compact mask (`compact_vision_mask`, alone, `with_real_counts`
    or `real_first_mask`), else ``(None, None, False)``."""
    counts, ordered = None, False
    if isinstance(mask, tuple) and len(mask) == 3 and mask[2] == REAL_FIRST:
        mask, ordered = mask[:2], True
    if isinstance(mask, tuple) and len(mask) == 2 and isinstance(mask[1], torch.Tensor):
        mask, counts = mask
        if counts.is_floating_point() or counts.dim() != 1:
            return None, None, False
    if isinstance(mask, torch.Tensor) and mask.is_floating_point() and mask.dim() == 2:
        return mask, counts, ordered
    return None, None, False


def is_compact_vision_mask(mask: Any) -> bool:
    return _unpack_compact(mask)[0] is not None


def _uniform_count(counts: torch.Tensor | None, batch: int) -> int | None:
    """The images' common count of real patches, where the host knows one (else None: the varlen call)."""
    if counts is None or counts.numel() != batch:
        return None
    from hf_fastvision.training.cuda_graphs import host_values

    values = set(host_values(counts))  # one host sync per tensor (cached), none inside a CUDA graph
    return values.pop() if len(values) == 1 else None


def split_vision_attention_forward(self: nn.Module, hidden_states: torch.Tensor,
                                   attention_mask: torch.Tensor | None = None, **kwargs: Any):
    """Drop-in ``forward`` for ``MllamaVisionAttention`` (same arguments, same result). Takes the stock mask or
    its compact form (`compact_vision_mask`)."""
    from hf_fastvision.patching import original_forward

    compact, counts, ordered = _unpack_compact(attention_mask)

    def stock():
        mask = expand_vision_mask(compact) if compact is not None else attention_mask
        return original_forward(self)(hidden_states, attention_mask=mask, **kwargs)

    batch, length, _ = hidden_states.shape
    if compact is not None:
        if self.config._attn_implementation != "sdpa" or kwargs:
            return stock()
        real = compact == 0
        self.__dict__.setdefault(_CHECKED, True)  # the encoder checked the form (`compact_vision_mask`)
    else:
        mask = attention_mask
        usable = (
            self.config._attn_implementation == "sdpa" and not kwargs and mask is not None and mask.dim() == 4
            and mask.shape[1] == 1 and mask.is_floating_point() and self.__dict__.get(_CHECKED, True)
        )
        if not usable:
            return stock()
        real = mask[:, 0].diagonal(dim1=-2, dim2=-1) == 0  # patch i pads exactly when its own entry is masked
        capturing = hidden_states.is_cuda and torch.cuda.is_current_stream_capturing()
        if _CHECKED not in self.__dict__ and not capturing:
            self.__dict__[_CHECKED] = _mask_has_split_form(mask, real)
            if not self.__dict__[_CHECKED]:
                logger.warning("vision_attention_split: %s got a mask of another form; stock attention from now on",
                               type(self).__name__)
                return stock()
    try:
        varlen = _varlen_kernel(hidden_states.device)
    except ImportError as exc:
        self.__dict__[_CHECKED] = False
        logger.warning("vision_attention_split: no varlen flash kernel in this torch (%s); stock attention", exc)
        return stock()
    dtype = _attention_dtype(hidden_states)
    if dtype is None:  # fp32 on CUDA without autocast: the flash kernels take 16-bit only
        return stock()
    shape = (batch, length, self.num_heads, self.head_dim)
    projections = (self.q_proj, self.k_proj, self.v_proj)
    # the rows real-first once, before the projections (row-wise, so they commute), instead of q, k and v after;
    # rows the encoder already ordered (`real_first_mask`) stay as they are
    perm, inv = (None, None) if ordered else real_first(real)
    x = hidden_states if ordered else permute_rows(hidden_states, perm, inv)
    if x.dtype == torch.float32 and dtype != torch.float32 and all(  # i.e. under 16-bit autocast
        narrows_to(p, dtype, x) for p in projections
    ):
        # LayerNorm hands over fp32 under autocast; the projections compute in `dtype` anyway, so each gets its own
        # narrowed copy (three cast nodes: the input's gradient still sums in fp32) and answers in `dtype`, which
        # skips the widen-then-narrow of q, k and v (bit-identical, `_autocast_narrowing`)
        q, k, v = (p(x.to(dtype)).view(shape) for p in projections)
    else:
        q, k, v = (p(x).view(shape) for p in projections)
    q, k, v = (t.to(dtype) for t in (q, k, v))  # what SDPA's autocast rule does (varlen_attn has none)
    n_real = None if self.__dict__.get(_VARLEN_ONLY) else _uniform_count(counts, batch)
    out = permuted_split_attention(q, k, v, real, self.scaling, varlen, n_real)  # [batch, L, heads, dim]
    out = (out if ordered else permute_rows(out, inv, perm)).reshape(batch, length, -1)
    return self.o_proj(out), None
