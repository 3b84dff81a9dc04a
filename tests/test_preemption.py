"""Runs that survive: SIGTERM and Ctrl-C save and exit 0, a SIGKILL anywhere (inside a checkpoint
write too) loses only the work since the newest complete checkpoint, and a resume from it
continues exactly as if nothing had happened."""

import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest
import torch

from fastgpt import checkpoint as ckpt_io
from fastgpt.metrics import read_metrics

from conftest import cli_args, tiny_config

REPO = pathlib.Path(__file__).resolve().parent.parent
# One thread: the runs compared here must do their sums in the same order to match exactly.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
TIMEOUT_S = 120
# Saves at 4, 8 and 12; every step logged, so each loss can be compared.
RUN = dict(max_iters=12, lr_decay_iters=12, eval_interval=4, log_interval=1, always_save_checkpoint=True, dropout=0.1)
# The reference goes on past RUN, so a run stopped by a signal at any step up to here can be checked.
LONG = 300


def harness(point: str, n: int, cfg) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(REPO / "tests" / "fault_harness.py"), point, str(n), "--", *cli_args(cfg)]
    return subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=TIMEOUT_S)


def losses_of_last_attempt(out_dir) -> dict[int, float]:
    """iteration -> logged training loss, from the last start in metrics.jsonl on."""
    records, _ = read_metrics(pathlib.Path(out_dir) / "metrics.jsonl")
    last_start = max(i for i, r in enumerate(records) if r["kind"] == "start")
    return {r["iter"]: r["loss"] for r in records[last_start:] if r["kind"] == "train"}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One uninterrupted run, in a subprocess like the runs it is compared with."""
    root = tmp_path_factory.mktemp("reference")
    from conftest import write_char_dataset

    write_char_dataset(root / "data" / "tiny")
    proc = harness("none", 0, tiny_config(root, root / "data", **{**RUN, "max_iters": LONG}))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root, losses_of_last_attempt(root / "out")


# point, which occurrence, the checkpoint a resume must start from
FAULTS = [
    ("step", 6, 4),  # between checkpoints
    ("mid_write", 2, 4),  # the second save's bytes half on disk
    ("before_rename", 2, 4),  # complete but not yet ckpt.pt
    ("after_rename", 2, 8),  # ckpt.pt is new; its numbered copy not made yet
]


@pytest.mark.parametrize("point,n,resumes_at", FAULTS, ids=[f[0] for f in FAULTS])
def test_sigkill_anywhere_resumes_from_the_newest_complete_checkpoint(tmp_path, reference, point, n, resumes_at):
    ref_root, ref_losses = reference
    cfg = tiny_config(tmp_path, ref_root / "data", **RUN)
    killed = harness(point, n, cfg)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    out = tmp_path / "out"
    assert ckpt_io.load_checkpoint(out / "ckpt.pt")["iter_num"] == resumes_at  # whole and loadable
    left_over = list(out.glob(".ckpt*"))
    assert bool(left_over) == (point in ("mid_write", "before_rename"))

    resumed = harness("none", 0, tiny_config(tmp_path, ref_root / "data", **{**RUN, "init_from": "auto"}))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {out / 'ckpt.pt'} at iteration {resumes_at}" in resumed.stdout
    losses = losses_of_last_attempt(out)
    assert sorted(losses) == list(range(resumes_at + 1, RUN["max_iters"] + 1))
    assert losses == {i: ref_losses[i] for i in losses}  # bit for bit: same sums in the same order
    assert not list(out.glob(".ckpt*"))  # the cut-short temporary was cleaned up
    kept = [i for i, _ in ckpt_io.numbered_checkpoints(out)]
    # keep_checkpoints=2; after_rename's kill came before 8's numbered copy, which only ckpt.pt held
    assert kept == ([4, 12] if point == "after_rename" else [8, 12])


def start_and_wait_for(cfg, line_start: str) -> tuple[subprocess.Popen, str]:
    """The training process, once it has printed a line starting `line_start`, and its output so far."""
    proc = subprocess.Popen([sys.executable, "-m", "fastgpt.train", *cli_args(cfg)], env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline, seen = time.monotonic() + TIMEOUT_S, []
    for line in proc.stdout:
        seen.append(line)
        if line.startswith(line_start):
            return proc, "".join(seen)
        assert time.monotonic() < deadline, "the run never got going"
    raise AssertionError(f"the run ended before printing {line_start!r}: {proc.stderr.read()[-3000:]}")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_saves_within_a_step_and_exits_0(tmp_path, reference, sig):
    ref_root, ref_losses = reference
    cfg = tiny_config(tmp_path, ref_root / "data", **{**RUN, "max_iters": 10_000, "eval_interval": 10_000})
    proc, before = start_and_wait_for(cfg, "iter 3:")
    sent = time.monotonic()
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=TIMEOUT_S)
    out = before + out
    assert proc.returncode == 0, err[-3000:]
    assert time.monotonic() - sent < 10
    assert f"received {sig.name}: finishing this step" in out
    stopped = int(out.split(f"stopped by {sig.name} at iteration ")[1].split(";")[0])
    logged = [int(line.split(":")[0].split()[1]) for line in out.splitlines() if line.startswith("iter ")]
    assert 3 <= stopped <= logged[-1] + 1 < LONG  # the step in flight, not the whole run
    checkpoint = ckpt_io.load_checkpoint(tmp_path / "out" / "ckpt.pt")
    assert checkpoint["iter_num"] == stopped

    # The checkpoint resumes exactly: on to LONG it logs what the uninterrupted run logged.
    resumed = harness("none", 0, tiny_config(tmp_path, ref_root / "data", **{**RUN, "max_iters": LONG, "init_from": "resume"}))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    losses = losses_of_last_attempt(tmp_path / "out")
    assert sorted(losses) == list(range(stopped + 1, LONG + 1))
    assert losses == {i: ref_losses[i] for i in losses}


def test_a_second_signal_exits_at_once(tmp_path, tiny_data):
    data_root, _ = tiny_data
    # An evaluation this long keeps the first signal waiting for a step; the second cannot wait.
    cfg = tiny_config(tmp_path, data_root, max_iters=10, eval_iters=100_000)
    proc, _ = start_and_wait_for(cfg, "MFU ")  # the line before the loop, which starts by evaluating
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    time.sleep(1.5)  # past the window in which a repeat counts as the same signal
    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGINT
    assert not (tmp_path / "out" / "ckpt.pt").exists()


@pytest.fixture
def nan_at_step_6(monkeypatch):
    """The 6th training step's loss becomes NaN: between the saves at 4 and 8."""
    from fastgpt import model as model_module

    forward, calls = model_module.GPT.forward, [0]

    def poisoned_forward(self, idx, targets=None):
        logits, loss = forward(self, idx, targets)
        if self.training and targets is not None:
            calls[0] += 1
            if calls[0] == 6:
                loss = loss * float("nan")
        return logits, loss

    monkeypatch.setattr(model_module.GPT, "forward", poisoned_forward)


def test_a_nonfinite_loss_stops_without_saving_over_a_good_checkpoint(tmp_path, tiny_data, nan_at_step_6, capsys):
    from fastgpt.train import main

    data_root, _ = tiny_data
    cfg = tiny_config(tmp_path, data_root, **{**RUN, "log_interval": 5, "dropout": 0.0})
    code = main(cli_args(cfg))
    err = capsys.readouterr().err.strip()
    assert code == 3 and len(err.splitlines()) == 1, err
    out = tmp_path / "out"
    assert f"the loss was NaN or inf at iteration 6; stopped without saving. Last good checkpoint: {out / 'ckpt.pt'}" in err
    checkpoint = ckpt_io.load_checkpoint(out / "ckpt.pt")
    assert checkpoint["iter_num"] == 4  # the save at 8 was refused
    assert all(torch.isfinite(v).all() for v in checkpoint["model"].values())


def test_skip_mode_drops_the_poisoned_step_and_finishes(tmp_path, tiny_data, nan_at_step_6, capsys):
    from fastgpt.train import train

    data_root, _ = tiny_data
    result = train(tiny_config(tmp_path, data_root, **{**RUN, "dropout": 0.0, "on_nonfinite_loss": "skip"}))
    assert "iter 6: gradient norm NaN or inf, step skipped" in capsys.readouterr().out
    assert result.iter_num == 12
    assert all(torch.isfinite(p).all() for p in result.model.parameters())
