"""What every benchmark file shares: the size of the run, peak memory, the results file and the
ratio table printed at the end of a session.

Sizes follow the device: "gpu" (GPT-2 124M shapes in bf16) on CUDA, "cpu" (shapes a 2-core CPU
runs in minutes) elsewhere; FASTGPT_BENCH_SIZE=cpu|gpu picks the other.

Results: every benchmark appends one JSON line to FASTGPT_BENCH_RESULTS (default
bench/results.jsonl) when it ends: suite, provider, shape, median/p20/p80 seconds, device, dtype,
versions, git commit, time and the benchmark's extra_info, so runs on other machines and days
can be compared (`python -m bench.plot` draws them). The committed bench/results.jsonl takes rows
only from a clean checkout: a '+dirty' (or unknown) commit names code nobody can check out again,
so such a session writes there nothing (FASTGPT_BENCH_RESULTS keeps its rows elsewhere).

Ratios: each suite names the pairs it is judged by (SUITE_PAIRS): fastgpt's provider against
each baseline, compiled ones included, since nanoGPT compiles by default. The table prints one
row per pair, naming both sides, and divides medians of the same run, so drift between runs
cancels; it shows the wider p20-p80 spread of the two, within which a speedup is noise.
"""

from __future__ import annotations

import datetime
import json
import os
import pathlib
import platform

import torch

from fastgpt.hardware import cpu_name
from fastgpt.profiling import cpu_peak_allocated_bytes
from fastgpt.outdir import git_commit

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
SIZE_ENV = "FASTGPT_BENCH_SIZE"
SIZES = ("cpu", "gpu")
SIZE = os.environ.get(SIZE_ENV, "gpu" if CUDA else "cpu")
if SIZE not in SIZES:
    raise ValueError(f"{SIZE_ENV}={SIZE!r} is not a size; use one of {', '.join(SIZES)}")
LARGE = SIZE == "gpu"
RESULTS_ENV = "FASTGPT_BENCH_RESULTS"
DEFAULT_RESULTS = pathlib.Path(__file__).resolve().parent / "results.jsonl"
DIRTY = "+dirty"  # fastgpt.rundir.git_commit's mark of a tree with uncommitted changes
# suite -> [(fastgpt's provider, a baseline it is compared with), ...]; a claim against the eager
# baseline alone would flatter fastgpt where torch.compile closes the gap
SUITE_PAIRS = {
    "train_step": [("fastgpt", "reference"), ("fastgpt", "reference-compiled")],
    "next_batch": [("prefetcher", "nanogpt")],
    "adamw": [("fastgpt", "default"), ("fastgpt", "fused"), ("fastgpt", "compiled")],
    "linear_cross_entropy": [("fastgpt", "eager"), ("fastgpt", "compiled"), ("triton", "compiled"),
                             ("fp8", "compiled")],
    "layer_norm": [("triton", "eager"), ("triton", "compiled")],
    "load_gpt2": [("fastgpt", "transformers")],
    "checkpoint_stall": [("background", "synchronous")],
}


def sync() -> None:
    if CUDA:
        torch.cuda.synchronize()  # CPU-GPU sync: time the work, not its launch


def peak_memory_bytes(fn) -> int:
    """Peak memory one call of fn allocates beyond what was live before it: on CUDA the
    allocator's high-water mark; on a CPU the running sum of torch's allocation and free events
    under the profiler (fastgpt.profiling.cpu_peak_allocated_bytes)."""
    if CUDA:
        sync()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        fn()
        sync()
        return torch.cuda.max_memory_allocated() - start
    return cpu_peak_allocated_bytes(fn)


def traceable(commit: str | None) -> bool:
    """Whether a row from `commit` can be traced to code: a commit without uncommitted changes."""
    return commit is not None and not commit.endswith(DIRTY)


def results_path(commit: str | None) -> tuple[pathlib.Path | None, str]:
    """(the file this session's rows go to, or None; a line saying where they went and why)."""
    chosen = os.environ.get(RESULTS_ENV)
    path = pathlib.Path(chosen) if chosen else DEFAULT_RESULTS
    if path.resolve() == DEFAULT_RESULTS.resolve() and not traceable(commit):
        return None, (f"results not appended to {DEFAULT_RESULTS}: commit {commit} is not a clean checkout; commit "
                      f"first, or set {RESULTS_ENV}=PATH to keep them elsewhere")
    return path, f"results appended to {path}; python -m bench.plot draws them"


def _device_name() -> str:
    if CUDA:
        return torch.cuda.get_device_name()
    return f"{cpu_name()} x{torch.get_num_threads()} threads"


def _versions() -> dict:
    versions = {"python": platform.python_version(), "torch": torch.__version__}
    try:
        import triton

        versions["triton"] = triton.__version__
    except ImportError:
        pass
    if CUDA:
        versions["cuda"] = torch.version.cuda
    return versions


class Session:
    """The results of one pytest session: appended to the results file as each ends, and the
    ratio table at the end."""

    def __init__(self):
        self.started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        self.context = {"run": self.started, "device": _device_name(), "size": SIZE, "versions": _versions(),
                        "commit": git_commit()}
        self.records: list[dict] = []
        self.results_path, self.results_note = results_path(self.context["commit"])

    def add(self, name: str, params: dict, stats, extra: dict) -> dict:
        """One benchmark's record (stats: pytest-benchmark's Stats, seconds a round)."""
        data = sorted(stats.data)
        quantile = lambda q: data[min(len(data) - 1, int(q * len(data)))]  # noqa: E731
        params = dict(params or {})
        provider = str(params.pop("provider", extra.get("provider", "-")))
        record = {
            **self.context,
            "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "suite": extra.get("suite", name.split("[")[0].removeprefix("test_")),
            "test": name,
            "provider": provider,
            "shape": extra.get("shape_name") or _shape_text(params, extra),
            "dtype": extra.get("dtype"),
            "median_s": stats.median,
            "p20_s": quantile(0.2),
            "p80_s": quantile(0.8),
            "rounds": stats.rounds,
            "extra": extra,
        }
        self.records.append(record)
        if self.results_path is not None:
            with open(self.results_path, "a") as f:
                f.write(json.dumps(record, default=str) + "\n")
        return record

    def table(self) -> list[str]:
        return ratio_table(self.records)


def _shape_text(params: dict, extra: dict) -> str:
    parts = [f"{k}={v}" for k, v in sorted(params.items())]
    if "shape" in extra:
        parts.insert(0, "x".join(map(str, extra["shape"])))
    return " ".join(parts) or "-"


def _fmt_rate(value) -> str:
    return "-" if value is None else f"{value:,.0f}"


def ratio_table(records: list[dict]) -> list[str]:
    """Lines of the table: per suite, shape and pair, fastgpt's median against the baseline's,
    from the same run. A pair with a side missing (a provider skipped on this device) is listed
    as such, never as a ratio; a shape where no pair's provider ran (a sweep of one provider's
    settings) is left out."""
    by_key: dict[tuple, dict[str, dict]] = {}
    for r in records:
        by_key.setdefault((r["suite"], r["shape"]), {})[r["provider"]] = r
    lines = [f"{'suite':<22} {'shape':<34} {'ours / baseline':<30} {'ms':>19} {'speedup':>8} {'spread':>7} "
             f"{'tokens/s':>19} {'mfu':>13} {'peak MB':>15}"]
    for (suite, shape), providers in sorted(by_key.items()):
        pairs = SUITE_PAIRS.get(suite, [])
        if not any(name in providers for pair in pairs for name in pair):
            continue
        for ours_name, base_name in pairs:
            lines.append(_pair_row(suite, shape, ours_name, base_name, providers))
    if any((r["extra"].get("mfu") or 0) > 1 for r in records):
        lines.append("mfu above 100%: the CPU's matmul peak was measured while the machine was busy; delete "
                     "peak_flops.json in fastgpt's cache folder ($FASTGPT_CACHE_DIR or ~/.cache/fastgpt) to measure it again")
    return lines


def _pair_row(suite: str, shape: str, ours_name: str, base_name: str, providers: dict[str, dict]) -> str:
    names = f"{ours_name} / {base_name}"
    head = f"{suite:<22} {shape[:34]:<34} {names:<30}"
    ours, base = providers.get(ours_name), providers.get(base_name)
    if ours is None or base is None:
        missing = " and ".join(n for n, r in ((ours_name, ours), (base_name, base)) if r is None)
        return f"{head} {missing} not run on this device"
    pair = (ours, base)
    ms = " / ".join(f"{r['median_s'] * 1e3:.4g}" for r in pair)
    toks = " / ".join(_fmt_rate(r["extra"].get("tokens_per_s")) for r in pair)
    mfus = [r["extra"].get("mfu") for r in pair]
    mfu = " / ".join("-" if m is None else f"{m:.1%}" for m in mfus)
    peaks = [r["extra"].get("peak_mb") for r in pair]
    peak = " / ".join("-" if p is None else f"{p:,.0f}" for p in peaks)
    speedup = base["median_s"] / ours["median_s"]
    # the wider p20-p80 range of the two, relative to its median: a speedup inside it is noise
    spread = max((r["p80_s"] - r["p20_s"]) / r["median_s"] for r in pair)
    return f"{head} {ms:>19} {speedup:>7.2f}x {spread:>7.0%} {toks:>19} {mfu:>13} {peak:>15}"
