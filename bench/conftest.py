"""Benchmark results kept as each one finishes, and the ratio table at the end of the session.

Each benchmark appends its record to the results file (bench/harness.py: FASTGPT_BENCH_RESULTS,
default bench/results.jsonl). pytest-benchmark writes --benchmark-json only when the session
ends, so a run stopped at a time cap (scripts/gpu_check.sh caps every file) would lose what it had
measured: with FASTGPT_BENCH_JSONL=PATH set, each benchmark also appends its entry, as it appears
in that JSON's "benchmarks" list, to PATH; scripts/bench_targets.py reads both.
"""

from __future__ import annotations

import json
import os

import pytest

from bench import harness
from fastgpt_kernels.common import tag_compile_caches

JSONL_ENV = "FASTGPT_BENCH_JSONL"
SESSION = harness.Session()


@pytest.fixture(scope="session", autouse=True)
def _tag_compile_caches():
    """The suites torch.compile fastgpt's custom ops (the model, the head + loss), and inductor's
    caches outlive the session: keyed by the ops' names alone, a graph compiled against an earlier
    version of the kernels would be reused and timed. Tagged as the trainer does before compiling."""
    tag_compile_caches()


@pytest.fixture(autouse=True)
def _append_finished_benchmark(request):
    yield
    metadata = getattr(request.node.funcargs.get("benchmark"), "stats", None)  # None if it never ran
    if metadata is None:
        return
    SESSION.add(metadata.name, metadata.params, metadata.stats, dict(metadata.extra_info))
    path = os.environ.get(JSONL_ENV)
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(metadata.as_dict(include_data=False), default=str) + "\n")


def pytest_terminal_summary(terminalreporter):
    if not SESSION.records:
        return
    ctx = SESSION.context
    write = terminalreporter.write_line
    terminalreporter.section("fastgpt against its baselines (same run; speedup = baseline ms / ours ms)")
    write(f"{ctx['device']}, size {ctx['size']}, {ctx['versions']}, commit {ctx['commit']}, {ctx['run']}")
    for line in SESSION.table():
        write(line)
    write(SESSION.results_note)
