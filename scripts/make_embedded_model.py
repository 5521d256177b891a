"""Regenerate the embedded demo model `hf_fastvision/assets/tiny_vlm` (reproducible: fixed seed, no downloads).

A tiny Qwen2.5-VL (hidden 64, 2 text and 2 vision layers) with its processor, built offline by
`hf_fastvision.archs.tiny`, images bounded to 56×56 pixels (4 image tokens). Weights are random: the demo
shows LoRA teaching it a visual task from scratch. Usage: `python scripts/make_embedded_model.py [--out DIR]`.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "hf_fastvision" / "assets" / "tiny_vlm"
SIDE = 56


def build(out: Path, seed: int = 1234) -> Path:
    from hf_fastvision.archs.tiny import tiny_model_and_processor

    import torch

    model, processor = tiny_model_and_processor("qwen2_5_vl", seed=seed)
    # A 64-wide model initialised at std 0.02 cannot express a confident prediction (logits stay within ±1.5
    # after the final norm); a wider output head lets LoRA steer the hidden state to a clear answer.
    with torch.no_grad():
        generator = torch.Generator().manual_seed(seed)
        model.lm_head.weight.copy_(torch.randn(model.lm_head.weight.shape, generator=generator) * 0.5)
    processor.image_processor.size = {"shortest_edge": SIDE * SIDE, "longest_edge": SIDE * SIDE}
    tmp = Path(tempfile.mkdtemp(prefix=".tiny_vlm-", dir=out.parent))
    try:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)  # atomic: never a half-written folder
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--seed", type=int, default=1234)
    args = parser.parse_args()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    path = build(args.out, args.seed)
    size = sum(f.stat().st_size for f in path.iterdir())
    print(f"wrote {path} ({size / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
