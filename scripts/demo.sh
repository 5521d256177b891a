#!/usr/bin/env bash
# One command: install the CPU torch pair and this package, then run the main job (hf-fastvision demo).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q torch==2.14.1 torchvision==0.29.1
python3 -m pip install -q -e .
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false TRANSFORMERS_VERBOSITY=error
exec hf-fastvision demo "$@"
