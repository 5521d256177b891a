"""Architecture specs, one small module per family. Importing this package registers them all.

The named families register first; the generic spec then claims every remaining image-text-to-text model type
of the installed transformers.
"""

from hf_fastvision.archs import gemma3, idefics3, llava, mistral3, mllama, qwen_vl  # noqa: F401  (register)
from hf_fastvision.archs.generic import build_generic_spec
from hf_fastvision.registry import register_arch

GENERIC = register_arch(build_generic_spec())

__all__ = ["GENERIC"]
