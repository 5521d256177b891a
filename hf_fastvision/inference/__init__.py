"""Fast generation for loaded models: `enable_fast_inference` attaches `model.fast_generate(...)`.

`hf_fastvision.inference.vllm_backend` is the optional vLLM path (imported only on request).
"""

from hf_fastvision.inference.fast_generate import (
    FastInferenceState,
    disable_fast_inference,
    enable_fast_inference,
    fast_inference_requested,
    fast_inference_state,
    max_batch_for_memory,
)

__all__ = [
    "FastInferenceState",
    "enable_fast_inference",
    "disable_fast_inference",
    "fast_inference_state",
    "fast_inference_requested",
    "max_batch_for_memory",
]
