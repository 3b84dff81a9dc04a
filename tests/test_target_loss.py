"""target_loss: time to a validation loss, measured in the trainer. The first evaluation at or
below the target is logged and written to metrics.jsonl as one 'target_reached' event, with
training and evaluation seconds apart; the run stops there unless stop_at_target=False, and a
resume neither reports it again nor loses it."""

from __future__ import annotations

import pytest

from fastgpt.config import ConfigError
from fastgpt.metrics import metrics_path, read_metrics
from fastgpt.train import train

from conftest import tiny_config

RUN = dict(max_iters=30, eval_interval=5, eval_iters=2, log_interval=5, lr_decay_iters=30)


def events(out_dir) -> list[dict]:
    return [r for r in read_metrics(metrics_path(out_dir))[0] if r.get("event") == "target_reached"]


def evals(out_dir) -> list[dict]:
    return [r for r in read_metrics(metrics_path(out_dir))[0] if r["kind"] == "eval"]


@pytest.fixture
def reference(tmp_path, tiny_data):
    """The evaluations of a run without a target, and a target its third evaluation first reaches."""
    data_root, _ = tiny_data
    history = train(tiny_config(tmp_path / "reference", data_root, **RUN)).history["eval"]
    val = [v for _, _, v in history]
    k = next(i for i in range(2, len(val)) if val[i] < min(val[:i]))  # the first new best from the third on
    return data_root, history, history[k][0], (val[k] + min(val[:k])) / 2


def test_the_run_stops_at_the_first_evaluation_that_reaches_the_target(tmp_path, reference):
    data_root, history, target_iter, target = reference
    cfg = tiny_config(tmp_path / "run", data_root, target_loss=target, **RUN)
    result = train(cfg)
    assert result.iter_num == target_iter  # stopped at that evaluation
    assert result.history["eval"] == [h for h in history if h[0] <= target_iter]  # the same run up to there
    (event,) = events(cfg.out_dir)
    assert event["iter"] == target_iter and event["val_loss"] == result.losses["val"] <= target
    assert event["tokens"] == target_iter * cfg.batch_size * cfg.block_size * cfg.gradient_accumulation_steps
    assert event["train_seconds"] > 0 and event["eval_seconds"] > 0
    last_eval = evals(cfg.out_dir)[-1]
    assert event["train_seconds"] + event["eval_seconds"] == pytest.approx(last_eval["elapsed_s"], abs=0.05)
    assert (tmp_path / "run" / "out" / "ckpt.pt").exists()  # saved as at any evaluation


def test_stop_at_target_false_goes_on_and_reports_the_target_once(tmp_path, reference):
    data_root, history, target_iter, target = reference
    cfg = tiny_config(tmp_path / "run", data_root, target_loss=target, stop_at_target=False, **RUN)
    result = train(cfg)
    assert result.iter_num == RUN["max_iters"] and result.history["eval"] == history
    assert [e["iter"] for e in events(cfg.out_dir)] == [target_iter]


def test_a_resume_after_the_target_does_not_report_it_again(tmp_path, reference):
    data_root, _, target_iter, target = reference
    cfg = tiny_config(tmp_path / "run", data_root, target_loss=target, **RUN)
    train(cfg)
    resumed = train(tiny_config(tmp_path / "run", data_root, target_loss=target, stop_at_target=False,
                                init_from="resume", **RUN))
    assert resumed.iter_num == RUN["max_iters"]
    assert [e["iter"] for e in events(cfg.out_dir)] == [target_iter]


def test_a_resumed_run_keeps_counting_training_and_evaluation_apart(tmp_path, reference):
    """Stopped before the target and resumed, the event's seconds continue the first segment's."""
    data_root, _, target_iter, target = reference
    first = tiny_config(tmp_path / "run", data_root, **{**RUN, "max_iters": target_iter - 5})
    train(first)
    before = evals(first.out_dir)[-1]
    train(tiny_config(tmp_path / "run", data_root, target_loss=target, init_from="resume", **RUN))
    (event,) = events(first.out_dir)
    assert event["iter"] == target_iter
    assert event["eval_seconds"] > before["eval_s"] and event["train_seconds"] > before["elapsed_s"] - before["eval_s"]


@pytest.mark.parametrize("value", [-1.0, float("nan")])
def test_a_bad_target_is_refused_naming_the_field(tmp_path, tiny_data, value):
    with pytest.raises(ConfigError, match="target_loss"):
        tiny_config(tmp_path, tiny_data[0], target_loss=value)
