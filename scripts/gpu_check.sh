#!/usr/bin/env bash
# One pass over everything that needs a GPU, in under 8 minutes on an H100 or H200. Each step has
# its own time cap (together 7.9 minutes), so a step that hangs or runs long costs only its own
# results:
#   1. the kernel tests, compiled for the GPU (no interpreter; in parallel when pytest-xdist is
#      installed, since compiling the kernels is most of their time; the offline sm_90 compile
#      check is left to CPU machines),
#   2. the kernel benchmarks at GPT-2 124M shapes in bf16 and the train-step benchmark (the small
#      default model; the data benchmark is left out, it measures no kernel), one file at a time, merged into bench.json, and the kernel targets read off
#      them (scripts/bench_targets.py); each benchmark is kept as it finishes, so a file stopped
#      at its cap loses only the ones still running,
#   3. GPT-2 124M training for ~1.5 minutes with torch ops and ~1.5 with the Triton kernels (most
#      of it torch.compile), printing tok/s and MFU (against the datasheet peak); the median of
#      the log lines from iteration 10 on, past the compile, goes into targets.txt.
# Usage: bash scripts/gpu_check.sh [OUT_DIR]
# OUT_DIR receives three files: gpu_check.log (everything printed), bench.json, targets.txt.
# Checkpoints (1.5 GB each) go to a temporary folder. The training data are random GPT-2 token
# ids made here (a GPU box may have no network): the losses mean nothing, the throughput is real.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:-gpu_check_out}}
mkdir -p "$out"
log="$out/gpu_check.log"
: >"$log"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1  # a step killed at its cap keeps what it printed
unset TRITON_INTERPRET
py=${PYTHON:-python3}  # GPU images name their torch-carrying interpreter python3
status=0
step() { printf '\n=== %s (%s)\n' "$*" "$(date +%T)" | tee -a "$log"; }
# run CAP_SECONDS COMMAND...: run it under a cap, log all of it; a failure or timeout sets status.
run() {
  local cap=$1; shift
  : >"$tmp/last.txt"
  timeout -k 10 "$cap" "$@" 2>&1 | tee -a "$log" "$tmp/last.txt"
  local rc=${PIPESTATUS[0]}
  # 124: stopped at the cap; 137: killed 10 s after it (timeout -k)
  { [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; } && echo "gpu_check: timed out after ${cap}s: $*" | tee -a "$log"
  [ "$rc" -eq 0 ] || status=1
}

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
"$py" -c "import torch, triton; assert torch.cuda.is_available(); print(torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())" 2>&1 | tee -a "$log"
[ "${PIPESTATUS[0]}" -eq 0 ] || { echo "gpu_check: needs CUDA, torch and triton" | tee -a "$log"; exit 1; }
run 10 nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv

step "kernel tests, compiled"
parallel=()
"$py" -c "import xdist" 2>/dev/null && parallel=(-n 8)
run 70 "$py" -m pytest -q -p no:cacheprovider ${parallel[@]+"${parallel[@]}"} tests/kernels \
  --ignore=tests/kernels/test_compile_sm90.py

bench() {  # bench CAP FILE: one benchmark file, its JSON kept for the merge
  step "benchmark $2"
  run "$1" "$py" -m pytest -q -p no:cacheprovider "bench/$2" --benchmark-only \
    --benchmark-json="$tmp/$2.json" --benchmark-columns=min,median,mean,rounds
}
export FASTGPT_BENCH_JSONL="$tmp/bench.jsonl"  # bench/conftest.py: each benchmark as it finishes
bench 60 test_bench_layernorm.py
bench 80 test_bench_cross_entropy.py  # two torch.compile baselines (head + loss, loss alone)
bench 45 test_bench_adamw.py
bench 45 test_bench_train_step.py
step "kernel targets"
"$py" scripts/bench_targets.py --merge "$out/bench.json" "$tmp"/*.json "$FASTGPT_BENCH_JSONL" 2>&1 \
  | tee "$out/targets.txt" | tee -a "$log"

step "synthetic GPT-2 token data"
"$py" - <<'PY' 2>&1 | tee -a "$log"
import pathlib, numpy as np
d = pathlib.Path("data/gpu_check"); d.mkdir(parents=True, exist_ok=True)
rng = np.random.default_rng(0)
for split, n in (("train", 64 * 2**20), ("val", 2**20)):
    rng.integers(0, 50257, n, dtype=np.uint16).tofile(d / f"{split}.bin")
print("wrote", d)
PY

for kernels in torch triton; do
  step "GPT-2 124M training, kernels=$kernels"
  run 82 "$py" -m fastgpt.train configs/owt.py --dataset=gpu_check --kernels=$kernels \
    --batch_size=16 --gradient_accumulation_steps=4 --max_iters=40 --warmup_iters=10 --lr_decay_iters=40 \
    --eval_interval=40 --eval_iters=2 --log_interval=5 --out_dir="$tmp/ckpt-$kernels"
  # The first log windows hold the compile: the median from iteration 10 on is the steady rate.
  "$py" - "$kernels" "$tmp/last.txt" <<'PY' 2>&1 | tee -a "$out/targets.txt" "$log"
import re, statistics, sys
kernels, path = sys.argv[1:]
lines = [m for m in re.finditer(r"^iter (\d+):.* ([\d,]+) tok/s(?:, mfu ([\d.]+)%)?", open(path).read(), re.M)
         if int(m[1]) >= 10]
what = f"GPT-2 124M training, kernels={kernels}"
if lines:
    tok = statistics.median(float(m[2].replace(",", "")) for m in lines)
    mfus = [float(m[3]) for m in lines if m[3]]
    mfu = f"mfu {statistics.median(mfus):.1f}%" if mfus else "no MFU (GPU peak unknown)"
    print(f"{what}: median of {len(lines)} log windows from iteration 10: {tok:,.0f} tok/s, {mfu}")
else:
    print(f"{what}: no log line from iteration 10 on (see gpu_check.log)")
PY
done
echo "gpu_check: exit status $status" | tee -a "$log"
exit $status
