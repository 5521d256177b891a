"""Gemma 3: SigLIP vision tower, norms computing x * (1 + w) in fp32, GeGLU MLP."""

from hf_fastvision.registry import ArchSpec, register_arch

GEMMA3 = register_arch(
    ArchSpec(
        name="gemma3",
        model_types=("gemma3",),
        language_model=("model.language_model",),
        vision_tower=("model.vision_tower",),
        projectors=("model.multi_modal_projector",),
        pad_token_candidates=("<pad>",),
        patches={"rms_norm": "gemma", "rope": True, "mlp": "geglu"},
        notes="Fixed image size (896 px, 256 tokens per image); pan-and-scan off by default.",
    )
)
