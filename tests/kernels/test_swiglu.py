import pytest
import torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaMLP

from hf_fastvision.kernels import SwiGLUFunction, swiglu, swiglu_ref
from hf_fastvision.tolerances import assert_close

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(2, 5, 67), (3, 1031), (1,)])
def test_triton_matches_ref(compare, device, dtype, shape):
    gate = torch.randn(shape, device=device, dtype=dtype) * 3
    up = torch.randn(shape, device=device, dtype=dtype)
    compare(SwiGLUFunction.apply, swiglu_ref, (gate, up), dtype=dtype)


def test_non_contiguous(compare, device):
    gu = torch.randn(5, 2 * 67, device=device)
    gate, up = gu[:, :67], gu[:, 67:]  # chunks of a fused gate_up projection
    compare(SwiGLUFunction.apply, swiglu_ref, (gate, up), dtype=torch.float32)


@pytest.mark.parametrize("dtype", DTYPES)
def test_llama_mlp(device, dtype):
    cfg = LlamaConfig(hidden_size=16, intermediate_size=67, num_attention_heads=2, num_key_value_heads=2, hidden_act="silu")
    mlp = LlamaMLP(cfg).to(device=device, dtype=torch.float32)
    x = torch.randn(2, 5, 16, device=device)
    y_tf = mlp(x)
    y_ref = mlp.down_proj(swiglu_ref(mlp.gate_proj(x), mlp.up_proj(x)))
    torch.testing.assert_close(y_ref, y_tf, rtol=0, atol=0)
    # fused op on this dtype (matmuls stay in fp32: fp16 matmul on CPU is slow / partial)
    g, u = mlp.gate_proj(x).to(dtype), mlp.up_proj(x).to(dtype)
    act = swiglu(g, u)
    assert act.dtype == dtype
    assert_close(act, mlp.act_fn(g.float()) * u.float(), dtype=dtype)
