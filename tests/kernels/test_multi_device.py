"""Kernels on a tensor living on a GPU other than the current one (models spread by device_map / max_memory).

Triton launches on the current device's stream; `device_guarded` must move each launch to its tensors' device.
Without it, a layer on cuda:1 called while cuda:0 is current reads inputs its producer has not finished writing.
"""

from __future__ import annotations

import pytest
import torch

from hf_fastvision.kernels import fused_linear_cross_entropy, rms_norm, swiglu
from hf_fastvision.kernels.fused_linear_cross_entropy import fused_linear_cross_entropy_ref
from hf_fastvision.kernels.rms_norm import rms_norm_ref
from hf_fastvision.kernels.swiglu import swiglu_ref

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs"),
]


def test_kernels_follow_their_tensors_device():
    torch.cuda.set_device(0)
    dev = torch.device("cuda", 1)
    torch.manual_seed(0)
    for _ in range(3):  # the producer's work is queued on cuda:1's stream right before each launch
        x = (torch.randn(512, 1024, device=dev) * 3).bfloat16()
        w = torch.randn(1024, device=dev, dtype=torch.bfloat16)
        torch.testing.assert_close(rms_norm(x, w, 1e-6), rms_norm_ref(x, w, 1e-6), atol=2e-2, rtol=2e-2)
        g, u = x.float().exp().bfloat16(), x * 2
        torch.testing.assert_close(swiglu(g, u), swiglu_ref(g, u), atol=2e-2, rtol=2e-2)
        h = torch.randn(64, 256, device=dev)
        head = torch.randn(1000, 256, device=dev) * 0.05
        y = torch.randint(0, 1000, (64,), device=dev)
        torch.testing.assert_close(
            fused_linear_cross_entropy(h, head, y), fused_linear_cross_entropy_ref(h, head, y), atol=1e-3, rtol=1e-3
        )
    assert torch.cuda.current_device() == 0
