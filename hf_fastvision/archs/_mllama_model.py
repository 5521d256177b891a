"""``MllamaModel.forward`` that frees the vision output once it is projected (patch flag ``vision_states``).

Stock, ``MllamaModel.forward`` keeps ``vision_outputs`` (the vision model's output, fp32 under autocast) in its
frame until it returns: through the whole text forward, although only the projected states are read after the
projector. On Llama-3.2-11B-Vision that is a ``[1, 1, 4, 1601, 7680]`` fp32 tensor, 0.18 GiB, alive at our
capture step's peak (``scripts/memory_peak.py``, ``modeling_mllama.py:1003``). Nothing else keeps it: the
projector's autograd node saves its own (autocast) copy of the input, not the fp32 tensor.

In training, this forward runs the vision model and the projector itself, exactly as the stock forward does, and
hands the stock forward the projected states as ``cross_attention_states`` (its documented input, "output of
the vision model") with ``pixel_values=None``; the fp32 output is freed on return from ``_project``. The values
are the same operations on the same inputs. Outside training (and for any call shape it does not recognise) the
stock forward runs unchanged, so inference outputs keep ``image_outputs`` where transformers returns it.

Where the text cross-attention split runs (`_mllama_cross_attention`, every cross-attention layer patched, no
cache), the stock frame would likewise keep the prepared ``[B, 1, S, V]`` mask through the text forward (0.1 GiB
at 8192 tokens on Llama-3.2-11B-Vision) although the layers get its compact ``(p, K)`` form. Here the mask is
prepared with transformers' own ``_prepare_cross_attention_mask``, reduced to the compact form and freed; the stock
forward gets no mask, and the text model's patched forward is handed the compact mask and the stock
``full_text_row_masked_out_mask`` instead. A mask without the compact form goes to the stock forward as it came.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["project_then_forward", "INJECTED_MASKS"]

INJECTED_MASKS = "_hffv_injected_cross_masks"  # on the text model, for the duration of one call


def project_then_forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
    """Drop-in ``forward`` for ``MllamaModel`` (see the module docstring)."""
    from hf_fastvision.patching import original_forward

    forward = original_forward(self)
    pixel_values = kwargs.get("pixel_values")
    if (args or not self.training or not isinstance(pixel_values, torch.Tensor)
            or kwargs.get("cross_attention_states") is not None or kwargs.get("aspect_ratio_ids") is None):
        return forward(*args, **kwargs)  # stock, including its own errors for conflicting inputs
    kwargs["cross_attention_states"] = _project(self, kwargs.pop("pixel_values"), kwargs["aspect_ratio_ids"],
                                                kwargs.get("aspect_ratio_mask"))
    masks = _compact_masks(self, kwargs)
    if masks is None:
        return forward(*args, **kwargs)
    kwargs["cross_attention_mask"] = None
    text = self.language_model
    text.__dict__[INJECTED_MASKS] = masks
    try:
        return forward(*args, **kwargs)
    finally:
        text.__dict__.pop(INJECTED_MASKS, None)


def _project(model: nn.Module, pixel_values: torch.Tensor, aspect_ratio_ids: torch.Tensor,
             aspect_ratio_mask: torch.Tensor | None) -> torch.Tensor:
    """The stock forward's vision + projector lines; only the projected states outlive this frame."""
    vision = model.vision_model(pixel_values=pixel_values, aspect_ratio_ids=aspect_ratio_ids,
                                aspect_ratio_mask=aspect_ratio_mask).last_hidden_state
    return model.multi_modal_projector(vision).reshape(-1, vision.shape[-2], model.hidden_size)


def _compact_masks(model: nn.Module, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(compact mask, full_text_row_masked_out_mask)`` where the cross split will take this call, else None."""
    from hf_fastvision.archs._mllama_cross_attention import _all_layers_split, compact_cross_mask, with_dense_shape

    raw = kwargs.get("cross_attention_mask")
    tokens = kwargs.get("input_ids") if kwargs.get("input_ids") is not None else kwargs.get("inputs_embeds")
    if (raw is None or tokens is None or raw.shape[1] != tokens.shape[1]
            or any(kwargs.get(k) is not None for k in ("past_key_values", "cache"))  # 5.17 / 5.24 names
            or not _all_layers_split(model.language_model)):
        return None
    from transformers.models.mllama.modeling_mllama import _prepare_cross_attention_mask

    full, rows = _prepare_cross_attention_mask(raw, num_vision_tokens=model.vision_model.num_patches,
                                               dtype=model.dtype)
    compact = compact_cross_mask(full)
    return None if compact is None else (with_dense_shape(compact, full.shape[2], full.shape[3]), rows)
