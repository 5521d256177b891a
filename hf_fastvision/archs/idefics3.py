"""Idefics3 and SmolVLM: SigLIP vision model, pixel-shuffle connector, text model at `model.text_model`."""

from hf_fastvision.archs import _budget
from hf_fastvision.registry import ArchSpec, register_arch

_COMMON = dict(
    language_model=("model.text_model",),
    vision_tower=("model.vision_model",),
    projectors=("model.connector",),
    image_budget=_budget.idefics_longest_edge,
    pad_token_candidates=("<pad>",),
    patches={"rms_norm": "rms", "rope": True, "mlp": "swiglu",
             # MLP output only enters the residual add: PatchOptions.mlp_lean_recompute (training/lean_mlp.py)
             "lean_mlp": ("LlamaDecoderLayer", "MistralDecoderLayer", "Qwen2DecoderLayer")},
)

IDEFICS3 = register_arch(ArchSpec(name="idefics3", model_types=("idefics3",), **_COMMON))
SMOLVLM = register_arch(ArchSpec(name="smolvlm", model_types=("smolvlm",), **_COMMON))
