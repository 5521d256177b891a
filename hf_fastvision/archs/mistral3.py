"""Mistral 3 (Mistral-Small-3.x vision): Pixtral vision tower, patch-merger projector."""

from hf_fastvision.archs import _budget
from hf_fastvision.registry import ArchSpec, register_arch

MISTRAL3 = register_arch(
    ArchSpec(
        name="mistral3",
        model_types=("mistral3",),
        language_model=("model.language_model",),
        vision_tower=("model.vision_tower",),
        projectors=("model.multi_modal_projector",),
        image_budget=_budget.longest_edge,
        pad_token_candidates=("<pad>",),
        patches={"rms_norm": "rms", "rope": True, "mlp": "swiglu",
                 # MLP output only enters the residual add: PatchOptions.mlp_lean_recompute (training/lean_mlp.py)
                 "lean_mlp": ("LlamaDecoderLayer", "MistralDecoderLayer", "Qwen2DecoderLayer")},
    )
)
