"""fastgpt.runtime: the CPU allocator setting that keeps freed memory with the process."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

# Allocates a 64 MiB tensor (every page written), frees it, and counts the page faults of a second
# one: with freed memory kept, the second reuses the first's pages.
SCRIPT = """
import resource, sys, torch
from fastgpt.runtime import keep_freed_memory
took = keep_freed_memory() if sys.argv[1] == "keep" else None
x = torch.ones(2**24); del x
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
y = torch.ones(2**24)
print(took, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""
PAGES_64_MIB = 2**26 // 4096


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc's malloc")
def test_freed_memory_is_reused_without_page_faults():
    faults = {}
    for mode in ("default", "keep"):
        out = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, timeout=120, check=True)
        took, faults[mode] = out.stdout.split()
        if mode == "keep":
            assert took == "True"
        faults[mode] = int(faults[mode])
    assert faults["default"] > 0.9 * PAGES_64_MIB  # a fresh mmap: every page faults in again
    assert faults["keep"] < 0.05 * PAGES_64_MIB
