"""The kernel targets of the Triton work, read off pytest-benchmark JSON files.

    python scripts/bench_targets.py [--merge MERGED.json] BENCH.json|BENCH.jsonl...

Several files (one per benchmark file, as scripts/gpu_check.sh writes them) are read as one
report; --merge also writes that report to MERGED.json. A .jsonl file holds one benchmark entry a
line, appended as each benchmark finishes (bench/conftest.py): what a run stopped at its time
cap measured before it stopped. An entry found in several files counts once.

Every ratio compares two providers timed in the same run (medians), so machine drift between
runs cancels. A target whose benchmarks are missing (the triton provider is skipped without
CUDA) is reported as not measured, never as met.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass


@dataclass(frozen=True)
class Target:
    what: str
    test: str  # benchmark function name
    params: tuple[tuple[str, str], ...]  # its parameters other than provider, e.g. (("mode", "forward"),)
    baseline: str  # the provider triton is compared with
    goal: float
    metric: str = "time"  # "time": baseline median / triton median; "memory": triton peak / baseline peak

    @property
    def goal_text(self) -> str:
        if self.metric == "memory":
            return f"<= {self.goal:g}x the memory"
        return "no slower" if self.goal == 1.0 else f">= {self.goal:g}x faster"


LN_GRAPH = (("mode", "forward+backward"), ("timing", "graph"))
LN_WALL = (("mode", "forward+backward"), ("timing", "wall"))
TARGETS = [
    # The kernels' GPU time (CUDA graph replay), what the targets are about...
    Target("LayerNorm fwd+bwd vs torch eager, GPU time", "test_layer_norm", LN_GRAPH, "eager", 1.5),
    Target("LayerNorm fwd+bwd vs torch.compile, GPU time", "test_layer_norm", LN_GRAPH, "compiled", 1.0),
    # ...and what an eager caller sees, Python launch overhead included.
    Target("LayerNorm fwd+bwd vs torch eager, wall time", "test_layer_norm", LN_WALL, "eager", 1.5),
    Target("LayerNorm fwd+bwd vs torch.compile, wall time", "test_layer_norm", LN_WALL, "compiled", 1.0),
    # The row kernel on given logits, against F.cross_entropy forward+backward...
    Target("cross-entropy fwd+bwd vs torch eager", "test_cross_entropy_rows", (), "eager", 2.0),
    Target("cross-entropy fwd+bwd peak memory vs eager", "test_cross_entropy_rows", (), "eager", 0.5,
           metric="memory"),
    # ...and the head fused with it, against F.linear + F.cross_entropy on the full logits.
    Target("head + loss fwd+bwd vs torch eager", "test_linear_cross_entropy", (), "eager", 1.0),
    Target("head + loss fwd+bwd peak memory vs unchunked", "test_linear_cross_entropy", (), "eager", 0.5,
           metric="memory"),
    Target("AdamW step vs torch fused AdamW", "test_adamw_step", (), "fused", 1.0),
]


def _key(test: str, params: dict) -> tuple:
    return test, tuple(sorted((k, str(v)) for k, v in params.items()))


def index(report: dict) -> dict[tuple, dict]:
    """(test, sorted parameters including provider) -> benchmark entry."""
    return {_key(b["name"].split("[")[0], b.get("params") or {}): b for b in report.get("benchmarks", [])}


def evaluate(report: dict) -> list[tuple[Target, float | None, str]]:
    """(target, measured ratio or None, verdict) for each target."""
    benches = index(report)
    rows = []
    for t in TARGETS:
        ours = benches.get(_key(t.test, {**dict(t.params), "provider": "triton"}))
        base = benches.get(_key(t.test, {**dict(t.params), "provider": t.baseline}))
        ratio = None
        if ours and base:
            if t.metric == "time":
                ratio = base["stats"]["median"] / ours["stats"]["median"]
            else:
                peaks = ours["extra_info"].get("peak_mb"), base["extra_info"].get("peak_mb")
                ratio = peaks[0] / peaks[1] if None not in peaks and peaks[1] else None
        if ratio is None:
            verdict = "not measured"
        else:
            met = ratio >= t.goal if t.metric == "time" else ratio <= t.goal
            verdict = "met" if met else "MISSED"
        rows.append((t, ratio, verdict))
    return rows


def merge(reports: list[dict]) -> dict:
    """One report holding every benchmark of `reports` once (the first copy of each fullname),
    with the first report's machine and commit."""
    merged = {k: v for k, v in (reports[0] if reports else {}).items() if k != "benchmarks"}
    seen, merged["benchmarks"] = set(), []
    for bench in (b for r in reports for b in r.get("benchmarks", [])):
        name = bench.get("fullname", bench["name"])
        if name not in seen:
            seen.add(name)
            merged["benchmarks"].append(bench)
    return merged


def read_report(path: str) -> dict:
    """A pytest-benchmark JSON report, or a .jsonl of its entries (a line cut off mid-write by a
    time cap is dropped)."""
    with open(path) as f:
        if not path.endswith(".jsonl"):
            return json.load(f)
        benches = []
        for line in f:
            try:
                benches.append(json.loads(line))
            except json.JSONDecodeError:
                pass
        return {"benchmarks": benches}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--merge", metavar="MERGED", help="also write the merged report here")
    parser.add_argument("reports", nargs="+", metavar="BENCH.json")
    args = parser.parse_args(argv)
    reports = []
    for path in args.reports:
        try:
            reports.append(read_report(path))
        except (OSError, json.JSONDecodeError) as e:  # a benchmark file cut off by its time cap
            print(f"skipping {path}: {e}")
    report = merge(reports)
    if args.merge:
        with open(args.merge, "w") as f:
            json.dump(report, f, indent=1)
    machine = report.get("machine_info", {}).get("node", "?")
    print(f"kernel targets from {len(reports)} report(s) ({machine})")
    for t, ratio, verdict in evaluate(report):
        measured = "-" if ratio is None else f"{ratio:.2f}x"
        print(f"  {t.what:<48} {measured:>7}  goal {t.goal_text:<22} {verdict}")
    print("  medians, ms a call:")
    for bench in sorted(report.get("benchmarks", []), key=lambda b: b["name"]):
        extra = bench.get("extra_info", {})
        shown = {k: extra[k] for k in ("gb_per_s", "gbps", "tflops", "peak_mb", "model", "tokens_per_s", "mfu",
                                       "programs") if k in extra}
        print(f"    {bench['name']:<56} {bench['stats']['median'] * 1e3:9.3f}  {shown}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
