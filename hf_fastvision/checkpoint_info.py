"""What a saved bitsandbytes 4-bit checkpoint holds: config, tensors, quant states and size (no weights loaded)."""

from __future__ import annotations

import json
import re
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hf_fastvision.errors import NotA4bitCheckpointError

__all__ = ["CheckpointInfo", "inspect_checkpoint", "is_4bit_model", "human_bytes"]

_QUANT_STATE_RE = re.compile(r"^(?P<weight>.+)\.quant_state\.bitsandbytes__(?P<type>nf4|fp4)$")


def human_bytes(n: int | float | None) -> str:
    if n is None:
        return "unknown"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return str(n)


@dataclass(frozen=True)
class CheckpointInfo:
    """What `inspect_checkpoint` found in a bitsandbytes 4-bit folder."""

    path: str
    model_type: str | None
    architectures: tuple[str, ...]
    quant_type: str
    double_quant: bool
    compute_dtype: str | None
    skip_modules: tuple[str, ...]
    quantized_tensors: int
    weight_bytes: int
    size_bytes: int
    files: tuple[str, ...]

    @property
    def kept_modules(self) -> tuple[str, ...]:
        """The skip entries as plain module names (our entries are escaped regexes with a boundary lookahead)."""
        return tuple(_plain_module(s) for s in self.skip_modules)

    def summary(self) -> str:
        dq = " + double quant" if self.double_quant else ""
        return (
            f"{self.model_type} bitsandbytes 4-bit ({self.quant_type}{dq}), {self.quantized_tensors} quantized "
            f"tensors, {len(self.files)} files, {human_bytes(self.size_bytes)}"
        )


def _plain_module(entry: str) -> str:
    return entry.replace(r"(?=\.|$)", "").replace("\\", "")


def _safetensors_keys(path: Path) -> set[str]:
    with open(path, "rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(n))
    return {k for k in header if k != "__metadata__"}


def _quantization_config(config: dict[str, Any]) -> dict[str, Any] | None:
    qc = config.get("quantization_config")
    return qc if isinstance(qc, dict) else None


def inspect_checkpoint(folder: str | os.PathLike[str]) -> CheckpointInfo:
    """Check that `folder` is a bitsandbytes 4-bit checkpoint; raise `NotA4bitCheckpointError` naming what is wrong.

    Checked: config.json has a `quantization_config` with `quant_method: bitsandbytes` and `load_in_4bit`; the
    safetensors files are complete; the tensors carry the 4-bit quant state (`<weight>.quant_state.bitsandbytes__
    nf4|fp4`, `.absmax`, `.quant_map`) of the quant type the config names.
    """
    from hf_fastvision.loading import verify_safetensors

    root = Path(folder)
    cfg_path = root / "config.json"
    if not cfg_path.is_file():
        raise NotA4bitCheckpointError(f"{root} has no config.json, so it is not a saved model.")
    config = json.loads(cfg_path.read_text(encoding="utf-8"))
    qc = _quantization_config(config)
    method = (qc or {}).get("quant_method")
    if qc is None or str(method).lower() != "bitsandbytes":
        raise NotA4bitCheckpointError(
            f"{root} is not a bitsandbytes checkpoint: config.json has "
            + ("no quantization_config" if qc is None else f"quant_method {method!r}")
            + ". Quantize it first (`hf-fastvision quantize SOURCE REPO_ID`)."
        )
    if not (qc.get("load_in_4bit") or qc.get("_load_in_4bit")):
        bits = "8-bit" if qc.get("load_in_8bit") or qc.get("_load_in_8bit") else "not 4-bit"
        raise NotA4bitCheckpointError(f"{root} is a bitsandbytes {bits} checkpoint, not a 4-bit one.")
    shards = sorted(root.glob("*.safetensors"))
    if not shards:
        raise NotA4bitCheckpointError(f"{root} has no *.safetensors weights (only safetensors checkpoints are supported).")
    verify_safetensors(root)
    keys: set[str] = set()
    for shard in shards:
        keys |= _safetensors_keys(shard)
    states = {m.group("weight"): m.group("type") for k in keys if (m := _QUANT_STATE_RE.match(k))}
    if not states:
        raise NotA4bitCheckpointError(
            f"{root}: config.json says 4-bit, but no tensor carries a bitsandbytes 4-bit quant state "
            "('<weight>.quant_state.bitsandbytes__nf4'); the weights were saved unquantized."
        )
    incomplete = sorted(w for w in states if not {w, f"{w}.absmax", f"{w}.quant_map"} <= keys)
    if incomplete:
        raise NotA4bitCheckpointError(f"{root}: incomplete 4-bit quant state for {', '.join(incomplete[:3])}.")
    declared = qc.get("bnb_4bit_quant_type", "fp4")
    found = set(states.values())
    if found != {declared}:
        raise NotA4bitCheckpointError(f"{root}: config.json says {declared}, the tensors are {', '.join(sorted(found))}.")
    files = tuple(sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file() and ".git" not in p.parts))
    compute = qc.get("bnb_4bit_compute_dtype")
    return CheckpointInfo(
        path=str(root),
        model_type=config.get("model_type"),
        architectures=tuple(config.get("architectures") or ()),
        quant_type=declared,
        double_quant=any(k.endswith(".nested_absmax") for k in keys),
        compute_dtype=str(compute).removeprefix("torch.") if compute else None,
        skip_modules=tuple(qc.get("llm_int8_skip_modules") or ()),
        quantized_tensors=len(states),
        weight_bytes=sum(p.stat().st_size for p in shards),
        size_bytes=sum((root / f).stat().st_size for f in files),
        files=files,
    )


def is_4bit_model(model: Any) -> bool:
    """True for a model loaded (or quantized on load) with bitsandbytes 4-bit weights."""
    config = getattr(model, "config", None)
    qc = getattr(config, "quantization_config", None)
    if qc is None:
        return False
    qd = qc if isinstance(qc, dict) else (qc.to_dict() if hasattr(qc, "to_dict") else vars(qc))
    method = qd.get("quant_method")
    if str(getattr(method, "value", method)).lower() != "bitsandbytes":
        return False
    if not (qd.get("load_in_4bit") or qd.get("_load_in_4bit")):
        return False
    return any(type(m).__name__ == "Linear4bit" for m in model.modules())
