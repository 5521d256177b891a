"""get_peft_model binds the fused 4-bit LoRA op; loss and adapter gradients equal peft's own path."""

from __future__ import annotations

import pytest
import torch

from hf_fastvision import FastVisionModel
from hf_fastvision.archs.tiny import NAMED_TINY_TYPES, missing_dependencies, sample_batch
from hf_fastvision.patching import patched_modules, unpatched
from hf_fastvision.tolerances import assert_close


def _loss_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    loss = model(**batch).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("name", NAMED_TINY_TYPES)
def test_fused_lora_matches_peft(name, tiny_checkpoint):
    if missing := missing_dependencies(name):
        pytest.skip(f"needs {missing}")
    model, processor = FastVisionModel.from_pretrained(str(tiny_checkpoint(name)), max_seq_length=256)
    peft_model = FastVisionModel.get_peft_model(model, r=4, lora_alpha=8, use_gradient_checkpointing=False)
    kinds = patched_modules(peft_model)
    n_lora = sum(1 for k in kinds.values() if k == "lora")
    n_layers = sum(1 for n, _ in peft_model.named_modules() if n.endswith(".lora_A"))
    assert n_lora == n_layers > 0, (n_lora, n_layers)  # every adapted layer is a 4-bit one here
    with torch.no_grad():
        for pname, param in peft_model.named_parameters():
            if "lora_B" in pname:
                param.normal_(0.0, 0.2)  # a non-zero adapter, so the LoRA branch shows in the loss
    batch = sample_batch(processor, name, 2)
    peft_model.train()
    loss, grads = _loss_and_grads(peft_model, batch)
    with unpatched(peft_model):
        ref_loss, ref_grads = _loss_and_grads(peft_model, batch)
    assert_close(loss, ref_loss, dtype=torch.float32)
    assert grads.keys() == ref_grads.keys() and any("lora_A" in n for n in grads)
    for n in grads:
        torch.testing.assert_close(grads[n], ref_grads[n], rtol=1e-3, atol=1e-5, msg=n)


def test_unfusable_calls_take_peft_path(tiny_checkpoint):
    """Dropout while training, and disabled adapters, run peft's own forward (and still train)."""
    model, processor = FastVisionModel.from_pretrained(str(tiny_checkpoint("qwen2_5_vl")), max_seq_length=256)
    peft_model = FastVisionModel.get_peft_model(model, r=4, lora_alpha=8, lora_dropout=0.5,
                                                use_gradient_checkpointing=False)
    from hf_fastvision.patching import _lora_fusable

    layer = next(m for n, m in peft_model.named_modules() if n.endswith("q_proj") and hasattr(m, "lora_A"))
    x = torch.randn(2, layer.in_features)
    peft_model.train()
    assert not _lora_fusable(layer, x)  # dropout p=0.5 in training
    peft_model.eval()
    assert _lora_fusable(layer, x)  # dropout is inactive in eval
    with peft_model.disable_adapter():
        assert not _lora_fusable(layer, x)
    peft_model.train()
    batch = sample_batch(processor, "qwen2_5_vl", 2)
    loss = peft_model(**batch).loss
    loss.backward()
    assert torch.isfinite(loss)


def test_lora_flag_off_binds_nothing(tiny_checkpoint):
    model, _ = FastVisionModel.from_pretrained(str(tiny_checkpoint("qwen2_vl")), patches={"lora": False})
    peft_model = FastVisionModel.get_peft_model(model, r=4, use_gradient_checkpointing=False)
    assert "lora" not in set(patched_modules(peft_model).values())


def test_fused_op_reads_the_canonical_layout_after_a_cpu_repacking(tiny_checkpoint):
    """A model that ran bitsandbytes' CPU GEMV before LoRA (its weights repacked, e.g. loaded by stock transformers)
    gets its weights back in the layout the fused op dequantizes, and no repacking afterwards."""
    from bitsandbytes.functional import has_avx512bf16

    if not has_avx512bf16():
        pytest.skip("bitsandbytes repacks 4-bit weights only on AVX512-BF16 CPUs")
    model, processor = FastVisionModel.from_pretrained(str(tiny_checkpoint("qwen2_vl")), max_seq_length=256)
    layers = [m for m in model.modules() if type(m).__name__ == "Linear4bit"]
    for m in layers:
        m.support_avx512bf16_for_cpu = True  # what a stock load leaves
    model.eval()
    batch = sample_batch(processor, "qwen2_vl", 1)
    with torch.no_grad():
        model(**batch)
    assert any(getattr(m.weight.quant_state, "packing_format_for_cpu", False) for m in layers)
    peft_model = FastVisionModel.get_peft_model(model, r=4, lora_alpha=8, use_gradient_checkpointing=False)
    assert not any(getattr(m.weight.quant_state, "packing_format_for_cpu", False) for m in layers)
    assert not any(m.support_avx512bf16_for_cpu for m in layers)
    fused, _ = _loss_and_grads(peft_model, batch)
    with unpatched(peft_model):
        reference, _ = _loss_and_grads(peft_model, batch)
    assert_close(fused, reference, dtype=torch.float32)
