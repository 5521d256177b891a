"""The 16-bit decode copy (`decode_weights="16bit"`): same numbers as bitsandbytes' multi-row path, greedy tokens
equal to `generate` on the 4-bit weights for every named tiny architecture (with and without LoRA, batch 1 and 4),
never saved, dropped by `for_training`, and kept inside `gpu_memory_utilization`."""

from __future__ import annotations

import pytest
import torch

from hf_fastvision import FastVisionModel
from hf_fastvision.archs.tiny import NAMED_TINY_TYPES, missing_dependencies, sample_batch
from hf_fastvision.inference import enable_fast_inference, fast_inference_state
from hf_fastvision.inference.dense_decode import (
    bind_dense_decode,
    dense_decode_bound,
    dense_decode_bytes,
    dense_decode_held,
    unbind_dense_decode,
)
from hf_fastvision.inference.fast_generate import _dense_copy_fits

NEW_TOKENS = 6
MAX_SEQ = 256


def _layer(bias: bool = True):
    import bitsandbytes as bnb

    torch.manual_seed(0)
    layer = bnb.nn.Linear4bit(128, 64, bias=bias, compute_dtype=torch.bfloat16, quant_type="nf4")
    layer.load_state_dict(torch.nn.Linear(128, 64, bias=bias).state_dict())
    return layer.to("cpu").eval()  # .to quantizes


@pytest.mark.parametrize("bias", [True, False])
def test_copy_equals_bitsandbytes_multi_row_path(bias):
    import bitsandbytes.functional as bnbf

    layer = _layer(bias)
    x = torch.randn(2, 5, 128, dtype=torch.bfloat16)
    # bitsandbytes' CUDA path for several rows: dequantize to the compute dtype, then F.linear
    w = bnbf.dequantize_4bit(layer.weight.data, layer.weight.quant_state).to(torch.bfloat16)
    exact = torch.nn.functional.linear(x, w, layer.bias.to(torch.bfloat16) if bias else None)
    assert bind_dense_decode(layer) == (1, 64 * 128 * 2)
    assert dense_decode_bound(layer) == 1 and dense_decode_held(layer) == 64 * 128 * 2
    assert torch.equal(layer(x), exact)
    stock = type(layer).forward(layer, x)  # on an AVX512-BF16 CPU: its own GEMV, after repacking the weight
    torch.testing.assert_close(layer(x).float(), stock.float(), rtol=2e-2, atol=2e-2)
    one = torch.randn(1, 128, dtype=torch.bfloat16)  # a one-row step too (bitsandbytes would take its GEMV)
    assert torch.equal(layer(one), layer(torch.cat([one, one]))[:1])
    assert "_hffv_dense_weight" not in layer.state_dict()  # never saved
    assert bind_dense_decode(layer) == (0, 0)  # idempotent
    assert unbind_dense_decode(layer) == 1
    assert dense_decode_bound(layer) == 0 and "forward" not in layer.__dict__
    torch.testing.assert_close(layer(x).float(), stock.float(), rtol=2e-2, atol=2e-2)


def test_training_mode_and_budget():
    layer = _layer()
    bind_dense_decode(layer)
    layer.train()
    x = torch.randn(3, 128, dtype=torch.bfloat16)
    calls = []
    real = type(layer).forward
    layer.__dict__["_hffv_dense_prev_forward"] = lambda t: calls.append(1) or real(layer, t)
    layer(x)
    assert calls == [1]  # training: bitsandbytes' forward (or whatever was bound before)
    unbind_dense_decode(layer)
    assert bind_dense_decode(layer, budget_bytes=64 * 128 * 2 - 1) == (0, 0)  # does not fit: nothing copied


def test_fit_rule():
    gib = 2**30
    assert _dense_copy_fits("auto", need=13 * gib, per_seq=gib, free=130 * gib, utilization=0.5)
    assert not _dense_copy_fits("auto", need=13 * gib, per_seq=gib, free=20 * gib, utilization=0.5)
    assert _dense_copy_fits("16bit", need=13 * gib, per_seq=gib, free=20 * gib, utilization=0.5)
    with pytest.raises(ValueError, match="decode_weights='4bit'"):
        _dense_copy_fits("16bit", need=13 * gib, per_seq=gib, free=10 * gib, utilization=0.5)


def test_vision_tower_is_not_copied_and_training_drops_the_copy(tiny_checkpoint):
    model, _processor = FastVisionModel.from_pretrained(tiny_checkpoint("qwen2_5_vl"), max_seq_length=MAX_SEQ)
    FastVisionModel.for_inference(model)
    with pytest.raises(ValueError, match="decode_weights"):
        enable_fast_inference(model, decode_weights="8bit")
    enable_fast_inference(model, max_seq_length=MAX_SEQ)  # "auto" on CPU: no copy
    assert fast_inference_state(model).decode_weights == "4bit" and dense_decode_bound(model) == 0
    need = dense_decode_bytes(model)
    enable_fast_inference(model, decode_weights="16bit")
    state = fast_inference_state(model)
    copied = [n for n, m in model.named_modules() if "_hffv_dense_weight" in m._buffers]
    assert state.decode_weights == "16bit" and state.dense_layers == len(copied) > 0 and state.dense_bytes == need
    assert not any(n.startswith("model.visual.") for n in copied), "the vision tower runs once per prompt"
    assert not any("_hffv" in k for k in model.state_dict())
    FastVisionModel.for_training(model)
    assert dense_decode_bound(model) == 0
    FastVisionModel.for_inference(model)  # remembered: the copy comes back
    assert dense_decode_bound(model) == len(copied)


def _generate(model, batch):
    with torch.no_grad():
        return model.fast_generate(**batch, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)


@pytest.mark.parametrize("name", NAMED_TINY_TYPES)
def test_greedy_tokens_equal_generate_on_4bit_weights(name, tiny_checkpoint):
    if missing := missing_dependencies(name):
        pytest.skip(f"needs {missing}")
    torch.manual_seed(0)
    model, processor = FastVisionModel.from_pretrained(tiny_checkpoint(name), max_seq_length=MAX_SEQ)
    for module in model.modules():  # the reference takes bitsandbytes' CUDA route (dequantize + F.linear), not
        if hasattr(module, "support_avx512bf16_for_cpu"):  # its AVX512 CPU GEMV, whose rounding differs
            module.support_avx512bf16_for_cpu = False
    processor.tokenizer.padding_side = "left"
    batches = {n: sample_batch(processor, name, n, with_labels=False) for n in (1, 4)}

    def compare(m, tag):
        FastVisionModel.for_inference(m)
        enable_fast_inference(m, max_seq_length=MAX_SEQ, decode_weights="4bit")
        with torch.no_grad():
            refs = {n: m.generate(**b, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)
                    for n, b in batches.items()}
        enable_fast_inference(m, decode_weights="16bit")
        assert dense_decode_bound(m) > 0
        for n, b in batches.items():
            assert torch.equal(_generate(m, b), refs[n]), f"{name} {tag} batch {n}: 16-bit decode copy differs"
        return refs[4]

    base_out = compare(model, "base")
    peft_model = FastVisionModel.get_peft_model(model, r=4, lora_alpha=8, use_gradient_checkpointing=False)
    assert dense_decode_bound(peft_model) == 0  # get_peft_model trains: the copy is gone
    with torch.no_grad():
        for pname, param in peft_model.named_parameters():
            if "lora_B" in pname:
                param.normal_(0.0, 0.5)
    lora_out = compare(peft_model, "lora")  # adapters apply unmerged on top of the copy
    assert not torch.equal(base_out, lora_out), "the randomised adapter should change the greedy output"


def test_copy_reads_the_canonical_layout_after_a_cpu_forward():
    """bitsandbytes repacks a weight for its CPU GEMV on the first eval forward; the copy must not read that."""
    import bitsandbytes.functional as bnbf

    layer = _layer()
    w = bnbf.dequantize_4bit(layer.weight.data, layer.weight.quant_state).to(torch.bfloat16)
    x = torch.randn(4, 128, dtype=torch.bfloat16)
    layer(x)  # may repack (AVX512-BF16 CPUs)
    bind_dense_decode(layer)
    dense = layer._buffers["_hffv_dense_weight"]
    torch.testing.assert_close(dense.float(), w.float(), rtol=1e-2, atol=1e-2)  # bf16 scales after the inverse


def test_16bit_model_has_nothing_to_copy(tiny_checkpoint):
    model, _processor = FastVisionModel.from_pretrained(tiny_checkpoint("qwen2_vl"), load_in_4bit=False,
                                                        load_in_16bit=True, max_seq_length=MAX_SEQ)
    FastVisionModel.for_inference(model)
    enable_fast_inference(model, decode_weights="16bit")
    state = fast_inference_state(model)
    assert state.decode_weights == "none" and state.dense_layers == 0 and dense_decode_bound(model) == 0


def test_copy_and_kernel_bindings_do_not_stack(tiny_checkpoint):
    """A layer carries the kernel or the copy, never one wrapped in the other, whatever the order of calls."""
    from hf_fastvision.inference.decode_kernels import bind_decode_kernels, decode_kernels_bound

    model, _processor = FastVisionModel.from_pretrained(tiny_checkpoint("qwen2_5_vl"), max_seq_length=MAX_SEQ)
    FastVisionModel.for_inference(model)
    enable_fast_inference(model, decode_weights="4bit")
    assert bind_decode_kernels(model, force=True) > 0  # what decode_kernel=True does on CUDA weights
    enable_fast_inference(model, decode_weights="16bit")  # CPU: decode_kernel is off here, so it comes off
    assert decode_kernels_bound(model) == 0 and dense_decode_bound(model) > 0
    for module in model.modules():
        if "_hffv_dense_weight" in module._buffers:
            assert module.forward.__func__.__name__ == "_dense_forward"
            assert module.__dict__.get("_hffv_dense_prev_forward") is None  # the stock forward underneath
    enable_fast_inference(model, decode_weights="4bit")
    assert dense_decode_bound(model) == 0 and all("forward" not in m.__dict__ for m in model.modules()
                                                  if type(m).__name__ == "Linear4bit")
