"""hf_fastvision: fast, memory-lean 4-bit fine-tuning of vision-language models on transformers."""

from hf_fastvision import allocator as _allocator

ALLOCATOR_SETUP = _allocator.configure()  # before anything can start CUDA; see `hf_fastvision.allocator`

from hf_fastvision.auto import AutoFastVisionModel
from hf_fastvision.errors import (
    CheckpointConfigError,
    CheckpointMismatchError,
    ConflictingOptionsError,
    CorruptCheckpointError,
    FastVisionError,
    FeatureNotAvailableError,
    HubUnreachableError,
    ImageSpanTruncationError,
    MissingDependencyError,
    ModelNotFoundError,
    NotAVisionModelError,
)
from hf_fastvision.errors import InvalidArgumentError, MissingTokenError
from hf_fastvision.fast_vision import FastVisionModel
from hf_fastvision.loading import LoadInfo, get_load_info
from hf_fastvision.quantization import QuantPlan
from hf_fastvision.registry import ArchSpec, get_arch, list_archs, register_arch

__version__ = "0.1.0"

__all__ = [
    "AutoFastVisionModel",
    "FastVisionModel",
    "ArchSpec",
    "register_arch",
    "get_arch",
    "list_archs",
    "QuantPlan",
    "LoadInfo",
    "get_load_info",
    "FastVisionError",
    "ModelNotFoundError",
    "NotAVisionModelError",
    "ConflictingOptionsError",
    "CorruptCheckpointError",
    "HubUnreachableError",
    "CheckpointConfigError",
    "CheckpointMismatchError",
    "MissingDependencyError",
    "FeatureNotAvailableError",
    "ImageSpanTruncationError",
    "InvalidArgumentError",
    "MissingTokenError",
]
