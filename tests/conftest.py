"""Shared fixtures: offline Hub settings and tiny saved checkpoints of every architecture."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
try:  # kernels run under Triton's interpreter without CUDA; it must be chosen before triton is first imported
    import ctypes.util

    if ctypes.util.find_library("cuda") is None:
        os.environ.setdefault("TRITON_INTERPRET", "1")
        # ...but everything outside tests/kernels (subprocesses included) runs the pure-torch references.
        os.environ.setdefault("HF_FASTVISION_DISABLE_TRITON", "1")
except Exception:  # pragma: no cover
    pass

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """`tiny_checkpoint(name)` → folder with a saved tiny fp32 model and processor (built once per session)."""
    from hf_fastvision.archs.tiny import tiny_model_and_processor

    made: dict[str, Path] = {}

    def make(name: str) -> Path:
        if name not in made:
            folder = tmp_path_factory.mktemp(f"tiny-{name}")
            model, processor = tiny_model_and_processor(name, seed=0)
            model.save_pretrained(folder)
            processor.save_pretrained(folder)
            made[name] = folder
        return made[name]

    return make


@pytest.fixture(scope="session")
def script_module():
    """``script_module("memory_peak")``: a file of ``scripts/`` imported as a module (each name loaded once)."""
    import importlib.util
    import sys

    loaded: dict[str, object] = {}

    def load(name: str):
        if name not in loaded:
            path = Path(__file__).resolve().parents[1] / "scripts" / f"{name}.py"
            spec = importlib.util.spec_from_file_location(f"{name}_under_test", path)
            module = importlib.util.module_from_spec(spec)
            sys.modules[spec.name] = module  # dataclasses look their module up there
            spec.loader.exec_module(module)
            loaded[name] = module
        return loaded[name]

    return load
