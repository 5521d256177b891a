"""Tiny offline models/processors (hf_fastvision.archs.tiny): train step, generate, processor round trip."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from hf_fastvision.archs import tiny

ALL = tiny.NAMED_TINY_TYPES + tiny.GENERIC_TINY_TYPES


def _skip_if_missing_deps(name):
    missing = tiny.missing_dependencies(name)
    if missing:
        pytest.skip(f"{name} processor needs {', '.join(missing)} (pip install {' '.join(missing)})")


@pytest.fixture(autouse=True)
def _one_thread():
    # the models are tiny: intra-op threads only add synchronisation overhead (10x slower on 2 busy cores)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_public_names():
    """Every named architecture spec has a tiny model, so registry-iterating tests cover it."""
    from hf_fastvision.registry import list_archs

    named_types = {mt for spec in list_archs(include_generic=False) for mt in spec.model_types}
    assert {tiny.model_type_of(n) for n in tiny.NAMED_TINY_TYPES} == named_types
    assert "llava_pixtral" in tiny.NAMED_TINY_TYPES  # Llava with a Pixtral tower, besides the CLIP one
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    assert len(tiny.GENERIC_TINY_TYPES) >= 6
    assert not set(tiny.GENERIC_TINY_TYPES) & set(tiny.NAMED_TINY_TYPES)
    for name in ALL:
        assert tiny.model_type_of(name) in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES
    assert tiny.model_type_of("llava_pixtral") == "llava"
    with pytest.raises(ValueError):
        tiny.tiny_config("not_a_model")


@pytest.mark.parametrize("name", ALL)
def test_config_agrees_with_tokenizer(name):
    cfg = tiny.tiny_config(name)
    tok = tiny.tiny_tokenizer(name)
    text = cfg.get_text_config()
    assert cfg.model_type == tiny.model_type_of(name)
    assert text.hidden_size == tiny.HIDDEN and text.num_hidden_layers == 2
    assert len(tok) <= text.vocab_size < 2048
    assert tok.pad_token is not None and tok.pad_token_id != tok.eos_token_id
    for role in ("bos", "eos", "pad"):
        if getattr(tok, f"{role}_token") is not None:
            assert getattr(text, f"{role}_token_id") == getattr(tok, f"{role}_token_id"), role
    image_id = getattr(cfg, "image_token_id", None)
    if image_id is None:
        image_id = cfg.image_token_index
    assert 0 <= image_id < len(tok)
    if name == "llava_pixtral":
        assert cfg.vision_config.model_type == "pixtral" and cfg.vision_feature_select_strategy == "full"
    if name == "llava":
        assert cfg.vision_config.model_type == "clip_vision_model"
    if name == "mllama":
        assert text.cross_attention_layers == [1]
    if name in ("qwen2_vl", "qwen2_5_vl", "qwen3_vl"):
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        assert sum(text.rope_parameters["mrope_section"]) == head_dim // 2
    if name == "gemma3":
        assert text.sliding_window <= 16 and "sliding_attention" in text.layer_types


@pytest.mark.parametrize("name", ALL)
def test_train_step_generate_and_processor_roundtrip(name, tmp_path):
    _skip_if_missing_deps(name)
    from transformers import AutoProcessor

    model, processor = tiny.tiny_model_and_processor(name)
    n_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    assert n_bytes < 5 * 2**20, n_bytes
    assert hasattr(model.model, tiny.text_model_attr(name))

    # forward with labels + backward
    batch = tiny.sample_batch(processor, name, n=2)
    assert (batch["labels"] != -100).any()
    assert (batch["labels"][batch["input_ids"] == processor.tokenizer.pad_token_id] == -100).all()
    model.train()
    out = model(**batch)
    assert torch.isfinite(out.loss), out.loss
    out.loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    model.zero_grad(set_to_none=True)

    # generate
    model.eval()
    gen_batch = tiny.sample_batch(processor, name, n=2, with_labels=False)
    assert "labels" not in gen_batch
    with torch.no_grad():
        seq = model.generate(**gen_batch, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    assert seq.shape == (2, gen_batch["input_ids"].shape[1] + 3)

    # save / reload the processor offline through AutoProcessor
    processor.save_pretrained(tmp_path)
    model.config.save_pretrained(tmp_path)  # as in a model folder: config.json next to the processor files
    reloaded = AutoProcessor.from_pretrained(tmp_path)
    assert type(reloaded) is type(processor)
    assert type(reloaded.image_processor) is type(processor.image_processor)
    assert reloaded.chat_template == processor.chat_template
    assert reloaded.image_processor.to_dict() == processor.image_processor.to_dict()
    assert len(reloaded.tokenizer) == len(processor.tokenizer)
    assert reloaded.tokenizer.pad_token_id == processor.tokenizer.pad_token_id
    again = tiny.sample_batch(reloaded, name, n=2)
    assert set(again.keys()) == set(batch.keys())
    for key, value in batch.items():
        if torch.is_tensor(value):
            assert torch.equal(value, again[key]), key
