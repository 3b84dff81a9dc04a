"""Throughput, model FLOPs utilisation (MFU) against the device's peak, and the run's metrics log.

MFU = (model FLOPs per token x tokens per second) / peak FLOP/s, with the model's FLOPs counted as
in the PaLM paper (appendix B): 6 per parameter per token plus attention's 12 * n_layer * n_embd * T.
The peak comes from fastgpt.hardware.

ThroughputMeter turns the loop's log points into records (ms/iter, tok/s, MFU, data-wait share,
peak memory, ETA). Reporter sends every number where it is kept: rank 0's console,
out_dir/metrics.jsonl (MetricsLog, one JSON object a line), the history `train()` returns, and
optionally Weights & Biases (Tracker, nanoGPT's `wandb_log` fields); at the end of a run the
losses are drawn from metrics.jsonl into loss.png (plot_losses; needs matplotlib).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import pathlib
import time
from typing import Callable

import torch

from fastgpt.checkpoint import OUT_DIR_HINT
from fastgpt.config import ConfigError, TrainConfig
from fastgpt.errors import FastgptError
from fastgpt.fileio import write_error
from fastgpt.hardware import describe_memory, peak_memory

METRICS_FILE = "metrics.jsonl"
LOSS_PLOT = "loss.png"
MISSING_MATPLOTLIB = "plot: matplotlib is not installed; pip install -e '.[plot]'"
FIGURE_INCHES = (12, 4.5)
DPI = 100
# The wall-time axis in the largest unit that still shows at least two of them.
TIME_UNITS = ((3600, "h"), (60, "min"), (1, "s"))


# The ETA's smoothing, per iteration: each iteration's time weighs 1% in the moving average, so
# the ETA follows the last ~100 iterations whatever log_interval is, and one slow step barely moves it.
ETA_BETA = 0.99


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
    """Timing between log points. `begin()` before the loop, `with meter.paused():` around each
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

    def begin(self, iter_num: int, elapsed: float = 0.0, eval_elapsed: float = 0.0) -> None:
        """`elapsed`: seconds the run's earlier segments took, `eval_elapsed` of them evaluating and
        saving (a resume continues both clocks)."""
        self.t_process = self.clock()
        self.t_start = self.t_window = self.t_process - elapsed
        self.first_iter = self.last_iter = iter_num
        self.eval_before, self.t_pause = eval_elapsed, None

    @contextlib.contextmanager
    def paused(self):
        self.t_pause = t_pause = self.clock()
        yield
        now = self.clock()
        self.eval_s += now - t_pause
        self.evals += 1
        self.t_window += now - t_pause  # the window's clock skips the evaluation
        self.t_pause = None

    def split_seconds(self) -> tuple[float, float]:
        """(training, evaluating and saving) seconds of the whole run so far; within paused(), up
        to the pause and with the evaluation in progress."""
        now = self.clock()
        paused = now - self.t_pause if self.t_pause is not None else 0.0
        evaluating = self.eval_before + self.eval_s + paused
        return now - self.t_start - evaluating, evaluating

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
            "elapsed_s": now - self.t_start, "eval_s": self.eval_before + self.eval_s, "eta_s": eta,
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
    disabled (ranks other than 0). A failed write (disk full) is a fileio.WriteError naming the file."""

    def __init__(self, out_dir: str | os.PathLike, enabled: bool = True):
        self.path = metrics_path(out_dir)
        self.file = None
        if enabled:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self.file = open(self.path, "a", encoding="utf-8")
                if _ends_mid_line(self.path):
                    self._append("\n")  # a line cut off by a crash: the next record starts a line of its own
            except OSError as e:
                raise write_error(self.path, e, OUT_DIR_HINT) from e

    def write(self, record: dict) -> None:
        if self.file is not None:
            self._append(json.dumps({k: _finite_or_none(v) for k, v in record.items()}) + "\n")

    def _append(self, text: str) -> None:
        try:
            self.file.write(text)
            self.file.flush()
        except OSError as e:
            raise write_error(self.path, e, OUT_DIR_HINT) from e

    def close(self) -> None:
        if self.file is not None:
            file, self.file = self.file, None
            try:
                file.close()  # flushes what a failed write left buffered: may fail again
            except OSError as e:
                raise write_error(self.path, e, OUT_DIR_HINT) from e

    def __enter__(self) -> "MetricsLog":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


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


def elapsed_before(path: str | os.PathLike, iter_num: int) -> tuple[float, float]:
    """(elapsed_s, eval_s) of the last record at or before iter_num in a metrics.jsonl that has
    them ((0, 0) without one; eval_s 0 where only elapsed_s was logged): where the clocks of a run
    resumed from iteration iter_num go on counting."""
    records = read_metrics(path)[0] if os.path.exists(path) else []
    times = [(r["elapsed_s"], r.get("eval_s") if isinstance(r.get("eval_s"), (int, float)) else 0.0)
             for r in records if r["iter"] <= iter_num and isinstance(r.get("elapsed_s"), (int, float))]
    return times[-1] if times else (0.0, 0.0)


# --- where the numbers go


class Tracker:
    """Sends metrics to W&B when `wandb_log` is on; does nothing otherwise."""

    def __init__(self, enabled: bool, project: str, run_name: str, config: dict):
        self.run = None
        if not enabled:
            return
        try:
            import wandb
        except ImportError as e:
            raise ConfigError("wandb_log=True needs the wandb package: pip install wandb, or set --wandb_log=False") from e
        self.run = wandb.init(project=project, name=run_name, config=config)

    def log(self, metrics: dict, step: int) -> None:
        if self.run is not None:
            self.run.log(metrics, step=step)

    def close(self) -> None:
        if self.run is not None:
            self.run.finish()


class Reporter:
    """One call per evaluation and per log step sends the numbers everywhere they are kept:
    the log line, metrics.jsonl, the history (iter, loss) / (iter, train, val), and W&B at
    evaluations, as nanoGPT logs it (with the last measured MFU)."""

    def __init__(self, log: Callable[[str], None], tracker: Tracker, cfg: TrainConfig, writes: bool, iter_num: int,
                 record: dict):
        """Opens cfg.out_dir/metrics.jsonl where `writes` (rank 0, not profiling) and writes its
        first record of this run (or of this resumed segment of it): the iteration it starts at and
        the run record."""
        self.log, self.tracker, self.metrics = log, tracker, MetricsLog(cfg.out_dir, writes)
        self.target_loss, self.stop_at_target, self.stop = cfg.target_loss, cfg.stop_at_target, False
        self.history: dict[str, list] = {"train": [], "eval": []}
        self.mfu: float | None = None
        self.metrics.write({"kind": "start", "iter": iter_num, "time": time.time(), "run": record})

    def __enter__(self) -> "Reporter":
        return self

    def __exit__(self, *exc) -> None:
        self.metrics.close()

    def finish(self, summary: str, plot: bool) -> None:
        """After the loop: close the W&B run, print the summary line and, with `plot`, draw the
        losses into loss.png beside metrics.jsonl (where there is one: rank 0, not profiling). On an
        exception, wandb's own exit hook closes its run and marks it failed."""
        self.tracker.close()
        self.log(summary)
        if plot and self.metrics.file is not None:
            self.log(save_plot(self.metrics.path, self.metrics.path.with_name(LOSS_PLOT)))

    def evaluation(self, iter_num: int, losses: dict[str, float], meter: ThroughputMeter, lr: float,
                   best_val_loss: float) -> None:
        """An evaluation's losses, with the clocks as `meter` reads them. The first one at or below
        target_loss, the one that brings the best val loss so far (`best_val_loss`, a resume's
        included) under it, also goes out as a 'target_reached' event and sets `stop` if asked to;
        every rank decides alike, as the losses and the best are the same on all of them."""
        train_s, eval_s = meter.split_seconds()
        self.log(f"step {iter_num}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}")
        self.history["eval"].append((iter_num, losses["train"], losses["val"]))
        self.metrics.write({"kind": "eval", "iter": iter_num, "train_loss": losses["train"], "val_loss": losses["val"],
                            "elapsed_s": train_s + eval_s, "eval_s": eval_s})
        self.tracker.log({"iter": iter_num, "train/loss": losses["train"], "val/loss": losses["val"], "lr": lr,
                          "mfu": self.mfu}, iter_num)
        if self.target_loss and losses["val"] <= self.target_loss < best_val_loss:
            self.stop = self.stop_at_target
            tokens = iter_num * meter.tokens_per_iter
            self.log(f"target val loss {self.target_loss} reached at iteration {iter_num} ({tokens:,} tokens): "
                     f"{train_s:.1f} s training, {eval_s:.1f} s evaluating and saving")
            self.metrics.write({"event": "target_reached", "kind": "event", "iter": iter_num, "tokens": tokens,
                                "val_loss": losses["val"], "train_seconds": train_s, "eval_seconds": eval_s})

    def step(self, record: dict) -> None:
        """A log step's record, as metrics.ThroughputMeter.tick makes it."""
        self.history["train"].append((record["iter"], record["loss"]))
        self.mfu = record["mfu"]
        self.log(format_log_line(record))
        self.metrics.write(record)


# --- the loss plot


class PlotError(FastgptError):
    """No metrics to plot; the message is one line for the user."""


def load_losses(path: str | os.PathLike) -> tuple[dict, dict]:
    """({iter: (elapsed_s, loss)} of the logged batches, {iter: (elapsed_s, train, val)} of the
    evaluations). Where a resume repeated iterations after a crash, the later record wins."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise PlotError(f"no {path}; train a run first (fastgpt.train writes it) or name the run's out_dir")
    records, skipped = read_metrics(path)
    train = {r["iter"]: _numbers(r, "elapsed_s", "loss") for r in records if r["kind"] == "train"}
    evals = {r["iter"]: _numbers(r, "elapsed_s", "train_loss", "val_loss") for r in records if r["kind"] == "eval"}
    if not train and not evals:
        what = f"{skipped} unreadable line(s)" if skipped else "no loss records"
        raise PlotError(f"nothing to plot in {path}: {what}")
    return train, evals


def _numbers(record: dict, *keys: str) -> tuple:
    """The record's values at keys, None where one is missing or not a number (drawn as a gap)."""
    values = (record.get(k) for k in keys)
    return tuple(v if isinstance(v, (int, float)) and not isinstance(v, bool) else None for v in values)


def _import_matplotlib():
    import matplotlib  # noqa: F401  (first: a submodule left in sys.modules would import without it)
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    return Figure, FigureCanvasAgg


def plot_losses(log_file: str | os.PathLike, out_path: str | os.PathLike) -> pathlib.Path:
    """Write the PNG; raises ImportError without matplotlib, PlotError without losses. Uses the
    Agg canvas directly (no pyplot), so no display and no global backend are involved."""
    train, evals = load_losses(log_file)
    Figure, FigureCanvasAgg = _import_matplotlib()
    fig = Figure(figsize=FIGURE_INCHES, dpi=DPI)
    FigureCanvasAgg(fig)
    by_iter, by_time = fig.subplots(1, 2)
    t_iters, e_iters = sorted(train), sorted(evals)
    longest = max([t for t, *_ in [*train.values(), *evals.values()] if t is not None], default=0)
    scale, unit = next((s, u) for s, u in TIME_UNITS if longest >= 2 * s or s == 1)
    for ax, x_of in ((by_iter, lambda it, t: it), (by_time, lambda it, t: None if t is None else t / scale)):
        ax.plot([x_of(i, train[i][0]) for i in t_iters], [train[i][1] for i in t_iters], lw=0.8, alpha=0.6,
                label="train (logged batch)")
        for col, label in ((1, "train (eval)"), (2, "val (eval)")):
            ax.plot([x_of(i, evals[i][0]) for i in e_iters], [evals[i][col] for i in e_iters], marker="o", ms=3, label=label)
        ax.set_ylabel("loss")
        ax.grid(alpha=0.3)
    by_iter.set_xlabel("iteration")
    by_time.set_xlabel(f"wall time since the run started ({unit})")
    by_iter.legend()
    fig.suptitle(str(pathlib.Path(log_file).parent))
    fig.tight_layout()
    out_path = pathlib.Path(out_path)
    fig.savefig(out_path, format="png")
    return out_path


def save_plot(log_file: str | os.PathLike, out_path: str | os.PathLike) -> str:
    """plot_losses for the trainer, as the one line to print: where the PNG went, or why none was
    written (a finished run never fails on its picture)."""
    try:
        return f"plot: wrote {plot_losses(log_file, out_path)}"
    except ImportError:
        return MISSING_MATPLOTLIB
    except PlotError as e:
        return f"plot: {e}"
