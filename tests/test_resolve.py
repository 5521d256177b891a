"""Resolution against a populated Hugging Face cache layout, offline and online (no request is made)."""

from __future__ import annotations

import json

import pytest

from hf_fastvision.errors import ModelNotFoundError
from hf_fastvision.resolve import prequantized_twin, resolve, source_of_twin

SOURCE = "Qwen/Qwen2.5-VL-7B-Instruct"
TWIN = "unsloth/Qwen2.5-VL-7B-Instruct-bnb-4bit"


def _cache_repo(cache, repo_id, revision="main", sha="a" * 40):
    """Lay out a repo the way huggingface_hub's cache does: refs/<rev> → snapshots/<sha>/config.json."""
    root = cache / f"models--{repo_id.replace('/', '--')}"
    (root / "refs").mkdir(parents=True, exist_ok=True)
    (root / "refs" / revision).write_text(sha)
    snap = root / "snapshots" / sha
    snap.mkdir(parents=True, exist_ok=True)
    (snap / "config.json").write_text(json.dumps({"model_type": "qwen2_5_vl"}))
    return snap


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture
def online(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_OFFLINE", False)


def test_mapping_data():
    assert prequantized_twin(SOURCE) == TWIN
    assert prequantized_twin(SOURCE.lower()) == TWIN
    assert source_of_twin(TWIN) == SOURCE
    assert prequantized_twin("nobody/nothing") is None


def test_offline_prefers_cached_twin(tmp_path, offline):
    _cache_repo(tmp_path, SOURCE)
    _cache_repo(tmp_path, TWIN)
    r = resolve(SOURCE, want_4bit=True, want_16bit=False, cache_dir=str(tmp_path))
    assert r.name == TWIN and r.offline and "twin" in r.reason


def test_offline_falls_back_to_cached_source(tmp_path, offline):
    _cache_repo(tmp_path, SOURCE)
    r = resolve(SOURCE, want_4bit=True, want_16bit=False, cache_dir=str(tmp_path))
    assert r.name == SOURCE and "quantizing on load" in r.reason


def test_offline_uncached_raises(tmp_path, offline):
    with pytest.raises(ModelNotFoundError, match="HF_HUB_OFFLINE"):
        resolve(SOURCE, want_4bit=True, want_16bit=False, cache_dir=str(tmp_path))


def test_offline_revision_is_respected(tmp_path, offline):
    _cache_repo(tmp_path, SOURCE, revision="v1")
    with pytest.raises(ModelNotFoundError):
        resolve(SOURCE, want_4bit=False, want_16bit=True, cache_dir=str(tmp_path), revision="main")
    r = resolve(SOURCE, want_4bit=False, want_16bit=True, cache_dir=str(tmp_path), revision="v1")
    assert r.name == SOURCE and r.revision == "v1"


def test_online_resolution(tmp_path, online):
    r = resolve(SOURCE, want_4bit=True, want_16bit=False, cache_dir=str(tmp_path))
    assert r.name == TWIN and not r.offline
    r16 = resolve(TWIN, want_4bit=False, want_16bit=True, cache_dir=str(tmp_path))
    assert r16.name == SOURCE and "16-bit source" in r16.reason
    exact = resolve(SOURCE, want_4bit=True, want_16bit=False, use_exact_model_name=True, cache_dir=str(tmp_path))
    assert exact.name == SOURCE and "use_exact_model_name" in exact.reason
    blocked = resolve(SOURCE, want_4bit=True, want_16bit=False, allow_twin=False, twin_block_reason="custom config")
    assert blocked.name == SOURCE and "custom config" in blocked.reason


def test_loader_blocks_twin_for_custom_settings(tmp_path, online):
    from hf_fastvision.loading import resolve_for
    from hf_fastvision.options import options_from_kwargs

    assert resolve_for(SOURCE, options_from_kwargs({})).name == TWIN
    for kwargs, why in (
        ({"quant_type": "fp4"}, "non-default"),
        ({"double_quant": False}, "non-default"),
        ({"quantization_config": object()}, "quantization_config"),
        ({"keep_vision_16bit": True}, "16-bit"),
    ):
        r = resolve_for(SOURCE, options_from_kwargs(kwargs))
        assert r.name == SOURCE and why in r.reason, kwargs
    assert resolve_for(TWIN, options_from_kwargs({"load_in_16bit": True})).name == SOURCE


def test_local_folder_wins(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    r = resolve(str(tmp_path), want_4bit=True, want_16bit=False)
    assert r.local and r.reason == "local folder"
