#!/usr/bin/env bash
# One pass over everything that needs a GPU, in under 8 minutes on an H100 or H200. Each step has
# its own time cap (together 7.5 minutes), so a step that hangs or runs long costs only its own
# results:
#   1. the kernel tests, compiled for the GPU (no interpreter; in parallel when pytest-xdist is
#      installed, since compiling the kernels is most of their time),
#   2. the benchmarks at GPT-2 124M shapes in bf16, one file at a time, merged into bench.json,
#      and the kernel targets read off them (scripts/bench_targets.py),
#   3. GPT-2 124M training for ~1 minute with torch ops and ~1 minute with the Triton kernels,
#      printing tok/s and MFU (against the datasheet peak).
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
  timeout "$cap" "$@" 2>&1 | tee -a "$log"
  local rc=${PIPESTATUS[0]}
  [ "$rc" -eq 124 ] && echo "gpu_check: timed out after ${cap}s: $*" | tee -a "$log"
  [ "$rc" -eq 0 ] || status=1
}

"$py" -c "import torch, triton; assert torch.cuda.is_available(); print(torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())" 2>&1 | tee -a "$log"
[ "${PIPESTATUS[0]}" -eq 0 ] || { echo "gpu_check: needs CUDA, torch and triton" | tee -a "$log"; exit 1; }
run 10 nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv

step "kernel tests, compiled"
parallel=()
"$py" -c "import xdist" 2>/dev/null && parallel=(-n 8)
run 110 "$py" -m pytest -q -p no:cacheprovider ${parallel[@]+"${parallel[@]}"} tests/kernels

bench() {  # bench CAP FILE: one benchmark file, its JSON kept for the merge
  step "benchmark $2"
  run "$1" "$py" -m pytest -q -p no:cacheprovider "bench/$2" --benchmark-only \
    --benchmark-json="$tmp/$2.json" --benchmark-columns=min,median,mean,rounds
}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
bench 60 test_bench_layernorm.py
bench 70 test_bench_cross_entropy.py
bench 30 test_bench_adamw.py
bench 40 test_bench_train_step.py
bench 10 test_bench_data.py
step "kernel targets"
"$py" scripts/bench_targets.py --merge "$out/bench.json" "$tmp"/*.json 2>&1 | tee "$out/targets.txt" | tee -a "$log"

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
  run 70 "$py" -m fastgpt.train configs/owt.py --dataset=gpu_check --kernels=$kernels \
    --batch_size=16 --gradient_accumulation_steps=4 --max_iters=40 --warmup_iters=10 --lr_decay_iters=40 \
    --eval_interval=40 --eval_iters=2 --log_interval=5 --out_dir="$tmp/ckpt-$kernels"
done
echo "gpu_check: exit status $status" | tee -a "$log"
exit $status
