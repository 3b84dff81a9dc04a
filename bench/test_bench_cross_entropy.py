"""The LM head and its cross-entropy loss, forward+backward: fastgpt's and Triton's against torch;
and the row kernel alone, on given logits.

    pytest bench/test_bench_cross_entropy.py --benchmark-only

Providers, measured in the same run so their ratios mean something:
  fastgpt   what the model calls with kernels='auto': the Triton op on CUDA, the chunked torch op
            (fastgpt/head_loss.py) on a CPU
  triton    kernels.cross_entropy.linear_cross_entropy: the head and the loss chunked over rows
  eager     the fp32 reference: F.linear in the input dtype, then F.cross_entropy on the logits
            upcast to fp32 (what nanoGPT and fastgpt's torch path do)
  compiled  the same reference under torch.compile

Each round of test_linear_cross_entropy is forward+backward of the head and the loss. Each round
of test_cross_entropy_rows is the loss and its gradient on given (N, V) logits: the row kernel
(triton) writes d(summed loss)/dlogits over them, the gradient the fused head feeds its matmuls;
eager and compiled run F.cross_entropy on the logits upcast to fp32 with reduction="sum", so both
sides produce the same gradient, and backward casts it back to the logits' dtype.

Shapes (bench/harness.py's size): "gpu", GPT-2 124M at batch 16 x 1024: N = 16384, C = 768,
V = 50304 in bf16; "cpu", fp32 at N = 1024 (the CPU train step's 4 x 256). Without CUDA the
triton provider is skipped (the interpreter would time numpy), and so is compiled (a GPU
baseline; inductor's CPU compiles outlast the CPU budget); a further group sweeps the CPU op's
chunk size.

extra_info: ms (median); TFLOP/s of the head's three matmuls (6NCV); and the peak memory above
what was allocated before the step (bench.harness.peak_memory_bytes).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")
from kernels import cross_entropy as ce  # noqa: E402

from bench import harness  # noqa: E402
from bench.harness import CUDA, DEVICE, LARGE, sync  # noqa: E402
from fastgpt import head_loss  # noqa: E402
from fastgpt.ops import choose_kernels  # noqa: E402

IGNORE = -1
N_EMBD, VOCAB = 768, 50304  # GPT-2 124M, vocabulary padded to a multiple of 64
if LARGE:  # batch 16 x 1024
    DTYPE, HEAD_ROWS, HEAD_ROUNDS, HEAD_WARMUP = torch.bfloat16, 16 * 1024, 20, 3
else:  # the CPU train step's GPT-2 batch (4 x 256)
    DTYPE, HEAD_ROWS, HEAD_ROUNDS, HEAD_WARMUP = torch.float32, 4 * 256, 3, 1
PROVIDERS = ["triton", "eager", "compiled"]
# fastgpt.head_loss's chunk budget, swept on a CPU (at CUDA sizes the Triton op runs instead).
CPU_CHUNK_BYTES = [64 * 2**20, 256 * 2**20, 1024 * 2**20]


def skip_gpu_providers_on_cpu(provider: str) -> None:
    if CUDA:
        return
    if provider == "triton":
        pytest.skip("the triton provider needs CUDA: under the interpreter it would time numpy")
    if provider == "compiled":
        pytest.skip("compiled is a GPU baseline; inductor's CPU compiles outlast the CPU budget of bench/")


def loss_fn(provider: str):
    if provider == "fastgpt":  # what the model calls on this device, kernels='auto'
        head_and_loss = choose_kernels("auto", DEVICE).ops.head_and_loss
        return lambda hidden, weight, targets, ignore: head_and_loss(hidden, weight, targets)[1]
    if provider == "triton":
        return ce.linear_cross_entropy
    reference = ce.linear_cross_entropy_reference
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
@pytest.mark.parametrize("provider", ["fastgpt", *PROVIDERS])
def test_linear_cross_entropy(benchmark, provider):
    """The head and the loss, forward+backward: fastgpt's (the chunked Triton op on CUDA, the
    chunked torch op on a CPU) against matmul + F.cross_entropy."""
    skip_gpu_providers_on_cpu(provider)
    run_head(benchmark, loss_fn(provider))


@pytest.mark.benchmark(group="linear_cross_entropy chunk")
@pytest.mark.skipif(CUDA, reason="sweeps the CPU op's chunk; on CUDA the Triton op runs")
@pytest.mark.parametrize("chunk_bytes", CPU_CHUNK_BYTES)
def test_cpu_head_chunk(benchmark, chunk_bytes, monkeypatch):
    """fastgpt.head_loss with `chunk_bytes` of logits a chunk (CHUNK_LOGITS_BYTES is the default)."""
    monkeypatch.setattr(head_loss, "CHUNK_LOGITS_BYTES", chunk_bytes)
    run_head(benchmark, head_loss.chunked_head_loss, memory=False, suite="linear_cross_entropy chunk",
             chunk_rows=head_loss.chunk_rows(VOCAB))


def summed_cross_entropy(logits, targets):
    return F.cross_entropy(logits.float(), targets, ignore_index=IGNORE, reduction="sum")


@pytest.mark.benchmark(group="cross_entropy")
@pytest.mark.parametrize("provider", PROVIDERS)
def test_cross_entropy_rows(benchmark, provider):
    """The loss and d(summed loss)/dlogits on (N, V) logits: the row kernel in place against
    F.cross_entropy forward+backward."""
    skip_gpu_providers_on_cpu(provider)
    torch.manual_seed(0)
    logits = torch.randn(HEAD_ROWS, VOCAB, device=DEVICE).to(DTYPE)
    targets = torch.randint(0, VOCAB, (HEAD_ROWS,), device=DEVICE)
    if provider == "triton":
        # Each round overwrites the logits with the previous round's gradient: finite values of
        # the same shape, so the kernel does the same work (its cost does not depend on them).
        def step():
            ce.cross_entropy_rows(logits, targets, IGNORE, write_grad=True).sum()
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
