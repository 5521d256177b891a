"""fast_generate (static KV cache) == generate, token for token, on tiny 4-bit models of every named architecture.

Batches hold one image per prompt with different image sizes (`tiny_images` alternates widths), left padded.
"""

from __future__ import annotations

import sys

import pytest
import torch

from hf_fastvision import FastVisionModel
from hf_fastvision.archs.tiny import NAMED_TINY_TYPES, missing_dependencies, sample_batch
from hf_fastvision.inference import disable_fast_inference, enable_fast_inference, fast_inference_state

NEW_TOKENS = 6
MAX_SEQ = 256
# Architectures expected to fall back to the dynamic cache (none on transformers 5.24; Mllama on 5.17).
DYNAMIC_CACHE_FALLBACK: dict[str, str] = {}
if tuple(int(x) for x in __import__("transformers").__version__.split(".")[:2]) < (5, 20):
    # transformers 5.17's Mllama static cache mis-sizes the cross-attention mask; fast_generate falls back
    DYNAMIC_CACHE_FALLBACK["mllama"] = "static cache shape mismatch in Mllama cross-attention (transformers 5.17)"


def _cache_types(model) -> list[str]:
    """Install a hook recording the cache class each forward of the transformers model receives."""
    seen: list[str] = []

    def hook(_module, _args, kwargs):
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        seen.append(type(cache).__name__)

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    base._hf_test_hook = base.register_forward_pre_hook(hook, with_kwargs=True)
    return seen


def _both(model, batch) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    kwargs = dict(batch, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)
    with torch.no_grad():
        ref = model.generate(**kwargs)
        seen = _cache_types(model)
        try:
            out = model.fast_generate(**kwargs)
        finally:
            base = model.get_base_model() if hasattr(model, "get_base_model") else model
            base._hf_test_hook.remove()
    return ref, out, seen


def _check(name, model, processor, tag) -> torch.Tensor:
    """Compare at batch 1 and 4; returns the batch-4 greedy output."""
    for n in (1, 4):
        batch = sample_batch(processor, name, n, with_labels=False)
        if n > 1:
            assert (batch["attention_mask"][:, -1] == 1).all(), "prompts must be left padded"
        ref, out, seen = _both(model, batch)
        assert ref.shape[1] == batch["input_ids"].shape[1] + NEW_TOKENS
        assert torch.equal(ref, out), f"{name} {tag} batch {n}: fast_generate differs from generate"
        state = fast_inference_state(model)
        if name in DYNAMIC_CACHE_FALLBACK:
            assert not state.static_cache and state.fallback_reason
        else:
            assert state.static_cache, state.fallback_reason
            assert seen and all(t == "StaticCache" for t in seen), seen
    return ref


@pytest.mark.parametrize("name", NAMED_TINY_TYPES)
def test_fast_generate_equals_generate(name, tiny_checkpoint):
    if missing := missing_dependencies(name):
        pytest.skip(f"needs {missing}")
    torch.manual_seed(0)
    model, processor = FastVisionModel.from_pretrained(tiny_checkpoint(name), max_seq_length=MAX_SEQ)
    FastVisionModel.for_inference(model)
    processor.tokenizer.padding_side = "left"
    enable_fast_inference(model, max_seq_length=MAX_SEQ)
    base_out = _check(name, model, processor, "base")

    # LoRA on vision and language layers, lora_B randomised so that the adapter changes the output
    peft_model = FastVisionModel.get_peft_model(model, r=4, lora_alpha=8, use_gradient_checkpointing=False)
    with torch.no_grad():
        for pname, param in peft_model.named_parameters():
            if "lora_B" in pname:
                param.normal_(0.0, 0.5)
    disable_fast_inference(peft_model)  # what for_training does
    assert not hasattr(peft_model, "fast_generate")
    FastVisionModel.for_inference(peft_model)
    processor.tokenizer.padding_side = "left"
    enable_fast_inference(peft_model)  # settings remembered from the first call
    assert fast_inference_state(peft_model).max_seq_length == MAX_SEQ
    lora_out = _check(name, peft_model, processor, "lora")
    assert not torch.equal(base_out, lora_out), "the randomised adapter should change the greedy output"


def test_enable_disable_and_limits(tiny_checkpoint):
    name = "qwen2_5_vl"
    model, processor = FastVisionModel.from_pretrained(tiny_checkpoint(name), max_seq_length=MAX_SEQ)
    FastVisionModel.for_inference(model)
    with pytest.raises(ValueError, match="gpu_memory_utilization"):
        enable_fast_inference(model, max_seq_length=MAX_SEQ, gpu_memory_utilization=0.0)
    with pytest.raises(ValueError, match="max_seq_length"):
        enable_fast_inference(model, max_seq_length=0)
    enable_fast_inference(model, max_seq_length=MAX_SEQ, max_batch_size=2)
    assert enable_fast_inference(model, max_seq_length=MAX_SEQ, max_batch_size=2) is model  # idempotent
    state = fast_inference_state(model)
    assert state.max_batch_size == 2 and not state.compile  # no compile on CPU
    batch = sample_batch(processor, name, 4, with_labels=False)
    with pytest.raises(ValueError, match="fits at most 2"):
        model.fast_generate(**batch, max_new_tokens=2)
    disable_fast_inference(model)
    assert not hasattr(model, "fast_generate") and fast_inference_state(model) is None
    assert "_valid_auto_compile_criteria" not in model.__dict__
    disable_fast_inference(model)  # safe twice
    enable_fast_inference(model, compile=False)  # remembered like the other settings
    disable_fast_inference(model)
    enable_fast_inference(model)
    state = fast_inference_state(model)
    assert not state.compile_requested and not state.compile and state.max_seq_length == MAX_SEQ


def test_vllm_backend_is_optional_and_lazy():
    from types import SimpleNamespace

    from hf_fastvision.errors import FeatureNotAvailableError
    from hf_fastvision.inference import vllm_backend

    assert "vllm" not in sys.modules or vllm_backend.vllm_available()
    if vllm_backend.vllm_available():
        pytest.skip("vllm is installed here")
    config = SimpleNamespace(architectures=["Qwen2_5_VLForConditionalGeneration"])
    assert not vllm_backend.vllm_supports(config)
    with pytest.raises(FeatureNotAvailableError, match="pip install vllm"):
        vllm_backend.load_vllm_engine("some/model", config, max_seq_length=128)
    assert "vllm" not in sys.modules


def test_fast_inference_flag_and_training_switch(tiny_checkpoint):
    """`from_pretrained(fast_inference=True)` attaches fast_generate; for_training removes it, for_inference restores."""
    from hf_fastvision import FastVisionModel

    model, processor = FastVisionModel.from_pretrained(str(tiny_checkpoint("qwen2_vl")), fast_inference=True,
                                                       max_seq_length=128)
    assert callable(getattr(model, "fast_generate", None))
    peft_model = FastVisionModel.get_peft_model(model, r=4)  # calls for_training
    assert getattr(peft_model, "fast_generate", None) is None
    FastVisionModel.for_inference(peft_model)
    assert callable(getattr(peft_model, "fast_generate", None))
