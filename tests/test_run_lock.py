"""One run per out_dir: a second run there, fresh or resuming, stops before touching anything with
one line naming the holder's pid and host; a lock whose holder was SIGKILLed is taken again; the
lock is released when a run ends, cleanly or with an error."""

from __future__ import annotations

import hashlib
import os
import pathlib
import signal
import socket
import subprocess
import sys

import pytest

from fastgpt import outdir, train

from conftest import cli_args, tiny_config

REPO = pathlib.Path(__file__).resolve().parent.parent
TIMEOUT_S = 60
# A process that takes out_dir's lock, says so, and holds it until killed.
HOLDER = "import sys, time; from fastgpt.outdir import RunLock; RunLock.take(sys.argv[1]); print('locked', flush=True); time.sleep(600)"


def snapshot(folder: pathlib.Path) -> dict[str, str]:
    """name -> sha256 of every file but the lock itself."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())
            if p.is_file() and p.name != outdir.LOCK_NAME}


def start_holder(out: pathlib.Path) -> subprocess.Popen:
    """A process that holds out's lock once this returns."""
    out.mkdir(exist_ok=True)
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(out)], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.stdout.readline().strip() == "locked"
    return proc


@pytest.fixture
def holder(tmp_path):
    """A process holding tmp_path/out's lock (the test may kill it first)."""
    proc = start_holder(tmp_path / "out")
    yield proc
    proc.kill()
    proc.wait(TIMEOUT_S)


@pytest.mark.parametrize("init_from", ["scratch", "resume"])
def test_second_run_is_refused_and_touches_nothing(tmp_path, tiny_data, capsys, init_from):
    cfg = tiny_config(tmp_path, tiny_data[0], max_iters=10, eval_interval=5)
    assert train.main(cli_args(cfg)) == 0  # the files a second run must leave alone
    first = start_holder(pathlib.Path(cfg.out_dir))  # the first run, still holding the folder
    try:
        before = snapshot(pathlib.Path(cfg.out_dir))
        capsys.readouterr()
        assert train.main([*cli_args(cfg), f"--init_from={init_from!r}"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0, err
        assert f"pid {first.pid} on host {socket.gethostname()}" in err and "another run" in err, err
        assert snapshot(pathlib.Path(cfg.out_dir)) == before
    finally:
        first.kill()
        first.wait(TIMEOUT_S)


def test_lock_of_a_killed_run_is_taken_again(tmp_path, tiny_data, holder):
    holder.send_signal(signal.SIGKILL)
    holder.wait(TIMEOUT_S)
    cfg = tiny_config(tmp_path, tiny_data[0], max_iters=4, eval_interval=2)
    assert (pathlib.Path(cfg.out_dir) / outdir.LOCK_NAME).is_file()  # left behind, as a SIGKILL leaves it
    assert train.main(cli_args(cfg)) == 0


def test_lock_is_released_after_a_run_and_after_an_error(tmp_path, tiny_data):
    cfg = tiny_config(tmp_path, tiny_data[0], max_iters=4, eval_interval=2)
    assert train.main(cli_args(cfg)) == 0
    outdir.RunLock.take(cfg.out_dir).release()
    # An error after the lock is taken: resuming a checkpoint whose model is not this one.
    assert train.main([*cli_args(cfg), "--init_from='resume'", "--optimizer='muon'"]) == 2
    outdir.RunLock.take(cfg.out_dir).release()
