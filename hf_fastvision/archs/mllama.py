"""Llama 3.2 Vision: tiled vision encoder, cross-attention layers in the text decoder."""

from hf_fastvision.archs import _budget
from hf_fastvision.archs._mllama_cross_attention import cross_attention_forward, text_model_forward
from hf_fastvision.archs._mllama_model import project_then_forward
from hf_fastvision.archs._mllama_vision_attention import split_vision_attention_forward
from hf_fastvision.archs._mllama_vision_encoder import lean_encoder_forward, prepare_lean_encoder
from hf_fastvision.archs._mllama_vision_mlp import vision_mlp_forward
from hf_fastvision.registry import ArchSpec, register_arch


def _frozen_mlp_gate(layer) -> bool:
    """A cross-attention layer's MLP output is ``gate.tanh() * mlp(x)`` before the residual add: the recomputed value
    is never read while the gate is frozen (LoRA), and is read for the gate's gradient when it trains."""
    gate = getattr(layer, "cross_attn_mlp_gate", None)
    return gate is not None and not gate.requires_grad


MLLAMA = register_arch(
    ArchSpec(
        name="mllama",
        model_types=("mllama",),
        language_model=("model.language_model",),
        vision_tower=("model.vision_model",),
        projectors=("model.multi_modal_projector",),
        image_budget=_budget.tiles,
        pad_token_candidates=("<|finetune_right_pad_id|>",),
        patches={"rms_norm": "rms", "rope": True, "mlp": "swiglu",
                 # PatchOptions.cross_attention_split: the text cross-attention over the visible keys only
                 "cross_attention_split": (("TextCrossAttention", cross_attention_forward),
                                           ("TextModel", text_model_forward)),
                 # PatchOptions.vision_states: the encoders keep only the layer outputs the vision model reads
                 "vision_states": ("VisionEncoder", lean_encoder_forward, prepare_lean_encoder),
                 # ... and, under the same flag, the model frees the vision output once projected (training)
                 "vision_output": ("MllamaModel", project_then_forward),
                 # PatchOptions.vision_mlp: the vision MLP in the autocast dtype (bit-identical, no fp32 round trips)
                 "vision_mlp": ("VisionMLP", vision_mlp_forward),
                 # PatchOptions.mlp_lean_recompute: layers whose MLP output only enters the residual add; the
                 # cross-attention layers scale it by a weight first, which is fine while that weight is frozen
                 "lean_mlp": ("MllamaSelfAttentionDecoderLayer",
                              ("MllamaCrossAttentionDecoderLayer", _frozen_mlp_gate)),
                 # PatchOptions.vision_attention_split (on by default; measured in scripts/results/h200_2026-12-01c_*)
                 "vision_attention_split": ("VisionAttention", split_vision_attention_forward)},
        checkpoint_layers=("MllamaVisionEncoderLayer",),  # 40 vision layers over 4 tiles: not GC layers upstream
        # the text model hands every decoder layer every input: the self-attention layers ignore the cross-attention
        # ones (so their CUDA graphs need not key on the cross split's host-known shapes), the cross-attention layers
        # the causal mask and the rotary inputs (a padded batch's [B, 1, S, S] mask gets no graph buffer for them)
        unused_layer_kwargs={
            "MllamaSelfAttentionDecoderLayer": ("cross_attention_states", "cross_attention_mask",
                                                "full_text_row_masked_out_mask"),
            "MllamaCrossAttentionDecoderLayer": ("attention_mask", "position_ids", "position_embeddings"),
        },
        notes="max_image_size bounds the number of 560-px tiles per image.",
    )
)
