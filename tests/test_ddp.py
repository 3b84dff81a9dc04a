"""DDP on CPU with gloo, launched the way users launch it: torchrun -m fastgpt.train."""

import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from fastgpt import checkpoint as ckpt_io
from fastgpt import distributed
from fastgpt.train import train

from conftest import cli_args, tiny_config

REPO = pathlib.Path(__file__).resolve().parent.parent
# Two processes on a 2-core machine: one thread each, or they spin against each other.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
# Generous for process start-up on a slow machine; a hang would take the collective timeout.
TIMEOUT_S = 240


def torchrun(*args, nproc=2, cwd, env=ENV):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)


def run_ddp(cfg, tmp_path, nproc=2):
    proc = torchrun("-m", "fastgpt.train", *cli_args(cfg), nproc=nproc, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def weights_and_moments(out_dir):
    ck = ckpt_io.load_checkpoint(pathlib.Path(out_dir) / "ckpt.pt")
    moments = [s["exp_avg"] for _, s in sorted(ck["optimizer"]["state"].items())]
    return ck["model"], moments, ck


def assert_same_training(a, b, weight_atol=2e-6):
    (wa, ma, _), (wb, mb, _) = a, b
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-4, atol=weight_atol, msg=lambda m: f"{k}: {m}")
    for x, y in zip(ma, mb):
        torch.testing.assert_close(y, x, rtol=1e-4, atol=1e-7)


COMMON = dict(max_iters=4, lr_decay_iters=8, eval_interval=4, grad_clip=1.0, dropout=0.0)


def test_two_ranks_equal_one_process_on_the_combined_batch(tmp_path, tiny_data):
    data_root, _ = tiny_data
    train(tiny_config(tmp_path / "one", data_root, batch_size=8, gradient_accumulation_steps=1, **COMMON))
    proc = run_ddp(tiny_config(tmp_path / "two", data_root, batch_size=4, gradient_accumulation_steps=2, **COMMON), tmp_path)
    assert "2 rank(s)" in proc.stdout and proc.stdout.count("step 4:") == 1  # rank 0 alone logs
    assert_same_training(weights_and_moments(tmp_path / "one" / "out"), weights_and_moments(tmp_path / "two" / "out"))


def test_muon_gives_every_rank_the_same_update(tmp_path, tiny_data):
    """torch's Muon steps on DDP's all-reduced gradients, so the ranks' weights stay identical.
    One process on the combined batch sums the gradient in another order, and Muon's bf16
    Newton-Schulz (whose slope at 0 is ~3.4 per step) turns that fp32 rounding into a few bf16
    ulps (2^-8) of each update: close to the distance trained, not to fp32 precision."""
    data_root, _ = tiny_data
    muon = dict(COMMON, optimizer="muon")
    one = train(tiny_config(tmp_path / "one", data_root, batch_size=8, gradient_accumulation_steps=1, **muon))
    cfg = tiny_config(tmp_path / "two", data_root, batch_size=4, gradient_accumulation_steps=2, **muon)
    out = tmp_path / "weights"
    proc = torchrun(str(REPO / "tests" / "ddp_harness.py"), "save_weights", str(out), "--", *cli_args(cfg), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rank0, rank1 = (torch.load(f"{out}.rank{r}", weights_only=True) for r in (0, 1))
    start = train(tiny_config(tmp_path / "start", data_root, **dict(muon, max_iters=0))).model.state_dict()
    for k, v in one.model.state_dict().items():
        assert torch.equal(rank1[k], rank0[k]), k
        assert (rank0[k] - v).norm() < 0.03 * (v - start[k]).norm(), k  # measured: ~1% on Muon's, ~1e-4 on AdamW's


def test_ddp_checkpoint_resumes_on_one_or_two_processes(tmp_path, tiny_data):
    data_root, _ = tiny_data
    whole = dict(COMMON, max_iters=8)
    train(tiny_config(tmp_path / "ref", data_root, batch_size=4, gradient_accumulation_steps=2, **whole))
    run_ddp(tiny_config(tmp_path / "ddp", data_root, batch_size=4, gradient_accumulation_steps=2, **COMMON), tmp_path)
    shutil.copytree(tmp_path / "ddp", tmp_path / "ddp1")
    resume = dict(whole, batch_size=4, gradient_accumulation_steps=2, init_from="resume")
    run_ddp(tiny_config(tmp_path / "ddp", data_root, **resume), tmp_path)
    result = train(tiny_config(tmp_path / "ddp1", data_root, **resume))
    assert result.iter_num == 8
    reference = weights_and_moments(tmp_path / "ref" / "out")
    assert_same_training(reference, weights_and_moments(tmp_path / "ddp" / "out"))
    assert_same_training(reference, weights_and_moments(tmp_path / "ddp1" / "out"))


def count_allreduces(cfg, tmp_path, name):
    out = tmp_path / f"{name}.count"
    proc = torchrun(str(REPO / "tests" / "ddp_harness.py"), "count_allreduce", str(out), "--", *cli_args(cfg), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return int(out.read_text())


def test_gradients_all_reduced_once_per_optimizer_step(tmp_path, tiny_data):
    data_root, _ = tiny_data
    steps = dict(COMMON, max_iters=3, eval_interval=100)
    one_micro = count_allreduces(tiny_config(tmp_path / "a", data_root, gradient_accumulation_steps=2, **steps), tmp_path, "a")
    four_micro = count_allreduces(tiny_config(tmp_path / "b", data_root, gradient_accumulation_steps=8, **steps), tmp_path, "b")
    assert one_micro >= 3 and one_micro % 3 == 0  # 3 steps x the number of gradient buckets
    assert four_micro == one_micro  # 4 micro-steps per rank, still one all-reduce per bucket per step


def test_accumulation_must_divide_among_ranks(tmp_path, tiny_data):
    data_root, _ = tiny_data
    proc = torchrun("-m", "fastgpt.train", *cli_args(tiny_config(tmp_path, data_root, gradient_accumulation_steps=3)), cwd=tmp_path)
    assert proc.returncode != 0
    assert "gradient_accumulation_steps=3 is the global count and must be divisible by the 2 ranks" in proc.stderr


def test_a_failing_rank_stops_the_job_quickly(tmp_path, tiny_data):
    data_root, _ = tiny_data
    cfg = tiny_config(tmp_path, data_root, max_iters=1000, eval_interval=1000, gradient_accumulation_steps=2)
    start = time.perf_counter()
    proc = torchrun(str(REPO / "tests" / "ddp_harness.py"), "fail_rank1", "unused", "--", *cli_args(cfg), cwd=tmp_path)
    elapsed = time.perf_counter() - start
    assert proc.returncode != 0
    assert "injected failure on rank 1" in proc.stderr
    assert elapsed < 60, f"the job took {elapsed:.0f} s to stop"


def test_a_killed_rank_fails_the_job_in_seconds_and_a_restart_resumes(tmp_path, tiny_data):
    data_root, _ = tiny_data
    harness = str(REPO / "tests" / "fault_harness.py")
    cfg = tiny_config(tmp_path / "once", data_root, max_iters=1000, eval_interval=4, gradient_accumulation_steps=2)
    proc = torchrun("--max-restarts=0", harness, "step", "6", "--", *cli_args(cfg), cwd=tmp_path)
    killed_at = (tmp_path / "once" / "out" / ".fault-injected").stat().st_mtime
    assert proc.returncode != 0
    assert time.time() - killed_at < 30, f"the job took {time.time() - killed_at:.0f} s to notice a lost rank"

    # The same fault with one restart allowed: the new attempt resumes from iteration 4 and finishes.
    cfg = tiny_config(tmp_path / "again", data_root, max_iters=12, eval_interval=4, gradient_accumulation_steps=2,
                      init_from="auto")
    proc = torchrun("--max-restarts=1", harness, "step", "6", "--", *cli_args(cfg), cwd=tmp_path,
                    env={**ENV, distributed.FRESH_STORE_ENV: "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "warning: torchrun --max-restarts" not in proc.stdout
    assert (tmp_path / "again" / "out" / ".fault-injected").exists()  # the fault did happen
    assert "at iteration 4" in proc.stdout and proc.stdout.count("resumed from") == 1
    assert ckpt_io.load_checkpoint(tmp_path / "again" / "out" / "ckpt.pt")["iter_num"] == 12


def test_sigterm_to_torchrun_stops_every_rank_at_one_step_with_a_checkpoint(tmp_path, tiny_data):
    data_root, _ = tiny_data
    cfg = tiny_config(tmp_path, data_root, max_iters=100_000, eval_interval=100_000, log_interval=1,
                      gradient_accumulation_steps=2)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "fastgpt.train",
           *cli_args(cfg)]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env={**ENV, "PYTHONUNBUFFERED": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:
        if line.startswith("iter 5:"):
            break
    sent = time.perf_counter()
    proc.send_signal(signal.SIGTERM)  # as a scheduler does; torchrun forwards it to both ranks
    out, _ = proc.communicate(timeout=TIMEOUT_S)
    assert time.perf_counter() - sent < 30
    # Had the ranks disagreed on the step, the save's gather would have failed or hung.
    stopped = int(out.split("stopped by SIGTERM at iteration ")[1].split(";")[0])
    assert ckpt_io.load_checkpoint(tmp_path / "out" / "ckpt.pt")["iter_num"] == stopped
    assert "Traceback" not in out.split("stopped by SIGTERM")[0]  # torchrun's own report of the signal comes after
