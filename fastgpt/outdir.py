"""The run folder (out_dir): checked before the first step, traced by a run record, and a new
run's predecessor set aside rather than overwritten.

    out_dir/ckpt.pt          the newest checkpoint (fastgpt.checkpoint)
    out_dir/ckpt-ITER.pt     older checkpoints kept (keep_checkpoints)
    out_dir/metrics.jsonl    every log line and evaluation (fastgpt.metrics)
    out_dir/run.json         this run's record: config, versions, device, git commit
    out_dir/.lock            held (fcntl.flock) by the run that owns the folder; holds its pid and host
"""

from __future__ import annotations

import fcntl
import json
import os
import pathlib
import shutil
import socket
import subprocess
import sys
import time

import torch

from fastgpt.fileio import atomic_writer
from fastgpt.checkpoint import OUT_DIR_HINT, checkpoint_path, numbered_checkpoints, remove_stale_temporaries
from fastgpt.errors import FastgptError
from fastgpt.metrics import metrics_path

RECORD_NAME = "run.json"
WRITE_TEST_NAME = ".write-test"
LOCK_NAME = ".lock"
# Where to ask git for the commit: the folder this package was imported from.
PACKAGE_DIR = pathlib.Path(__file__).resolve().parent
GIT_TIMEOUT_S = 5
# A checkpoint holds the fp32 weights and AdamW's two fp32 moments per parameter.
CHECKPOINT_COPIES = 3


class RunDirError(FastgptError):
    """out_dir cannot hold this run; one line for the user."""


def prepare(out_dir: str | os.PathLike) -> "RunLock":
    """Before the data and the model are loaded, so a bad out_dir fails in seconds: check that it
    can be written, take its lock (the caller releases it), and remove the temporaries of a save
    that a kill cut short."""
    check_writable(out_dir)
    run_lock = RunLock.take(out_dir)
    remove_stale_temporaries(out_dir)
    return run_lock


class RunLock:
    """One run per out_dir: an exclusive fcntl.flock on out_dir/.lock, held while the file stays
    open. The kernel drops a flock when its holder exits, however it exits (SIGKILL, OOM kill), so
    a lock left by a dead run is simply taken again: the file's pid and host only tell a second
    run whom it is waiting for. (On NFS a flock is only as good as the server's lock manager.)"""

    def __init__(self, path: pathlib.Path, fd: int):
        self.path, self.fd = path, fd

    @classmethod
    def take(cls, out_dir: str | os.PathLike) -> "RunLock":
        path = pathlib.Path(out_dir) / LOCK_NAME
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = _read_holder(fd)
            os.close(fd)
            raise RunDirError(
                f"out_dir={str(out_dir)!r} is in use by another run (pid {holder.get('pid', '?')} on host "
                f"{holder.get('host', '?')}, per {path}); wait for it to end, stop it, or choose another --out_dir"
            ) from e
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps({"pid": os.getpid(), "host": socket.gethostname()}) + "\n").encode(), 0)
        return cls(path, fd)

    def release(self) -> None:
        """Idempotent; the file stays (removing it would let a third run lock a new file while a
        second still waits on the old one)."""
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


def _read_holder(fd: int) -> dict:
    """The pid and host a lock file names; {} while its holder has not written them yet."""
    try:
        holder = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except (OSError, ValueError):
        return {}
    return holder if isinstance(holder, dict) else {}


def check_writable(out_dir: str | os.PathLike) -> None:
    """Create out_dir and prove a file can be written in it, so that a run never trains for
    hours to fail at its first save."""
    folder = pathlib.Path(out_dir)
    if folder.exists() and not folder.is_dir():
        raise RunDirError(f"out_dir={str(folder)!r} is a file, not a folder; move it or choose another --out_dir")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with atomic_writer(folder / WRITE_TEST_NAME, "wb") as f:
            f.write(b"fastgpt")
        (folder / WRITE_TEST_NAME).unlink()
    except OSError as e:
        raise RunDirError(
            f"cannot write to out_dir={str(folder)!r} ({e.strerror or e}); choose a folder you can write with --out_dir"
        ) from e
    for name in ("ckpt.pt", RECORD_NAME):
        if (folder / name).is_dir():
            raise RunDirError(f"{folder / name} is a folder where this run writes a file; move it or choose another --out_dir")


def check_free_space(out_dir: str | os.PathLike, num_params: int) -> None:
    """Refuse to start when the disk cannot take one checkpoint of a model this size."""
    need = num_params * CHECKPOINT_COPIES * torch.finfo(torch.float32).bits // 8
    free = shutil.disk_usage(out_dir).free
    if free < need:
        raise RunDirError(
            f"out_dir={str(out_dir)!r} has {free / 2**20:,.0f} MiB free, and a checkpoint of this model needs about "
            f"{need / 2**20:,.0f} MiB; free some space or choose another --out_dir"
        )


def set_aside(paths: list[pathlib.Path]) -> list[tuple[pathlib.Path, pathlib.Path]]:
    """Rename each existing file to NAME.<its mtime>.SUFFIX, so a new run never overwrites it."""
    moved = []
    for path in paths:
        if not path.exists():
            continue
        stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(path.stat().st_mtime))
        target = path.with_name(f"{path.stem}.{stamp}{path.suffix}")
        n = 1
        while target.exists():
            target = path.with_name(f"{path.stem}.{stamp}-{n}{path.suffix}")
            n += 1
        os.replace(path, target)
        moved.append((path, target))
    return moved


def git_commit() -> str | None:
    """The commit of the source tree fastgpt runs from ('+dirty' when it has changes), or None
    outside a git checkout (an installed wheel) or without git."""
    try:
        run = lambda *args: subprocess.run(("git", "-C", str(PACKAGE_DIR), *args), capture_output=True, text=True,
                                           timeout=GIT_TIMEOUT_S, check=True).stdout.strip()
        commit = run("rev-parse", "HEAD")
        dirty = run("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("+dirty" if dirty else "")


def run_record(config: dict, device: torch.device, world_size: int, host: dict) -> dict:
    """What any result of this run can be traced back to; plain data, so checkpoints carry it.
    host: hardware.host_summary(), which the start-up log has already shown."""
    record = {
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "argv": list(sys.argv),
        "git_commit": git_commit(),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else host["cpu"],
        "world_size": world_size,
        "host": host,
        "config": config,
    }
    return json.loads(json.dumps(record))  # plain data by construction: a weights_only load accepts it


def claim(out_dir: str | os.PathLike, record: dict, fresh: bool, num_params: int, log=lambda line: None) -> None:
    """Make out_dir this run's, on rank 0 of a run that trains: check there is room for its
    checkpoints, then write its record to out_dir/run.json; a fresh run first sets the previous
    run's checkpoints, log and record aside (each move logged)."""
    check_free_space(out_dir, num_params)
    folder = pathlib.Path(out_dir)
    moved = []
    if fresh:
        previous = [checkpoint_path(folder), *(p for _, p in numbered_checkpoints(folder)), metrics_path(folder),
                    folder / RECORD_NAME]
        moved = set_aside(previous)
    with atomic_writer(folder / RECORD_NAME, "w", OUT_DIR_HINT) as f:
        json.dump(record, f, indent=2)
        f.write("\n")
    for path, new_name in moved:
        log(f"kept the previous run's {path.name} as {new_name}")
