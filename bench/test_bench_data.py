"""Latency of the training loop's `next(batches)`: the background prefetcher against nanoGPT's
synchronous get_batch, in the same run.

    pytest bench/test_bench_data.py --benchmark-only

Both draw GPT-2-sized batches (12 x 1024 tokens) from the same uint16 file. nanoGPT's get_batch
(bench/reference.py) re-opens the memmap, slices each window with Python, stacks them and copies
to the device on the caller's thread; the prefetcher has done all of that on its thread before the call, so what the
loop pays is a queue hand-off. Each result records the latency in microseconds.
"""

from __future__ import annotations

import time

import numpy as np
import pytest

from bench.harness import DEVICE
from bench.reference import get_batch
from fastgpt.data import BatchStream, Prefetcher

BATCH, BLOCK = 12, 1024
N_TOKENS = 32 * 1024 * 1024  # 64 MiB of uint16, enough that batches are spread over the file
# The prefetcher's consumer is timed on a realistic cadence: the loop computes between batches,
# and the worker uses that time to refill the queue.
COMPUTE_SECONDS = 0.005


@pytest.fixture(scope="module")
def token_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("bench") / "train.bin"
    np.random.default_rng(0).integers(0, 50257, N_TOKENS, dtype=np.uint16).tofile(path)
    return path


@pytest.mark.benchmark(group="next_batch")
@pytest.mark.parametrize("provider", ["prefetcher", "nanogpt"])
def test_next_batch(benchmark, provider, token_file):
    if provider == "nanogpt":
        benchmark.pedantic(get_batch, args=(token_file, BATCH, BLOCK, DEVICE), rounds=200, warmup_rounds=10)
    else:
        tokens = np.memmap(token_file, dtype=np.uint16, mode="r")
        batches = Prefetcher(BatchStream(tokens, BATCH, BLOCK, 0, "train"), DEVICE)
        try:
            next(batches)

            def setup():
                time.sleep(COMPUTE_SECONDS)  # the model's step, during which the worker refills

            benchmark.pedantic(lambda: next(batches), setup=setup, rounds=200, warmup_rounds=10)
        finally:
            batches.close()
    benchmark.extra_info.update(suite="next_batch", shape_name=f"{BATCH}x{BLOCK} uint16",
                                median_us=round(benchmark.stats.stats.median * 1e6, 1))
