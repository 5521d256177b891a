"""`hf_fastvision.allocator.configure`: expandable segments only where the user left the allocator alone."""

from __future__ import annotations

import pytest

from hf_fastvision import allocator


@pytest.fixture
def clean(monkeypatch):
    monkeypatch.delenv("WSL_DISTRO_NAME", raising=False)
    monkeypatch.delenv("WSL_INTEROP", raising=False)
    monkeypatch.setattr(allocator, "_unsupported_platform", lambda: None)
    monkeypatch.setattr(allocator, "_pending", [])  # the package's own decision stays as it was
    monkeypatch.setattr("torch.cuda.is_available", lambda: True)  # the paths a GPU machine takes
    return {}


def test_defers_to_training_when_nothing_is_configured(clean, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    assert allocator.configure(clean) == "deferred to training" and clean == {}


def test_import_mode_sets_expandable_segments_at_once(clean, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    clean[allocator.OPT_OUT] = "import"
    assert allocator.configure(clean) == "set"
    assert clean == {allocator.OPT_OUT: "import", allocator._variable(): allocator.SETTING}
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
    env: dict[str, str] = {allocator.OPT_OUT: "import"}
    assert allocator.configure(env).startswith("too late") and env == {allocator.OPT_OUT: "import"}
    late: dict[str, str] = {}  # the default switches at run time: a late import still gets it for training
    assert allocator.configure(late) == "deferred to training" and late == {}


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


def test_train_mode_defers_until_training(clean, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    clean[allocator.OPT_OUT] = "train"
    assert allocator.configure(clean) == "deferred to training"
    assert clean == {allocator.OPT_OUT: "train"}  # nothing written at import
    monkeypatch.setenv(allocator._variable(), "x")  # recorded, so the teardown removes what the call writes
    monkeypatch.delenv(allocator._variable())
    assert allocator.enable_for_training() == "set"  # CUDA not started yet: the variable still takes effect
    import os

    assert os.environ[allocator._variable()] == allocator.SETTING
    assert allocator.enable_for_training() == "nothing deferred"  # once only


def test_train_mode_switches_a_running_allocator(clean, monkeypatch):
    import torch

    calls = []
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    clean[allocator.OPT_OUT] = "train"
    allocator.configure(clean)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: calls.append("empty_cache"))
    monkeypatch.setattr(torch.cuda.memory, "_set_allocator_settings", lambda s: calls.append(s))
    monkeypatch.setattr(torch._C, "_accelerator_setAllocatorSettings", lambda s: calls.append(s), raising=False)
    assert allocator.enable_for_training() == "switched at training"
    assert calls == ["empty_cache", allocator.SETTING]  # the load's freed blocks go back before the switch


def test_import_mode_leaves_nothing_for_training(clean, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    clean[allocator.OPT_OUT] = "import"
    assert allocator.configure(clean) == "set"
    assert allocator.enable_for_training() == "nothing deferred"


def test_an_unknown_mode_names_the_choices(clean):
    clean[allocator.OPT_OUT] = "later"
    with pytest.raises(ValueError, match="import, train, 0"):
        allocator.configure(clean)


def test_without_cuda_training_sets_nothing(clean, monkeypatch):
    import os

    import torch

    clean[allocator.OPT_OUT] = "train"
    allocator.configure(clean)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    before = {k: os.environ.get(k) for k in ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF")}
    assert allocator.enable_for_training() == "no CUDA"
    assert {k: os.environ.get(k) for k in before} == before


@pytest.mark.parametrize("value", ["1", "true", "on", ""])
def test_the_old_on_switch_means_the_default(clean, value):
    clean[allocator.OPT_OUT] = value
    assert allocator.configure(clean) == "deferred to training"
