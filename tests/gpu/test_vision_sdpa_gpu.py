"""The `vision_sdpa` patch flag on CUDA (GPU machine): with "flash" the Qwen-VL vision attention runs the
FlashAttention kernels forward and backward, and gives the default order's (cuDNN on Hopper) output and input
gradient within bf16 rounding."""

from __future__ import annotations

import pytest
import torch

from hf_fastvision import AutoFastVisionModel

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _attention(folder, order):
    model = AutoFastVisionModel.from_pretrained(folder, load_in_16bit=True, dtype=torch.bfloat16,
                                                patches={"vision_sdpa": order}).to("cuda")
    return next(m for m in model.modules() if type(m).__name__.endswith("VisionAttention"))


def _run(attn, x, cu, pos):
    x = x.detach().requires_grad_()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        out = attn(x, cu_seqlens=cu, position_embeddings=pos)
        (grad,) = torch.autograd.grad(out.float().square().sum(), x)
        torch.cuda.synchronize()
    kernels = " ".join(e.name.lower() for e in prof.events())
    return out.float(), grad.float(), kernels


@pytest.mark.parametrize("lengths", [[64] * 4, [64, 64, 32, 16]])
def test_flash_order_runs_flash_and_matches_the_default_order(lengths, tiny_checkpoint):
    folder = tiny_checkpoint("qwen2_5_vl")
    fast, default = _attention(folder, "flash"), _attention(folder, "default")
    default.load_state_dict(fast.state_dict())
    torch.manual_seed(0)
    seq, dim = sum(lengths), fast.qkv.in_features
    x = torch.randn(seq, dim, device="cuda", dtype=torch.bfloat16)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
    emb = torch.randn(seq, dim // fast.num_heads, device="cuda")
    pos = (emb.cos(), emb.sin())
    out_f, grad_f, kernels_f = _run(fast, x, cu, pos)
    out_d, grad_d, _ = _run(default, x, cu, pos)
    assert "flash" in kernels_f  # forward and backward kernels of FlashAttention
    assert "cudnn" not in kernels_f
    torch.testing.assert_close(out_f, out_d, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(grad_f, grad_d, rtol=5e-2, atol=5e-2)
