"""Mllama's vision MLP in the autocast dtype (patch flag `vision_mlp`): bit-identical to the stock MLP, which widens to
fp32 between its linears under autocast (LayerNorm feeds it fp32; 4-bit linears answer in their input's dtype)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from hf_fastvision import FastVisionModel
from hf_fastvision.archs._autocast_narrowing import narrows_to
from hf_fastvision.archs._mllama_vision_mlp import vision_mlp_forward
from hf_fastvision.archs.tiny import sample_batch, tiny_processor
from hf_fastvision.patching import _KIND, _ORIGINAL, patched_modules, restore_forward

pytest.importorskip("bitsandbytes")


def _vision_mlps(model):
    return [m for m in model.modules() if type(m).__name__ == "MllamaVisionMLP"]


def _unpatch_vision_mlps(model) -> int:
    n = 0
    for m in _vision_mlps(model):
        if m.__dict__.get(_KIND) == "mlp":
            restore_forward(m, m.__dict__.pop(_ORIGINAL))
            m.__dict__.pop(_KIND)
            n += 1
    return n


def _cuda_like_layernorms(model) -> None:
    """CUDA's autocast runs ``layer_norm`` in fp32 (its fp32 list), CPU's does not: emulate CUDA so the vision
    stream is fp32 here too, as it is on the GPU (the case these patches exist for)."""
    import torch.nn.functional as F

    def fp32_forward(self, x):
        with torch.autocast("cpu", enabled=False):
            w = self.weight.float() if self.weight is not None else None
            b = self.bias.float() if self.bias is not None else None
            return F.layer_norm(x.float(), self.normalized_shape, w, b, self.eps)

    for name, m in model.named_modules():
        if type(m) is nn.LayerNorm and "vision_model" in name:
            m.forward = fp32_forward.__get__(m)


def _model(folder):
    model, _ = FastVisionModel.from_pretrained(str(folder), load_in_4bit=True, dtype=torch.bfloat16)
    _cuda_like_layernorms(model)
    torch.manual_seed(0)
    model = FastVisionModel.get_peft_model(model, r=8, lora_alpha=16, lora_dropout=0.0, finetune_vision_layers=True,
                                           random_state=0)
    for n, p in model.named_parameters():  # LoRA B starts at zero: give it values so every gradient is exercised
        if "lora_B" in n:
            with torch.no_grad():
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(hash(n) % 2**31)) * 0.05)
    return model.train()


def _step(model, batch):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(**batch)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.loss.detach(), grads


def test_vision_mlp_is_bit_identical_under_autocast_with_4bit_lora(tiny_checkpoint):
    folder = tiny_checkpoint("mllama")
    patched, stock = _model(folder), _model(folder)
    names = [n for n, k in patched_modules(patched).items() if k == "mlp" and "vision_model" in n]
    assert names, "the vision MLPs are patched by default"
    assert _unpatch_vision_mlps(stock) == len(names)
    calls = []
    for m in _vision_mlps(patched):  # the narrow path must really run (not the fallback)
        m.fc1.register_forward_pre_hook(lambda mod, args: calls.append(args[0].dtype))
    batch = sample_batch(tiny_processor("mllama"), "mllama", n=2)
    loss_p, grads_p = _step(patched, batch)
    loss_s, grads_s = _step(stock, batch)
    assert calls and all(d == torch.bfloat16 for d in calls), calls
    assert torch.equal(loss_p, loss_s), (loss_p, loss_s)
    vision = [n for n in grads_s if "vision_model" in n and "lora" in n]
    assert vision and set(grads_p) == set(grads_s)
    for n, g in grads_s.items():
        assert torch.equal(grads_p[n], g), n
    # module level: same values *and* dtype (the model's fp32 residual stream would hide a narrower output)
    mlp = _vision_mlps(stock)[0]
    x = torch.randn(2, 9, mlp.fc1.in_features)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref, got = mlp(x), vision_mlp_forward(mlp, x)
    assert ref.dtype == got.dtype == torch.float32
    assert torch.equal(got, ref)


def test_vision_mlp_falls_back_where_the_narrowing_would_change_numbers(tiny_checkpoint):
    model = _model(tiny_checkpoint("mllama"))
    mlp = _vision_mlps(model)[0]
    x = torch.randn(1, 5, mlp.fc1.in_features)
    seen = []
    mlp.fc1.register_forward_pre_hook(lambda mod, args: seen.append(args[0].dtype))
    mlp(x)  # no autocast: stock
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mlp(x.to(torch.bfloat16))  # already 16-bit: stock
    assert seen == [torch.float32, torch.bfloat16]
    dropout = nn.Dropout(0.1).train()
    name = mlp.fc1.active_adapters[0]
    mlp.fc1.lora_dropout[name] = dropout  # dropout: peft's path, which adds the adapter in fp32 on fp32 input
    assert not narrows_to(mlp.fc1, torch.bfloat16, x)
    plain = nn.Linear(4, 4)
    assert narrows_to(plain, torch.bfloat16, x)
    assert not narrows_to(nn.Conv1d(4, 4, 1), torch.bfloat16, x)


def test_vision_mlp_forward_on_a_16bit_mlp_matches_stock_exactly():
    from transformers.models.mllama.configuration_mllama import MllamaVisionConfig
    from transformers.models.mllama.modeling_mllama import MllamaVisionMLP

    torch.manual_seed(0)
    mlp = MllamaVisionMLP(MllamaVisionConfig(hidden_size=32, intermediate_size=96)).to(torch.bfloat16)
    x = torch.randn(3, 7, 32, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = type(mlp).forward(mlp, x)
        got = vision_mlp_forward(mlp, x)
    assert got.dtype == ref.dtype
    assert torch.equal(got, ref)
    g = torch.randn_like(ref)
    (ref_x,) = torch.autograd.grad(ref, x, g)
    (got_x,) = torch.autograd.grad(got, x, g)
    assert torch.equal(got_x, ref_x)


def test_split_attention_narrows_its_projections_bit_identically(tiny_checkpoint, monkeypatch):
    """The split vision attention feeds q/k/v projections the narrowed input (they compute in bf16 anyway):
    same loss and gradients as when each 4-bit projection narrows, widens and the split narrows again."""
    import hf_fastvision.archs._mllama_vision_attention as mva

    folder = tiny_checkpoint("mllama")
    model = _model(folder)
    seen = []
    for m in model.modules():
        if type(m).__name__ == "MllamaVisionAttention":
            m.q_proj.register_forward_pre_hook(lambda mod, args: seen.append(args[0].dtype))
    batch = sample_batch(tiny_processor("mllama"), "mllama", n=2)
    loss_n, grads_n = _step(model, batch)
    assert seen and all(d == torch.bfloat16 for d in seen), seen
    model.zero_grad(set_to_none=True)
    seen.clear()
    monkeypatch.setattr(mva, "narrows_to", lambda *a: False)
    loss_w, grads_w = _step(model, batch)
    assert seen and all(d == torch.float32 for d in seen), seen
    assert torch.equal(loss_n, loss_w)
    assert any("vision_model" in n and "q_proj" in n for n in grads_w)
    for n, g in grads_w.items():
        assert torch.equal(grads_n[n], g), n


def test_vision_mlp_flag_turns_only_the_vision_mlp_off(tiny_checkpoint):
    folder = str(tiny_checkpoint("mllama"))
    on, _ = FastVisionModel.from_pretrained(folder, load_in_4bit=True, dtype=torch.bfloat16)
    off, _ = FastVisionModel.from_pretrained(folder, load_in_4bit=True, dtype=torch.bfloat16,
                                             patches={"vision_mlp": False})
    kinds_on, kinds_off = patched_modules(on), patched_modules(off)
    vision_on = [n for n, k in kinds_on.items() if k == "mlp" and "vision_model" in n]
    assert vision_on and not [n for n, k in kinds_off.items() if k == "mlp" and "vision_model" in n]
    assert {n: k for n, k in kinds_on.items() if n not in vision_on} == kinds_off  # text MLPs etc. stay patched
    assert any(k == "mlp" for k in kinds_off.values())
