"""Train and val loss of a run, against iterations and against wall time, as a PNG.

    python -m fastgpt.plot out-shakespeare-char                 # writes out-shakespeare-char/loss.png
    python -m fastgpt.plot out --out loss.png

Reads OUT_DIR/metrics.jsonl (written by fastgpt.train, which also calls this at the end of a run).
Needs matplotlib: pip install -e '.[plot]'. Without it, one line says so.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys

from fastgpt.metrics import METRICS_FILE, metrics_path, read_metrics

MISSING_MATPLOTLIB = "plot: matplotlib is not installed; pip install -e '.[plot]'"
FIGURE_INCHES = (12, 4.5)
DPI = 100
# The wall-time axis in the largest unit that still shows at least two of them.
TIME_UNITS = ((3600, "h"), (60, "min"), (1, "s"))


class PlotError(ValueError):
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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fastgpt.plot", description=__doc__.split("\n\n")[0])
    p.add_argument("out_dir", help=f"a run's out_dir, holding {METRICS_FILE}")
    p.add_argument("--out", default=None, help="the PNG to write (default: OUT_DIR/loss.png)")
    args = p.parse_args(argv)
    out = args.out or pathlib.Path(args.out_dir) / "loss.png"
    try:
        print(f"plot: wrote {plot_losses(metrics_path(args.out_dir), out)}")
    except ImportError:
        print(MISSING_MATPLOTLIB, file=sys.stderr)
        return 2
    except (PlotError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
