"""id → the checkpoint actually loaded: a local folder, a pre-quantized 4-bit twin, or the id itself.

The mapping from official ids to public `*-bnb-4bit` repos is data (`data/prequantized.json`). Offline
(`HF_HUB_OFFLINE=1`) a Hub id resolves only to what the local Hugging Face cache holds.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path

from hf_fastvision.errors import ModelNotFoundError

__all__ = ["Resolution", "resolve", "prequantized_twin", "source_of_twin", "is_offline", "in_cache"]

_TRUE = {"1", "on", "yes", "true"}


def is_offline() -> bool:
    """HF_HUB_OFFLINE read at call time (huggingface_hub reads it once, at import)."""
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE:
        return True
    try:
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE)
    except Exception:  # pragma: no cover - very old hub
        return False


@lru_cache(maxsize=1)
def _mapping() -> dict[str, str]:
    text = resources.files("hf_fastvision").joinpath("data/prequantized.json").read_text()
    return {k: v for k, v in json.loads(text).items() if not k.startswith("_")}


def _twins() -> dict[str, str]:
    return {k.lower(): v for k, v in _mapping().items()}


def _sources() -> dict[str, str]:
    return {v.lower(): k for k, v in _mapping().items()}


def prequantized_twin(model_id: str) -> str | None:
    """The published bnb-4bit repo of an official id, if we know one."""
    return _twins().get(model_id.lower())


def source_of_twin(model_id: str) -> str | None:
    """The 16-bit source of a known bnb-4bit repo."""
    return _sources().get(model_id.lower())


def in_cache(repo_id: str, revision: str | None = None, cache_dir: str | None = None) -> bool:
    """True when the HF cache holds this repo's config.json at `revision` (default: main)."""
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(repo_id, "config.json", cache_dir=cache_dir, revision=revision)
    except Exception:
        return False
    return isinstance(found, str)


@dataclass(frozen=True)
class Resolution:
    """What `from_pretrained` was asked for, what it loads, and why."""

    requested: str
    name: str
    revision: str | None
    local: bool
    reason: str
    offline: bool

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def _looks_like_path(name: str) -> bool:
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name


def resolve(
    name: str | os.PathLike[str],
    *,
    want_4bit: bool,
    want_16bit: bool,
    allow_twin: bool = True,
    twin_block_reason: str = "",
    use_exact_model_name: bool = False,
    revision: str | None = None,
    cache_dir: str | None = None,
) -> Resolution:
    """Decide which checkpoint to load. Raises `ModelNotFoundError` for a missing folder or uncached offline id."""
    requested = os.fspath(name)
    offline = is_offline()
    path = Path(requested).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotFoundError.not_a_checkpoint(requested)
        return Resolution(requested, str(path.resolve()), None, True, "local folder", offline)
    if _looks_like_path(requested) or path.exists():
        raise ModelNotFoundError.missing_folder(requested)

    target, reason = requested, "as given"
    if use_exact_model_name:
        reason = "use_exact_model_name=True"
    elif want_4bit and (twin := prequantized_twin(requested)):
        if not allow_twin:
            reason = f"pre-quantized twin {twin} not used: {twin_block_reason}"
        elif offline and not in_cache(twin, revision, cache_dir) and in_cache(requested, revision, cache_dir):
            reason = f"offline and only the 16-bit source is cached (twin {twin} is not); quantizing on load"
        else:
            target, reason = twin, "pre-quantized bnb-4bit twin of the requested model"
    elif want_16bit and (source := source_of_twin(requested)):
        target, reason = source, "16-bit source of the requested 4-bit repo"

    if offline and not in_cache(target, revision, cache_dir):
        raise ModelNotFoundError.unknown_id(requested, offline=True)
    return Resolution(requested, target, revision, False, reason, offline)
