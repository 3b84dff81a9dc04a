"""LayerNorm forward, backward, and both: the Triton kernel against torch eager and torch.compile.

    pytest bench/test_bench_layernorm.py --benchmark-only

Providers, measured in the same run so their ratio means something:
  triton     fastgpt_kernels.layernorm.layer_norm (CUDA only, see below)
  eager      torch.nn.functional.layer_norm
  compiled   torch.compile(F.layer_norm): inductor's generated kernels

On CUDA, forward and forward+backward are also timed from a CUDA graph (timing "graph": one
call captured once and replayed once per call), which is the GPU's time for the kernels alone:
a (16384, 768) LayerNorm takes tens of microseconds on an H100, less than the Python that
launches it, so wall time ("wall") measures the host as much as the kernel. Both are reported.

A further group times the Triton forward+backward (graph) with each backward grid that
fastgpt_kernels.layernorm.backward_grid can choose (enough programs for 4, 8, 16 or 32 resident warps an
SM), to check its default on a GPU.

Modes, one benchmark group each: forward (with autograd recording, as in training), backward
(torch.autograd.grad of a kept graph: no .grad accumulation is timed), forward+backward.

At size "gpu" (bench/harness.py): (16384, 768) in bf16, GPT-2 small's width over 16 sequences of
1024 tokens. A round is CALLS_PER_ROUND back-to-back calls (on CUDA) and one synchronize, so the
GPU runs ahead of Python as it does in training; pytest-benchmark times them as CALLS_PER_ROUND
iterations of one call, so its stats, the results file, the ratio table and
scripts/bench_targets.py all show the same number: time per call. `extra_info` adds GB/s.

Without CUDA the triton provider is skipped: Triton's CPU interpreter runs kernels in numpy, a
correctness tool, not a performance number. The torch providers then run on (2048, 768) in fp32,
one call per round, so the file still runs; those figures measure this CPU.

GB/s counts the bytes the kernel's docstring counts per element (e bytes each): forward 2e (read
x, write y), backward 3e (read x and dy, write dx), forward+backward 5e; weight, bias, statistics
and partial sums are left out. The same count serves every provider: it is the work's effective
bandwidth, not the traffic each implementation happens to generate.
"""

import itertools

import pytest
import torch
import torch.nn.functional as F

from bench.harness import CUDA, LARGE, sync

DEVICE = "cuda" if CUDA else "cpu"
ROWS, COLS, DTYPE = (16384, 768, torch.bfloat16) if LARGE else (2048, 768, torch.float32)
CALLS_PER_ROUND = 10 if CUDA else 1
ROUNDS, WARMUP_ROUNDS = (50, 5) if LARGE else (20, 3)
# Calls on a side stream before a CUDA graph capture (torch.cuda.graphs' recipe warms up a few):
# lazy initialisation (cuBLAS handles, autograd's buffers) must not happen inside the capture.
GRAPH_WARMUP_CALLS = 3
EPS = 1e-5
BYTES_PER_ELEMENT = {"forward": 2, "backward": 3, "forward+backward": 5}  # times e, the element size
PROVIDERS = ["triton", "eager", "compiled"]
MODES = list(BYTES_PER_ELEMENT)
TIMINGS = ["wall", "graph"] if CUDA else ["wall"]


def layer_norm_for(provider: str):
    if provider == "triton":
        # Imported here only: importing triton without a GPU or the interpreter selected would
        # leave it unable to run the kernel tests later in the same session.
        from fastgpt_kernels.layernorm import layer_norm

        return lambda x, w, b: layer_norm(x, w, b, EPS)
    eager = lambda x, w, b: F.layer_norm(x, (x.shape[-1],), w, b, EPS)  # noqa: E731
    return torch.compile(eager, fullgraph=True) if provider == "compiled" else eager


def build(provider: str, mode: str, timing: str = "wall"):
    """A function doing one call of `mode` (replayed from a CUDA graph when timing is "graph")
    that waits for the GPU on every CALLS_PER_ROUND-th call, the end of a round."""
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(ROWS, COLS, generator=g) * 2 + 0.5).to(DEVICE, DTYPE).requires_grad_()
    w = (1 + 0.1 * torch.randn(COLS, generator=g)).to(DEVICE, DTYPE).requires_grad_()
    b = (0.1 * torch.randn(COLS, generator=g)).to(DEVICE, DTYPE).requires_grad_()
    dy = torch.randn(ROWS, COLS, generator=g).to(DEVICE, DTYPE)
    inputs = (x, w, b)
    fn = layer_norm_for(provider)

    if mode == "forward":
        call = lambda: fn(*inputs)  # noqa: E731
    elif mode == "backward":
        y = fn(*inputs)
        call = lambda: torch.autograd.grad(y, inputs, dy, retain_graph=True)  # noqa: E731
    else:
        call = lambda: torch.autograd.grad(fn(*inputs), inputs, dy)  # noqa: E731

    call()  # compile (torch.compile, Triton) outside the timed rounds
    if timing == "graph":
        call = graphed(call)
    calls = itertools.count(1)

    def timed_call():
        call()
        if next(calls) % CALLS_PER_ROUND == 0:
            sync()  # CPU-GPU sync: once a round, so within it the GPU runs ahead of Python

    return timed_call


def graphed(call):
    """call() captured once into a CUDA graph; returns its replay. torch.cuda.graphs' recipe:
    warm up on a side stream, then capture. The autograd graph is built inside the capture too
    (forward+backward), so the backward runs on the capturing stream."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(GRAPH_WARMUP_CALLS):
            call()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        call()
    return graph.replay


def time_calls(benchmark, provider: str, mode: str, timing: str) -> None:
    """pytest-benchmark's stats per call: each round is CALLS_PER_ROUND iterations of one call."""
    benchmark.pedantic(build(provider, mode, timing), rounds=ROUNDS, iterations=CALLS_PER_ROUND,
                       warmup_rounds=WARMUP_ROUNDS)


def record(benchmark, mode: str, **extra) -> None:
    seconds = benchmark.stats.stats.median  # a call's: pytest-benchmark divides by the iterations
    nbytes = BYTES_PER_ELEMENT[mode] * ROWS * COLS * DTYPE.itemsize
    benchmark.extra_info.update(
        suite="layer_norm", shape=[ROWS, COLS],
        dtype=str(DTYPE).removeprefix("torch."),
        calls_per_round=CALLS_PER_ROUND,
        gb_per_s=round(nbytes / seconds / 1e9, 1),
        **extra,
    )


@pytest.mark.parametrize("timing", TIMINGS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("provider", PROVIDERS)
def test_layer_norm(benchmark, provider, mode, timing):
    if provider == "triton" and not CUDA:
        pytest.skip("triton provider needs CUDA: the CPU interpreter is not a performance number")
    if timing == "graph" and mode == "backward":
        pytest.skip("backward alone reuses a forward made outside the capture; timed as wall only")
    benchmark.group = f"layer_norm {mode} {timing} ({ROWS}, {COLS}) {str(DTYPE).removeprefix('torch.')} {DEVICE}"
    time_calls(benchmark, provider, mode, timing)
    record(benchmark, mode)


@pytest.mark.skipif(not CUDA, reason="times the Triton backward's grid on a GPU")
@pytest.mark.parametrize("resident_warps", [4, 8, 16, 32])
def test_layer_norm_backward_grid(benchmark, monkeypatch, resident_warps):
    """The Triton backward with enough programs for `resident_warps` warps an SM (4: one program
    an SM at this width, Liger-Kernel's grid; 32: the default, fastgpt_kernels.layernorm.backward_grid),
    timed as forward+backward from a CUDA graph: the forward is the same in every variant, and
    wall time would mostly time the host."""
    import fastgpt_kernels.layernorm as ln

    monkeypatch.setattr(ln, "BWD_RESIDENT_WARPS", resident_warps)
    benchmark.group = f"layer_norm backward grid ({ROWS}, {COLS}) {str(DTYPE).removeprefix('torch.')}"
    time_calls(benchmark, "triton", "forward+backward", "graph")
    _, warps = ln._launch_config(COLS)
    programs, rows_per_program = ln.backward_grid(ROWS, warps, ln._sm_count(torch.device(DEVICE)))
    record(benchmark, "forward+backward", resident_warps=resident_warps, programs=programs,
           rows_per_program=rows_per_program)
