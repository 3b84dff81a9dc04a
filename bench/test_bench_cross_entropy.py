"""The LM head and its cross-entropy loss, forward+backward: each of fastgpt's implementations
against torch, eager and compiled; and the row step alone, on given logits.

    pytest bench/test_bench_cross_entropy.py --benchmark-only

Providers, measured in the same run so their ratios mean something:
  fastgpt   what the model calls with kernels='auto' on this device (fastgpt.ops), under
            torch.compile on CUDA as the trainer's compile='auto' runs it
  triton    fastgpt_kernels.head_loss.linear_cross_entropy(impl='triton'): the head and the loss chunked
            over rows, each chunk's loss and gradient by the Triton row kernel
  chunked   the same op with the torch row step (impl='torch'): the CPU's head + loss
  fp8       the fp8 head (kernels/fp8_linear.py) then F.cross_entropy on its logits, under
            torch.compile, as the model runs it with head_loss_kernel='fp8'
  eager     the fp32 reference: F.linear in the input dtype, then F.cross_entropy on the logits
            upcast to fp32 (what nanoGPT and fastgpt's torch path do)
  compiled  the same reference under torch.compile: what nanoGPT's compiled train.py runs

Each round of test_linear_cross_entropy is forward+backward of the head and the loss. Each round
of test_cross_entropy_rows is the loss and its gradient on given (N, V) logits: the row steps
(triton, torch) write d(summed loss)/dlogits over them, the gradient the fused head feeds its
matmuls; eager and compiled run F.cross_entropy on the logits upcast to fp32 with
reduction="sum", so every side produces the same gradient.

Shapes (bench/harness.py's size): "gpu", GPT-2 124M at batch 16 x 1024: N = 16384, C = 768,
V = 50304 in bf16; "cpu", fp32 at N = 1024 (the CPU train step's 4 x 256). Without CUDA the
triton, fp8 and compiled providers are skipped (the interpreter would time numpy, a CPU has no
fp8 matmul, and inductor's CPU compiles outlast the CPU budget of bench/). A further group sweeps
the chunk size of the chunked op this device runs (triton on CUDA, torch on a CPU).

extra_info: ms (median); TFLOP/s of the head's three matmuls (6NCV); and the peak memory above
what was allocated before the step (bench.harness.peak_memory_bytes).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from bench import harness
from bench.harness import CUDA, DEVICE, LARGE, sync
from fastgpt.ops import choose_ops
from fastgpt_kernels import head_loss as hl
from fastgpt_kernels.fp8_linear import fp8_linear

IGNORE = -1
N_EMBD, VOCAB = 768, 50304  # GPT-2 124M, vocabulary padded to a multiple of 64
if LARGE:  # batch 16 x 1024
    DTYPE, HEAD_ROWS, HEAD_ROUNDS, HEAD_WARMUP = torch.bfloat16, 16 * 1024, 20, 3
else:  # the CPU train step's GPT-2 batch (4 x 256)
    DTYPE, HEAD_ROWS, HEAD_ROUNDS, HEAD_WARMUP = torch.float32, 4 * 256, 3, 1
HEAD_PROVIDERS = ["fastgpt", "triton", "chunked", "fp8", "eager", "compiled"]
ROW_PROVIDERS = ["triton", "torch", "eager", "compiled"]
GPU_ONLY = {"triton": "under the interpreter it would time numpy",
            "fp8": "a CPU has no fp8 matmul",
            "compiled": "inductor's CPU compiles outlast the CPU budget of bench/"}
# Chunk budgets of fastgpt_kernels.head_loss swept on this device's chunked op.
CHUNK_BYTES = [128 * 2**20, 256 * 2**20, 512 * 2**20] if CUDA else [64 * 2**20, 256 * 2**20, 1024 * 2**20]


def skip_gpu_providers_on_cpu(provider: str) -> None:
    if not CUDA and provider in GPU_ONLY:
        pytest.skip(f"the {provider} provider needs CUDA: {GPU_ONLY[provider]}")


def fp8_head_loss(hidden, weight, targets, ignore):
    logits = fp8_linear(hidden, weight)
    return F.cross_entropy(logits.float(), targets, ignore_index=ignore)


def loss_fn(provider: str):
    if provider == "fastgpt":  # what the model calls on this device, kernels='auto', compiled where the trainer compiles
        head_and_loss = choose_ops("auto", DEVICE).ops.head_and_loss
        fn = lambda hidden, weight, targets, ignore: head_and_loss(hidden, weight, targets)[1]  # noqa: E731
        return torch.compile(fn) if CUDA else fn
    if provider in ("triton", "chunked"):
        impl = "triton" if provider == "triton" else "torch"
        return lambda hidden, weight, targets, ignore: hl.linear_cross_entropy(hidden, weight, targets, ignore, impl=impl)
    if provider == "fp8":
        return torch.compile(fp8_head_loss)
    reference = hl.linear_cross_entropy_reference
    return torch.compile(reference) if provider == "compiled" else reference


def head_inputs():
    torch.manual_seed(0)
    hidden = torch.randn(HEAD_ROWS, N_EMBD, device=DEVICE).to(DTYPE).requires_grad_()
    weight = (torch.randn(VOCAB, N_EMBD, device=DEVICE) * 0.02).to(DTYPE).requires_grad_()
    targets = torch.randint(0, VOCAB, (HEAD_ROWS,), device=DEVICE)
    return hidden, weight, targets


def run_head(benchmark, fn, memory=True, **extra):
    hidden, weight, targets = head_inputs()

    def step():
        hidden.grad = weight.grad = None
        fn(hidden, weight, targets, IGNORE).backward()
        sync()

    benchmark.pedantic(step, rounds=HEAD_ROUNDS, warmup_rounds=HEAD_WARMUP)
    seconds = benchmark.stats.stats.median
    flops = 6 * HEAD_ROWS * N_EMBD * VOCAB  # logits, grad_hidden, grad_weight
    info = dict(suite="linear_cross_entropy", shape=[HEAD_ROWS, N_EMBD, VOCAB], dtype=str(DTYPE).removeprefix("torch."),
                ms=round(seconds * 1e3, 3), tflops=round(flops / seconds / 1e12, 3),
                full_logits_mb=round(HEAD_ROWS * VOCAB * hidden.element_size() / 1e6, 1))
    if memory:
        hidden.grad = weight.grad = None
        info["peak_mb"] = round(harness.peak_memory_bytes(step) / 1e6, 1)
    benchmark.extra_info.update(info, **extra)


@pytest.mark.benchmark(group="linear_cross_entropy")
@pytest.mark.parametrize("provider", HEAD_PROVIDERS)
def test_linear_cross_entropy(benchmark, provider):
    """The head and the loss, forward+backward."""
    skip_gpu_providers_on_cpu(provider)
    run_head(benchmark, loss_fn(provider))


@pytest.mark.benchmark(group="linear_cross_entropy chunk")
@pytest.mark.parametrize("chunk_bytes", CHUNK_BYTES)
def test_head_chunk(benchmark, chunk_bytes, monkeypatch):
    """The chunked op this device runs with `chunk_bytes` of logits a chunk (the default is
    fastgpt_kernels.head_loss.CHUNK_LOGITS_BYTES)."""
    monkeypatch.setattr(hl, "CHUNK_LOGITS_BYTES", chunk_bytes)
    run_head(benchmark, loss_fn("triton" if CUDA else "chunked"), suite="linear_cross_entropy chunk",
             chunk_rows=hl.default_chunk_size(HEAD_ROWS, VOCAB, DTYPE.itemsize))


def summed_cross_entropy(logits, targets):
    return F.cross_entropy(logits.float(), targets, ignore_index=IGNORE, reduction="sum")


@pytest.mark.benchmark(group="cross_entropy")
@pytest.mark.parametrize("provider", ROW_PROVIDERS)
def test_cross_entropy_rows(benchmark, provider):
    """The loss and d(summed loss)/dlogits on (N, V) logits: a row step in place against
    F.cross_entropy forward+backward."""
    skip_gpu_providers_on_cpu(provider)
    torch.manual_seed(0)
    logits = torch.randn(HEAD_ROWS, VOCAB, device=DEVICE).to(DTYPE)
    targets = torch.randint(0, VOCAB, (HEAD_ROWS,), device=DEVICE)
    if provider in ("triton", "torch"):
        if provider == "triton":
            from fastgpt_kernels.cross_entropy import cross_entropy_rows as rows
        else:
            rows = hl.torch_row_losses

        # Each round overwrites the logits with the previous round's gradient: finite values of
        # the same shape, so the step does the same work (its cost does not depend on them).
        def step():
            rows(logits, targets, IGNORE, write_grad=True).sum()
            sync()
    else:
        loss = torch.compile(summed_cross_entropy) if provider == "compiled" else summed_cross_entropy
        logits.requires_grad_()

        def step():
            logits.grad = None
            loss(logits, targets).backward()
            sync()

    benchmark.pedantic(step, rounds=HEAD_ROUNDS, warmup_rounds=HEAD_WARMUP)
    seconds = benchmark.stats.stats.median
    logits.grad = None
    # Traffic of the in-place pass: the logits read twice and their gradient written once.
    benchmark.extra_info.update(
        suite="cross_entropy", shape=[HEAD_ROWS, VOCAB], dtype=str(DTYPE).removeprefix("torch."),
        ms=round(seconds * 1e3, 3), gb_per_s=round(3 * logits.numel() * logits.element_size() / seconds / 1e9, 1),
        peak_mb=round(harness.peak_memory_bytes(step) / 1e6, 1))
