"""One optimizer step, data included: fastgpt against the independent nanoGPT-style reference
(bench/reference.py), at the same model, batch and dtype, in the same run.

    pytest bench/test_bench_train_step.py --benchmark-only

Providers:
  fastgpt    what `python -m fastgpt.train` does with its defaults: the ops kernels='auto' picks
             (Triton on CUDA; on a CPU torch ops with the chunked head + loss at large
             vocabularies), compile='auto', fused AdamW (TritonAdamW on CUDA), batches from the
             background prefetcher
  reference  nanoGPT's loop in plain PyTorch: eager, full logits, torch.optim.AdamW's default
             implementation, synchronous get_batch from the memmap
  reference-compiled
             the same under torch.compile with torch's fused AdamW: what nanoGPT's train.py runs
             on CUDA by default (compile=True; configure_optimizers asks for fused on CUDA), so
             the baseline to beat there. Skipped on a CPU: inductor's CPU compile of the model
             outlasts bench/'s CPU budget

Shapes: "default" is configs/shakespeare_char.py's model and batch (vocabulary 84 padded to
128); "gpt2" is GPT-2 124M (vocab 50304, no biases), batch 4 x 256 at size "cpu" and 16 x 1024
at size "gpu". The dtype is nanoGPT's policy for the device (fp32 on a CPU, bf16 on a GPU that has
it) for every provider. Gradient clipping at 1.0, as both trainers do by default.

The providers run in this one process, which they share (the heap the first grew, fastgpt's
allocator setting): for a verdict run each alone, e.g. `-k reference-gpt2`, then
`-k reference-compiled-gpt2`, then `-k fastgpt-gpt2`, and read them from the results file.

extra_info: tokens_per_s, mfu (the PaLM count, 6N + 12 L C T FLOPs a token, against the
datasheet peak on a GPU and this machine's measured matmul peak on a CPU) and peak_mb (memory one
step allocates above what was live before it; bench.harness.peak_memory_bytes).
"""

from __future__ import annotations

import pathlib

import numpy as np
import pytest
import torch

from bench import reference
from bench.harness import DEVICE, LARGE, peak_memory_bytes, sync
from fastgpt.config import read_config_file
from fastgpt.data import BatchStream, Prefetcher, open_tokens
from fastgpt.hardware import peak_flops
from fastgpt.model import GPT, GPTConfig
from fastgpt.ops import choose_ops
from fastgpt.optim import make_optimizer
from fastgpt.hardware import autocast, configure_backends, grad_scaler

CONFIG = read_config_file(pathlib.Path(__file__).resolve().parent.parent / "configs" / "shakespeare_char.py")
SHAPES = {  # name -> (model fields, batch size)
    "default": (dict(n_layer=CONFIG["n_layer"], n_head=CONFIG["n_head"], n_embd=CONFIG["n_embd"],
                     block_size=CONFIG["block_size"], vocab_size=128), CONFIG["batch_size"]),
    "gpt2": (dict(n_layer=12, n_head=12, n_embd=768, block_size=1024 if LARGE else 256, vocab_size=50304),
             16 if LARGE else 4),
}
# (warmup, timed) rounds: a GPT-2 step takes ~10 s on a 2-core CPU
ROUNDS = {"default": (5, 20), "gpt2": (5, 20) if LARGE else (1, 3)}
LR, BETAS, WEIGHT_DECAY, GRAD_CLIP = 6e-4, (0.9, 0.95), 0.1, 1.0
N_TOKENS = 2**22


@pytest.fixture(scope="module")
def token_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("train_step") / "train.bin"
    np.random.default_rng(0).integers(0, 84, N_TOKENS, dtype=np.uint16).tofile(path)
    return path


@pytest.fixture(autouse=True)
def restore_tf32():
    """Each provider sets TF32 as its trainer does (the fp32 peak assumes it); restored after."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def fastgpt_step(fields, batch_size, dtype, path, cleanup):
    configure_backends(DEVICE)  # as train.py: TF32 on CUDA; on a CPU, malloc keeps freed memory
    op_choices = choose_ops("auto", DEVICE)
    torch.manual_seed(0)
    model = GPT(GPTConfig(**fields, dropout=0.0, bias=False), op_choices.ops).to(DEVICE)
    opt = make_optimizer(model, WEIGHT_DECAY, LR, BETAS, DEVICE.type, op_choices.optimizer)
    forward = torch.compile(model) if DEVICE.type == "cuda" else model  # the trainer's compile='auto'
    tokens = open_tokens(path, 84, fields["block_size"])
    batches = Prefetcher(BatchStream(tokens, batch_size, fields["block_size"], 0, "train"), DEVICE)
    cleanup.append(batches.close)
    ctx, scaler = autocast(DEVICE, dtype), grad_scaler(DEVICE, dtype)

    def step():  # the body of fastgpt/train.py's loop, one micro-step
        x, y = next(batches)
        with ctx:
            _, loss = forward(x, y)
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        sync()

    return step, model, op_choices.ops.name


def reference_step(fields, batch_size, dtype, path, compiled: bool):
    torch.manual_seed(0)
    model = reference.ReferenceGPT(reference.ReferenceConfig(**fields, dropout=0.0, bias=False)).to(DEVICE)
    opt = reference.configure_optimizer(model, WEIGHT_DECAY, LR, BETAS, fused=compiled)
    forward = torch.compile(model) if compiled else model  # nanoGPT compiles after building the optimizer
    inner = reference.make_train_step(
        forward, opt, lambda: reference.get_batch(path, batch_size, fields["block_size"], DEVICE), DEVICE, dtype,
        grad_clip=GRAD_CLIP)

    def step():
        inner()
        sync()

    return step


# The references run first: fastgpt's CPU allocator setting (fastgpt.hardware.keep_freed_memory)
# cannot be undone, and lasts for the rest of the process.
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("provider", ["reference", "reference-compiled", "fastgpt"])
def test_train_step(benchmark, provider, shape, token_file):
    if provider == "reference-compiled" and DEVICE.type != "cuda":
        pytest.skip("reference-compiled is a GPU baseline; inductor's CPU compile outlasts the CPU budget of bench/")
    fields, batch_size = SHAPES[shape]
    dtype = reference.nanogpt_dtype(DEVICE)
    cleanup = []
    try:
        if provider == "fastgpt":
            step, model, kernels = fastgpt_step(fields, batch_size, dtype, token_file, cleanup)
            flops_per_token = model.flops_per_token()
        else:
            compiled = provider == "reference-compiled"
            step, kernels = reference_step(fields, batch_size, dtype, token_file, compiled), provider
            with torch.device("meta"):  # the same architecture, so the same count; no weights needed
                flops_per_token = GPT(GPTConfig(**fields, bias=False)).flops_per_token()
        warmup, rounds = ROUNDS[shape]
        benchmark.group = f"train_step {shape}"
        benchmark.pedantic(step, rounds=rounds, warmup_rounds=warmup)
        peak_bytes = peak_memory_bytes(step)
    finally:
        for close in cleanup:
            close()
    seconds = benchmark.stats.stats.median
    tokens = batch_size * fields["block_size"]
    peak = peak_flops(DEVICE, dtype)
    benchmark.extra_info.update(
        suite="train_step", shape_name=f"{shape} {batch_size}x{fields['block_size']}",
        dtype=str(dtype).removeprefix("torch."), kernels=kernels, model=fields,
        tokens_per_s=round(tokens / seconds), mfu=round(flops_per_token * tokens / seconds / peak, 4) if peak else None,
        peak_tflops=peak / 1e12 if peak else None, peak_mb=round(peak_bytes / 2**20, 1),
    )
