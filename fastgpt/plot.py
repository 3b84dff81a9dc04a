"""Train and val loss of a run, against iterations and against wall time, as a PNG.

    python -m fastgpt.plot out-shakespeare-char                 # writes out-shakespeare-char/loss.png
    python -m fastgpt.plot out --out loss.png

Reads OUT_DIR/metrics.jsonl (written by fastgpt.train, which also calls this at the end of a run).
Needs matplotlib: pip install -e '.[plot]'. Without it, one line says so.
"""

from __future__ import annotations

import pathlib
import sys

from fastgpt.cli import OneLineParser, run_command
from fastgpt.errors import ExitStatus
from fastgpt.metrics import METRICS_FILE, MISSING_MATPLOTLIB, metrics_path, plot_losses


def _run(argv: list[str]) -> int | None:
    p = OneLineParser(prog="python -m fastgpt.plot", description=__doc__.split("\n\n")[0])
    p.add_argument("out_dir", help=f"a run's out_dir, holding {METRICS_FILE}")
    p.add_argument("--out", default=None, help="the PNG to write (default: OUT_DIR/loss.png)")
    args = p.parse_args(argv)
    out = args.out or pathlib.Path(args.out_dir) / "loss.png"
    try:
        print(f"plot: wrote {plot_losses(metrics_path(args.out_dir), out)}")
    except ImportError:  # the trainer's line, word for word
        print(MISSING_MATPLOTLIB, file=sys.stderr)
        return ExitStatus.BAD_INPUT
    return None


def main(argv: list[str] | None = None) -> int:
    return run_command(_run, argv)


if __name__ == "__main__":
    sys.exit(main())
