#!/usr/bin/env bash
# The GPU-only checks, as one command on a host with one NVIDIA GPU:
#   bash scripts/gpu_checks.sh OUTDIR
# 1. the one-GPU closed loop's runs: every plan of studies/h100-1gpu.yaml trained for real and
#    traced (moeperf compare --run-only); OUTDIR/traces_{1,2}.tgz hold h100-1gpu/<plan>/.
#    Compare them on any host: moeperf compare studies/h100-1gpu.yaml --traces <unpacked>.
# 2. grouped GEMM TFLOP/s, Triton vs the best torch path, bf16 and FP8: benchmarks/kernels_gpu.py
#    -> OUTDIR/kernels_gpu.csv.
# Each stage has its own time limit (a stage cut short keeps what it finished), and OUTDIR ends
# up with at most 7 files.
set -u
out=${1:?usage: bash scripts/gpu_checks.sh OUTDIR}
study=${STUDY:-studies/h100-1gpu.yaml}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
traces=$(mktemp -d)
{ nvidia-smi || true
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
  python3 -c "import torch; print(torch.cuda.get_device_name() if torch.cuda.is_available() else 'no cuda')"
} >"$out/host.txt" 2>&1
timeout "${COMPARE_S:-250}" python3 -m perfmodel.cli compare "$study" --run-only --traces "$traces" \
  --steps 8 --profile-steps 6:6 2>&1 | tee "$out/compare_run.log"
# two archives (the device tool returns files of at most 16 MiB)
runs=($(cd "$traces" && ls -d */*/))
half=$(( (${#runs[@]} + 1) / 2 ))
tar czf "$out/traces_1.tgz" -C "$traces" "${runs[@]:0:$half}"
tar czf "$out/traces_2.tgz" -C "$traces" "${runs[@]:$half}"
timeout "${KERNELS_S:-280}" python3 benchmarks/kernels_gpu.py --out "$out/kernels_gpu.csv" 2>&1 \
  | tee "$out/kernels_gpu.log"
ls -la "$out"
