"""Draw the benchmark results file as a PNG: fastgpt's speedup over each baseline per suite and
shape, one bar per run (a run is one pytest session, on one machine).

    python -m bench.plot [RESULTS.jsonl] [--out bench_results.png] [--last 6]

Needs matplotlib (pip install -e '.[plot]').
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

from bench.harness import DEFAULT_RESULTS, SUITE_PAIRS


def read_results(path: pathlib.Path) -> list[dict]:
    """The records of a results file; a line cut off mid-write is skipped."""
    records = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and {"run", "suite", "shape", "provider", "median_s"} <= record.keys():
            records.append(record)
    return records


def speedups(records: list[dict]) -> dict[str, dict[str, float]]:
    """run label -> {"suite shape: ours / baseline": baseline median / ours median}, for each of
    harness.SUITE_PAIRS measured in the same run."""
    medians: dict[tuple, float] = {}
    labels: dict[str, str] = {}
    for r in records:
        medians[(r["run"], r["suite"], r["shape"], r["provider"])] = r["median_s"]
        labels[r["run"]] = f"{r['run'][:16]} {r.get('device', '?')[:28]} {r.get('commit') or ''}"
    out: dict[str, dict[str, float]] = {}
    for (run, suite, shape, provider), median in medians.items():
        for ours, baseline in SUITE_PAIRS.get(suite, []):
            base = medians.get((run, suite, shape, baseline)) if provider == ours else None
            if base:
                out.setdefault(labels[run], {})[f"{suite} {shape}: {ours} / {baseline}"] = base / median
    return out


def plot(by_run: dict[str, dict[str, float]], out: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = sorted({name for values in by_run.values() for name in values})
    runs = list(by_run)
    height = 0.8 / max(1, len(runs))
    fig, ax = plt.subplots(figsize=(10, 0.6 + 0.45 * len(rows) * max(1, len(runs)) ** 0.5))
    for i, run in enumerate(runs):
        ys = [j + i * height for j in range(len(rows))]
        ax.barh(ys, [by_run[run].get(name, 0.0) for name in rows], height=height, label=run)
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_yticks([j + 0.4 - height / 2 for j in range(len(rows))], rows)
    ax.invert_yaxis()
    ax.set_xlabel("speedup: baseline median / fastgpt median (same run)")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Draw bench results (fastgpt's speedups) as a PNG.")
    parser.add_argument("results", nargs="?", default=str(DEFAULT_RESULTS), help="results file (JSON lines)")
    parser.add_argument("--out", default="bench_results.png", help="PNG to write")
    parser.add_argument("--last", type=int, default=6, help="runs to show, newest last")
    args = parser.parse_args(argv)
    path = pathlib.Path(args.results)
    if not path.is_file():
        print(f"error: no results file at {path}; run pytest bench/ --benchmark-only first", file=sys.stderr)
        return 2
    by_run = speedups(read_results(path))
    if not by_run:
        print(f"error: {path} holds no fastgpt/baseline pair from one run", file=sys.stderr)
        return 2
    if args.last < 1:
        print(f"error: --last={args.last} must be at least 1", file=sys.stderr)
        return 2
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("error: matplotlib is not installed; pip install -e '.[plot]'", file=sys.stderr)
        return 2
    plot(dict(list(by_run.items())[-args.last:]), pathlib.Path(args.out))
    print(f"wrote {args.out} ({len(by_run)} run(s) in {path}, last {min(args.last, len(by_run))} shown)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
