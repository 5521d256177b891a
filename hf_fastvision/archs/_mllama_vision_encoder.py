"""Mllama's vision encoders keep only the layer outputs the model reads (patch flag ``vision_states``).

``MllamaVisionEncoder.forward`` appends every layer's output to ``hidden_states`` and ``MllamaVisionModel`` holds
both encoders' results until it returns. It then reads five of them (``intermediate_layers_indices``, e.g.
``[3, 7, 15, 23, 30]``) from the 32-layer local encoder and none from the 8-layer global encoder. So in training
the end of the vision forward holds 39 layer outputs at once. On Llama-3.2-11B-Vision each is
``[1, 6432, 1280]`` fp32 (autocast runs LayerNorm in fp32, so the vision residual stream is fp32): 1.2 GiB. That
moment was the peak of our whole QLoRA step at seq 2048 (``scripts/memory_peak.py``).

Layers that checkpoint already save (or offload) their own input for the recompute, so the other outputs serve
no one. Where every layer runs the split attention (`_mllama_vision_attention`), the encoder also hands the layers
the mask's ``[B, L]`` diagonal instead of the ``[B, 1, L, L]`` mask (checked to have the split form, one host sync
per call), with each image's count of real patches (`with_real_counts`): checkpointed and graphed layers then
save and copy that, not 0.08 GiB per encoder. The encoder also puts the rows in the split's real-first order once
(`real_first`) and restores the stock order of the outputs it returns: attention is the only op that mixes rows and
its stock form is permutation-equivariant, so the layers compute the same values on permuted rows; per layer that
saves a sort and two row gathers each way (on an H200 ~0.2 ms per Llama-3.2-11B-Vision vision layer call, 80 calls
per checkpointed step; `scripts/results/h200_2026-12-02k_sixteenth/profile_2048/`). The patched forward runs the
same layers in the same order on the same rows, so the values are the stock ones. Its ``hidden_states`` tuple has the stock length and holds the outputs
at the read indices; the other entries are ``None``. Which indices are read is fixed when the patch is bound, from
the owning vision model.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["lean_encoder_forward", "prepare_lean_encoder"]

_KEEP = "_hffv_keep_states"


def prepare_lean_encoder(module: nn.Module, name: str, model: nn.Module) -> bool:
    """Bind only an encoder that is the ``transformer`` or ``global_transformer`` of an Mllama vision model whose
    reads are known; records which layer outputs that model reads."""
    parent_name = name.rpartition(".")[0]
    try:
        parent = model.get_submodule(parent_name) if parent_name else model
    except AttributeError:
        return False
    indices = getattr(parent, "intermediate_layers_indices", None)
    if getattr(parent, "transformer", None) is module and indices is not None:
        keep = frozenset(int(i) for i in indices)
    elif getattr(parent, "global_transformer", None) is module:
        keep = frozenset()
    else:
        return False
    n = len(module.layers)
    if any(not -n <= i < n for i in keep):
        return False
    module.__dict__[_KEEP] = frozenset(i % n for i in keep)
    return True


def lean_encoder_forward(self: nn.Module, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                         **kwargs: Any):
    """Drop-in ``forward`` for ``MllamaVisionEncoder``: the stock loop, keeping only the outputs read later."""
    from transformers.modeling_outputs import BaseModelOutput

    keep = self.__dict__[_KEEP]
    mask, restore = attention_mask, None
    if _split_ready(self) and not (hidden_states.is_cuda and torch.cuda.is_current_stream_capturing()):
        from hf_fastvision.archs import _mllama_vision_attention as va

        compact = va.compact_vision_mask(attention_mask)
        if compact is not None:  # the layers get the [B, L] diagonal, not the [B, 1, L, L] mask
            compact, counts = va.with_real_counts(compact)  # and each image's count of real patches (shapes)
            # the rows real-first once for all layers (`real_first_mask`): every op but attention is row-wise
            perm, inv = va.real_first(compact == 0)
            hidden_states = va.permute_rows(hidden_states, perm, inv)
            mask = va.real_first_mask(compact.gather(-1, perm), counts)

            def restore(h: torch.Tensor) -> torch.Tensor:
                return va.permute_rows(h, inv, perm)

    states: list[torch.Tensor | None] = []
    for i, layer in enumerate(self.layers):
        hidden_states = layer(hidden_states, attention_mask=mask, **kwargs)
        states.append(hidden_states if i in keep else None)
    if restore is not None:  # the stock row order for what leaves the encoder (each tensor once)
        restored = {id(h): restore(h) for h in [*states, hidden_states] if h is not None}
        states = [None if h is None else restored[id(h)] for h in states]
        hidden_states = restored[id(hidden_states)]
    return BaseModelOutput(last_hidden_state=hidden_states, hidden_states=tuple(states))


def _split_ready(encoder: nn.Module) -> bool:
    """Whether every layer's attention runs the split forward, which takes the compact mask (checked each call:
    flags can be changed by unpatching)."""
    from hf_fastvision.archs._mllama_vision_attention import split_vision_attention_forward

    for layer in encoder.layers:
        attn = getattr(layer, "self_attn", None)
        forward = attn.__dict__.get("forward") if attn is not None else None
        if getattr(forward, "__func__", None) is not split_vision_attention_forward:
            return False
    return True
