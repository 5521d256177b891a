"""Training: LoRA set-up, offloaded activation checkpointing, the vision SFT collator."""

from hf_fastvision.training.checkpointing import disable_checkpointing, enable_checkpointing
from hf_fastvision.training.collator import VisionSFTCollator
from hf_fastvision.training.lora import for_inference, for_training, get_peft_model, lora_target_modules

__all__ = [
    "get_peft_model",
    "lora_target_modules",
    "for_training",
    "for_inference",
    "enable_checkpointing",
    "disable_checkpointing",
    "VisionSFTCollator",
]
