#!/usr/bin/env bash
# One pass over everything that needs a GPU, in under 8 minutes on an H100 (each step has its own
# time cap; the caps add up to 8 minutes):
#   1. the kernel tests, compiled for the GPU (no interpreter),
#   2. the kernel and train-step benchmarks at GPT-2 124M shapes in bf16, and the kernel targets
#      read off them (scripts/bench_targets.py),
#   3. GPT-2 124M training for ~1 minute with torch ops and ~1 minute with the Triton kernels,
#      printing tok/s and MFU (against the datasheet peak).
# Usage: bash scripts/gpu_check.sh [OUT_DIR]
# OUT_DIR receives six small files: gpu.txt, kernel_tests.log, bench.json, bench.log,
# targets.txt, train_{torch,triton}.log. Checkpoints (1.5 GB each) go to a temporary folder.
# The training data are random GPT-2 token ids made here (a GPU box may have no network):
# the losses mean nothing, the throughput is real.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:-gpu_check_out}}
mkdir -p "$out"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
unset TRITON_INTERPRET
status=0
step() { echo; echo "=== $* ($(date +%T))"; }

python -c "import torch, triton; assert torch.cuda.is_available(); print(torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())" \
  || { echo "gpu_check: needs CUDA, torch and triton"; exit 1; }
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv | tee "$out/gpu.txt"

step "kernel tests, compiled"
timeout 140 python -m pytest -q -p no:cacheprovider tests/kernels 2>&1 | tee "$out/kernel_tests.log" | tail -20
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

step "benchmarks (bf16, GPT-2 124M shapes)"
timeout 160 python -m pytest -q -p no:cacheprovider bench/ --benchmark-only \
  --benchmark-json="$out/bench.json" --benchmark-columns=min,median,mean,rounds 2>&1 \
  | tee "$out/bench.log" | grep -v "^$" | tail -60
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
python scripts/bench_targets.py "$out/bench.json" | tee "$out/targets.txt"

step "synthetic GPT-2 token data"
python - <<'PY'
import pathlib, numpy as np
d = pathlib.Path("data/gpu_check"); d.mkdir(parents=True, exist_ok=True)
rng = np.random.default_rng(0)
for split, n in (("train", 64 * 2**20), ("val", 2**20)):
    rng.integers(0, 50257, n, dtype=np.uint16).tofile(d / f"{split}.bin")
print("wrote", d)
PY

ckpt=$(mktemp -d)
trap 'rm -rf "$ckpt"' EXIT
for kernels in torch triton; do
  step "GPT-2 124M training, kernels=$kernels"
  timeout 90 python -m fastgpt.train configs/owt.py --dataset=gpu_check --kernels=$kernels \
    --batch_size=16 --gradient_accumulation_steps=4 --max_iters=40 --warmup_iters=10 --lr_decay_iters=40 \
    --eval_interval=40 --eval_iters=2 --log_interval=5 --out_dir="$ckpt/$kernels" 2>&1 \
    | tee "$out/train_$kernels.log" | grep -E "^(iter|step|done|device|MFU|error)|Error"
  [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
done
exit $status
