"""Throughput, model FLOPs utilisation (MFU) against the device's peak, and the run's metrics log.

MFU = (model FLOPs per token x tokens per second) / peak FLOP/s, with the model's FLOPs counted as
in the PaLM paper (appendix B): 6 per parameter per token plus attention's 12 * n_layer * n_embd * T.
The peak is the datasheet's dense figure on a known GPU, and on a CPU the machine's own measured
matmul rate for the dtype in use: a CPU has no datasheet number that means anything across VMs,
core counts and BLAS builds, so we measure one, once, and cache it.

ThroughputMeter turns the loop's log points into records (ms/iter, tok/s, MFU, data-wait share,
peak memory, ETA); MetricsLog appends them to out_dir/metrics.jsonl, one JSON object a line.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import math
import os
import pathlib
import platform
import re
import sys
import time

import psutil
import torch

from fastgpt.assets import atomic_writer, cache_dir

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
METRICS_FILE = "metrics.jsonl"
# The ETA's smoothing, per iteration: each iteration's time weighs 1% in the moving average, so
# the ETA follows the last ~100 iterations whatever log_interval is, and one slow step barely moves it.
ETA_BETA = 0.99


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


def format_eta(seconds: float) -> str:
    """1h02m, 6m10s, 42s."""
    s = max(0, round(seconds))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    if s >= 60:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s}s"


def evals_left(iter_num: int, max_iters: int, eval_interval: int) -> int:
    """Evaluations the loop still runs after iteration iter_num: at each multiple of eval_interval
    up to max_iters, and at max_iters itself."""
    return max_iters // eval_interval - iter_num // eval_interval + (1 if max_iters % eval_interval else 0)


class ThroughputMeter:
    """Timing between log points. `start()` before the loop, `pause()`/`resume()` around each
    evaluation (kept out of every rate), `with meter.data():` around each batch fetch, and
    `tick(iter_num, loss, lr)` at each log point, which returns the metrics record of the window.

    The ETA is the iterations left times a moving average of the time per iteration (ETA_BETA),
    plus the evaluations left times the mean evaluation (and checkpoint) time so far. The first
    window holds one-time costs (compile, warm-up), so the second one reseeds the average."""

    def __init__(self, tokens_per_iter: int, flops_per_iter: float, peak: float | None, max_iters: int,
                 eval_interval: int, device: torch.device, clock=time.perf_counter):
        self.tokens_per_iter, self.flops_per_iter, self.peak, self.device = tokens_per_iter, flops_per_iter, peak, device
        self.max_iters, self.eval_interval, self.clock = max_iters, eval_interval, clock
        self.avg_iter_s: float | None = None
        self.windows = self.evals = 0
        self.eval_s = self.data_s = 0.0

    def start(self, iter_num: int, elapsed: float = 0.0) -> None:
        """`elapsed`: seconds an earlier segment of this run took (a resume continues its clock)."""
        self.t_process = self.clock()
        self.t_start = self.t_window = self.t_process - elapsed
        self.first_iter = self.last_iter = iter_num

    def elapsed(self) -> float:
        return self.clock() - self.t_start

    def pause(self) -> None:
        self.t_pause = self.clock()

    def resume(self) -> None:
        now = self.clock()
        self.eval_s += now - self.t_pause
        self.evals += 1
        self.t_window += now - self.t_pause  # the window's clock skips the evaluation

    @contextlib.contextmanager
    def data(self):
        t = self.clock()
        yield
        self.data_s += self.clock() - t

    def tick(self, iter_num: int, loss: float, lr: float) -> dict:
        now = self.clock()
        iters, wall = iter_num - self.last_iter, now - self.t_window
        per_iter = wall / iters
        weight = 1.0 if self.windows < 2 else 1 - ETA_BETA**iters  # windows 1 and 2 seed the average
        self.avg_iter_s = per_iter if self.avg_iter_s is None else self.avg_iter_s + weight * (per_iter - self.avg_iter_s)
        eval_s = self.eval_s / self.evals if self.evals else 0.0
        eta = (self.max_iters - iter_num) * self.avg_iter_s + evals_left(iter_num, self.max_iters, self.eval_interval) * eval_s
        record = {
            "kind": "train", "iter": iter_num, "loss": loss, "lr": lr,
            "ms_per_iter": per_iter * 1000, "tokens_per_s": self.tokens_per_iter / per_iter,
            "mfu": self.flops_per_iter / per_iter / self.peak if self.peak else None,
            "data_wait": self.data_s / wall if wall > 0 else 0.0, "peak_mem_bytes": peak_memory(self.device)[0],
            "elapsed_s": now - self.t_start, "eta_s": eta,
        }
        self.windows += 1
        self.t_window, self.last_iter, self.data_s = now, iter_num, 0.0
        return record

    def summary(self, iter_num: int, best_val_loss: float) -> str:
        """The run's last line: this process's iterations and seconds, best val loss, peak memory."""
        total = self.clock() - self.t_process
        return (f"done: {iter_num - self.first_iter} iterations in {total:.1f} s ({total - self.eval_s:.1f} s training, "
                f"{self.eval_s:.1f} s evaluating and saving); best val loss {best_val_loss:.4f}; {describe_memory(self.device)}")


def format_log_line(record: dict) -> str:
    """iter 1000: loss 1.6423, lr 1.76e-03, 146.7 ms/iter, 27,928 tok/s, mfu 48.5%, eta 6m10s"""
    mfu = f", mfu {record['mfu']:.1%}" if record["mfu"] is not None else ""
    return (f"iter {record['iter']}: loss {record['loss']:.4f}, lr {record['lr']:.2e}, {record['ms_per_iter']:.1f} ms/iter, "
            f"{record['tokens_per_s']:,.0f} tok/s{mfu}, eta {format_eta(record['eta_s'])}")


def metrics_path(out_dir: str | os.PathLike) -> pathlib.Path:
    return pathlib.Path(out_dir) / METRICS_FILE


def _finite_or_none(value):
    return None if isinstance(value, float) and not math.isfinite(value) else value


class MetricsLog:
    """Appends records to out_dir/metrics.jsonl, one JSON object a line, each flushed as it is
    written so a crash keeps every line before it. A resume appends to the same file. Non-finite
    numbers (a diverged loss) are written as null, so every line is strict JSON. A no-op when
    disabled (ranks other than 0)."""

    def __init__(self, out_dir: str | os.PathLike, enabled: bool = True):
        self.path = metrics_path(out_dir)
        self.file = None
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.file = open(self.path, "a", encoding="utf-8")
            if _ends_mid_line(self.path):
                self.file.write("\n")  # a line cut off by a crash: the next record starts a line of its own

    def write(self, record: dict) -> None:
        if self.file is not None:
            self.file.write(json.dumps({k: _finite_or_none(v) for k, v in record.items()}) + "\n")
            self.file.flush()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None


def _ends_mid_line(path: pathlib.Path) -> bool:
    """Whether a file's last byte is not a newline, read alone (the log grows through a long run)."""
    if path.stat().st_size == 0:
        return False
    with open(path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1) != b"\n"


def read_metrics(path: str | os.PathLike) -> tuple[list[dict], int]:
    """(the records of a metrics.jsonl, how many lines were not records and were skipped): a line
    cut off by a crash is skipped, not fatal."""
    records, skipped = [], 0
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError:
                record = None
            if isinstance(record, dict) and "kind" in record and isinstance(record.get("iter"), int):
                records.append(record)
            else:
                skipped += 1
    return records, skipped


def elapsed_before(path: str | os.PathLike, iter_num: int) -> float:
    """The elapsed_s of the last record at or before iter_num in a metrics.jsonl (0 without one):
    where a run resumed from iteration iter_num goes on counting."""
    records = read_metrics(path)[0] if os.path.exists(path) else []
    times = [r["elapsed_s"] for r in records if r["iter"] <= iter_num and isinstance(r.get("elapsed_s"), (int, float))]
    return times[-1] if times else 0.0
