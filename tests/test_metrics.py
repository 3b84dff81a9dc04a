"""ThroughputMeter (ETA, smoothing, data-wait share) on a fake clock, and metrics.jsonl as the
trainer writes it: every field, appended on resume, a new run's log set aside; and the CPU peak
measurement leaving the run's random stream alone."""

import json
import math
from functools import partial

import pytest
import torch

from fastgpt import fileio, hardware
from fastgpt.metrics import (ETA_BETA, MetricsLog, ThroughputMeter, elapsed_before, evals_left, format_eta,
                             format_log_line, read_metrics)
from fastgpt.train import train

from conftest import tiny_config

CPU = torch.device("cpu")
TRAIN_FIELDS = {"kind", "iter", "loss", "lr", "ms_per_iter", "tokens_per_s", "mfu", "data_wait", "peak_mem_bytes",
                "elapsed_s", "eval_s", "eta_s"}


class Clock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


def meter(clock, max_iters=1000, eval_interval=100, peak=None, tokens=64, flops=1e9):
    m = ThroughputMeter(tokens, flops, peak, max_iters, eval_interval, CPU, clock=clock)
    m.begin(0)
    return m


@pytest.mark.parametrize("seconds, text", [
    (0, "0s"), (42, "42s"), (42.4, "42s"), (59.6, "1m00s"), (370, "6m10s"), (3599.6, "1h00m"), (3720, "1h02m"),
    (3600 * 27 + 60 * 5, "27h05m"), (-3, "0s"),
])
def test_format_eta(seconds, text):
    assert format_eta(seconds) == text


@pytest.mark.parametrize("iter_num, max_iters, interval, left", [
    (0, 20, 10, 2), (5, 20, 10, 2), (10, 20, 10, 1), (20, 20, 10, 0), (5, 25, 10, 3), (20, 25, 10, 1), (0, 7, 10, 1),
])
def test_evals_left_counts_multiples_and_the_last_iteration(iter_num, max_iters, interval, left):
    brute = sum(1 for k in range(iter_num + 1, max_iters + 1) if k % interval == 0 or k == max_iters)
    assert evals_left(iter_num, max_iters, interval) == left == brute


def test_first_two_windows_seed_the_average_then_it_smooths():
    clock = Clock()
    m = meter(clock, max_iters=1000, eval_interval=10_000)  # no evaluation left to add
    clock.t += 10 * 1.0  # first window: 1 s/iter (compile, warm-up)
    r1 = m.tick(10, 2.0, 1e-3)
    assert r1["ms_per_iter"] == pytest.approx(1000) and r1["eta_s"] == pytest.approx(990 * 1.0)
    clock.t += 10 * 0.1  # second window replaces it
    r2 = m.tick(20, 2.0, 1e-3)
    assert r2["eta_s"] == pytest.approx(980 * 0.1)
    clock.t += 10 * 0.2  # third: a moving average weighted per iteration
    r3 = m.tick(30, 2.0, 1e-3)
    avg = 0.1 + (1 - ETA_BETA**10) * (0.2 - 0.1)
    assert r3["ms_per_iter"] == pytest.approx(200)
    assert r3["eta_s"] == pytest.approx(970 * avg)
    assert 0.1 < avg < 0.2


def test_evaluation_is_out_of_the_rates_and_in_the_eta():
    clock = Clock()
    m = meter(clock, max_iters=100, eval_interval=50)
    with m.paused():
        clock.t += 3.0  # the evaluation at iteration 0
    clock.t += 10 * 0.5
    r = m.tick(10, 2.0, 1e-3)
    assert r["ms_per_iter"] == pytest.approx(500)  # the 3 s evaluation is not in the window
    assert r["elapsed_s"] == pytest.approx(8.0)  # but is in the run's clock
    assert r["eta_s"] == pytest.approx(90 * 0.5 + 2 * 3.0)  # evaluations at 50 and 100, 3 s each
    assert m.eval_s == pytest.approx(3.0)


def test_data_wait_share_and_rates():
    clock = Clock()
    m = meter(clock, peak=1e12, tokens=1000, flops=5e10)
    for _ in range(4):
        with m.data():
            clock.t += 0.05  # waiting for the batch
        clock.t += 0.2  # the step
    r = m.tick(4, 1.5, 3e-4)
    assert r["data_wait"] == pytest.approx(0.2 / 1.0)
    assert r["tokens_per_s"] == pytest.approx(1000 / 0.25)
    assert r["mfu"] == pytest.approx(5e10 / 0.25 / 1e12)
    clock.t += 1.0  # a window without waiting: the share restarts
    assert m.tick(8, 1.5, 3e-4)["data_wait"] == 0.0


def test_mfu_is_none_without_a_peak():
    clock = Clock()
    m = meter(clock, peak=None)
    clock.t += 1.0
    assert m.tick(1, 1.0, 1e-3)["mfu"] is None


def test_log_line_format():
    record = {"iter": 1000, "loss": 1.64231, "lr": 1.76e-3, "ms_per_iter": 146.71, "tokens_per_s": 27928.2, "mfu": 0.4852,
              "eta_s": 370.2}
    assert format_log_line(record) == "iter 1000: loss 1.6423, lr 1.76e-03, 146.7 ms/iter, 27,928 tok/s, mfu 48.5%, eta 6m10s"
    assert format_log_line({**record, "mfu": None}).endswith("27,928 tok/s, eta 6m10s")


def test_metrics_log_appends_strict_json_and_repairs_a_cut_line(tmp_path):
    log = MetricsLog(tmp_path)
    log.write({"kind": "train", "iter": 1, "loss": math.nan, "elapsed_s": 1.0})
    log.close()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"kind": "train", "it')  # a crash in the middle of a line
    log = MetricsLog(tmp_path)
    log.write({"kind": "eval", "iter": 2, "train_loss": 1.0, "val_loss": 1.1, "elapsed_s": 2.5})
    log.close()
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 3 and json.loads(lines[0])["loss"] is None  # strict JSON: no NaN
    records, skipped = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["iter"] for r in records] == [1, 2] and skipped == 1
    assert elapsed_before(tmp_path / "metrics.jsonl", 1) == (1.0, 0.0)  # logged before eval_s was
    assert elapsed_before(tmp_path / "metrics.jsonl", 5) == (2.5, 0.0)
    assert elapsed_before(tmp_path / "nothing.jsonl", 5) == (0.0, 0.0)


def test_disabled_log_writes_nothing(tmp_path):
    log = MetricsLog(tmp_path / "out", enabled=False)
    log.write({"kind": "train", "iter": 1})
    log.close()
    assert not (tmp_path / "out").exists()


def test_trainer_writes_every_field_and_resume_appends(tmp_path, tiny_data):
    data_root, _ = tiny_data
    common = dict(max_iters=20, lr_decay_iters=20, eval_interval=10, log_interval=5)
    train(tiny_config(tmp_path, data_root, **{**common, "max_iters": 10}))
    path = tmp_path / "out" / "metrics.jsonl"
    first = read_metrics(path)[0]
    train(tiny_config(tmp_path, data_root, init_from="resume", **common))
    records, skipped = read_metrics(path)
    assert skipped == 0 and records[: len(first)] == first  # appended, not rewritten
    assert [r["iter"] for r in records if r["kind"] == "start"] == [0, 10]
    assert [r["iter"] for r in records if r["kind"] == "eval"] == [0, 10, 20]  # 10 is not evaluated twice
    trains = [r for r in records if r["kind"] == "train"]
    assert [r["iter"] for r in trains] == [5, 10, 15, 20]
    for r in trains:
        assert set(r) == TRAIN_FIELDS
        assert r["ms_per_iter"] > 0 and r["tokens_per_s"] > 0 and 0 < r["data_wait"] < 1 and r["peak_mem_bytes"] > 2**20
        assert r["mfu"] is None or 0 < r["mfu"] < 1
    evals = [r for r in records if r["kind"] == "eval"]
    assert all(set(r) == {"kind", "iter", "train_loss", "val_loss", "elapsed_s", "eval_s"} for r in evals)
    clock = [r["elapsed_s"] for r in records if r["kind"] != "start"]
    assert clock == sorted(clock)  # the resumed run's clock goes on from the checkpoint's
    assert trains[-1]["eta_s"] < 5


def test_new_run_sets_the_old_log_aside(tmp_path, tiny_data):
    data_root, _ = tiny_data
    train(tiny_config(tmp_path, data_root, max_iters=5, eval_interval=5))
    old = (tmp_path / "out" / "metrics.jsonl").read_text()
    train(tiny_config(tmp_path, data_root, max_iters=5, eval_interval=5, seed=7))
    kept = list((tmp_path / "out").glob("metrics.*.jsonl"))
    assert len(kept) == 1 and kept[0].read_text() == old
    assert [r["kind"] for r in read_metrics(tmp_path / "out" / "metrics.jsonl")[0]].count("start") == 1


def test_measuring_the_cpu_peak_leaves_the_run_unchanged(tmp_path, tiny_data, monkeypatch):
    """The first run on a machine measures the matmul peak after seeding; its dropout masks, and
    so its losses, must be those of a run that read the peak from the cache."""
    data_root, _ = tiny_data
    monkeypatch.setattr(hardware, "measure_matmul_flops", partial(hardware.measure_matmul_flops, size=64, seconds=0.01))
    monkeypatch.setenv(fileio.CACHE_DIR_ENV, str(tmp_path / "cache"))  # empty: the first run measures
    runs = [train(tiny_config(tmp_path / name, data_root, max_iters=6, log_interval=1, dropout=0.1)).history["train"]
            for name in ("measured", "cached")]
    assert (tmp_path / "cache" / hardware.PEAK_CACHE_FILE).exists()
    assert runs[0] == runs[1]
