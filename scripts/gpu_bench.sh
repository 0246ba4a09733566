#!/usr/bin/env bash
# The one prepared GPU check of the performance work (a few minutes on one GPU):
#   1. cvarch-bench on the GPU (loader, step overhead and start-up; the full epoch is left to `make bench`),
#   2. ResNet-20 training images/s, fp32 eager against bf16-mixed + channels_last + torch.compile.
# Usage: CVARCH_DATA_DIR=/path/with/cifar10 bash scripts/gpu_bench.sh [out_dir]
# It uses .venv if present (make install), else the python3 on PATH; results go to out_dir (default bench-gpu/),
# with the card's name in every JSON ("machine.gpu").
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-${OUT:-bench-gpu}}
mkdir -p "$OUT"
BIN=.venv/bin
[ -x "$BIN/python" ] || BIN=$(dirname "$(command -v python3)")
"$BIN/python" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name(0))"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.csv" || true
BENCH=("$BIN/python" -m cvarch.bench device=cuda "workdir=$OUT/work" repeats=3 steps=100 warmup=20)

# 1. the benchmark on the GPU, fp32 eager
"${BENCH[@]}" "only=[loader,step,startup]" "out=$OUT/bench_gpu_fp32.json" | tee "$OUT/bench_gpu_fp32.md"
# 2. the fast path: bf16 autocast, NHWC, compiled (the raw loop it is compared with stays fp32 eager)
"${BENCH[@]}" "only=[step]" "out=$OUT/bench_gpu_fast.json" \
  'train_overrides=["trainer.precision=bf16-mixed","model.channels_last=true","model.compile=true"]' | tee "$OUT/bench_gpu_fast.md"

"$BIN/python" - "$OUT" <<'EOF'
import json, statistics, sys
out = sys.argv[1]
fp32, fast = (json.load(open(f"{out}/bench_gpu_{k}.json")) for k in ("fp32", "fast"))
a, b = (statistics.median(r["step"]["cvarch"]) for r in (fp32, fast))
print(f"{fp32['machine']['gpu']}: resnet20 batch 128 training images/s: fp32 {a:,.0f}, "
      f"bf16+channels_last+compile {b:,.0f} ({b / a:.2f}x)")
EOF
