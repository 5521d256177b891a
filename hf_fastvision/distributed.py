"""Multi-process helpers: who am I, run this on rank 0 only, and the FSDP + QLoRA storage check.

Thin wrappers over `torch.distributed` and the environment `torchrun` / `accelerate launch` set (`RANK`,
`LOCAL_RANK`, `WORLD_SIZE`); nothing here starts processes or talks to other ranks except through
`torch.distributed` (a barrier after a rank-0-only write, so the others never read a half-written folder).

    from hf_fastvision.distributed import save_on_main
    from hf_fastvision.training.saving import save_adapter
    save_on_main(save_adapter, model, "out/adapter", processor)   # rank 0 writes, every rank waits for it
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

from hf_fastvision.errors import ConflictingOptionsError

__all__ = [
    "WorldInfo",
    "world_info",
    "is_main_process",
    "barrier",
    "on_main_process",
    "main_process_only",
    "save_on_main",
    "gather_full_state_dict",
    "fsdp_requested",
    "check_fsdp_qlora",
]

T = TypeVar("T")


@dataclass(frozen=True)
class WorldInfo:
    rank: int
    """Global rank of this process (0 when not distributed)."""
    local_rank: int
    """Rank on this host: the GPU index `torchrun` gives this process (0 when not distributed)."""
    world_size: int
    """Number of processes in the job (1 when not distributed)."""

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _dist_ready() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def world_info() -> WorldInfo:
    """Rank, local rank and world size: from the initialized process group if there is one, else the env."""
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if _dist_ready():
        return WorldInfo(torch.distributed.get_rank(), local_rank, torch.distributed.get_world_size())
    return WorldInfo(int(os.environ.get("RANK", "0")), local_rank, int(os.environ.get("WORLD_SIZE", "1")))


def is_main_process() -> bool:
    """True on global rank 0 (and in any single-process run)."""
    return world_info().is_main


def barrier() -> None:
    """`torch.distributed.barrier()` when a process group is up; nothing otherwise."""
    if _dist_ready():
        torch.distributed.barrier()


def on_main_process(fn: Callable[..., T], *args: Any, wait: bool = True, **kwargs: Any) -> T | None:
    """Call `fn(*args, **kwargs)` on rank 0 only; return its result there and None elsewhere.

    With `wait` (the default) every rank meets at a barrier afterwards, so nobody reads what rank 0 is still
    writing. Every rank must call it (it is a collective when a process group is up). If `fn` raises on rank 0
    the error propagates before the barrier; the other ranks then wait until the launcher's timeout ends them.
    """
    result = fn(*args, **kwargs) if is_main_process() else None
    if wait:
        barrier()
    return result


def main_process_only(fn: Callable[..., T]) -> Callable[..., T | None]:
    """Decorator form of `on_main_process` (with the barrier)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> T | None:
        return on_main_process(fn, *args, **kwargs)

    return wrapper


def _is_fsdp(model: Any) -> bool:
    return type(model).__name__ == "FullyShardedDataParallel"


def gather_full_state_dict(fsdp_model: Any) -> dict[str, torch.Tensor] | None:
    """The whole state dict of an FSDP (FSDP1) model, gathered unit by unit to CPU: on rank 0; None elsewhere.

    A collective: every rank must call it. Keys are the wrapped model's own (no FSDP prefixes).
    """
    from torch.distributed.fsdp import FullStateDictConfig, StateDictType
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    config = FullStateDictConfig(offload_to_cpu=True, rank0_only=True)
    with FSDP.state_dict_type(fsdp_model, StateDictType.FULL_STATE_DICT, config):
        state = fsdp_model.state_dict()
    return state if is_main_process() else None


def save_on_main(save_fn: Callable[..., T], model: Any, *args: Any, **kwargs: Any) -> T | None:
    """Run one of `hf_fastvision.training.saving`'s functions (or `model.save_pretrained`-like callable) on rank 0.

    A `DistributedDataParallel` wrapper is unwrapped first (`.module`), so the folder holds the plain model's
    files. Under FSDP every rank takes part in gathering the full state dict first (`gather_full_state_dict`), then
    rank 0 writes the adapter from it; only `save_adapter` is supported there (a merged save needs the whole model
    on one process: save the adapter, then merge it in a single process with `save_merged_16bit`).
    """
    if _is_fsdp(model):
        from hf_fastvision.training.saving import save_adapter

        if save_fn is not save_adapter:
            raise ConflictingOptionsError(
                ["FSDP", f"save_on_main({getattr(save_fn, '__name__', save_fn)})"],
                "only save_adapter can write from a sharded model. Save the adapter, then merge it in one process "
                "(hf_fastvision.training.saving.save_merged_16bit on the base model with the adapter loaded).",
            )
        state = gather_full_state_dict(model)
        return on_main_process(save_fn, model.module, *args, state_dict=state, **kwargs)
    inner = getattr(model, "module", model) if type(model).__name__ == "DistributedDataParallel" else model
    return on_main_process(save_fn, inner, *args, **kwargs)


def fsdp_requested() -> bool:
    """True when `accelerate launch` was configured for FSDP (it sets ACCELERATE_USE_FSDP)."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in {"1", "true", "yes"}


def _dtype(value: Any) -> torch.dtype | None:
    if value is None or isinstance(value, torch.dtype):
        return value
    return getattr(torch, str(value).removeprefix("torch."), None)


def check_fsdp_qlora(model: Any, compute_dtype: torch.dtype | str | None = None) -> None:
    """Raise unless every 4-bit weight is stored in the dtype FSDP will flatten the model to.

    FSDP flattens a wrapped module's parameters into one tensor of a single dtype, so 4-bit weights packed in the
    default `uint8` storage cannot share a flat parameter with bf16 norms/LoRA (and would be cast, corrupting them).
    `compute_dtype` defaults to the model's bitsandbytes compute dtype.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else getattr(model, "module", model)
    qconfig = getattr(getattr(base, "config", None), "quantization_config", None)
    if compute_dtype is None and qconfig is not None:
        compute_dtype = getattr(qconfig, "bnb_4bit_compute_dtype", None)
        if compute_dtype is None and isinstance(qconfig, dict):
            compute_dtype = qconfig.get("bnb_4bit_compute_dtype")
    want = _dtype(compute_dtype) or torch.bfloat16
    wrong = sorted({str(p.dtype).removeprefix("torch.") for p in base.parameters()
                    if (type(p).__name__ == "Params4bit" or getattr(p, "quant_state", None) is not None) and p.dtype != want})
    if wrong:
        name = str(want).removeprefix("torch.")
        raise ConflictingOptionsError(
            ["FSDP", f"quant_storage={wrong[0]}"],
            f"FSDP + QLoRA needs the 4-bit weights stored in the compute dtype ({name}), but they are stored as "
            f"{', '.join(wrong)}. Load with `FastVisionModel.from_pretrained(..., dtype=torch.{name}, "
            f"quant_storage=\"{name}\")` (or BitsAndBytesConfig(bnb_4bit_quant_storage=torch.{name})).",
        )
