#!/usr/bin/env bash
# Install moeperf into the active Python environment (a venv is recommended).
# torch is pinned FIRST so that nothing later pulls a multi-GB CUDA build of torch.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q --upgrade pip
python -m pip install -q "torch==2.13.0" || python -m pip install -q "torch>=2.11,<2.15"
python -m pip install -q -e ".[runtime,test,distributed]"
