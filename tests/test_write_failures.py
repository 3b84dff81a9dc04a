"""A write that fails (here: a file-size limit, which fails a write with EFBIG as a full disk fails
it with ENOSPC) ends the run with one `error:` line naming the file, the free space and what to
do, exit status 2; the previous checkpoint is intact and no temporary file is left behind. A
checkpoint written in the background fails on its worker thread and ends the run the same way."""

from __future__ import annotations

import hashlib
import os
import pathlib
import subprocess
import sys

import pytest

from fastgpt import train

from conftest import cli_args, tiny_config

REPO = pathlib.Path(__file__).resolve().parent.parent
ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
TIMEOUT_S = 120
# Bytes of padding that make metrics.jsonl longer than any run.json, shorter than half a checkpoint.
METRICS_PADDING = 32 * 1024
# Train under RLIMIT_FSIZE = argv[1] bytes; SIGXFSZ ignored, so an over-long write fails with EFBIG.
LIMITED_TRAIN = ("import resource, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
                 "n = int(sys.argv[1]); resource.setrlimit(resource.RLIMIT_FSIZE, (n, n)); "
                 "from fastgpt import train; sys.exit(train.main(sys.argv[2:]))")


def sha256(path: pathlib.Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def trained(tmp_path, tiny_data):
    """A run folder with a checkpoint at iteration 10, and the config that continues it to 20."""
    cfg = tiny_config(tmp_path, tiny_data[0], max_iters=10, eval_interval=5)
    assert train.main(cli_args(cfg)) == 0
    return pathlib.Path(cfg.out_dir), [*cli_args(cfg), "--max_iters=20", "--lr_decay_iters=20", "--init_from='resume'"]


def run_limited(limit: int, args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", LIMITED_TRAIN, str(limit), *args], env=ENV, capture_output=True,
                          text=True, timeout=TIMEOUT_S)


@pytest.mark.parametrize("name,async_save", [("ckpt.pt", True), ("ckpt.pt", False), ("metrics.jsonl", True),
                                             ("run.json", True)], ids=["ckpt.pt", "ckpt.pt-sync", "metrics.jsonl", "run.json"])
def test_a_failed_write_is_one_line_and_loses_nothing(trained, name, async_save):
    out, args = trained
    args = [*args, f"--async_save={async_save}"]
    ckpt = out / "ckpt.pt"
    before = sha256(ckpt)
    with open(out / "metrics.jsonl", "a") as f:  # a log longer than the resume's run.json: a line of padding
        f.write('{"padding": "' + "x" * METRICS_PADDING + '"}\n')
    metrics_size = (out / "metrics.jsonl").stat().st_size
    # Each limit lets every smaller file through and stops the one under test.
    limit = {"ckpt.pt": ckpt.stat().st_size // 2, "metrics.jsonl": metrics_size + 100, "run.json": 100}[name]
    assert metrics_size + 100 < ckpt.stat().st_size // 2
    proc = run_limited(limit, args)
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: cannot write "), proc.stderr[-3000:]
    line = lines[0]
    assert str(out / name) in line and "bytes free there" in line and "--out_dir" in line, line
    assert ("writing in the background" in proc.stdout) == (name == "ckpt.pt" and async_save), proc.stdout[-3000:]
    assert sha256(ckpt) == before
    assert not [p.name for p in out.iterdir() if p.name.endswith((".tmp", ".link"))]
