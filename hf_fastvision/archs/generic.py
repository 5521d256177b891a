"""The generic spec: every other image-text-to-text model type transformers knows, discovered at import time.

Module roles are found by name (discovery patterns): the common names transformers uses for text decoders,
vision encoders and projectors across its ~100 vision-language families.
"""

from __future__ import annotations

from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

from hf_fastvision.archs import _budget
from hf_fastvision.registry import ArchSpec, get_arch_for_model_type, register_arch

LANGUAGE_NAMES = ("language_model", "text_model", "text_decoder", "decoder")
VISION_NAMES = ("visual", "vision_tower", "vision_model", "vision_encoder", "image_encoder", "vision_backbone")
PROJECTOR_NAMES = (
    "multi_modal_projector",
    "mm_projector",
    "connector",
    "merger",
    "modality_projection",
    "vision_projection",
    "visual_projection",
    "projector",
    "image_newline",
)


def discovered_model_types() -> list[str]:
    """Image-text-to-text model types of the installed transformers that no named spec covers."""
    return sorted(mt for mt in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES if get_arch_for_model_type(mt) is None)


def build_generic_spec() -> ArchSpec:
    return ArchSpec(
        name="generic",
        model_types=tuple(discovered_model_types()),
        language_model=LANGUAGE_NAMES,
        vision_tower=VISION_NAMES,
        projectors=PROJECTOR_NAMES,
        image_budget=_budget.generic,
        pad_token_candidates=("<pad>", "<|pad|>", "[PAD]"),
        generic=True,
        notes="Generic path: module roles discovered by name; no fused-kernel patches.",
    )
