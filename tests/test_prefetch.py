"""The background prefetcher: same batches as the stream, resumable, failures surface, stops cleanly."""

import os
import subprocess
import sys
import threading
import time
import traceback

import numpy as np
import pytest
import torch

from fastgpt.data import BatchStream, Prefetcher, open_tokens

TOKENS = np.arange(60_000, dtype=np.uint16) % 50_000


@pytest.fixture
def prefetchers():
    made = []

    def make(stream, depth=2):
        p = Prefetcher(stream, "cpu", depth)
        made.append(p)
        return p

    yield make
    for p in made:
        p.close()


def stream(rank=0, world_size=1, batch_size=4, seed=3, split="train"):
    return BatchStream(TOKENS, batch_size, 16, seed, split, rank, world_size)


def test_prefetched_batches_equal_the_stream(prefetchers):
    p = prefetchers(stream())
    reference = stream()
    for _ in range(5):
        x, y = next(p)
        xy = torch.from_numpy(next(reference).astype(np.int64))
        assert torch.equal(x, xy[:, :-1]) and torch.equal(y, xy[:, 1:])


def test_an_index_less_gpu_is_named_when_the_prefetcher_is_made(monkeypatch):
    """On the caller's thread, whose current GPU the worker thread (current device: cuda:0)
    cannot know; the worker's set_device refuses an index-less 'cuda' (tests/test_cuda.py
    draws batches on a GPU)."""
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 2)
    assert Prefetcher(stream(), "cuda").device == torch.device("cuda", 2)
    assert Prefetcher(stream(), torch.device("cuda", 1)).device == torch.device("cuda", 1)
    assert Prefetcher(stream(), "cpu").device == torch.device("cpu")


def test_ranks_draw_different_windows_that_together_make_one_process_batch(prefetchers):
    single = prefetchers(stream(batch_size=8))
    r0, r1 = prefetchers(stream(rank=0, world_size=2)), prefetchers(stream(rank=1, world_size=2))
    for _ in range(3):
        x0, x1 = next(r0)[0], next(r1)[0]
        assert not torch.equal(x0, x1)
        assert torch.equal(torch.cat([x0, x1]), next(single)[0])


def test_state_counts_batches_handed_out_not_prepared(prefetchers):
    p = prefetchers(stream(), depth=4)
    next(p)
    time.sleep(0.3)  # let the worker fill its queue
    assert p.state_dict() == {"sequences": 4}
    expected = [next(p)[0] for _ in range(3)]
    q = prefetchers(stream())
    q.load_state_dict({"sequences": 4})
    assert all(torch.equal(next(q)[0], e) for e in expected)


def test_resume_on_another_world_size(prefetchers):
    two = [prefetchers(stream(rank=r, world_size=2)) for r in (0, 1)]
    for p in two:
        next(p)
    state = two[0].state_dict()
    assert state == two[1].state_dict() == {"sequences": 8}
    single = prefetchers(stream())
    single.load_state_dict(state)
    continued = torch.cat([next(p)[0] for p in two])
    assert torch.equal(torch.cat([next(single)[0], next(single)[0]]), continued)


def test_load_state_that_does_not_divide_is_refused(prefetchers):
    p = prefetchers(stream(world_size=2))
    with pytest.raises(ValueError, match=r"not a whole number of batches of 4 x 2 ranks"):
        p.load_state_dict({"sequences": 12})


class FailingStream(BatchStream):
    def batch(self, i):
        if i == 2:
            raise KeyError("bad window")
        return super().batch(i)


def test_worker_exception_is_raised_in_the_caller_with_its_traceback(prefetchers):
    p = prefetchers(FailingStream(TOKENS, 4, 16, 0, "train"))
    next(p)
    next(p)
    with pytest.raises(KeyError, match="bad window") as info:
        next(p)
    frames = "".join(traceback.format_tb(info.value.__traceback__))
    assert "_work" in frames and "in batch" in frames  # where it happened, on the worker thread
    assert p._thread is None  # the failed worker is gone


def test_close_stops_a_blocked_worker_quickly():
    p = Prefetcher(stream(), "cpu", depth=1)
    next(p)
    time.sleep(0.2)  # the worker is now blocked on the full queue
    worker = p._thread
    start = time.perf_counter()
    p.close()
    assert time.perf_counter() - start < 1.0
    assert not worker.is_alive()
    assert not any(t.name == "fastgpt-prefetch" and t.is_alive() for t in threading.enumerate() if t is worker)


def test_running_prefetchers_are_closed_at_exit(tmp_path):
    """The exit hook joins every running worker: a daemon thread left inside torch while the
    interpreter tears down can abort the process (exit status 134, seen under torch 2.11)."""
    from fastgpt import data

    path = tmp_path / "t.bin"
    TOKENS.tofile(path)
    tokens = np.memmap(path, dtype=np.uint16, mode="r")
    prefetchers = [Prefetcher(BatchStream(tokens, 4, 16, seed, "train"), "cpu") for seed in (0, 1)]
    for p in prefetchers:
        next(p)
    threads = [p._thread for p in prefetchers]
    assert set(prefetchers) <= set(data._RUNNING) and all(t.is_alive() for t in threads)
    data._close_running_prefetchers()
    assert not data._RUNNING and not any(t.is_alive() for t in threads)


def test_interpreter_exits_without_close(tmp_path):
    path = tmp_path / "t.bin"
    TOKENS.tofile(path)
    code = (
        "import numpy as np; from fastgpt.data import BatchStream, Prefetcher;"
        f"t = np.memmap({str(path)!r}, dtype=np.uint16, mode='r');"
        "p = Prefetcher(BatchStream(t, 4, 16, 0, 'train'), 'cpu'); next(p); print('ok')"
    )
    env = {**os.environ, "PYTHONPATH": os.getcwd(), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", (proc.returncode, proc.stdout, proc.stderr)


def test_the_exit_hook_is_registered_by_the_first_worker_not_by_import(tmp_path):
    path = tmp_path / "t.bin"
    TOKENS.tofile(path)
    code = (
        "import atexit, numpy as np; from fastgpt.data import BatchStream, Prefetcher; n = atexit._ncallbacks();"
        f"t = np.memmap({str(path)!r}, dtype=np.uint16, mode='r');"
        "ps = [Prefetcher(BatchStream(t, 4, 16, s, 'train'), 'cpu') for s in (0, 1)]; made = atexit._ncallbacks() - n;"
        "next(ps[0]); first = atexit._ncallbacks() - n; next(ps[1]); print(made, first, atexit._ncallbacks() - n)"
    )
    env = {**os.environ, "PYTHONPATH": os.getcwd(), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["0", "1", "1"]  # none for building prefetchers, one for all workers


def anon_and_file_rss() -> tuple[int, int]:
    """(RssAnon, RssFile) in bytes: the process's private memory, and file pages it maps."""
    fields = dict(line.split(":", 1) for line in open("/proc/self/status"))
    return tuple(int(fields[k].split()[0]) * 1024 for k in ("RssAnon", "RssFile"))


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads Linux's /proc")
def test_memmap_pages_stay_out_of_private_memory(tmp_path, prefetchers):
    """nanoGPT issue #287: reading batches from a memmap must not grow the process's private
    memory; the file's pages belong to the page cache (shared, reclaimable), and opening the file
    (which scans every token) must not map them all."""
    path = tmp_path / "big.bin"
    n_tokens = 64 * 1024 * 1024  # 128 MiB
    np.arange(n_tokens, dtype=np.uint64).astype(np.uint16).tofile(path)
    anon0, file0 = anon_and_file_rss()
    tokens = open_tokens(path, 65536, 1024)
    anon1, file1 = anon_and_file_rss()
    assert file1 - file0 < 16 * 2**20, "validating the file mapped its pages"
    p = prefetchers(BatchStream(tokens, 64, 1024, 0, "train"))
    for _ in range(300):  # 300 x 64 windows of 2 KiB: touches most of the file's pages
        next(p)
    anon2, file2 = anon_and_file_rss()
    assert file2 - file1 > 64 * 2**20  # the windows were really read through the mapping
    assert anon2 - anon1 < 32 * 2**20, f"private memory grew by {(anon2 - anon1) / 2**20:.0f} MiB"
