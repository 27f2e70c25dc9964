#!/usr/bin/env bash
# Set up gfa-peft on a fresh machine: a CPU build of torch 2.13.0 when no torch is installed
# (an unpinned `torch` would pull a multi-GB CUDA build), then the package with its extras.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! python -c "import torch" >/dev/null 2>&1; then
    python -m pip install --quiet "torch==2.13.0"
fi
python -m pip install --quiet -e ".[dev,experiments]"
