"""bench/harness.py and bench/plot.py: the results file, the ratio table and its picture."""

from __future__ import annotations

import json
import types

import pytest

from bench import harness
from bench import plot as bench_plot


def stats(median, data):
    return types.SimpleNamespace(median=median, rounds=len(data), data=data)


@pytest.fixture
def session(tmp_path, monkeypatch):
    monkeypatch.setenv(harness.RESULTS_ENV, str(tmp_path / "results.jsonl"))
    s = harness.Session()
    s.add("test_train_step[fastgpt-default]", {"provider": "fastgpt", "shape": "default"}, stats(0.5, [0.4, 0.5, 0.6, 0.7, 0.45]),
          {"suite": "train_step", "shape_name": "default 32x128", "tokens_per_s": 8192, "mfu": 0.5, "peak_mb": 100.0})
    s.add("test_train_step[reference-default]", {"provider": "reference", "shape": "default"}, stats(1.0, [1.0] * 3),
          {"suite": "train_step", "shape_name": "default 32x128", "tokens_per_s": 4096, "mfu": 0.25, "peak_mb": 150.0})
    s.add("test_layer_norm[eager-forward-wall]", {"provider": "eager", "mode": "forward", "timing": "wall"},
          stats(0.002, [0.002]), {"suite": "layer_norm", "shape": [2048, 768]})
    return s


def test_results_file_has_one_complete_line_per_benchmark(session, tmp_path):
    lines = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert len(lines) == 3
    first = lines[0]
    for key in ("run", "device", "size", "versions", "commit", "time", "suite", "provider", "shape", "median_s",
                "p20_s", "p80_s", "rounds", "extra"):
        assert key in first, key
    assert (first["suite"], first["provider"], first["shape"]) == ("train_step", "fastgpt", "default 32x128")
    assert first["p20_s"] == 0.45 and first["p80_s"] == 0.7  # quantiles of the sorted rounds
    assert lines[2]["shape"] == "2048x768 mode=forward timing=wall"
    assert "torch" in first["versions"]


def test_ratio_table_pairs_the_same_run_and_names_what_is_missing(session):
    table = session.table()
    train = next(line for line in table if line.startswith("train_step"))
    assert "fastgpt / reference" in train and "2.00x" in train  # 1.0 s / 0.5 s
    assert " 50% " in train  # fastgpt's p80 - p20 = 0.7 - 0.45 over its median 0.5
    assert "8,192 / 4,096" in train and "50.0% / 25.0%" in train and "100 / 150" in train
    ln = next(line for line in table if line.startswith("layer_norm"))
    assert "triton not run on this device" in ln and "x " not in ln.split("eager")[-1]


def test_plot_draws_speedups(session, tmp_path):
    pytest.importorskip("matplotlib")
    path = tmp_path / "results.jsonl"
    with open(path, "a") as f:
        f.write('{"cut off mid-wri\n')  # a line a killed run left behind
    by_run = bench_plot.speedups(bench_plot.read_results(path))
    assert [list(v.items()) for v in by_run.values()] == [[("train_step default 32x128", 2.0)]]
    out = tmp_path / "speedups.png"
    assert bench_plot.main([str(path), "--out", str(out)]) == 0
    assert out.read_bytes().startswith(b"\x89PNG")


def test_plot_without_results_is_one_line(tmp_path, capsys):
    assert bench_plot.main([str(tmp_path / "none.jsonl")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: no results file") and err.count("\n") == 1
    (tmp_path / "empty.jsonl").write_text("garbage\n")
    assert bench_plot.main([str(tmp_path / "empty.jsonl")]) == 2
    assert "no fastgpt/baseline pair" in capsys.readouterr().err
