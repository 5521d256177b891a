"""Fused Triton training kernels (Liger-Kernel style: each op file imports only torch and triton).

Every op has a Triton ``torch.autograd.Function`` (forward + backward), a pure-torch
``*_ref`` reference with the same signature, and a convenience function that dispatches to
Triton when the tensors are on CUDA (or when ``TRITON_INTERPRET=1``) and to the reference
otherwise. Without triton installed everything falls back to the references.
"""

from ._utils import HAS_TRITON, preferred_half_dtype, triton_interpret, use_triton
from .fused_linear_cross_entropy import (
    FusedLinearCrossEntropyFunction,
    default_chunk_size,
    fused_linear_cross_entropy,
    fused_linear_cross_entropy_ref,
)
from .geglu import GeGLUFunction, geglu, geglu_grads, geglu_ref
from .rms_norm import RMSNormFunction, rms_norm, rms_norm_ref
from .rope import (
    RoPEFunction,
    apply_multimodal_rotary_pos_emb,
    apply_multimodal_rotary_pos_emb_ref,
    apply_rotary_pos_emb,
    apply_rotary_pos_emb_ref,
    apply_rotary_pos_emb_vision,
    apply_rotary_pos_emb_vision_ref,
    combine_mrope_ref,
    mrope_axis_map,
)
from .swiglu import SwiGLUFunction, swiglu, swiglu_grads, swiglu_ref

__all__ = [
    "HAS_TRITON",
    "preferred_half_dtype",
    "triton_interpret",
    "use_triton",
    # rms norm
    "RMSNormFunction",
    "rms_norm",
    "rms_norm_ref",
    # rope
    "RoPEFunction",
    "apply_rotary_pos_emb",
    "apply_rotary_pos_emb_ref",
    "apply_rotary_pos_emb_vision",
    "apply_rotary_pos_emb_vision_ref",
    "apply_multimodal_rotary_pos_emb",
    "apply_multimodal_rotary_pos_emb_ref",
    "combine_mrope_ref",
    "mrope_axis_map",
    # gated MLP activations
    "SwiGLUFunction",
    "swiglu",
    "swiglu_grads",
    "swiglu_ref",
    "GeGLUFunction",
    "geglu",
    "geglu_grads",
    "geglu_ref",
    # loss
    "FusedLinearCrossEntropyFunction",
    "fused_linear_cross_entropy",
    "fused_linear_cross_entropy_ref",
    "default_chunk_size",
]
