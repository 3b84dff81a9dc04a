"""The machine a run computes on: its device, autocast dtype and gradient scaling, whether it
compiles, the host's description, and the peak FLOP/s that MFU is measured against.

The peak is the datasheet's dense figure on a known GPU, and on a CPU the machine's own measured
matmul rate for the dtype in use: a CPU has no datasheet number that means anything across VMs,
core counts and BLAS builds, so we measure one, once, and cache it."""

from __future__ import annotations

import contextlib
import ctypes
import importlib.metadata
import json
import os
import platform
import re
import sys
import time

import psutil
import torch

from fastgpt.distributed import indexed_device
from fastgpt.errors import FastgptError
from fastgpt.fileio import atomic_writer, cache_dir

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# The device types the trainer and the sampler are written for; torch knows others ('meta' has no data at all).
DEVICE_TYPES = ("cpu", "cuda", "mps")
# On a CPU, autocast to bf16 only where the instruction set multiplies bf16 natively (x86's
# AVX512-BF16 or AMX, as /proc/cpuinfo names them): elsewhere oneDNN emulates bf16 and the step
# runs slower than in fp32.
CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")
# glibc's mallopt parameters (malloc.h): the number of blocks it may mmap, and the free space at the
# top of the heap past which it returns memory to the OS (a C int: 2 GiB at most).
MALLOC_MMAP_MAX, MALLOC_TRIM_THRESHOLD = -4, -1
MALLOC_NEVER_TRIM = 2**31 - 1

# Dense (no sparsity) tensor-core peaks in FLOP/s from the vendors' datasheets, for bf16/fp16 and
# for fp32 matmuls (which run as TF32 where torch allows it, as fastgpt sets), per GPU class. A
# class is recognised by whole words of torch.cuda.get_device_name() ("NVIDIA L40" is not an L4),
# and the class naming the most words wins ("NVIDIA H100 NVL" is an H100 NVL, not an H100 SXM).
GPU_PEAK_FLOPS = {
    # class: (words of its device name, bf16/fp16, fp32 (TF32))
    "H200": (("H200",), 989e12, 494e12),  # SXM
    "H200 NVL": (("H200", "NVL"), 835e12, 418e12),
    "GH200": (("GH200",), 989e12, 494e12),
    "H100 SXM": (("H100",), 989e12, 494e12),  # torch names it "NVIDIA H100 80GB HBM3"
    "H100 PCIe": (("H100", "PCIe"), 756e12, 378e12),
    "H100 NVL": (("H100", "NVL"), 835e12, 418e12),
    "A100": (("A100",), 312e12, 156e12),  # SXM and PCIe alike
    "A10G": (("A10G",), 70e12, 35e12),  # AWS's A10G (not NVIDIA's A10 datasheet)
    "A10": (("A10",), 125e12, 62.5e12),
    "L40S": (("L40S",), 362e12, 183e12),
    "L40": (("L40",), 181e12, 90.5e12),
    "L4": (("L4",), 121e12, 60e12),
    "RTX 4090": (("RTX", "4090"), 165e12, 82.6e12),
    "RTX 3090": (("RTX", "3090"), 71e12, 35.6e12),
    "V100": (("V100",), 125e12, 15.7e12),  # fp16 tensor cores; no bf16, no TF32
    "T4": (("T4",), 65e12, 8.1e12),
}
# CPU peak measurement: square matmuls this large reach the BLAS's steady state on a laptop or a
# server; run untimed for a while first (clocks and the thread pool ramp up), then repeated for at
# least CPU_PEAK_SECONDS, best rate kept (the least disturbed run): on a shared VM single runs
# vary widely, and a short measurement understates the peak until MFU reads above 100%.
CPU_PEAK_MATMUL_SIZE = 1024
CPU_PEAK_WARMUP_SECONDS = 0.25
CPU_PEAK_SECONDS = 1.5
CPU_PEAK_METHOD = "best-of-1.5s"  # in the cache key: a change of method measures again
PEAK_CACHE_FILE = "peak_flops.json"

class RuntimeConfigError(FastgptError):
    """The requested device or dtype cannot run here; one line for the user."""


def resolve_device(name: str) -> torch.device:
    """'auto' -> cuda, else mps, else cpu; an explicit device must exist. A GPU comes back with
    its index ('cuda' -> cuda:N, the current device), so the log names the one in use."""
    if name == "auto":
        if torch.cuda.is_available():
            return indexed_device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in DEVICE_TYPES:
        raise RuntimeConfigError(f"device={name!r} is not a device; use 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeConfigError(f"device={name!r} but CUDA is not available here; use --device=cpu or 'auto'")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        count = torch.cuda.device_count()
        raise RuntimeConfigError(
            f"device={name!r} but this machine has {count} CUDA device(s), cuda:0..cuda:{count - 1}; "
            "pick one of them or 'cuda'"
        )
    if device.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise RuntimeConfigError(f"device={name!r} but MPS is not available here; use --device=cpu or 'auto'")
    return indexed_device(device)


def cpu_flags() -> set[str]:
    """The CPU's feature flags (/proc/cpuinfo); empty where the OS does not list them."""
    return set((cpuinfo("flags") or "").split())


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """The autocast dtype: 'auto' picks the fastest the device runs natively, from what the
    device reports (no measurement, no files)."""
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        if device.type == "cpu" and cpu_flags() & set(CPU_BF16_FLAGS):
            return torch.bfloat16
        return torch.float32
    dtype = DTYPES[name]
    if dtype is torch.bfloat16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise RuntimeConfigError(f"dtype='bfloat16' but {torch.cuda.get_device_name(device)} lacks bf16; use 'float16'")
    return dtype


def compiles(setting: bool | str, device: torch.device) -> bool:
    """Whether the run torch.compiles its model: True, False, or 'auto' = on CUDA only (on a CPU
    inductor's compile outlasts what it saves in a short run)."""
    return setting is True or (setting == "auto" and device.type == "cuda")


def autocast(device: torch.device, dtype: torch.dtype):
    """Mixed precision for the forward pass; a no-op context in fp32."""
    if dtype is torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def grad_scaler(device: torch.device, dtype: torch.dtype) -> torch.amp.GradScaler:
    """fp16 gradients underflow without loss scaling; bf16 and fp32 need none (disabled scaler)."""
    return torch.amp.GradScaler(device.type, enabled=dtype is torch.float16)


def configure_backends(device: torch.device) -> None:
    """TF32 for fp32 matmuls on Ampere and later: 8x the tensor-core rate, fp32 range. On a CPU,
    freed memory stays with the process (keep_freed_memory)."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if device.type == "cpu":
        keep_freed_memory()


def keep_freed_memory() -> bool:
    """Have glibc's malloc serve every block from its heap and never hand freed memory back to the
    OS. By default each block over 32 MB (less, before glibc's threshold adapts) is a fresh mmap
    and its free an munmap, so every training step page-faults its large activations and
    gradients in again (zeroing GPT-2's embedding gradient is then mostly page faults). From the
    heap, later steps mostly reuse pages already mapped (tests/test_hardware.py counts the faults),
    as torch's CUDA allocator caches blocks; the resident size stays at the step's peak instead of
    dropping between steps. Returns whether the setting took (False off glibc: macOS, musl)."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    return bool(libc.mallopt(MALLOC_MMAP_MAX, 0) and libc.mallopt(MALLOC_TRIM_THRESHOLD, MALLOC_NEVER_TRIM))


def gpu_class(device_name: str) -> str | None:
    """The GPU_PEAK_FLOPS class of a torch.cuda.get_device_name() ("NVIDIA H100 PCIe" -> "H100
    PCIe"), or None for a GPU not listed."""
    words = set(re.findall(r"[a-z0-9]+", device_name.lower()))
    known = [name for name, (needs, _, _) in GPU_PEAK_FLOPS.items() if {w.lower() for w in needs} <= words]
    return max(known, key=lambda name: len(GPU_PEAK_FLOPS[name][0]), default=None)


def gpu_peak_flops(device_name: str, dtype: torch.dtype) -> float | None:
    """Datasheet peak of a known GPU for this autocast dtype, or None if the GPU is not listed."""
    name = gpu_class(device_name)
    if name is None:
        return None
    _, half, fp32 = GPU_PEAK_FLOPS[name]
    return half if dtype in (torch.bfloat16, torch.float16) else fp32


def measure_matmul_flops(dtype: torch.dtype, size: int = CPU_PEAK_MATMUL_SIZE, seconds: float = CPU_PEAK_SECONDS) -> float:
    """Best observed FLOP/s of a (size x size) @ (size x size) matmul on the CPU in `dtype`."""
    # Its own generator: the trainer measures after seeding (or restoring) the global one, and a
    # cache miss must not shift the dropout masks of the run that follows.
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, generator=gen).to(dtype)
    b = torch.randn(size, size, generator=gen).to(dtype)
    out = torch.empty(size, size, dtype=dtype)
    start = time.perf_counter()
    while time.perf_counter() - start < CPU_PEAK_WARMUP_SECONDS:  # thread pool, BLAS kernel choice, clocks
        torch.mm(a, b, out=out)
    best = float("inf")
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        t = time.perf_counter()
        torch.mm(a, b, out=out)
        best = min(best, time.perf_counter() - t)
    return 2 * size**3 / best


def cpuinfo(field: str) -> str | None:
    """The first `field` line of Linux's /proc/cpuinfo, or None where there is none."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith(field)), None)
    except OSError:
        return None


def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo), else what platform knows of it."""
    return cpuinfo("model name") or platform.processor() or platform.machine()


def _cpu_key(dtype: torch.dtype) -> str:
    return f"{cpu_name()}|threads={torch.get_num_threads()}|torch={torch.__version__}|{dtype}|{CPU_PEAK_METHOD}"


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
        "torch": str(torch.__version__),  # a str subclass that a weights_only load refuses
        "triton": _version_of("triton"),
        "cuda": torch.version.cuda,  # the CUDA torch was built with; None for a CPU build
        "platform": platform.platform(),
        "cpu": cpu_name(),
        "cpu_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def _version_of(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def peak_memory(device: torch.device) -> tuple[int | None, str]:
    """(bytes, what was measured): the CUDA allocator's peak on CUDA, else the process's peak RSS
    (torch, Python and the data included), or None where the OS does not report it."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device), "torch.cuda.max_memory_allocated"
    try:
        import resource  # POSIX only
    except ImportError:
        return None, "not reported on this OS"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss * (1 if sys.platform == "darwin" else 1024), "peak RSS of the process"  # macOS: bytes, Linux: KiB


def describe_memory(device: torch.device) -> str:
    mem, source = peak_memory(device)
    return f"peak memory {mem / 2**20:,.1f} MiB ({source})" if mem is not None else f"peak memory {source}"
