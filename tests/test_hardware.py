"""fastgpt.hardware: the CPU allocator setting that keeps freed memory with the process, the device and
dtype choices (on CUDA too, through a stand-in torch.cuda), loss scaling and TF32."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest
import torch

from fastgpt import hardware
from fastgpt.hardware import RuntimeConfigError, configure_backends, grad_scaler, resolve_device, resolve_dtype

# A training-like loop: each step allocates and frees 32 MiB activations and gradients. Counts
# the page faults of four steps after two of warm-up.
SCRIPT = """
import resource, sys, torch
from fastgpt.hardware import keep_freed_memory
took = keep_freed_memory() if sys.argv[1] == "keep" else None
torch.set_num_threads(1)
w = torch.randn(1024, 1024, requires_grad=True)
x = torch.randn(8192, 1024)
def step():
    (x @ w).relu().sum().backward()
    w.grad = None
step(); step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(4):
    step()
print(took, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""
PAGES_32_MIB = 2**25 // 4096


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc's malloc")
def test_steps_reuse_freed_memory_instead_of_faulting_it_in():
    faults = {}
    for mode in ("default", "keep"):
        out = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, timeout=120, check=True)
        took, count = out.stdout.split()
        assert took == ("True" if mode == "keep" else "None")
        faults[mode] = int(count)
    # By default each 32 MiB block is a fresh mmap whose every page faults in, several a step.
    assert faults["default"] > 4 * 2 * PAGES_32_MIB
    assert faults["keep"] < 0.5 * faults["default"]


@pytest.mark.parametrize("flags,expected", [({"avx2", "fma"}, torch.float32), ({"avx512f", "avx512_bf16"}, torch.bfloat16),
                                            ({"amx_bf16", "amx_tile"}, torch.bfloat16), (set(), torch.float32)])
def test_auto_dtype_on_a_cpu_reads_its_flags_and_measures_nothing(monkeypatch, flags, expected):
    monkeypatch.setattr(hardware, "cpu_flags", lambda: flags)
    monkeypatch.setattr(hardware, "measure_matmul_flops", lambda *a, **k: pytest.fail("resolve_dtype measured"))
    assert hardware.resolve_dtype("auto", torch.device("cpu")) is expected


@pytest.fixture
def two_gpus(monkeypatch):
    """torch.cuda as a machine with GPUs 0 and 1 reports it, GPU 1 current; nothing touches a GPU."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla T4")


@pytest.mark.parametrize("name, expected", [("auto", "cuda:1"), ("cuda", "cuda:1"), ("cuda:0", "cuda:0"), ("cpu", "cpu")])
def test_a_gpu_device_comes_back_with_its_index(two_gpus, name, expected):
    """So the log says which GPU, and the prefetcher's worker thread can be put on it."""
    assert resolve_device(name) == torch.device(expected)


def test_a_gpu_past_the_last_is_refused_by_name(two_gpus):
    with pytest.raises(RuntimeConfigError, match=r"device='cuda:2' but this machine has 2 CUDA device\(s\), cuda:0..cuda:1"):
        resolve_device("cuda:2")


@pytest.mark.parametrize("bf16, expected", [(True, torch.bfloat16), (False, torch.float16)])
def test_auto_dtype_on_a_gpu_is_bf16_where_it_runs_else_fp16(two_gpus, monkeypatch, bf16, expected):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: bf16)
    assert resolve_dtype("auto", torch.device("cuda", 1)) is expected
    assert resolve_dtype("float16", torch.device("cuda", 1)) is torch.float16


def test_bf16_on_a_gpu_without_it_names_the_gpu(two_gpus, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: False)
    with pytest.raises(RuntimeConfigError, match="dtype='bfloat16' but Tesla T4 lacks bf16; use 'float16'"):
        resolve_dtype("bfloat16", torch.device("cuda", 1))


@pytest.mark.parametrize("dtype, scaled", [(torch.float16, True), (torch.bfloat16, False), (torch.float32, False)])
def test_only_fp16_scales_the_loss(dtype, scaled):
    """The choice, on the CPU's scaler (tests/test_cuda.py steps the CUDA one in fp16)."""
    assert grad_scaler(torch.device("cpu"), dtype).is_enabled() is scaled


def test_fp32_matmuls_on_a_gpu_run_as_tf32():
    flags = (torch.backends.cuda.matmul, torch.backends.cudnn)
    before = [flag.allow_tf32 for flag in flags]  # monkeypatch cannot restore torch's properties
    try:
        for flag in flags:
            flag.allow_tf32 = False
        configure_backends(torch.device("cuda", 0))
        assert all(flag.allow_tf32 for flag in flags)
    finally:
        for flag, value in zip(flags, before):
            flag.allow_tf32 = value


@pytest.mark.parametrize("setting, device, expected", [
    ("auto", "cuda:0", True), ("auto", "cpu", False), ("auto", "mps", False),
    (True, "cpu", True), (False, "cuda:0", False),
])
def test_compile_auto_means_on_cuda_only(setting, device, expected):
    """The decision only a GPU run takes, checked here (gpu_check.sh's runs take it on CUDA)."""
    assert hardware.compiles(setting, torch.device(device)) is expected
