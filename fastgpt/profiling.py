"""`--profile`: torch.profiler around a few real training steps, and a summary of where they went.

    python -m fastgpt.train configs/shakespeare_char.py --profile
    python -m fastgpt.train configs/owt.py --profile --profile_active=5

The schedule skips `profile_wait` steps, traces `profile_warmup` more and discards them, then
records `profile_active` steps. Every rank writes, into out_dir/profile/ (the rank in each name):
  trace_rank{R}.json.gz                  Chrome trace: ui.perfetto.dev or chrome://tracing
  tensorboard/rank{R}.*.pt.trace.json.gz tensorboard_trace_handler's files: tensorboard --logdir
  memory_rank{R}.pickle                  on CUDA, the allocator's history: pytorch.org/memory_viz
The training loop names its phases with `region()` ("data", "forward", "backward",
"optimizer"); the summary gives each one's share of the recorded steps.
"""

from __future__ import annotations

import contextlib
import pathlib
import shutil

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, record_function

from fastgpt.config import ConfigError, TrainConfig
from fastgpt.hardware import describe_memory

REGIONS = ("data", "forward", "backward", "optimizer")
TOP_OPS = 12  # rows of the operator tables
MEMORY_HISTORY_ENTRIES = 100_000  # allocator events the snapshot keeps (the memory_viz guide's figure; torch keeps all)


class StepProfiler:
    """`with StepProfiler(...) as prof:` then `prof.step()` after every training step until
    `prof.done`; `prof.report()` is the summary. Disabled (cfg.profile False), `region()` is a
    plain record_function (a few microseconds, and visible to any outside profiler) and `step()`
    does nothing."""

    def __init__(self, cfg: TrainConfig, device: torch.device, rank: int, steps_left: int):
        self.enabled, self.device, self.rank = cfg.profile, device, rank
        self.dir = pathlib.Path(cfg.out_dir) / "profile"
        self.wait, self.warmup, self.active = cfg.profile_wait, cfg.profile_warmup, cfg.profile_active
        self.done, self.files, self.summary = False, [], ""
        needed = self.wait + self.warmup + self.active
        if self.enabled and steps_left < needed:
            raise ConfigError(
                f"profile needs {needed} training steps (profile_wait+profile_warmup+profile_active) but only "
                f"{steps_left} remain before max_iters={cfg.max_iters}; raise max_iters"
            )
        self._cuda = self.enabled and device.type == "cuda"
        self._prof = None

    def __enter__(self) -> StepProfiler:
        if not self.enabled:
            return self
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self._cuda else [])
        schedule = torch.profiler.schedule(wait=self.wait, warmup=self.warmup, active=self.active, repeat=1)
        self._prof = torch.profiler.profile(activities=activities, schedule=schedule, on_trace_ready=self._save,
                                            record_shapes=True, profile_memory=True)
        if self._cuda:
            torch.cuda.memory._record_memory_history(max_entries=MEMORY_HISTORY_ENTRIES)
        self._prof.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self._prof is not None:
            self._prof.__exit__(*exc)
            self._prof = None
        if self._cuda:
            torch.cuda.memory._record_memory_history(enabled=None)

    def region(self, name: str):
        """A named phase of the step. While profiling on CUDA it ends in a synchronize (a CPU-GPU
        sync), so that its span holds its kernels' time and the shares are wall time."""
        return self._synced(name) if self._cuda and not self.done else record_function(name)

    @contextlib.contextmanager
    def _synced(self, name: str):
        with record_function(name):
            yield
            torch.cuda.synchronize(self.device)

    def step(self) -> None:
        if self._prof is not None and not self.done:
            self._prof.step()  # after the last active step this calls _save

    def _save(self, prof: torch.profiler.profile) -> None:
        # A trace can be exported once; TensorBoard's file is a gzipped Chrome trace, so the
        # Chrome trace is a copy of it under a name that stays the same from run to run.
        tb_dir = self.dir / "tensorboard"
        torch.profiler.tensorboard_trace_handler(str(tb_dir), worker_name=f"rank{self.rank}", use_gzip=True)(prof)
        tb_trace = sorted(tb_dir.glob(f"rank{self.rank}.*.pt.trace.json.gz"))[-1]  # names end in time_ns
        chrome = self.dir / f"trace_rank{self.rank}.json.gz"
        shutil.copyfile(tb_trace, chrome)
        self.files.append((chrome, "Chrome trace: ui.perfetto.dev or chrome://tracing"))
        self.files.append((tb_trace, f"TensorBoard trace: tensorboard --logdir {tb_dir} (torch-tb-profiler plugin)"))
        if self._cuda:
            snapshot = self.dir / f"memory_rank{self.rank}.pickle"
            torch.cuda.memory._dump_snapshot(str(snapshot))
            self.files.append((snapshot, "CUDA memory snapshot: drag into pytorch.org/memory_viz"))
        self.summary = summarize(prof.key_averages(), self.active, self._cuda)
        self.done = True

    def report(self) -> str:
        """The summary, peak memory and where each file went (this rank's; the others' are alike)."""
        if not self.done:
            return "profile: the schedule did not finish; no traces written"
        lines = [self.summary, describe_memory(self.device)] + [f"wrote {path} ({what})" for path, what in self.files]
        return "\n".join(lines)


def summarize(averages, steps: int, cuda: bool) -> str:
    """Each region's share of the recorded steps and the top operators by self time, per step.
    `averages`: prof.key_averages(), which keeps host events and device events (kernels, copies,
    and the device-side copies of the regions) apart."""
    host = [e for e in averages if e.device_type == DeviceType.CPU]
    by_name = {e.key: e for e in host}
    step_us = sum(e.cpu_time_total for e in host if e.key.startswith("ProfilerStep")) or 1.0
    kind = "wall time, each region ending in a CUDA sync" if cuda else "CPU wall time"
    lines = [f"profile: {steps} step(s) recorded, {step_us / steps / 1e3:.2f} ms/step ({kind})",
             f"  {'region':<12}{'ms/step':>10}{'share':>9}"]
    region_us = {name: by_name[name].cpu_time_total if name in by_name else 0.0 for name in REGIONS}
    region_us["other"] = max(step_us - sum(region_us.values()), 0.0)  # lr, logging, the profiler itself
    for name, us in region_us.items():
        lines.append(f"  {name:<12}{us / steps / 1e3:>10.2f}{us / step_us:>9.1%}")
    host_ops = [e for e in host if e.key not in REGIONS and not e.key.startswith("ProfilerStep")]
    tables = [("CPU", host_ops, "self_cpu_time_total")]
    if cuda:
        kernels = [e for e in averages if e.device_type != DeviceType.CPU and not e.is_user_annotation]
        tables.append(("CUDA", kernels, "self_device_time_total"))
    for label, ops, attr in tables:
        total = sum(getattr(e, attr) for e in ops) or 1.0
        lines.append(f"top operators by self {label} time:")
        lines.append(f"  {'operator':<56}{'ms/step':>10}{'share':>9}{'calls/step':>12}")
        for e in sorted(ops, key=lambda e: getattr(e, attr), reverse=True)[:TOP_OPS]:
            us = getattr(e, attr)
            if us > 0:
                lines.append(f"  {e.key[:55]:<56}{us / steps / 1e3:>10.3f}{us / total:>9.1%}{e.count / steps:>12.1f}")
    return "\n".join(lines)


def cpu_peak_allocated_bytes(fn) -> int:
    """Peak of the bytes torch's CPU allocator holds while fn runs, above what it held before: the
    profiler's allocation and free events, summed in order. fn runs twice, counted the second
    time: a first profiled run can miss the free of a block allocated before profiling began
    (torch warns of a "block of unknown size"), which overstates its peak."""
    for _ in range(2):
        with torch.profiler.profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            fn()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"), key=lambda e: e.start_ns())
    live = peak = 0
    for e in events:
        live += e.nbytes()
        peak = max(peak, live)
    return peak
