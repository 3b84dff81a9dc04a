"""Benchmark results kept as each one finishes.

pytest-benchmark writes --benchmark-json only when the session ends, so a run stopped at a time
cap (scripts/gpu_check.sh caps every file) would lose every number it had measured. With
FASTGPT_BENCH_JSONL=PATH set, each benchmark appends its entry, as it appears in that JSON's
"benchmarks" list, to PATH as one line when its test ends; scripts/bench_targets.py reads both.
"""

from __future__ import annotations

import json
import os

import pytest

JSONL_ENV = "FASTGPT_BENCH_JSONL"


@pytest.fixture(autouse=True)
def _append_finished_benchmark(request):
    yield
    path = os.environ.get(JSONL_ENV)
    metadata = getattr(request.node.funcargs.get("benchmark"), "stats", None)  # None if it never ran
    if path and metadata is not None:
        with open(path, "a") as f:
            f.write(json.dumps(metadata.as_dict(include_data=False), default=str) + "\n")
