#!/usr/bin/env bash
# The one prepared GPU check of the performance work (a few minutes on one GPU):
#   1. cvarch-bench on the GPU (loader, step overhead and start-up; the full epoch is left to `make bench`),
#   2. ResNet-20 training images/s, fp32 eager against bf16-mixed + channels_last + torch.compile,
#   3. the CIFAR-10 speed run (experiment=speedrun94) end to end, fp32 and bf16-mixed + channels_last (+ compile):
#      training seconds (first step to last) against airbench94's 3.83 s on an A100 (Jordan 2024), and accuracy.
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

# 3. the speed run, whole jobs: training seconds from the StepTimer, test accuracy from the run's metrics
speedrun() {  # name, extra overrides...
  local name=$1; shift
  "$BIN/python" -m cvarch.train experiment=speedrun94 logger=csv "paths.log_dir=$OUT/work/speedrun_$name" \
    +callbacks.bench_timer._target_=cvarch.bench.StepTimer "+callbacks.bench_timer.path=$OUT/speedrun_$name.json" \
    "$@" | tail -1 > "$OUT/speedrun_$name.dir"
}
speedrun fp32
speedrun bf16 trainer.precision=bf16-mixed model.channels_last=true
speedrun bf16_compile trainer.precision=bf16-mixed model.channels_last=true model.compile=true
"$BIN/python" - "$OUT" <<'EOF'
import csv, json, sys
from pathlib import Path
out = Path(sys.argv[1])
for name in ("fp32", "bf16", "bf16_compile"):
    times = json.loads((out / f"speedrun_{name}.json").read_text())
    seconds = times["epochs"][-1][-1] - times["batches"][0]
    run = Path((out / f"speedrun_{name}.dir").read_text().strip())
    rows = [r for f in run.glob("csv/**/metrics.csv") for r in csv.DictReader(open(f)) if r.get("test/acc_tta")]
    acc = float(rows[-1]["test/acc_tta"]) if rows else float("nan")
    print(f"speedrun94 {name}: training {seconds:.2f} s (airbench94 on an A100: 3.83 s; "
          f"ratio {seconds / 3.83:.2f}), test/acc_tta {acc:.4f}")
EOF
