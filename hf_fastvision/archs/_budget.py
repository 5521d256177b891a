"""Image-resolution levers shared by several families: `max_image_size` (longest side, pixels) → processor."""

from __future__ import annotations

import math
from typing import Any


def _image_processor(processor: Any) -> Any:
    return getattr(processor, "image_processor", processor)


def _set_size_key(ip: Any, key: str, value: int) -> None:
    size = dict(getattr(ip, "size", None) or {})
    size[key] = value
    ip.size = size


def longest_edge(processor: Any, max_image_size: int) -> dict[str, Any]:
    """Processors that resize so the longest side is at most `size['longest_edge']` (Pixtral, Idefics2/3)."""
    ip = _image_processor(processor)
    _set_size_key(ip, "longest_edge", int(max_image_size))
    return {"size.longest_edge": int(max_image_size)}


def idefics_longest_edge(processor: Any, max_image_size: int) -> dict[str, Any]:
    """Idefics3 / SmolVLM: the whole image is resized to `size`; sub-images are `max_image_size` squares."""
    ip = _image_processor(processor)
    tile = int((getattr(ip, "max_image_size", None) or {}).get("longest_edge", max_image_size))
    edge = max(tile, (int(max_image_size) // tile) * tile)  # a multiple of the tile, at least one tile
    _set_size_key(ip, "longest_edge", edge)
    return {"size.longest_edge": edge}


def total_pixels(processor: Any, max_image_size: int) -> dict[str, Any]:
    """Qwen-VL: dynamic resolution bounded by a pixel count (`max_pixels`, stored as size['longest_edge'])."""
    ip = _image_processor(processor)
    max_pixels = int(max_image_size) ** 2
    size = dict(getattr(ip, "size", None) or {})
    min_pixels = min(int(size.get("shortest_edge", 0) or 0), max_pixels)
    size.update(longest_edge=max_pixels, shortest_edge=min_pixels)
    ip.size = size
    for attr, value in (("max_pixels", max_pixels), ("min_pixels", min_pixels)):
        if hasattr(ip, attr):
            setattr(ip, attr, value)
    return {"max_pixels": max_pixels}


def tiles(processor: Any, max_image_size: int) -> dict[str, Any]:
    """Mllama: images are cut into fixed tiles; bound the tile count."""
    ip = _image_processor(processor)
    tile = int((getattr(ip, "size", None) or {}).get("height", max_image_size))
    n = max(1, math.ceil(int(max_image_size) / tile) ** 2)
    n = min(n, int(getattr(ip, "max_image_tiles", n) or n))
    ip.max_image_tiles = n
    return {"max_image_tiles": n}


def generic(processor: Any, max_image_size: int) -> dict[str, Any]:
    """Any other family: bound `size['longest_edge']` where the image processor has that knob, else do nothing."""
    ip = _image_processor(processor)
    size = getattr(ip, "size", None)
    if isinstance(size, dict) and "longest_edge" in size:
        return longest_edge(processor, max_image_size)
    return {}
