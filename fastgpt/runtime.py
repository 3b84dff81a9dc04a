"""Where and in what precision a run computes: device, autocast dtype, gradient scaling, seeds."""

from __future__ import annotations

import contextlib
import ctypes
import platform

import torch

from fastgpt.distributed import indexed_device
from fastgpt.metrics import cpuinfo

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


class RuntimeConfigError(ValueError):
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
    heap, later steps mostly reuse pages already mapped (tests/test_runtime.py counts the faults),
    as torch's CUDA allocator caches blocks; the resident size stays at the step's peak instead of
    dropping between steps. Returns whether the setting took (False off glibc: macOS, musl)."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    return bool(libc.mallopt(MALLOC_MMAP_MAX, 0) and libc.mallopt(MALLOC_TRIM_THRESHOLD, MALLOC_NEVER_TRIM))
