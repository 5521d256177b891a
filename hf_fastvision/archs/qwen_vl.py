"""Qwen2-VL, Qwen2.5-VL and Qwen3-VL: `model.visual` (with its `merger`), `model.language_model`, M-RoPE."""

from hf_fastvision.archs import _budget
from hf_fastvision.archs._vision_attention import grouped_chunk_attention_forward
from hf_fastvision.registry import ArchSpec, register_arch

# vision attention: chunks (windows / images) of equal length in one SDPA call (see _vision_attention.py)
_VISION_ATTENTION = ("VisionAttention", grouped_chunk_attention_forward)
# layers whose gated MLP output only enters the residual add (PatchOptions.mlp_lean_recompute, training/lean_mlp.py)
_LEAN_MLP = ("Qwen2VLDecoderLayer", "Qwen2_5_VLDecoderLayer", "Qwen2_5_VLVisionBlock", "Qwen3VLTextDecoderLayer")

_COMMON = dict(
    language_model=("model.language_model",),
    vision_tower=("model.visual",),
    image_budget=_budget.total_pixels,
    pad_token_candidates=("<|endoftext|>",),
)

QWEN2_VL = register_arch(
    ArchSpec(
        name="qwen2_vl",
        model_types=("qwen2_vl",),
        projectors=("model.visual.merger",),
        patches={"rms_norm": "rms", "rope": True, "mlp": "swiglu", "vision_attention": _VISION_ATTENTION,
                 "lean_mlp": _LEAN_MLP},
        notes="Forward needs mm_token_type_ids with images (the processor makes it).",
        **_COMMON,
    )
)
QWEN2_5_VL = register_arch(
    ArchSpec(
        name="qwen2_5_vl",
        model_types=("qwen2_5_vl",),
        projectors=("model.visual.merger",),
        patches={"rms_norm": "rms", "rope": True, "mlp": "swiglu", "vision_attention": _VISION_ATTENTION,
                 "lean_mlp": _LEAN_MLP},
        **_COMMON,
    )
)
QWEN3_VL = register_arch(
    ArchSpec(
        name="qwen3_vl",
        model_types=("qwen3_vl",),
        projectors=("model.visual.merger", "model.visual.deepstack_merger_list"),
        patches={"rms_norm": "rms", "rope": True, "mlp": "swiglu", "vision_attention": _VISION_ATTENTION,
                 "lean_mlp": _LEAN_MLP},
        notes="Deepstack mergers feed vision features into early text layers; kept 16-bit with the merger.",
        **_COMMON,
    )
)
