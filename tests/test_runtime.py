"""fastgpt.runtime: the CPU allocator setting that keeps freed memory with the process, and the dtype choice."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest
import torch

# A training-like loop: each step allocates and frees 32 MiB activations and gradients. Counts
# the page faults of four steps after two of warm-up.
SCRIPT = """
import resource, sys, torch
from fastgpt.runtime import keep_freed_memory
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
    from fastgpt import metrics, runtime

    monkeypatch.setattr(runtime, "cpu_flags", lambda: flags)
    monkeypatch.setattr(metrics, "measure_matmul_flops", lambda *a, **k: pytest.fail("resolve_dtype measured"))
    assert runtime.resolve_dtype("auto", torch.device("cpu")) is expected
