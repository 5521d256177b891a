"""Every saving mode round-trips with equal logits, through our loader and through stock transformers/peft."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForImageTextToText

from hf_fastvision import AutoFastVisionModel, FastVisionModel, get_load_info
from hf_fastvision.archs.tiny import sample_batch
from hf_fastvision.quantization import keep_canonical_packing
from hf_fastvision.training.saving import save_adapter, save_merged_4bit, save_merged_16bit


@pytest.fixture(params=["qwen2_5_vl", "gemma3", "idefics3"])
def trained(request, tiny_checkpoint):
    name = request.param
    model, processor = FastVisionModel.from_pretrained(str(tiny_checkpoint(name)))
    model = FastVisionModel.get_peft_model(model, r=8, lora_alpha=16, use_gradient_checkpointing=False)
    torch.manual_seed(0)
    with torch.no_grad():  # move the adapters away from their zero-initialised B so merging matters
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    batch = sample_batch(processor, name, n=2, with_labels=False)
    model.eval()
    with torch.no_grad():
        logits = model(**batch).logits
    return name, model, processor, batch, logits


def keep_canonical_packing_of(model):
    keep_canonical_packing(model)  # the same bitsandbytes route as our loads (no AVX512 repacking)
    return model


def _logits(model, batch):
    model.eval()
    with torch.no_grad():
        return model(**batch).logits


def test_adapter_round_trip(trained, tiny_checkpoint, tmp_path):
    name, model, processor, batch, logits = trained
    save_adapter(model, tmp_path / "adapter", processor)
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
    base = AutoFastVisionModel.from_pretrained(tiny_checkpoint(name))
    ours = PeftModel.from_pretrained(base, tmp_path / "adapter")
    torch.testing.assert_close(_logits(ours, batch), logits, rtol=0, atol=0)
    # stock transformers + bitsandbytes + peft load our adapter onto their own 4-bit model
    from transformers import BitsAndBytesConfig

    plan = get_load_info(base).plan
    stock_base = AutoModelForImageTextToText.from_pretrained(
        tiny_checkpoint(name), quantization_config=BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float32, llm_int8_skip_modules=plan.skip_modules))
    keep_canonical_packing(stock_base)  # the same bitsandbytes route as our loads (no AVX512 repacking)
    stock = PeftModel.from_pretrained(stock_base, tmp_path / "adapter")
    torch.testing.assert_close(_logits(stock, batch), logits, rtol=0, atol=0)


def test_merged_16bit_round_trip(trained, tmp_path):
    name, model, processor, batch, logits = trained
    save_merged_16bit(model, tmp_path / "m16", processor, dtype=torch.float32)
    stock = AutoModelForImageTextToText.from_pretrained(tmp_path / "m16")
    assert not any("Linear4bit" in type(m).__name__ for m in stock.modules())
    torch.testing.assert_close(_logits(stock, batch), logits, rtol=1e-4, atol=1e-4)
    ours = AutoFastVisionModel.from_pretrained(tmp_path / "m16", load_in_16bit=True)
    torch.testing.assert_close(_logits(ours, batch), logits, rtol=1e-4, atol=1e-4)


def test_merged_4bit_round_trip(trained, tmp_path):
    name, model, processor, batch, logits = trained
    save_merged_4bit(model, tmp_path / "m4", processor, dtype=torch.float32)
    ours = AutoFastVisionModel.from_pretrained(tmp_path / "m4")
    assert get_load_info(ours).prequantized
    stock = keep_canonical_packing_of(AutoModelForImageTextToText.from_pretrained(tmp_path / "m4"))
    torch.testing.assert_close(_logits(stock, batch), _logits(ours, batch), rtol=0, atol=0)
    # it is exactly the merged 16-bit model quantized with the architecture's plan
    save_merged_16bit(model, tmp_path / "m16", processor, dtype=torch.float32)
    requantized = AutoFastVisionModel.from_pretrained(tmp_path / "m16", use_exact_model_name=True)
    torch.testing.assert_close(_logits(ours, batch), _logits(requantized, batch), rtol=0, atol=0)
    assert torch.isfinite(_logits(ours, batch)).all()


def test_save_adapter_refuses_plain_model(tiny_checkpoint, tmp_path):
    model = AutoFastVisionModel.from_pretrained(tiny_checkpoint("qwen2_5_vl"))
    with pytest.raises(ValueError, match="get_peft_model"):
        save_adapter(model, tmp_path / "a")
    assert not (tmp_path / "a").exists()


def test_adapter_made_by_stock_peft_loads_onto_ours(tiny_checkpoint, tmp_path):
    """An adapter in the standard peft format made elsewhere (plain transformers + peft) loads onto our model."""
    from peft import LoraConfig, get_peft_model

    folder = tiny_checkpoint("qwen2_vl")
    stock = get_peft_model(AutoModelForImageTextToText.from_pretrained(folder),
                           LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    stock.save_pretrained(tmp_path / "stock-adapter")
    ours = PeftModel.from_pretrained(AutoFastVisionModel.from_pretrained(folder, load_in_16bit=True), tmp_path / "stock-adapter")
    from hf_fastvision.archs.tiny import tiny_processor

    batch = sample_batch(tiny_processor("qwen2_vl"), "qwen2_vl", n=1, with_labels=False)
    torch.testing.assert_close(_logits(ours, batch), _logits(stock, batch), rtol=1e-5, atol=1e-5)
