"""Checks of a checkpoint folder that read no weight: its files, its shard index, and every tensor's shape.

Shapes come from the safetensors headers (8-byte length + JSON) and are compared with the meta-device model after
the key conversions transformers itself applies on load (`transformers.conversion_mapping`): renamings of old
checkpoint layouts (`language_model.model.` → `model.language_model.`, ...) and converters that fuse or split
tensors (per-expert MoE weights → one 3-D parameter, ...). Only keys that map one-to-one onto a model tensor are
shape-checked; converted keys only count as present, keys that map nowhere are left to transformers, and the packed
weights of a pre-quantized bitsandbytes checkpoint (`.weight` uint8 + `.absmax`, `.quant_map`, `.quant_state.*`)
are not compared. Without the conversion API (another transformers version) only exact names are checked, and
missing tensors are not reported.
"""

from __future__ import annotations

import json
import re
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from math import prod
from pathlib import Path
from typing import Any

from hf_fastvision.errors import CheckpointMismatchError, CorruptCheckpointError, ModelNotFoundError

__all__ = [
    "TensorHeader",
    "read_header",
    "check_index",
    "check_weights_present",
    "weight_files",
    "check_tensors",
    "init_missing_prefixes",
]

SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"
_INDEX_RE = re.compile(r"^(model|pytorch_model)\.(safetensors|bin)\.index(\.[^.]+)?\.json$")
_WEIGHTS_RE = re.compile(r"^(model|pytorch_model)([.-][^/]*)?\.(safetensors|bin)$")
_PACKED_STATE_RE = re.compile(r"^(?P<weight>.+)\.quant_state\.bitsandbytes__\w+$")
_PACKED_SUFFIXES = (".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map")


@dataclass(frozen=True)
class TensorHeader:
    """One tensor as a safetensors header describes it."""

    shape: tuple[int, ...]
    dtype: str
    file: str


def read_header(path: Path) -> dict[str, Any]:
    """The header of one *.safetensors file (tensor name → entry), checked against the file's length."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise CorruptCheckpointError(str(path), f"{size} bytes, shorter than a safetensors header")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8:
                raise CorruptCheckpointError(str(path), f"header claims {n} bytes, file has {size - 8}")
            header = json.loads(fh.read(n))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CorruptCheckpointError(str(path), f"unreadable header: {exc}") from exc
    if not isinstance(header, dict):
        raise CorruptCheckpointError(str(path), "the header is not a JSON object")
    try:
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    except (KeyError, IndexError, TypeError) as exc:
        raise CorruptCheckpointError(str(path), f"header entry without data_offsets ({exc!r})") from exc
    if 8 + n + end > size:
        raise CorruptCheckpointError(str(path), f"{size} bytes on disk, {8 + n + end} expected")
    return header


def _index_map(path: Path) -> dict[str, str]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise CorruptCheckpointError(
            str(path), f"not valid JSON: {exc.msg} at line {exc.lineno}, column {exc.colno}"
        ) from exc
    except UnicodeDecodeError as exc:
        raise CorruptCheckpointError(str(path), f"not UTF-8 text ({exc.reason})") from exc
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CorruptCheckpointError(str(path), "it has no `weight_map` object of tensor name → shard file")
    return weight_map


def check_index(folder: Path, require_shards: bool = True) -> None:
    """Every shard index in `folder` is valid JSON with a weight_map; with `require_shards`, every shard it names
    is there (off for a cache snapshot still downloading)."""
    for path in sorted(p for p in folder.iterdir() if _INDEX_RE.match(p.name) and p.is_file()):
        weight_map = _index_map(path)
        if require_shards:
            missing = sorted({f for f in weight_map.values() if not (folder / f).is_file()})
            if missing:
                raise CorruptCheckpointError.missing_shards(str(path), str(folder), missing)


def check_weights_present(folder: Path) -> None:
    """A local folder with config.json holds weights too (adapter folders are left to transformers and peft)."""
    names = sorted(p.name for p in folder.iterdir())
    if any(_WEIGHTS_RE.match(n) or _INDEX_RE.match(n) for n in names) or "adapter_config.json" in names:
        return
    raise ModelNotFoundError.no_weights(str(folder), names)


def weight_files(folder: Path) -> list[Path] | None:
    """The safetensors files transformers loads from `folder` (index shards, else model.safetensors), or None
    when they are not all on disk or the weights are in another format."""
    index = folder / SAFETENSORS_INDEX
    if index.is_file():
        files = [folder / f for f in sorted(set(_index_map(index).values()))]
    elif (folder / SAFETENSORS_SINGLE).is_file():
        files = [folder / SAFETENSORS_SINGLE]
    else:
        return None
    return files if all(f.is_file() for f in files) else None


def init_missing_prefixes(value: bool | str | Iterable[str] | None) -> tuple[str, ...]:
    """`init_missing` as module-name prefixes: True allows every tensor to be initialised, a string one prefix."""
    if value is None or value is False:
        return ()
    if value is True:
        return ("",)
    if isinstance(value, str):
        return (value,)
    return tuple(str(v) for v in value)


def _allowed(name: str, prefixes: Sequence[str]) -> bool:
    return any(p == "" or name == p or name.startswith(p.rstrip(".") + ".") for p in prefixes)


class _Mapper:
    """Checkpoint key → model key as transformers' loader computes it (`convert_and_load_state_dict_in_model`)."""

    def __init__(self, meta: Any, state_dict: dict[str, Any], key_mapping: dict[str, str] | None) -> None:
        self.state_dict = state_dict
        self.prefix = getattr(meta, "base_model_prefix", "") or None
        self.exact = False
        try:
            from transformers.conversion_mapping import get_model_conversion_mapping
            from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

            try:
                mapping = get_model_conversion_mapping(meta, key_mapping=key_mapping)
            except TypeError:
                mapping = get_model_conversion_mapping(meta, key_mapping)
        except Exception:  # another transformers version: exact names only
            self.exact = True
            return
        self._rename = rename_source_key
        self.renamings = [m for m in mapping if isinstance(m, WeightRenaming)]
        self.converters = [m for m in mapping if isinstance(m, WeightConverter)]
        self.by_pattern = {p: c for c in self.converters for p in c.source_patterns}

    def __call__(self, key: str) -> tuple[str, list[str] | None]:
        """(model key, every target key when a converter claims the key, else None)."""
        if self.exact:
            return key, None
        renamed, pattern = self._rename(key, self.renamings, self.converters, self.prefix, self.state_dict)
        if renamed not in self.state_dict and key in self.state_dict:
            renamed, pattern = self._rename(key, [], [], self.prefix, self.state_dict)
        if pattern is None:
            return renamed, None
        converter = self.by_pattern.get(pattern)
        targets = list(getattr(converter, "target_patterns", None) or [])
        first = targets[0] if targets else None
        return renamed, [renamed.replace(first, t) for t in targets] if first else [renamed]


def _packed(keys: Iterable[str]) -> set[str]:
    """Keys of bitsandbytes-packed weights and their quant-state companions."""
    states = {k: m.group("weight") for k in keys if (m := _PACKED_STATE_RE.match(k))}
    weights = set(states.values())
    return weights | set(states) | {w + suffix for w in weights for suffix in _PACKED_SUFFIXES}


def _shape(values: Sequence[int]) -> str:
    return "[" + ", ".join(str(v) for v in values) + "]"


def check_tensors(
    meta: Any,
    folder: Path,
    headers: dict[Path, dict[str, Any]],
    *,
    init_missing: Sequence[str] = (),
    check_shapes: bool = True,
    key_mapping: dict[str, str] | None = None,
) -> None:
    """Compare the checkpoint's tensors (`headers`: file → safetensors header) with the meta-device `meta`.

    Raises `CheckpointMismatchError` for a tensor whose shape differs from the model's (unless `check_shapes` is
    off: `ignore_mismatched_sizes=True`), and for model parameters the checkpoint lacks that are neither tied to
    one it has nor under a module prefix in `init_missing`.
    """
    tensors = {
        k: TensorHeader(tuple(v.get("shape", ())), str(v.get("dtype", "?")), path.name)
        for path, header in headers.items()
        for k, v in header.items()
        if k != "__metadata__" and isinstance(v, dict)
    }
    state_dict = meta.state_dict()
    mapper = _Mapper(meta, state_dict, key_mapping)
    packed = _packed(tensors)
    covered: set[str] = set()
    unmapped: list[str] = []
    mismatches: list[tuple[str, str, str, str, str]] = []
    for key in sorted(tensors):
        if key in packed and not key.endswith(".weight"):
            continue  # quant-state companions of a packed weight
        renamed, targets = mapper(key)
        if renamed not in state_dict:
            unmapped.append(renamed)
            continue
        covered.update(targets or [renamed])
        if targets is not None or key in packed or not check_shapes:
            continue  # fused / split by a converter, or packed 4-bit data: no one-to-one shape to compare
        found, expected = tensors[key], tuple(state_dict[renamed].shape)
        if found.shape != expected:
            mismatches.append((renamed, key, found.file, _shape(expected), f"{_shape(found.shape)} {found.dtype}"))
    if mismatches:
        raise CheckpointMismatchError.wrong_shapes(str(folder), mismatches)
    if mapper.exact:
        return
    missing = _missing(meta, covered, unmapped)
    missing = [m for m in missing if not _allowed(m, init_missing)]
    if missing:
        modules = sorted({m.rsplit(".", 1)[0] if "." in m else m for m in missing})
        raise CheckpointMismatchError.missing_tensors(str(folder), missing, _collapse(modules))


def _missing(meta: Any, covered: set[str], unmapped: Sequence[str]) -> list[str]:
    """Model parameters no checkpoint key provides, after ties, the class's ignore list and unmapped keys."""
    names_of: dict[int, list[str]] = {}
    for name, param in meta.named_parameters(remove_duplicate=False):
        names_of.setdefault(id(param), []).append(name)
    present = set(covered)
    for names in names_of.values():  # parameters shared by several modules are one tensor
        if present.intersection(names):
            present.update(names)
    tied = getattr(meta, "all_tied_weights_keys", None)  # the ties this config asks for, expanded
    if tied is None:  # older transformers: the class's declaration (ties that may be switched off: excused anyway)
        tied = getattr(meta, "_tied_weights_keys", None) or {}
    if isinstance(tied, dict):
        for target, source in tied.items():  # transformers ties either way round
            if target in present or source in present:
                present.update((target, source))
    elif isinstance(tied, (list, tuple, set)):  # the oldest form: names of the tied (output) weights
        present.update(str(t) for t in tied)
    ignore = [re.compile(p) for p in (getattr(meta, "_keys_to_ignore_on_load_missing", None) or ())]
    # A key that maps onto no model tensor may still fill one transformers builds differently (e.g. per-expert
    # linears swapped in for a pre-quantized checkpoint): modules it falls under are not reported.
    touched = {k.rsplit(".", i)[0] for k in unmapped for i in range(1, k.count(".") + 1)}
    out = []
    for names in names_of.values():
        for name in names:
            module = name.rsplit(".", 1)[0] if "." in name else ""
            if name in present or module in touched or any(r.search(name) for r in ignore):
                continue
            out.append(name)
    return sorted(out)


def _collapse(modules: Sequence[str]) -> list[str]:
    """Module paths to suggest for `init_missing`: the shortest ones, each covering the longer paths under it."""
    out: list[str] = []
    for m in sorted(modules, key=lambda s: (s.count("."), s)):
        if not any(m == o or m.startswith(o + ".") for o in out):
            out.append(m)
    return out[:8]
