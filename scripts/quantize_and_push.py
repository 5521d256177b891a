#!/usr/bin/env python
"""Quantize a 16-bit vision-language model to bitsandbytes 4-bit, verify it, and publish it in one commit.

    python scripts/quantize_and_push.py SOURCE REPO_ID [--quant-type nf4|fp4] [--no-double-quant]
        [--keep MODULE_PATTERN ...] [--compute-dtype bfloat16] [--local-dir DIR] [--dry-run] [--force]

The same command as `hf-fastvision quantize` (see `hf_fastvision.quantize`). The token comes from HF_TOKEN or
`hf auth login`; HF_ENDPOINT picks the server.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__":
    try:
        from hf_fastvision.quantize import quantize_command
    except ImportError:  # run from a checkout without installing
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        from hf_fastvision.quantize import quantize_command

    sys.exit(quantize_command(sys.argv[1:]))
