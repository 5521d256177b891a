"""id → the checkpoint actually loaded: a local folder, a pre-quantized 4-bit twin, or the id itself.

The mapping from official ids to public `*-bnb-4bit` repos is data (`data/prequantized.json`). Offline
(`HF_HUB_OFFLINE=1`) a Hub id resolves only to what the local Hugging Face cache holds.
"""

from __future__ import annotations

import difflib
import json
import os
from dataclasses import asdict, dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path

from hf_fastvision import writer
from hf_fastvision.errors import ModelNotFoundError

__all__ = [
    "Resolution",
    "resolve",
    "prequantized_twin",
    "source_of_twin",
    "is_offline",
    "in_cache",
    "local_close_matches",
]

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


def local_close_matches(path: Path) -> tuple[str, list[str]]:
    """(folder, names): close matches of the first missing component of `path` among its existing parent's folders."""
    parts = path.parts
    base = Path(parts[0]) if path.is_absolute() else Path(".")
    rest = parts[1:] if path.is_absolute() else parts
    for i, part in enumerate(rest):
        nxt = base / part
        if not nxt.exists():
            try:
                siblings = [p.name for p in base.iterdir() if p.is_dir() and not p.name.startswith(".")]
            except OSError:
                return str(base), []
            close = [base / c for c in difflib.get_close_matches(part, siblings, n=3, cutoff=0.6)]
            deeper = [c.joinpath(*rest[i + 1 :]) for c in close]
            return str(base), [str(d if d.exists() else c) for c, d in zip(close, deeper)]
        base = nxt
    return str(base), []


def _invalid_hub_id(name: str) -> str | None:
    """Why `name` is not a Hub repo id, or None when it is one."""
    try:
        from huggingface_hub.utils import validate_repo_id
    except ImportError:  # pragma: no cover - very old hub
        return None
    try:
        validate_repo_id(name)
    except Exception as exc:  # HFValidationError
        return str(exc).split("\n")[0]
    return None


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
    writer.recover(path)  # finish a save of ours that was interrupted between its renames (cheap when none was)
    if path.is_dir():
        writer.check_manifest(path)
        if not (path / "config.json").is_file():
            raise ModelNotFoundError.not_a_checkpoint(requested)
        return Resolution(requested, str(path.resolve()), None, True, "local folder", offline)
    if path.exists():
        raise ModelNotFoundError.is_a_file(requested, str(path.parent))
    if _looks_like_path(requested) or isinstance(name, os.PathLike):
        where, close = local_close_matches(path)
        raise ModelNotFoundError.missing_folder(requested, close, where)
    if (why := _invalid_hub_id(requested)) is not None:
        raise ModelNotFoundError.invalid_id(requested, why)

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
        if offline and not in_cache(source, revision, cache_dir):
            raise ModelNotFoundError.source_not_cached(requested, source, in_cache(requested, revision, cache_dir))
        target, reason = source, "16-bit source of the requested 4-bit repo"

    if offline and not in_cache(target, revision, cache_dir):
        raise ModelNotFoundError.unknown_id(requested, offline=True, close=local_close_matches(path)[1])
    return Resolution(requested, target, revision, False, reason, offline)
