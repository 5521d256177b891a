"""The meta-device LoRA set-up on CUDA (GPU machine): every adapter tensor equals peft's path bit for bit on a
4-bit model whose base layers sit on the GPU (the CPU tests cover the same on CPU-placed layers), and one
training step from either gives the same loss and LoRA gradients."""

from __future__ import annotations

import pytest
import torch

from hf_fastvision import FastVisionModel
from hf_fastvision.archs.tiny import missing_dependencies, sample_batch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.mark.parametrize("name", ["qwen2_5_vl", "mllama"])
def test_fast_lora_init_equals_peft_on_cuda(name, tiny_checkpoint):
    if missing := missing_dependencies(name):
        pytest.skip(f"needs {missing}")
    folder = str(tiny_checkpoint(name))
    built = []
    for fast in (False, True):
        model, processor = FastVisionModel.from_pretrained(folder, load_in_4bit=True, dtype=torch.bfloat16,
                                                           use_gradient_checkpointing=False)
        built.append((FastVisionModel.get_peft_model(model, r=8, lora_alpha=16, random_state=11,
                                                     fast_lora_init=fast), processor))
    (ref, processor), (fast, _) = built
    a = {n: p for n, p in ref.named_parameters() if "lora_" in n}
    b = {n: p for n, p in fast.named_parameters() if "lora_" in n}
    assert a.keys() == b.keys() and a
    for n in a:
        assert (a[n].dtype, a[n].device.type, a[n].requires_grad) == (b[n].dtype, "cuda", b[n].requires_grad), n
        assert torch.equal(a[n], b[n]), n
    batch = {k: v.cuda() if torch.is_tensor(v) else v for k, v in sample_batch(processor, name, 1).items()}
    losses, grads = [], []
    for model in (ref, fast):
        model.train()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(**batch).loss
        loss.backward()
        losses.append(loss.detach().float())
        grads.append({n: p.grad.detach().clone() for n, p in model.named_parameters() if "lora_B" in n})
    assert torch.allclose(losses[0], losses[1], rtol=0, atol=1e-6)
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], rtol=1e-3, atol=1e-5)
