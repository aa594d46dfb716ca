#!/usr/bin/env bash
# The GPU-only checks, as one command on a host with one NVIDIA GPU (8 minutes at most in all):
#   bash scripts/gpu_checks.sh OUTDIR
# 1. (RUNTIME_S, 200 s) the runtime on one GPU against a peer stack: benchmarks/runtime_gpu.py trains
#    moe-1b and a Mixtral-shaped 4-layer model in bf16 and FP8 (tensorwise, blockwise) at micro-batch
#    1-8 -> tokens/s, MFU, host us per op of a profiled step, CUDA syncs inside a step, and
#    `vs_torchtitan R` (last line) -> OUTDIR/runtime_gpu.{csv,json,log}.
# 2. (COMPARE_S, 150 s) the one-GPU closed loop's runs, re-recorded: every plan of
#    studies/h100-1gpu.yaml trained for real and traced (moeperf compare --run-only);
#    OUTDIR/traces_{1,2}.tgz hold h100-1gpu/<plan>/. Compare them on any host:
#    moeperf compare studies/h100-1gpu.yaml --traces <unpacked>  (and re-calibrate from them).
# 3. (KERNELS_S, 110 s) grouped GEMM TFLOP/s, Triton vs the best torch path, bf16 and FP8:
#    benchmarks/kernels_gpu.py at 4,096 tokens per rank -> OUTDIR/kernels_gpu.{csv,log}.
# Each stage has its own time limit (a stage cut short keeps what it finished: runtime_gpu.py saves
# after every model, kernels_gpu.py after every shape), and OUTDIR ends up with at most 10 files.
#
# The peer of stage 1 is torchtitan; the GPU host has no network, so its wheel travels with the
# working tree. On a host with the registry, once (.wheels/ is git-ignored: .gitignore and
# .git/info/exclude; never commit wheels):
#   pip download --no-deps -d .wheels torchtitan==0.3.0 spmd_types==0.2.3 tyro==1.0.17 \
#       docstring_parser==0.18.0 typeguard==4.6.1
#   (torchtitan-0.3.0-py3-none-any.whl, 1.3 MB, plus what importing its MoE layer needs; 1.7 MB in all)
# and name .wheels in the device run's carry. They are installed here with --no-deps into a scratch
# folder on PYTHONPATH: the host's torch and everything else stay as they are. Without them, or if
# torchtitan does not run on the host's torch, runtime_gpu.py says why and falls back (megatron-core,
# else its plain-PyTorch reference model) and names the peer it used on the line before the ratio.
set -u
out=${1:?usage: bash scripts/gpu_checks.sh OUTDIR}
study=${STUDY:-studies/h100-1gpu.yaml}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
traces=$(mktemp -d)
{ nvidia-smi || true
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
  python3 -c "import torch; print(torch.cuda.get_device_name() if torch.cuda.is_available() else 'no cuda')"
  if ls .wheels/*.whl >/dev/null 2>&1; then
    peer=$(mktemp -d)
    python3 -m pip install --no-deps --no-index --target "$peer" -q .wheels/*.whl && echo "peer wheels: $(ls .wheels)"
  else
    echo "no .wheels/: runtime_gpu.py will say why torchtitan is not used"
  fi
} >"$out/host.txt" 2>&1
# (the braces above run in this shell: $peer is set here when the wheels were installed)
[ -d "${peer:-}/torchtitan" ] && export PYTHONPATH="$PYTHONPATH:$peer"
rt=${RUNTIME_S:-200}
timeout "$rt" python3 benchmarks/runtime_gpu.py --out "$out" --budget-s $((rt - 45)) 2>&1 | tee "$out/runtime_gpu.log"
timeout "${COMPARE_S:-150}" python3 -m perfmodel.cli compare "$study" --run-only --traces "$traces" \
  --steps 8 --profile-steps 6:6 2>&1 | tee "$out/compare_run.log"
# two archives (the device tool returns files of at most 16 MiB)
runs=($(cd "$traces" && ls -d */*/))
half=$(( (${#runs[@]} + 1) / 2 ))
tar czf "$out/traces_1.tgz" -C "$traces" "${runs[@]:0:$half}"
tar czf "$out/traces_2.tgz" -C "$traces" "${runs[@]:$half}"
timeout "${KERNELS_S:-110}" python3 benchmarks/kernels_gpu.py --tokens 4096 --out "$out/kernels_gpu.csv" 2>&1 \
  | tee "$out/kernels_gpu.log"
ls -la "$out"
