"""The load path on tiny checkpoints of every named architecture (and some generic ones), offline, on CPU."""

from __future__ import annotations

import bitsandbytes as bnb
import pytest
import torch
from transformers import AutoModelForImageTextToText

from hf_fastvision import AutoFastVisionModel, FastVisionModel, get_load_info
from hf_fastvision.archs.tiny import GENERIC_TINY_TYPES, NAMED_TINY_TYPES, sample_batch


def _linear_kinds(model):
    return {n: type(m) for n, m in model.named_modules() if isinstance(m, (torch.nn.Linear, bnb.nn.Linear4bit))}


def _assert_follows_plan(model):
    plan = get_load_info(model).plan
    kinds = _linear_kinds(model)
    for name in plan.quantized:
        assert kinds[name] is bnb.nn.Linear4bit, f"{name} should be 4-bit"
    for name in plan.kept:
        assert kinds[name] is torch.nn.Linear, f"{name} should stay 16-bit"
    assert plan.quantized and plan.kept


@pytest.mark.parametrize("name", NAMED_TINY_TYPES)
def test_named_architecture_loads_trains_saves(name, tiny_checkpoint, tmp_path):
    folder = tiny_checkpoint(name)
    upstream = AutoModelForImageTextToText.from_pretrained(folder)

    model = AutoFastVisionModel.from_pretrained(folder)
    assert type(model).__name__ == type(upstream).__name__
    assert type(model).__module__.startswith("transformers.")
    assert type(model) is not type(upstream) and isinstance(model, type(upstream))
    _assert_follows_plan(model)
    assert not get_load_info(model).prequantized

    model2, processor = FastVisionModel.from_pretrained(str(folder), max_seq_length=512)
    tok = processor.tokenizer
    assert tok.padding_side == "right" and tok.pad_token_id != tok.eos_token_id
    batch = sample_batch(processor, name, n=2)
    out = model2(**batch)
    assert torch.isfinite(out.loss)
    out.loss.backward()  # reaches the (16-bit) input embeddings through the 4-bit layers
    emb = model2.get_input_embeddings().weight
    assert emb.grad is not None and torch.isfinite(emb.grad).all()

    # The 4-bit checkpoint it saves loads in stock transformers, and back through us without re-quantizing.
    model2.zero_grad()
    model2.save_pretrained(tmp_path / "q4")
    processor.save_pretrained(tmp_path / "q4")
    stock = AutoModelForImageTextToText.from_pretrained(tmp_path / "q4")
    assert type(stock).__name__ == type(upstream).__name__
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in stock.modules())
    reloaded = AutoFastVisionModel.from_pretrained(tmp_path / "q4")
    assert get_load_info(reloaded).prequantized
    _assert_follows_plan(reloaded)
    model2.eval()
    reloaded.eval()
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**inputs).logits, model2(**inputs).logits, rtol=0, atol=0)


@pytest.mark.parametrize("name", GENERIC_TINY_TYPES)
def test_generic_architecture_loads_and_trains(name, tiny_checkpoint):
    model, processor = FastVisionModel.from_pretrained(str(tiny_checkpoint(name)))
    info = get_load_info(model)
    assert info.arch == "generic"
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    assert "lm_head" in info.plan.kept
    batch = sample_batch(processor, name, n=1)
    loss = model(**batch).loss
    assert torch.isfinite(loss)
    loss.backward()


def test_16bit_and_keep_vision(tiny_checkpoint):
    folder = tiny_checkpoint("qwen2_5_vl")
    m16 = AutoFastVisionModel.from_pretrained(folder, load_in_16bit=True)
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in m16.modules())
    mv = AutoFastVisionModel.from_pretrained(folder, keep_vision_16bit=True)
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in mv.model.visual.modules())
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in mv.model.language_model.modules())


def test_user_quantization_config_wins(tiny_checkpoint):
    from transformers import BitsAndBytesConfig

    qc = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="fp4", llm_int8_skip_modules=["lm_head"])
    model = AutoFastVisionModel.from_pretrained(tiny_checkpoint("qwen2_vl"), quantization_config=qc)
    quant_types = {m.weight.quant_type for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert quant_types == {"fp4"}
    assert isinstance(model.model.visual.merger.mlp[0], bnb.nn.Linear4bit)  # the user's plan, not ours


def test_from_config_and_register(tiny_checkpoint):
    from hf_fastvision.archs.tiny import tiny_config

    model = AutoFastVisionModel.from_config(tiny_config("qwen2_vl"))
    assert type(model).__dict__.get("_hf_fastvision_patched")
    assert type(model).__name__ == "Qwen2VLForConditionalGeneration"

    from transformers import PretrainedConfig, Qwen2VLConfig, Qwen2VLForConditionalGeneration

    class MyVLConfig(Qwen2VLConfig):
        model_type = "my_vl"

    class MyVLModel(Qwen2VLForConditionalGeneration):
        config_class = MyVLConfig

    AutoFastVisionModel.register(MyVLConfig, MyVLModel)
    assert AutoFastVisionModel._model_mapping[MyVLConfig].__name__ == "MyVLModel"
    assert AutoFastVisionModel._model_mapping[MyVLConfig].__dict__.get("_hf_fastvision_patched")
    with pytest.raises(ValueError, match="already mapped"):
        AutoFastVisionModel.register(MyVLConfig, MyVLModel)
    with pytest.raises(ValueError, match="already mapped"):
        AutoFastVisionModel.register(Qwen2VLConfig, Qwen2VLForConditionalGeneration)
    assert isinstance(PretrainedConfig, type)


def test_max_image_size_bounds_image_tokens(tiny_checkpoint):
    from hf_fastvision.archs.tiny import sample_messages

    folder = str(tiny_checkpoint("qwen2_5_vl"))
    _, big = FastVisionModel.from_pretrained(folder, load_in_16bit=True)
    _, small = FastVisionModel.from_pretrained(folder, load_in_16bit=True, max_image_size=28)
    conv = sample_messages("qwen2_5_vl", n=1)[0]
    image = conv[0]["content"][0]["image"].resize((112, 112))
    conv[0]["content"][0]["image"] = image
    n_big = big(text=big.apply_chat_template(conv), images=[image], return_tensors="pt")["input_ids"].shape[1]
    n_small = small(text=small.apply_chat_template(conv), images=[image], return_tensors="pt")["input_ids"].shape[1]
    assert n_small < n_big
    assert small.image_processor.size["longest_edge"] == 28 * 28
