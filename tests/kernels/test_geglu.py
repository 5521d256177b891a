import pytest
import torch
from transformers.models.gemma3.configuration_gemma3 import Gemma3TextConfig
from transformers.models.gemma3.modeling_gemma3 import Gemma3MLP

from hf_fastvision.kernels import GeGLUFunction, geglu, geglu_ref
from hf_fastvision.tolerances import assert_close

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(2, 5, 67), (3, 1031), (1,)])
def test_triton_matches_ref(compare, device, dtype, shape):
    gate = torch.randn(shape, device=device, dtype=dtype) * 3
    up = torch.randn(shape, device=device, dtype=dtype)
    compare(GeGLUFunction.apply, geglu_ref, (gate, up), dtype=dtype)


def test_extreme_values(compare, device):
    # tanh saturation on both sides must not produce inf/nan
    gate = torch.tensor([-80.0, -20.0, -5.0, -1e-4, 0.0, 1e-4, 5.0, 20.0, 80.0], device=device)
    up = torch.ones_like(gate)
    outs, grads = compare(GeGLUFunction.apply, geglu_ref, (gate, up), dtype=torch.float32)
    assert torch.isfinite(outs[0]).all() and all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("dtype", DTYPES)
def test_gemma3_mlp(device, dtype):
    cfg = Gemma3TextConfig(hidden_size=16, intermediate_size=67)
    assert cfg.hidden_activation == "gelu_pytorch_tanh"
    mlp = Gemma3MLP(cfg).to(device=device, dtype=torch.float32)
    x = torch.randn(2, 5, 16, device=device)
    y_tf = mlp(x)
    y_ref = mlp.down_proj(geglu_ref(mlp.gate_proj(x), mlp.up_proj(x)))
    torch.testing.assert_close(y_ref, y_tf, rtol=0, atol=0)
    g, u = mlp.gate_proj(x).to(dtype), mlp.up_proj(x).to(dtype)
    act = geglu(g, u)
    assert act.dtype == dtype
    assert_close(act, mlp.act_fn(g.float()) * u.float(), dtype=dtype)
