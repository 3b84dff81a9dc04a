#!/usr/bin/env bash
# The one GPU report: everything fastgpt can only check on a GPU, in sections. On a cold H200:
# tests ~1 minute, bench ~3, stepbench ~2, e2e ~11 (each GPT-2 run compiles for 15-50 s and
# evaluates and saves for ~13 s; a 300-step run takes ~86 s, a 40-step one ~45 s), so a 15-minute
# lease runs them in two or three calls. Training runs are capped at 150 s or more. Each step has its own time cap: a step that hangs or
# runs long costs only its own results.
#
#   bash scripts/gpu_check.sh [SECTION ...]    sections: tests bench stepbench e2e speedrun (default: all)
#
#   tests      the kernel tests compiled for the GPU and tests/test_cuda.py (CUDA-only branches)
#   bench      the kernel benchmarks at GPT-2 124M shapes in bf16 (BENCH_FILES, default the
#              cross-entropy, LayerNorm and AdamW files), merged into bench.json; the kernel
#              targets read off them (scripts/bench_targets.py) into targets.txt
#   stepbench  the train-step benchmark at GPT-2 124M, fastgpt against the reference compiled
#   speedrun   configs/owt_speedrun.py's tokens/s against configs/owt.py's, 16 x 1024 x 4, compiled
#   e2e        GPT-2 124M training end to end, most telling first: at 16 x 1024 x 4 micro-steps
#              (A), 300 steps on real text of the all-torch step and of the fp8 head (speed and
#              loss); the reference trainer (bench/reference_train.py, compiled with fused AdamW,
#              as nanoGPT's train.py) at A and at 64 x 1024 x 1 (B); kernels='auto' and the fp8
#              head at B; `torchrun --nproc_per_node=1 ... --profile`; each op's Triton kernel
#              alone at A (what kernels='auto' is decided by); sampling from a checkpoint. Every
#              run but the torchrun one is the plain one-GPU `python -m fastgpt.train`. Writes
#              e2e.md (the table, scripts/e2e_table.py) and kernel_measurements.json (this GPU's
#              entry for fastgpt/kernel_measurements.json).
#
# Environment: OUT (default gpu_check_out) receives gpu_check.log (everything printed), bench.json,
# targets.txt, e2e.md, kernel_measurements.json. TEXT_DATA: a folder of GPT-2 BPE train.bin and
# val.bin for the 300-step loss runs (e.g. from `python -m fastgpt.prepare text`); without it they
# train on random tokens, whose loss means nothing. NANOGPT_DIR: a checkout of nanoGPT; with it,
# nanoGPT's own train.py runs at A too. Throughput runs train on random GPT-2 token ids made here
# (a GPU box may have no network): their losses mean nothing, their speed is real. Checkpoints
# (1.5 GB each) go to a temporary folder, in memory where /dev/shm allows.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-gpu_check_out}
mkdir -p "$out"
log="$out/gpu_check.log"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1  # a step killed at its cap keeps what it printed
unset TRITON_INTERPRET
py=${PYTHON:-python3}  # GPU images name their torch-carrying interpreter python3
sections=("$@")
[ ${#sections[@]} -eq 0 ] && sections=(tests bench stepbench e2e speedrun)
status=0
step() { printf '\n=== %s (%s)\n' "$*" "$(date +%T)" | tee -a "$log"; }
# run CAP_SECONDS COMMAND...: run it under a cap, log all of it; a failure or timeout sets status.
run() {
  local cap=$1; shift
  timeout -k 10 "$cap" "$@" 2>&1 | tee -a "$log"
  local rc=${PIPESTATUS[0]}
  # 124: stopped at the cap; 137: killed 10 s after it (timeout -k)
  { [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; } && echo "gpu_check: timed out after ${cap}s: $*" | tee -a "$log"
  [ "$rc" -eq 0 ] || status=1
  return "$rc"
}
want() { [[ " ${sections[*]} " == *" $1 "* ]]; }

scratch=$([ -w /dev/shm ] && echo /dev/shm || echo "${TMPDIR:-/tmp}")
tmp=$(mktemp -d "$scratch/gpu_check.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
step "environment: sections ${sections[*]}"
"$py" - <<'PY' 2>&1 | tee -a "$log"
import time, torch, triton
assert torch.cuda.is_available(), "gpu_check needs CUDA"
print(torch.__version__, "triton", triton.__version__, torch.cuda.get_device_name(), torch.cuda.get_device_capability())
a, b = (torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16) for _ in range(2))
for _ in range(3):
    a @ b
torch.cuda.synchronize(); t = time.perf_counter()
for _ in range(20):
    a @ b
torch.cuda.synchronize()
print(f"bf16 8192^3 matmul: {20 * 2 * 8192**3 / (time.perf_counter() - t) / 1e12:.0f} TFLOP/s")
PY
[ "${PIPESTATUS[0]}" -eq 0 ] || { echo "gpu_check: needs CUDA, torch and triton" | tee -a "$log"; exit 1; }
gpu=$("$py" -c "import torch; print(torch.cuda.get_device_name())")
commit=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)

if want tests; then
  step "kernel tests compiled, and the CUDA-only branches"
  parallel=()
  "$py" -c "import xdist" 2>/dev/null && parallel=(-n 8)
  # shellcheck disable=SC2086  # TEST_PATHS: a shorter list where device time is short
  run 150 "$py" -m pytest -q -p no:cacheprovider ${parallel[@]+"${parallel[@]}"} ${TEST_PATHS:-tests/kernels tests/test_cuda.py} \
    --ignore=tests/kernels/test_compile_sm90.py
fi

bench() {  # bench CAP FILE [PYTEST ARGS]: one benchmark file, its JSON kept for the merge
  local cap=$1 file=$2; shift 2
  step "benchmark $file $*"
  run "$cap" "$py" -m pytest -q -p no:cacheprovider "bench/$file" --benchmark-only \
    --benchmark-json="$tmp/$file.json" --benchmark-columns=min,median,mean,rounds "$@"
}
export FASTGPT_BENCH_JSONL="$tmp/bench.jsonl"  # bench/conftest.py: each benchmark as it finishes
export FASTGPT_BENCH_RESULTS="$out/results.jsonl"
declare -A bench_cap=([test_bench_cross_entropy.py]=110 [test_bench_layernorm.py]=60 [test_bench_adamw.py]=45)
if want bench; then
  for file in ${BENCH_FILES:-test_bench_cross_entropy.py test_bench_layernorm.py test_bench_adamw.py}; do
    bench "${bench_cap[$file]:-90}" "$file"  # cross-entropy: three torch.compile baselines
  done
fi
if want stepbench; then
  bench 150 test_bench_train_step.py -k gpt2  # GPT-2 compiled twice: fastgpt and the reference
fi
if want bench || want stepbench; then
  step "kernel targets"
  "$py" scripts/bench_targets.py --merge "$out/bench.json" "$tmp"/*.json "$FASTGPT_BENCH_JSONL" 2>&1 \
    | tee "$out/targets.txt" | tee -a "$log"
fi

if want e2e || want speedrun; then
  step "synthetic GPT-2 token data"
  "$py" - <<'PY' 2>&1 | tee -a "$log"
import pathlib, numpy as np
d = pathlib.Path("data/gpu_check"); d.mkdir(parents=True, exist_ok=True)
rng = np.random.default_rng(0)
for split, n in (("train", 64 * 2**20), ("val", 2**20)):
    rng.integers(0, 50257, n, dtype=np.uint16).tofile(d / f"{split}.bin")
print("wrote", d)
PY
fi
if want speedrun; then
  # configs/owt_speedrun.py against configs/owt.py at one shape, 40 steps each on random tokens
  # (speed only): tokens/s over the logged windows after the first (compile), ratio printed.
  for cfgname in owt owt_speedrun; do
    step "speedrun throughput: configs/$cfgname.py, 16x1024 x4"
    run 240 "$py" -m fastgpt.train configs/$cfgname.py --dataset=gpu_check --batch_size=16 \
      --gradient_accumulation_steps=4 --max_iters=40 --warmup_iters=10 --lr_decay_iters=40 --eval_interval=1000 \
      --eval_iters=2 --log_interval=5 --target_loss=0.0 --out_dir="$tmp/$cfgname"
  done
  step "speedrun throughput ratio"
  "$py" - "$tmp" <<'PY' 2>&1 | tee -a "$log"
import json, statistics, sys, pathlib
rates = {}
for name in ("owt", "owt_speedrun"):
    path = pathlib.Path(sys.argv[1]) / name / "metrics.jsonl"
    rows = [json.loads(l) for l in path.read_text().splitlines()] if path.exists() else []
    tps = [r["tokens_per_s"] for r in rows if r.get("kind") == "train"][1:]
    rates[name] = statistics.median(tps) if tps else None
    print(f"{name}: median {rates[name]} tok/s over {len(tps)} windows")
if all(rates.values()):
    print(f"speedrun/default tokens/s: {rates['owt_speedrun'] / rates['owt']:.3f} (target >= 0.95)")
PY
  rm -rf "${tmp:?}/owt" "${tmp:?}/owt_speedrun"
fi
if want e2e; then
  A=(--batch_size=16 --gradient_accumulation_steps=4)
  B=(--batch_size=64 --gradient_accumulation_steps=1)
  synthetic=(--dataset=gpu_check --max_iters=40 --warmup_iters=10 --lr_decay_iters=40 --eval_interval=40 --eval_iters=2)
  if [ -n "${TEXT_DATA:-}" ]; then
    text=(--data_root="$(dirname "$TEXT_DATA")" --dataset="$(basename "$TEXT_DATA")")
  else
    text=(--dataset=gpu_check)
  fi
  text+=(--max_iters=300 --warmup_iters=30 --lr_decay_iters=300 --eval_interval=300 --eval_iters=20)
  # e2e NAME SHAPE TOKENS_PER_ITER WHAT CAP COMMAND...: one run, bracketed for scripts/e2e_table.py
  e2e() {
    local name=$1 shape=$2 tokens=$3 what=$4 cap=$5; shift 5
    step "e2e $name: $what, $shape"
    echo "=== e2e run $name | $shape | $tokens | $what" >>"$log"
    run "$cap" "$@"
    echo "=== e2e end $name rc=$?" >>"$log"
  }
  fastgpt() {  # fastgpt NAME SHAPE WHAT CAP ARGS...: python -m fastgpt.train on one GPU
    local name=$1 shape=$2 what=$3 cap=$4; shift 4
    e2e "$name" "$shape" 65536 "$what" "$cap" "$py" -m fastgpt.train configs/owt.py --log_interval=5 \
      --out_dir="$tmp/$name" "$@"
    [ "$name" = torch-A ] || rm -rf "${tmp:?}/$name"  # 1.5 GB each; torch-A's is sampled from below
  }
  reference() {  # reference NAME SHAPE BATCH ACCUMULATION
    e2e "$1" "$2" 65536 "reference trainer, compiled, fused AdamW" 150 "$py" -m bench.reference_train \
      --data_dir=data/gpu_check --batch_size="$3" --gradient_accumulation_steps="$4" --max_iters=40 \
      --warmup_iters=10 --log_interval=5 --compile=True --dtype=bfloat16
  }
  sa="16x1024 x4"; sb="64x1024 x1"
  # Real text first: the all-torch step's speed and its loss at 300 steps, then the fp8 head's;
  # then the reference at both shapes; then each op's Triton kernel alone, the rest torch: what
  # kernels='auto' is decided by.
  fastgpt torch-A "$sa" "fastgpt, every op torch (Inductor)" 200 "${A[@]}" "${text[@]}" --kernels=torch
  fastgpt fp8-A "$sa" "fastgpt, torch + fp8 head" 200 "${A[@]}" "${text[@]}" --kernels=torch --head_loss_kernel=fp8
  reference reference-A "$sa" 16 4
  reference reference-B "$sb" 64 1
  fastgpt auto-B "$sb" "fastgpt, kernels=auto" 150 "${B[@]}" "${synthetic[@]}" --kernels=auto
  fastgpt fp8-B "$sb" "fastgpt, auto + fp8 head" 150 "${B[@]}" "${synthetic[@]}" --kernels=auto --head_loss_kernel=fp8
  step "torchrun --nproc_per_node=1 --profile (the NCCL path, the stop vote, the profiler on CUDA)"
  run 150 "$py" -m torch.distributed.run --standalone --nproc_per_node=1 -m fastgpt.train configs/owt.py "${A[@]}" \
    "${synthetic[@]}" --out_dir="$tmp/torchrun" --profile
  fastgpt optimizer-A "$sa" "fastgpt, torch + Triton AdamW" 150 "${A[@]}" "${synthetic[@]}" --kernels=torch --optimizer_kernel=triton
  fastgpt head_loss-A "$sa" "fastgpt, torch + Triton head + loss" 150 "${A[@]}" "${synthetic[@]}" --kernels=torch --head_loss_kernel=triton
  fastgpt layer_norm-A "$sa" "fastgpt, torch + Triton LayerNorm" 150 "${A[@]}" "${synthetic[@]}" --kernels=torch --layer_norm_kernel=triton
  if [ -d "$tmp/torch-A" ]; then
    step "sample from the all-torch run's checkpoint on CUDA"
    run 60 "$py" -m fastgpt.sample --out_dir="$tmp/torch-A" --num_samples=1 --max_new_tokens=64
  fi
  if [ -n "${NANOGPT_DIR:-}" ]; then
    mkdir -p "$NANOGPT_DIR/data" && ln -sfn "$PWD/data/gpu_check" "$NANOGPT_DIR/data/gpu_check"
    # log_interval=1: nanoGPT times each iteration up to the host, so only a sync every step makes its times true.
    e2e nanogpt-A "$sa" 65536 "nanoGPT train.py, compile=True" 150 bash -c "cd '$NANOGPT_DIR' && '$py' train.py \
      config/train_gpt2.py --dataset=gpu_check --batch_size=16 --gradient_accumulation_steps=4 --max_iters=40 \
      --lr_decay_iters=40 --warmup_iters=10 --eval_interval=1000 --eval_iters=2 --log_interval=1 --wandb_log=False \
      --out_dir='$tmp/nano' --compile=True"
  fi
  step "end-to-end table"
  "$py" scripts/e2e_table.py "$log" --markdown "$out/e2e.md" --measurements "$out/kernel_measurements.json" \
    --gpu "$gpu" --commit "$commit" 2>&1 | tee -a "$log"
fi
echo "gpu_check: exit status $status" | tee -a "$log"
exit $status
