"""Llava with a CLIP vision tower, and Pixtral (a Llava with a Pixtral vision tower)."""

from hf_fastvision.archs import _budget
from hf_fastvision.registry import ArchSpec, register_arch

LLAVA = register_arch(
    ArchSpec(
        name="llava",
        model_types=("llava",),
        language_model=("model.language_model",),
        vision_tower=("model.vision_tower",),
        projectors=("model.multi_modal_projector",),
        image_budget=_budget.generic,
        pad_token_candidates=("<pad>",),
        patches={"rms_norm": "rms", "rope": True, "mlp": "swiglu",
                 # MLP output only enters the residual add: PatchOptions.mlp_lean_recompute (training/lean_mlp.py)
                 "lean_mlp": ("LlamaDecoderLayer", "MistralDecoderLayer", "Qwen2DecoderLayer")},
        notes=(
            "CLIP towers take a fixed image size; Pixtral towers (vision_feature_select_strategy='full') take "
            "max_image_size as the longest edge."
        ),
    )
)
