"""Qwen-VL vision attention with one SDPA call per distinct chunk length (instead of one call per chunk).

Qwen2-VL, Qwen2.5-VL and Qwen3-VL vision towers attend within chunks given by ``cu_seqlens``: one chunk per image
(Qwen2-VL, Qwen3-VL) or per window of 8x8 merged patches (Qwen2.5-VL's windowed layers). With the ``sdpa``
implementation transformers runs one SDPA call per chunk: a 448x448 image has 16 windows, so Qwen2.5-VL-7B's 32
vision layers issue ~450 attention calls per forward, ~960 per checkpointed training step. On an H200 (torch 2.11,
2026-11-27 profile, `scripts/profile_step.py`) each call cost ~280 us of host time in cuDNN attention — about a
quarter of the step's host time, while the GPU idled.

Chunks of equal length are stacked into one batched SDPA call (exact: the chunks are independent), so a typical
image needs one or two calls per layer. Anything but the ``sdpa`` implementation runs the stock forward.
"""

from __future__ import annotations

import sys
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["grouped_chunk_attention_forward", "rope_warmup_spec"]


def grouped_chunk_attention_forward(
    self: nn.Module,
    hidden_states: torch.Tensor,
    cu_seqlens: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
    max_seqlen: int | None = None,
    **kwargs: Any,
) -> torch.Tensor:
    """Drop-in ``forward`` for ``Qwen*VisionAttention`` (same arguments, same result)."""
    if self.config._attn_implementation != "sdpa" or position_embeddings is None:
        from hf_fastvision.patching import original_forward

        return original_forward(self)(hidden_states, cu_seqlens, position_embeddings=position_embeddings,
                                      max_seqlen=max_seqlen, **kwargs)
    if self.__dict__.get("_hffv_rope"):  # the `rope` patch flag: the fused kernel (same fp32 math)
        from hf_fastvision.kernels.rope import apply_rotary_pos_emb_vision as rope
    else:
        rope = sys.modules[type(self).__module__].apply_rotary_pos_emb_vision
    seq = hidden_states.shape[0]
    q, k, v = self.qkv(hidden_states).reshape(seq, 3, self.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
    cos, sin = position_embeddings
    q, k = rope(q, k, cos, sin)  # [seq, heads, head_dim]
    heads, head_dim = q.shape[1], q.shape[2]
    from hf_fastvision.training.cuda_graphs import host_values

    bounds = host_values(cu_seqlens)  # one host sync per step (cached per tensor), none inside a CUDA graph
    if bounds[0] != 0 or bounds[-1] != seq:
        raise ValueError(f"cu_seqlens must run from 0 to {seq}, got {bounds[0]}..{bounds[-1]}")
    groups: dict[int, list[int]] = {}
    for start, end in zip(bounds[:-1], bounds[1:]):
        if end > start:
            groups.setdefault(end - start, []).append(start)
    dropout = self.attention_dropout if self.training else 0.0

    def attend(qs: torch.Tensor, ks: torch.Tensor, vs: torch.Tensor, n: int, length: int) -> torch.Tensor:
        shape = (n, length, heads, head_dim)
        qs, ks, vs = (t.reshape(shape).transpose(1, 2) for t in (qs, ks, vs))  # [n, heads, length, head_dim]
        out = F.scaled_dot_product_attention(qs, ks, vs, dropout_p=dropout, scale=self.scaling)
        return out.transpose(1, 2).reshape(n * length, heads, head_dim)

    if len(groups) == 1:  # every chunk has the same length: a view, no gather
        (length, starts), = groups.items()
        out = attend(q, k, v, len(starts), length)
    else:
        out = q.new_zeros(seq, heads, head_dim)
        for length, starts in groups.items():
            idx = _chunk_index(length, tuple(starts), q.device)
            part = attend(q.index_select(0, idx), k.index_select(0, idx), v.index_select(0, idx), len(starts), length)
            out = out.index_copy(0, idx, part.to(out.dtype))
    return self.proj(out.reshape(seq, -1))


def rope_warmup_spec(module: nn.Module, dtype: str) -> dict[str, Any] | None:
    """The rotary launch `grouped_chunk_attention_forward` makes on `module` (for `training/precompile.py`): q/k
    are slices of the fused qkv projection (``[S, 3, H, D]``) in the activations' `dtype`; cos/sin are fp32 (the
    towers' rotary tables stay fp32 whatever the model's dtype). None when `module` does not run it with the fused
    rotary."""
    forward = getattr(module.__dict__.get("forward"), "__func__", None)
    if forward is not grouped_chunk_attention_forward or not module.__dict__.get("_hffv_rope"):
        return None
    heads, qkv = getattr(module, "num_heads", None), getattr(module, "qkv", None)
    width = getattr(qkv, "out_features", None)
    if not isinstance(heads, int) or not isinstance(width, int) or width % (3 * heads):
        return None
    return {"op": "rope", "layout": "qkv", "q_heads": heads, "kv_heads": heads, "head_dim": width // (3 * heads),
            "dtype": dtype, "cos_dtype": "float32"}


_INDEX_CACHE: dict[tuple, torch.Tensor] = {}


def _chunk_index(length: int, starts: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """Token indices of the chunks starting at `starts`, cached on the device (built before any graph capture)."""
    key = (length, starts, device)
    idx = _INDEX_CACHE.get(key)
    if idx is None:
        if len(_INDEX_CACHE) > 256:
            _INDEX_CACHE.clear()
        idx = (torch.tensor(starts)[:, None] + torch.arange(length)[None, :]).reshape(-1).to(device)
        _INDEX_CACHE[key] = idx
    return idx
