"""`hf_fastvision.allocator.configure`: expandable segments only where the user left the allocator alone."""

from __future__ import annotations

import pytest

from hf_fastvision import allocator


@pytest.fixture
def clean(monkeypatch):
    monkeypatch.delenv("WSL_DISTRO_NAME", raising=False)
    monkeypatch.delenv("WSL_INTEROP", raising=False)
    monkeypatch.setattr(allocator, "_unsupported_platform", lambda: None)
    return {}


def test_sets_expandable_segments_when_nothing_is_configured(clean, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    assert allocator.configure(clean) == "set"
    assert clean == {allocator._variable(): allocator.SETTING}
    assert allocator._variable() in ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF")


@pytest.mark.parametrize("var", ["PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF"])
def test_the_users_setting_wins(clean, var):
    clean[var] = "max_split_size_mb:128"
    assert allocator.configure(clean).startswith("left to the user")
    assert clean == {var: "max_split_size_mb:128"}


def test_opt_out_and_late_calls_change_nothing(clean, monkeypatch):
    import torch

    clean[allocator.OPT_OUT] = "0"
    assert allocator.configure(clean).startswith("off") and clean == {allocator.OPT_OUT: "0"}
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    env: dict[str, str] = {}
    assert allocator.configure(env).startswith("too late") and env == {}


def test_unsupported_platforms_are_left_alone(monkeypatch):
    monkeypatch.setattr(allocator, "_unsupported_platform", lambda: "WSL")
    env: dict[str, str] = {}
    assert allocator.configure(env) == "unsupported on WSL" and env == {}


def test_the_package_import_ran_it():
    import hf_fastvision

    assert isinstance(hf_fastvision.ALLOCATOR_SETUP, str) and hf_fastvision.ALLOCATOR_SETUP


def test_rocm_is_left_alone(clean, monkeypatch):
    import torch

    monkeypatch.setattr(torch.version, "hip", "6.2", raising=False)
    assert allocator.configure(clean) == "unsupported on ROCm" and clean == {}
