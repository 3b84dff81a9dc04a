"""`python -m fastgpt.plot OUT_DIR`: a PNG of the losses, one line and exit 2 on a missing or
useless metrics.jsonl, and one line (the trainer carrying on) without matplotlib."""

import os
import pathlib
import subprocess
import sys

import pytest

from fastgpt import metrics, plot
from fastgpt.metrics import MetricsLog
from fastgpt.train import train

from conftest import tiny_config

REPO = pathlib.Path(__file__).resolve().parent.parent
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_run(out_dir):
    """A resumed run's log: iterations 6-10 logged twice (a crash after the checkpoint at 5)."""
    log = MetricsLog(out_dir)
    log.write({"kind": "start", "iter": 0, "time": 0.0, "config": {}})
    log.write({"kind": "eval", "iter": 0, "train_loss": 4.2, "val_loss": 4.2, "elapsed_s": 0.5})
    for it in range(1, 11):
        log.write({"kind": "train", "iter": it, "loss": 4.0 - 0.1 * it, "elapsed_s": 0.5 + it})
    log.write({"kind": "start", "iter": 5, "time": 0.0, "config": {}})
    for it in range(6, 21):
        log.write({"kind": "train", "iter": it, "loss": 4.0 - 0.1 * it if it != 12 else float("nan"), "elapsed_s": 0.75 + it})
    log.write({"kind": "eval", "iter": 20, "train_loss": 2.1, "val_loss": 2.2, "elapsed_s": 21.0})
    log.close()


def without_matplotlib(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now raises ImportError


def test_load_losses_keeps_the_later_of_repeated_iterations(tmp_path):
    write_run(tmp_path)
    train_losses, evals = metrics.load_losses(tmp_path / "metrics.jsonl")
    assert sorted(train_losses) == list(range(1, 21)) and sorted(evals) == [0, 20]
    assert train_losses[7] == (7.75, pytest.approx(3.3)) and train_losses[5] == (5.5, pytest.approx(3.5)) and train_losses[12][1] is None  # NaN was written as null
    assert evals[20] == (21.0, 2.1, 2.2)


def test_plot_writes_a_png(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    write_run(tmp_path)
    assert plot.main([str(tmp_path)]) == 0
    png = tmp_path / "loss.png"
    assert png.read_bytes()[:8] == PNG_MAGIC and png.stat().st_size > 10_000
    assert capsys.readouterr().out == f"plot: wrote {png}\n"
    other = tmp_path / "elsewhere.png"
    assert plot.main([str(tmp_path), "--out", str(other)]) == 0
    assert other.read_bytes()[:8] == PNG_MAGIC


def test_training_ends_with_a_png(tmp_path, tiny_data, capsys):
    pytest.importorskip("matplotlib")
    data_root, _ = tiny_data
    train(tiny_config(tmp_path, data_root, max_iters=5, eval_interval=5))
    png = tmp_path / "out" / "loss.png"
    assert png.read_bytes()[:8] == PNG_MAGIC
    assert capsys.readouterr().out.splitlines()[-1] == f"plot: wrote {png}"


def test_without_matplotlib_the_plot_is_one_line_and_exit_2(tmp_path, monkeypatch, capsys):
    write_run(tmp_path)
    without_matplotlib(monkeypatch)
    assert plot.main([str(tmp_path)]) == 2
    captured = capsys.readouterr()
    assert captured.err == "plot: matplotlib is not installed; pip install -e '.[plot]'\n" and captured.out == ""
    assert not (tmp_path / "loss.png").exists()


def test_without_matplotlib_training_says_so_and_finishes(tmp_path, tiny_data, monkeypatch, capsys):
    data_root, _ = tiny_data
    without_matplotlib(monkeypatch)
    result = train(tiny_config(tmp_path, data_root, max_iters=5, eval_interval=5))
    assert result.iter_num == 5 and (tmp_path / "out" / "ckpt.pt").exists()
    assert capsys.readouterr().out.splitlines()[-1] == metrics.MISSING_MATPLOTLIB
    assert not (tmp_path / "out" / "loss.png").exists()


@pytest.mark.parametrize("content", [None, "", "\n\n", "not json\n{\"kind\": \"train\"}\n[1, 2]\n",
                                     '{"kind": "start", "iter": 0, "config": {}}\n'])
def test_no_losses_is_one_line_and_exit_2(tmp_path, capsys, content):
    if content is not None:
        (tmp_path / "metrics.jsonl").write_text(content)
    assert plot.main([str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "metrics.jsonl" in err
    assert not (tmp_path / "loss.png").exists()


def test_help():
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "fastgpt.plot", "--help"], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "usage: python -m fastgpt.plot" in proc.stdout and "--out" in proc.stdout


def test_odd_values_are_gaps_not_crashes(tmp_path):
    pytest.importorskip("matplotlib")
    (tmp_path / "metrics.jsonl").write_text('{"kind": "train", "iter": 1, "loss": "x", "elapsed_s": true}\n'
                                            '{"kind": "train", "iter": 2, "loss": 3.0, "elapsed_s": 2}\n')
    assert metrics.load_losses(tmp_path / "metrics.jsonl")[0] == {1: (None, None), 2: (2, 3.0)}
    assert plot.main([str(tmp_path)]) == 0
