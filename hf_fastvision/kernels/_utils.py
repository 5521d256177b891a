"""Small shared helpers for the Triton kernels (imports only torch and triton).

``triton`` is an optional dependency (extra ``kernels``). When it is missing we expose
stand-ins so that the kernel modules still import; every op then falls back to its
pure-torch ``*_ref`` implementation.
"""

from __future__ import annotations

import functools
import os
import types

import torch

try:  # pragma: no cover - exercised implicitly
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - only without triton
    HAS_TRITON = False

    def _jit(fn=None, **_kwargs):
        if fn is None:
            return lambda f: f
        return fn

    triton = types.SimpleNamespace(jit=_jit, cdiv=lambda a, b: (a + b - 1) // b, next_power_of_2=None)
    tl = types.SimpleNamespace(constexpr=int)

__all__ = [
    "HAS_TRITON",
    "triton",
    "tl",
    "triton_interpret",
    "use_triton",
    "next_power_of_2",
    "calculate_settings",
    "num_programs",
    "preferred_half_dtype",
    "device_guarded",
    "grad_buffers",
    "mark_overwritten",
]


def _storage(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def grad_buffers(overwrite: bool, g: torch.Tensor, u: torch.Tensor, dy: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Where a gated activation's backward writes ``(d_gate, d_up)``: fresh tensors, or with ``overwrite`` the
    saved ``gate`` and ``up`` themselves (each element is read before it is written, in the same program), which
    saves two ``[tokens, intermediate]`` tensors at the MLP's peak. Only when the three tensors are distinct
    storages; callers pass ``overwrite`` only for inputs nothing else reads (the patched MLP's own projections)."""
    if overwrite and len({_storage(g), _storage(u), _storage(dy)}) == 3:
        return g, u
    return torch.empty_like(g), torch.empty_like(u)


def gated_grads(dy: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, overwrite: bool, launch, ref):
    """``(d gate, d up)`` of a gated activation without an autograd graph: ``launch(dy, g, u, dg, du)`` (its
    Triton backward kernel) where Triton runs, else autograd through ``ref(gate, up)``; with ``overwrite`` the
    gradients go over ``gate`` and ``up`` where `grad_buffers` allows it."""
    if use_triton(dy, gate, up):
        g, u, dy = gate.contiguous(), up.contiguous(), dy.contiguous()
        dg, du = grad_buffers(overwrite, g, u, dy)
        launch(dy, g, u, dg, du)
        return dg, du
    with torch.enable_grad():
        g, u = gate.detach().requires_grad_(True), up.detach().requires_grad_(True)
        dg, du = torch.autograd.grad(ref(g, u), (g, u), dy)
    return dg, du


def mark_overwritten(*tensors: torch.Tensor) -> None:
    """Bump the version counters of tensors a kernel wrote through raw pointers (autograd cannot see it), so any
    other autograd node that saved them fails loudly when it unpacks them instead of reading gradients."""
    bump = getattr(torch.autograd.graph, "increment_version", None)
    if bump is not None:
        for t in tensors:
            bump(t)


def triton_interpret() -> bool:
    """True when Triton runs in interpreter mode (``TRITON_INTERPRET=1``, CPU tensors allowed)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def use_triton(*tensors: torch.Tensor) -> bool:
    """Whether the Triton path should be used for these tensors.

    Yes if triton is importable and either all tensors live on CUDA or the interpreter is on; never when
    `HF_FASTVISION_DISABLE_TRITON=1` (the pure-torch references run instead).
    """
    if not HAS_TRITON or os.environ.get("HF_FASTVISION_DISABLE_TRITON", "").lower() in ("1", "true", "yes"):
        return False
    ts = [t for t in tensors if isinstance(t, torch.Tensor)]
    if ts and all(t.is_cuda for t in ts):
        return True
    return triton_interpret()


def next_power_of_2(n: int) -> int:
    n = int(n)
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


# A row of a Triton block lives in registers; beyond this we would spill too much.
MAX_FUSED_SIZE = 65536


def calculate_settings(n: int) -> tuple[int, int]:
    """BLOCK_SIZE (next power of two >= n) and num_warps for a one-row-per-program kernel."""
    block = next_power_of_2(n)
    if block > MAX_FUSED_SIZE:
        raise RuntimeError(f"row size {n} exceeds the maximum fused size {MAX_FUSED_SIZE}")
    num_warps = 4
    if block >= 32768:
        num_warps = 32
    elif block >= 8192:
        num_warps = 16
    elif block >= 2048:
        num_warps = 8
    return block, num_warps


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def num_programs(device: torch.device, n_rows: int) -> int:
    """Number of persistent programs for row-reduction kernels (e.g. weight gradients)."""
    if device.type == "cuda":
        idx = device.index if device.index is not None else torch.cuda.current_device()
        p = _sm_count(idx)
    else:  # interpreter: few programs keep it fast
        p = 2
    return max(1, min(p, n_rows))


def preferred_half_dtype(device: torch.device | str | None = None) -> torch.dtype:
    """bfloat16 where the GPU supports it, float16 otherwise (e.g. T4 / V100); bf16 on CPU."""
    device = torch.device(device) if device is not None else None
    if device is not None and device.type != "cuda":
        return torch.bfloat16
    if torch.cuda.is_available():
        idx = device.index if device is not None and device.index is not None else torch.cuda.current_device()
        # native bf16 needs compute capability >= 8.0 (Ampere); Triton has no bf16 path below that
        if torch.cuda.get_device_capability(idx)[0] < 8:
            return torch.float16
    return torch.bfloat16


class device_guarded:  # noqa: N801 - used like the kernel it wraps
    """A Triton kernel whose launches run on their tensors' CUDA device.

    Triton launches on the *current* CUDA device and its current stream. When accelerate spreads a model over
    several GPUs (``device_map="auto"``, ``max_memory``) a layer on ``cuda:1`` is called while ``cuda:0`` is
    current, and an unguarded launch would run on the wrong device's stream, unsynchronised with the work that
    produced its inputs. ``device_guarded(kernel)[grid](*args)`` switches to the first CUDA tensor argument's
    device for the launch (a no-op when it is already current, and for CPU tensors under the interpreter).
    """

    def __init__(self, kernel):
        self.kernel = kernel

    def __getitem__(self, grid):
        launch = self.kernel[grid]

        def run(*args, **kwargs):
            for arg in args:
                if isinstance(arg, torch.Tensor):
                    if arg.is_cuda and arg.device.index != torch.cuda.current_device():
                        with torch.cuda.device(arg.device):
                            return launch(*args, **kwargs)
                    break
            return launch(*args, **kwargs)

        return run
