"""Cross-entropy over (N, V) logits, and the LM head fused with it: Triton against torch.

    pytest bench/test_bench_cross_entropy.py --benchmark-only

Providers, measured in the same run so their ratios mean something:
  triton    kernels.cross_entropy: the fused loss-and-gradient pass; linear_cross_entropy chunked
  eager     the fp32 references: F.cross_entropy on the logits upcast to fp32 (what nanoGPT and
            fastgpt's torch path do); for the head, F.linear in the input dtype first
  compiled  the same references under torch.compile

Modes: forward, backward, forward+backward. Each round starts from fresh logits (a copy made
outside the timed region: the Triton forward consumes them); backward times only the backward of
a forward run in setup. Triton's backward is a scaling of the gradient its forward already wrote.

Shapes: on CUDA, GPT-2 124M at batch 16 x 1024: logits (16384, 50304) in bf16, and the head at
N = 16384, C = 768, V = 50304. Without CUDA the triton provider is skipped (the interpreter would
time numpy) and the torch providers run on a small fp32 CPU shape, so that the file still runs.

extra_info: ms (median); GB/s against a nominal byte count, the least any implementation must
move (forward reads the logits once, backward writes their gradient once), so providers compare
on one scale; TFLOP/s of the head's three matmuls (6NCV); and, for forward+backward on CUDA, the
peak memory above what was allocated before the step (torch.cuda.max_memory_allocated delta).
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")
from kernels import cross_entropy as ce  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
IGNORE = -1
if CUDA:  # GPT-2 124M, batch 16 x 1024, vocabulary padded to a multiple of 64
    N_ROWS, N_EMBD, VOCAB, DTYPE = 16 * 1024, 768, 50304, torch.bfloat16
    ROUNDS, WARMUP_ROUNDS = 20, 3
else:
    N_ROWS, N_EMBD, VOCAB, DTYPE = 256, 64, 8192, torch.float32
    ROUNDS, WARMUP_ROUNDS = 5, 1
PROVIDERS = ["triton", "eager", "compiled"]
MODES = ["forward", "backward", "forward+backward"]


def sync():
    if CUDA:
        torch.cuda.synchronize()  # time the work, not its launch


def loss_fn(provider: str, fused_head: bool):
    if provider == "triton":
        if not CUDA:
            pytest.skip("the triton provider needs CUDA: under the interpreter it would time numpy")
        return ce.linear_cross_entropy if fused_head else ce.cross_entropy
    reference = ce.linear_cross_entropy_reference if fused_head else ce.cross_entropy_reference
    return torch.compile(reference) if provider == "compiled" else reference


def peak_bytes_above_start(step) -> int | None:
    """Peak CUDA memory one call of step() allocates beyond what was live before it."""
    if not CUDA:
        return None
    sync()
    torch.cuda.reset_peak_memory_stats()
    start = torch.cuda.memory_allocated()
    step()
    sync()
    return torch.cuda.max_memory_allocated() - start


@pytest.mark.benchmark(group="cross_entropy")
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("provider", PROVIDERS)
def test_cross_entropy(benchmark, provider, mode):
    fn = loss_fn(provider, fused_head=False)
    torch.manual_seed(0)
    logits = torch.randn(N_ROWS, VOCAB, device=DEVICE).to(DTYPE)
    targets = torch.randint(0, VOCAB, (N_ROWS,), device=DEVICE)

    def fresh():
        return logits.clone().requires_grad_()

    # Setups finish their GPU work before returning: pytest-benchmark starts the clock right
    # after setup, so a pending 1.65 GB copy (or forward) would be timed as the round's.
    def forward():
        x = fresh()
        sync()
        return (x,), {}

    def run_forward(x):
        loss = fn(x, targets, IGNORE)
        sync()
        return loss

    def with_loss():
        loss = fn(fresh(), targets, IGNORE)
        sync()
        return (loss,), {}

    def run_backward(loss):
        loss.backward()
        sync()

    def run_both(x):
        fn(x, targets, IGNORE).backward()
        sync()

    target, setup = {"forward": (run_forward, forward), "backward": (run_backward, with_loss),
                     "forward+backward": (run_both, forward)}[mode]
    benchmark.pedantic(target, setup=setup, rounds=ROUNDS, warmup_rounds=WARMUP_ROUNDS)
    seconds = benchmark.stats.stats.median
    logits_bytes = logits.numel() * logits.element_size()
    nominal = {"forward": 1, "backward": 1, "forward+backward": 2}[mode] * logits_bytes
    info = dict(shape=[N_ROWS, VOCAB], dtype=str(DTYPE).removeprefix("torch."), ms=round(seconds * 1e3, 3),
                gbps=round(nominal / seconds / 1e9, 1), logits_mb=round(logits_bytes / 1e6, 1))
    if mode == "forward+backward":
        peak = peak_bytes_above_start(lambda: run_both(*forward()[0]))
        info["peak_mb"] = None if peak is None else round(peak / 1e6, 1)
    benchmark.extra_info.update(info)


@pytest.mark.benchmark(group="linear_cross_entropy")
@pytest.mark.parametrize("provider", PROVIDERS)
def test_linear_cross_entropy(benchmark, provider):
    """The head and the loss, forward+backward: chunked Triton against matmul + F.cross_entropy."""
    fn = loss_fn(provider, fused_head=True)
    torch.manual_seed(0)
    hidden = torch.randn(N_ROWS, N_EMBD, device=DEVICE).to(DTYPE).requires_grad_()
    weight = (torch.randn(VOCAB, N_EMBD, device=DEVICE) * 0.02).to(DTYPE).requires_grad_()
    targets = torch.randint(0, VOCAB, (N_ROWS,), device=DEVICE)

    def step():
        hidden.grad = weight.grad = None
        fn(hidden, weight, targets, IGNORE).backward()
        sync()

    benchmark.pedantic(step, rounds=ROUNDS, warmup_rounds=WARMUP_ROUNDS)
    seconds = benchmark.stats.stats.median
    hidden.grad = weight.grad = None
    peak = peak_bytes_above_start(step)
    flops = 6 * N_ROWS * N_EMBD * VOCAB  # logits, grad_hidden, grad_weight
    benchmark.extra_info.update(
        shape=[N_ROWS, N_EMBD, VOCAB], dtype=str(DTYPE).removeprefix("torch."), ms=round(seconds * 1e3, 3),
        tflops=round(flops / seconds / 1e12, 2), full_logits_mb=round(N_ROWS * VOCAB * hidden.element_size() / 1e6, 1),
        peak_mb=None if peak is None else round(peak / 1e6, 1),
    )
