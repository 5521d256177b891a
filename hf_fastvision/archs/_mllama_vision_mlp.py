"""Mllama's vision MLP in the autocast dtype: the same numbers without the fp32 round trips (patch flag ``mlp``).

Under bf16 autocast Mllama's vision layers feed their MLP from ``nn.LayerNorm``, which autocast runs in fp32, and
bitsandbytes' 4-bit linears (and our fused LoRA op, which matches them) return their result in the *input's*
dtype. So the stock MLP computes ``fc1`` in bf16 and then widens its ``[tokens, 5120]`` output to fp32, runs GELU
in fp32, and ``fc2`` narrows that back to bf16 before its matmul; backward mirrors it. On Llama-3.2-11B-Vision
that is ~0.5 GB of extra memory traffic per vision layer and pass (40 layers; forward, recompute, backward) and
fp32 temporaries twice the size in the checkpoint recompute.

When every linear of the MLP computes in the autocast dtype anyway, running the MLP on ``x.to(dtype)`` and
widening only its output back to ``x.dtype`` gives bit-identical values and gradients:

- the linears see the same bf16 operands (they would have narrowed ``x`` themselves), and their bf16 results
  were widened exactly;
- GELU on the bf16 tensor computes in fp32 internally and rounds once, which is what ``fc2``'s narrowing of the
  fp32 GELU did; its backward likewise ends in the same rounding ``fc1``'s backward applied;
- the output returns in the dtype the stock ``fc2`` gives (``x.dtype`` for a 4-bit one), so the residual stream
  keeps its dtype.

"Computes in the autocast dtype anyway" (`_autocast_narrowing.narrows_to`): a plain ``nn.Linear`` under autocast,
a bitsandbytes 4-bit linear whose compute dtype is the autocast dtype, or a peft LoRA layer over one of those
whose call takes the fused op (4-bit) or peft's path without dropout (16-bit). Anything else (no autocast, an fp32
compute dtype, dropout, other adapters) runs the stock forward.
"""

from __future__ import annotations

import torch
from torch import nn

from hf_fastvision.archs._autocast_narrowing import answers_in_input_dtype, autocast_dtype, narrows_to

__all__ = ["vision_mlp_forward"]


def _one_kernel_gelu(act: nn.Module) -> bool:
    """GELU as one elementwise kernel (fp32 math inside for 16-bit inputs, one rounding): exact in either dtype.
    Activations composed of several ops (quick_gelu, the python GELU) would round between them in 16-bit."""
    if type(act) is nn.GELU:
        return True
    return type(act).__name__ == "GELUActivation" and getattr(act, "act", None) is torch.nn.functional.gelu


def vision_mlp_forward(self: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    """Drop-in ``forward`` for ``MllamaVisionMLP`` (``fc1 -> activation -> fc2``): same result, same dtype."""
    from hf_fastvision.patching import original_forward

    dtype = autocast_dtype(hidden_states)
    if (
        dtype is None
        or hidden_states.dtype != torch.float32
        or not _one_kernel_gelu(self.activation_fn)
        or not (narrows_to(self.fc1, dtype, hidden_states) and narrows_to(self.fc2, dtype, hidden_states))
    ):
        return original_forward(self)(hidden_states)
    narrow = hidden_states.to(dtype)
    out = self.fc2(self.activation_fn(self.fc1(narrow)))
    return out.to(hidden_states.dtype) if answers_in_input_dtype(self.fc2) else out
