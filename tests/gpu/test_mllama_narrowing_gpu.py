"""Mllama's vision MLP in the autocast dtype on CUDA (GPU machine), where autocast really runs LayerNorm in fp32:
the patched MLP over 4-bit + fused-LoRA linears equals the stock MLP bit for bit, forward and backward."""

from __future__ import annotations

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def test_vision_mlp_is_bit_identical_on_cuda(tiny_checkpoint):
    from hf_fastvision import FastVisionModel
    from hf_fastvision.archs._mllama_vision_mlp import vision_mlp_forward
    from hf_fastvision.patching import original_forward

    model, _ = FastVisionModel.from_pretrained(str(tiny_checkpoint("mllama")), load_in_4bit=True,
                                               dtype=torch.bfloat16)
    model = FastVisionModel.get_peft_model(model, r=8, lora_alpha=16, lora_dropout=0.0, finetune_vision_layers=True)
    for n, p in model.named_parameters():
        if "lora_B" in n:
            with torch.no_grad():
                p.normal_(0, 0.05)
    model.train()
    layer = next(m for m in model.modules() if type(m).__name__ == "MllamaVisionEncoderLayer")
    mlp = layer.mlp
    torch.manual_seed(0)
    x = torch.randn(2, 40, mlp.fc1.in_features, device="cuda", dtype=torch.bfloat16)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        normed = layer.post_attention_layernorm(x).detach().requires_grad_(True)
        assert normed.dtype == torch.float32  # CUDA autocast: LayerNorm in fp32
        ref = original_forward(mlp)(normed)
        got = vision_mlp_forward(mlp, normed)
    assert got.dtype == ref.dtype == torch.float32
    assert torch.equal(got, ref)
    g = torch.randn_like(ref)
    params = [p for p in mlp.parameters() if p.requires_grad]
    ref_grads = torch.autograd.grad(ref, [normed, *params], g)
    got_grads = torch.autograd.grad(got, [normed, *params], g)
    for a, b in zip(got_grads, ref_grads):
        assert torch.equal(a, b)
