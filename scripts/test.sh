#!/usr/bin/env bash
# The test suite: fast unit tests, CPU multi-rank tests (gloo, with timeouts), Triton kernels
# under the interpreter (TRITON_INTERPRET=1, fp32).
set -uo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1 MPLBACKEND=Agg
python -m pytest -q --timeout=600 "$@"
