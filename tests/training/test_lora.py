"""LoRA lands exactly on the layers the flags select; frozen weights keep their dtype; LoRA trains in fp32."""

from __future__ import annotations

import pytest
import torch

from hf_fastvision import AutoFastVisionModel, FastVisionModel
from hf_fastvision.archs.tiny import NAMED_TINY_TYPES, sample_batch
from hf_fastvision.loading import get_load_info
from hf_fastvision.registry import get_arch, resolve_roots
from hf_fastvision.training.lora import lora_target_modules


def _lora_layers(peft_model):
    return {n.rsplit(".lora_A", 1)[0].removeprefix("base_model.model.") for n, _ in peft_model.named_modules() if n.endswith(".lora_A")}


def _under(name, roots):
    return any(name.startswith(r + ".") for r in roots)


@pytest.mark.parametrize("name", NAMED_TINY_TYPES)
def test_flags_select_exact_layers(name, tiny_checkpoint):
    model, processor = FastVisionModel.from_pretrained(str(tiny_checkpoint(name)))
    spec = get_arch(model.config)
    roots = resolve_roots(spec, model)
    everything = set(lora_target_modules(model))
    vision = set(lora_target_modules(model, finetune_language_layers=False))
    language = set(lora_target_modules(model, finetune_vision_layers=False))
    attention = set(lora_target_modules(model, finetune_mlp_modules=False))
    mlp = set(lora_target_modules(model, finetune_attention_modules=False))
    assert vision and language and attention and mlp
    assert vision | language == everything and not vision & language
    assert attention | mlp == everything and not attention & mlp
    assert all(_under(n, roots.vision) for n in vision)
    assert all(_under(n, roots.language) for n in language)
    assert not any(_under(n, roots.projectors) or n in roots.lm_head for n in everything)

    dtypes = {n: p.dtype for n, p in model.named_parameters()}
    peft_model = FastVisionModel.get_peft_model(model, finetune_language_layers=False, finetune_mlp_modules=False)
    assert _lora_layers(peft_model) == vision & attention
    for n, p in peft_model.get_base_model().named_parameters():
        if "lora_" in n:
            assert p.dtype == torch.float32 and p.requires_grad
        else:
            assert not p.requires_grad and p.dtype == dtypes[n.replace(".base_layer", "")], n
    assert get_load_info(peft_model) is not None
    loss = peft_model(**sample_batch(processor, name, n=1)).loss
    loss.backward()
    grads = [p.grad for p in peft_model.parameters() if p.requires_grad]
    # Llava-style models read an earlier vision layer, so the last one's adapters may get no gradient; in the
    # tiny Gemma 3 the answer lies outside the sliding window of the image, so vision gradients are zero there.
    assert any(g is not None for g in grads)
    assert all(torch.isfinite(g).all() for g in grads if g is not None)


def test_bf16_frozen_weights_not_upcast(tiny_checkpoint):
    model, _ = FastVisionModel.from_pretrained(str(tiny_checkpoint("qwen2_vl")), dtype=torch.bfloat16)
    peft_model = FastVisionModel.get_peft_model(model)
    frozen = {p.dtype for n, p in peft_model.named_parameters() if not p.requires_grad and p.is_floating_point()}
    assert frozen == {torch.bfloat16}
    assert {p.dtype for p in peft_model.parameters() if p.requires_grad} == {torch.float32}


def test_target_modules_override_and_bad_flags(tiny_checkpoint):
    model, _ = FastVisionModel.from_pretrained(str(tiny_checkpoint("qwen2_vl")))
    with pytest.raises(ValueError, match="vision and/or language"):
        FastVisionModel.get_peft_model(model, finetune_vision_layers=False, finetune_language_layers=False)
    peft_model = FastVisionModel.get_peft_model(model, target_modules=["q_proj"])
    assert _lora_layers(peft_model) and all(n.endswith("q_proj") for n in _lora_layers(peft_model))
    with pytest.raises(ValueError, match="already has LoRA"):
        FastVisionModel.get_peft_model(peft_model)


def test_for_training_and_inference_switch(tiny_checkpoint):
    from hf_fastvision.training.checkpointing import checkpointing_mode

    model, processor = FastVisionModel.from_pretrained(str(tiny_checkpoint("qwen2_vl")), use_gradient_checkpointing=True)
    peft_model = FastVisionModel.get_peft_model(model)
    assert peft_model.training and processor.tokenizer.padding_side == "right"
    assert checkpointing_mode(peft_model.get_base_model()) is not None
    FastVisionModel.for_inference(peft_model)
    assert not peft_model.training and processor.tokenizer.padding_side == "left"
    assert checkpointing_mode(peft_model.get_base_model()) is None
    FastVisionModel.for_training(peft_model)
    assert peft_model.training and processor.tokenizer.padding_side == "right"
    assert checkpointing_mode(peft_model.get_base_model()) is not None


def test_spec_listed_blocks_are_checkpointed(tiny_checkpoint):
    """Mllama's vision layers are plain modules upstream; the spec has them checkpointed too, with equal grads."""
    from hf_fastvision.archs.tiny import tiny_processor
    from hf_fastvision.training.checkpointing import checkpointed_layers

    name = "mllama"
    batch = sample_batch(tiny_processor(name), name, n=1)
    grads = {}
    for mode in (False, True):
        model = AutoFastVisionModel.from_pretrained(tiny_checkpoint(name), load_in_16bit=True)
        peft_model = FastVisionModel.get_peft_model(model, use_gradient_checkpointing=mode)
        vision_layers = [m for m in checkpointed_layers(peft_model.get_base_model()) if "Vision" in type(m).__name__]
        assert vision_layers
        calls = []
        for layer in vision_layers:
            layer.mlp.register_forward_hook(lambda *a: calls.append(1))
        peft_model(**batch).loss.backward()
        if mode:  # recomputed in backward (a layer whose output never reaches the loss is not)
            assert len(calls) > len(vision_layers)
        else:
            assert len(calls) == len(vision_layers)
        grads[mode] = {n: p.grad.clone() for n, p in peft_model.named_parameters() if p.grad is not None}
    for n, g in grads[False].items():
        torch.testing.assert_close(grads[True][n], g, rtol=1e-5, atol=1e-6, msg=n)
