"""Model cards for published 4-bit repos, rendered from the Jinja templates in `model_cards/`."""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hf_fastvision.checkpoint_info import CheckpointInfo
from hf_fastvision.checkpoint_info import human_bytes as _human

__all__ = ["render_card", "card_context"]


def _front_matter(path: Path) -> dict[str, Any]:
    """YAML metadata of a README.md (empty when absent or unreadable)."""
    import yaml

    try:
        text = path.read_text(encoding="utf-8")
    except OSError:
        return {}
    m = re.match(r"^\ufeff?---\s*\n(.*?)\n---\s*(\n|$)", text, flags=re.S)
    if not m:
        return {}
    try:
        meta = yaml.safe_load(m.group(1))
    except yaml.YAMLError:
        return {}
    return meta if isinstance(meta, dict) else {}


# --------------------------------------------------------------------------------------------------- inspection


def _template_candidates() -> list[Path]:
    here = Path(__file__).resolve().parent
    return [here / "assets" / "model_cards" / "quantized.md.j2", here.parent / "model_cards" / "quantized.md.j2"]


def render_card(context: dict[str, Any], template: str | os.PathLike[str] | None = None) -> str:
    """Render the quantized-model card (`model_cards/quantized.md.j2`, or `template`) with `context`."""
    import jinja2

    path = Path(template) if template is not None else next((p for p in _template_candidates() if p.is_file()), None)
    if path is None or not path.is_file():
        raise FileNotFoundError(f"model card template not found (looked in {[str(p) for p in _template_candidates()]})")
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(path.parent)),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        autoescape=False,
    )
    env.filters["yaml"] = lambda v: json.dumps(v, ensure_ascii=False)
    env.filters["human_bytes"] = _human
    return env.get_template(path.name).render(**context)


def card_context(
    info: CheckpointInfo,
    *,
    repo_id: str,
    base_model: str | None,
    size_16bit: int | None = None,
    logit_error: dict[str, Any] | None = None,
    source_card: dict[str, Any] | None = None,
    kept_linear: int | None = None,
    tags: Sequence[str] = (),
) -> dict[str, Any]:
    """The variables `render_card` fills in, from a written 4-bit folder and what is known of its source."""
    from hf_fastvision import __version__

    source_card = source_card or {}
    all_tags = ["bitsandbytes", "4-bit", "hf_fastvision", info.model_type or "vision-language", *tags]
    license_keys = ("license", "license_name", "license_link")
    license_meta = {k: source_card[k] for k in license_keys if isinstance(source_card.get(k), str)}
    return {
        "repo_id": repo_id,
        "base_model": base_model,
        "model_type": info.model_type,
        "architectures": list(info.architectures),
        "license": license_meta,
        "tags": list(dict.fromkeys(all_tags)),
        "quant_type": info.quant_type,
        "double_quant": info.double_quant,
        "compute_dtype": info.compute_dtype or "float32",
        "kept_modules": list(info.kept_modules),
        "quantized_tensors": info.quantized_tensors,
        "kept_linear": kept_linear,
        "size_16bit": size_16bit,
        "size_4bit": info.weight_bytes,
        "ratio": (info.weight_bytes / size_16bit) if size_16bit else None,
        "logit_error": logit_error,
        "version": __version__,
    }


def _source_card(name: str | None, revision: str | None, local: bool, token: str | None) -> dict[str, Any]:
    """Front matter of the source model's README (for its license), from disk or the Hub; {} if unavailable."""
    if not name:
        return {}
    if local or Path(name).is_dir():
        return _front_matter(Path(name) / "README.md")
    with contextlib.suppress(Exception):
        from huggingface_hub import hf_hub_download

        path = hf_hub_download(
            name, "README.md", revision=revision, token=token, endpoint=_hub()._endpoint(), local_files_only=_hub()._offline()
        )
        return _front_matter(Path(path))
    return {}


def _size_16bit(model: Any) -> int:
    """Bytes of the model's weights in 16-bit (4-bit weights counted at their original shape)."""
    total = 0
    for p in model.parameters():
        state = getattr(p, "quant_state", None)
        total += 2 * (math.prod(state.shape) if state is not None else p.numel())
    return total


# --------------------------------------------------------------------------------------------------- push


def _hub() -> Any:
    import hf_fastvision.hub as hub  # environment helpers live with the hub calls

    return hub
