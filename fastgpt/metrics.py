"""Throughput and model FLOPs utilisation (MFU) against the device's peak.

MFU = (model FLOPs per token x tokens per second) / peak FLOP/s, with the model's FLOPs counted as
in the PaLM paper (appendix B): 6 per parameter per token plus attention's 12 * n_layer * n_embd * T.
The peak is the datasheet's dense figure on a known GPU, and on a CPU the machine's own measured
matmul rate for the dtype in use: a CPU has no datasheet number that means anything across VMs,
core counts and BLAS builds, so we measure one, once, and cache it.
"""

from __future__ import annotations

import json
import os
import platform
import time

import psutil
import torch

from fastgpt.assets import atomic_writer, cache_dir

# Dense (no sparsity) tensor-core peaks in FLOP/s from the vendors' datasheets, for bf16/fp16 and
# for fp32 matmuls (which run as TF32 where torch allows it, as fastgpt sets). The first name
# contained in torch.cuda.get_device_name() wins, so the more specific names come first.
GPU_PEAK_FLOPS = (
    # name,          bf16/fp16,  fp32 (TF32)
    ("H200", 989e12, 494e12),
    ("H100 PCIe", 756e12, 378e12),
    ("H100", 989e12, 494e12),  # SXM
    ("A100", 312e12, 156e12),
    ("A10G", 70e12, 35e12),  # AWS's A10G (not NVIDIA's A10 datasheet)
    ("A10", 125e12, 62.5e12),
    ("L40S", 362e12, 183e12),
    ("L4", 121e12, 60e12),
    ("RTX 4090", 165e12, 82.6e12),
    ("RTX 3090", 71e12, 35.6e12),
    ("V100", 125e12, 15.7e12),  # fp16 tensor cores; no bf16, no TF32
    ("T4", 65e12, 8.1e12),
)
# CPU peak measurement: square matmuls this large reach the BLAS's steady state on a laptop or a
# server; repeated for at least this long, best rate kept (the least disturbed run).
CPU_PEAK_MATMUL_SIZE = 1024
CPU_PEAK_SECONDS = 0.5
PEAK_CACHE_FILE = "peak_flops.json"


def gpu_peak_flops(device_name: str, dtype: torch.dtype) -> float | None:
    """Datasheet peak of a known GPU for this autocast dtype, or None if the GPU is not listed."""
    for name, half, fp32 in GPU_PEAK_FLOPS:
        if name in device_name:
            return half if dtype in (torch.bfloat16, torch.float16) else fp32
    return None


def measure_matmul_flops(dtype: torch.dtype, size: int = CPU_PEAK_MATMUL_SIZE, seconds: float = CPU_PEAK_SECONDS) -> float:
    """Best observed FLOP/s of a (size x size) @ (size x size) matmul on the CPU in `dtype`."""
    a = torch.randn(size, size).to(dtype)
    b = torch.randn(size, size).to(dtype)
    out = torch.empty(size, size, dtype=dtype)
    torch.mm(a, b, out=out)  # warm-up: thread pool, BLAS kernel selection
    best = float("inf")
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        t = time.perf_counter()
        torch.mm(a, b, out=out)
        best = min(best, time.perf_counter() - t)
    return 2 * size**3 / best


def _cpu_key(dtype: torch.dtype) -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return f"{cpu}|threads={torch.get_num_threads()}|torch={torch.__version__}|{dtype}"


def cpu_peak_flops(dtype: torch.dtype) -> float:
    """This machine's matmul FLOP/s in `dtype`, measured once per (CPU, threads, torch, dtype) and
    cached in the user's cache folder."""
    path = cache_dir() / PEAK_CACHE_FILE
    key = _cpu_key(dtype)
    try:
        cache = json.loads(path.read_text())
    except (OSError, ValueError):
        cache = {}
    if key not in cache:
        cache[key] = measure_matmul_flops(dtype)
        try:
            with atomic_writer(path, "w") as f:
                json.dump(cache, f, indent=1)
        except OSError:
            pass  # a read-only cache costs a re-measurement next run, nothing else
    return float(cache[key])


def peak_flops(device: torch.device, dtype: torch.dtype) -> float | None:
    """Peak FLOP/s to measure MFU against, or None when unknown (an unlisted GPU, MPS)."""
    if device.type == "cuda":
        return gpu_peak_flops(torch.cuda.get_device_name(device), dtype)
    if device.type == "cpu":
        return cpu_peak_flops(dtype)
    return None


def describe_peak(device: torch.device, dtype: torch.dtype, peak: float | None) -> str:
    if peak is None:
        return f"MFU: no peak known for {device}; MFU not reported"
    source = "datasheet" if device.type == "cuda" else "measured matmul, cached"
    return f"MFU against {peak / 1e12:.3g} TFLOP/s {str(dtype).removeprefix('torch.')} peak ({source})"


def host_summary() -> dict:
    """Versions and hardware, logged with each run so its numbers can be reproduced."""
    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "cpu_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
    return info
