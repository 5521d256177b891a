"""The `rope` patch on CUDA (GPU machine): compiled Triton RoPE in the text attention (and the Qwen-VL towers'
vision attention) of tiny models gives the stock rotary's loss under bf16 autocast and gradients as close to fp32
as the stock rotary's, the kernel runs once per attention layer, and the patched attention can be captured in a
CUDA graph (no host sync)."""

from __future__ import annotations

import pytest
import torch

from hf_fastvision import AutoFastVisionModel
from hf_fastvision.archs.tiny import sample_batch, tiny_processor
from hf_fastvision.kernels import rope as rope_kernels
from hf_fastvision.patching import patched_modules

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _load(folder, patches):
    # fp32 weights: without autocast the stock model is the fp32 reference
    return AutoFastVisionModel.from_pretrained(folder, load_in_16bit=True, dtype=torch.float32,
                                               patches=patches).to("cuda").train()


@pytest.mark.parametrize("name", ["qwen2_5_vl", "mllama", "gemma3"])
def test_compiled_rope_matches_the_stock_rotary(name, tiny_checkpoint, monkeypatch):
    folder = tiny_checkpoint(name)
    stock, fast = _load(folder, {"rope": False}), _load(folder, None)
    n_rope = sum(k == "rope" for k in patched_modules(fast).values())
    assert n_rope > 0
    calls = []
    launch = rope_kernels._apply_triton
    monkeypatch.setattr(rope_kernels, "_apply_triton", lambda *a, **k: calls.append(1) or launch(*a, **k))
    batch = sample_batch(tiny_processor(name), name, n=2)
    batch = {k: v.to("cuda") if torch.is_tensor(v) else v for k, v in batch.items()}
    losses, grads = [], []
    for model, autocast in ((stock, False), (stock, True), (fast, True)):  # fp32 reference, then both in bf16
        model.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            loss = model(**batch).loss
        loss.backward()
        losses.append(loss.float())
        grads.append({n: p.grad.float() for n, p in model.named_parameters() if p.grad is not None})
    assert len(calls) >= n_rope
    ref, stock_bf16, fast_bf16 = grads
    torch.testing.assert_close(losses[2], losses[1], rtol=2e-2, atol=2e-2)
    # bf16 rounds q/k differently on each path (the stock rotary twice in bf16, the kernel once from fp32), and the
    # difference grows through the layers: the kernel's gradients must be as close to fp32 as the stock rotary's
    for n, g in ref.items():
        err_fast, err_stock = (fast_bf16[n] - g).norm(), (stock_bf16[n] - g).norm()
        assert err_fast <= 2 * err_stock + 1e-3 * g.norm() + 1e-6, (n, float(err_fast), float(err_stock),
                                                                     float(g.norm()))


def test_the_rope_kernel_captures_in_a_cuda_graph():
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(1, 512, 8, 128, device="cuda", dtype=torch.bfloat16, generator=g).transpose(1, 2)
    k = torch.randn(1, 512, 2, 128, device="cuda", dtype=torch.bfloat16, generator=g).transpose(1, 2)
    angles = torch.rand(1, 512, 64, device="cuda", generator=g) * 6.3
    cos, sin = torch.cat([angles, angles], -1).cos().bfloat16(), torch.cat([angles, angles], -1).sin().bfloat16()
    expected = rope_kernels.apply_rotary_pos_emb_ref(q, k, cos, sin)
    rope_kernels.apply_rotary_pos_emb(q, k, cos, sin)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = rope_kernels.apply_rotary_pos_emb(q, k, cos, sin)
    graph.replay()
    torch.cuda.synchronize()
    for a, b in zip(out, expected):
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2)
