#!/usr/bin/env bash
# The GPU half of the kernel work, in as few device calls as possible (each ≤ 10 minutes).
#
#   bash bench/gpu_session.sh tests     # every `-m gpu` test (kernels at full shapes, CUDA graphs, compile, model-level)
#   bash bench/gpu_session.sh bench7    # bench/kernels_bench.py, Qwen2.5-7B shapes
#   bash bench/gpu_session.sh bench14   # bench/kernels_bench.py, Qwen2.5-14B shapes
#   bash bench/gpu_session.sh all       # the three in one call (needs ~10 min: use on a warm cache)
#
# Runs on the lent machine's own python3 (its torch / triton; nothing can be downloaded there):
# the package goes in with --no-deps; when that is refused, the two source folders go on PYTHONPATH
# (`rain_adapter` from the repo root, `rain_kernels` from `kernels/`). Logs and tables go to $OUT
# (the device tool returns that folder) or ./gpu_out.
set -uo pipefail
what=${1:-all}
OUT=${OUT:-$PWD/gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TRITON_DEFAULT_FP_FUSION=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
PY=${PYTHON:-python3}

{ nvidia-smi; $PY -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda,
  'triton', triton.__version__, torch.cuda.get_device_name())"; } > "$OUT/device.txt" 2>&1
cat "$OUT/device.txt" | tail -1

if ! $PY -c "import rain_adapter, rain_kernels" 2>/dev/null; then
  if ! $PY -m pip install --no-deps --no-build-isolation -e . > "$OUT/install.log" 2>&1; then
    echo "pip install refused (see install.log): importing from the source folders"
    export PYTHONPATH=$PWD:$PWD/kernels${PYTHONPATH:+:$PYTHONPATH}
  fi
fi

rc=0
if [[ $what == tests || $what == all ]]; then
  $PY -m pytest -q -m gpu tests/ -p no:cacheprovider 2>&1 | tee "$OUT/gpu_tests.log"
  rc=$(( rc | ${PIPESTATUS[0]} ))
fi
for m in 7 14; do
  if [[ $what == bench$m || $what == all ]]; then
    # graph replays (GPU time, the targets) for every shape; launched from Python for a subset
    $PY bench/kernels_bench.py --models ${m}b --graphs 2>&1 | tee "$OUT/bench_kernels_${m}b_graphs.md"
    rc=$(( rc | ${PIPESTATUS[0]} ))
    $PY bench/kernels_bench.py --models ${m}b --roles q,down --m 1,16,4096 2>&1 | tee "$OUT/bench_kernels_${m}b_eager.md"
    rc=$(( rc | ${PIPESTATUS[0]} ))
  fi
done
exit $rc
