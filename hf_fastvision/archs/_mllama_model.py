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
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["project_then_forward"]


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
    return forward(*args, **kwargs)


def _project(model: nn.Module, pixel_values: torch.Tensor, aspect_ratio_ids: torch.Tensor,
             aspect_ratio_mask: torch.Tensor | None) -> torch.Tensor:
    """The stock forward's vision + projector lines; only the projected states outlive this frame."""
    vision = model.vision_model(pixel_values=pixel_values, aspect_ratio_ids=aspect_ratio_ids,
                                aspect_ratio_mask=aspect_ratio_mask).last_hidden_state
    return model.multi_modal_projector(vision).reshape(-1, vision.shape[-2], model.hidden_size)
