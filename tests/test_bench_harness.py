"""bench/harness.py and bench/plot.py: the results file, the ratio table and its picture."""

from __future__ import annotations

import json
import types

import pytest
import torch.nn.functional as F

from bench import harness
from bench import plot as bench_plot
from bench import test_bench_layernorm as ln_bench


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


def test_committed_results_come_from_clean_checkouts():
    """A row from a tree with uncommitted changes names code that no one can check out again."""
    lines = harness.DEFAULT_RESULTS.read_text().splitlines() if harness.DEFAULT_RESULTS.exists() else []
    commits = {json.loads(line)["commit"] for line in lines if line.strip()}
    assert all(harness.traceable(c) for c in commits), sorted(map(str, commits))


@pytest.mark.parametrize("commit", ["abc123+dirty", None])
def test_a_dirty_tree_writes_nothing_to_the_committed_results(commit, tmp_path, monkeypatch):
    committed = tmp_path / "results.jsonl"
    monkeypatch.setattr(harness, "DEFAULT_RESULTS", committed)
    monkeypatch.setattr(harness, "git_commit", lambda: commit)
    monkeypatch.delenv(harness.RESULTS_ENV, raising=False)
    record = ("test_adamw_step[fastgpt]", {"provider": "fastgpt"}, stats(1.0, [1.0]), {"suite": "adamw"})
    s = harness.Session()
    s.add(*record)
    assert not committed.exists() and len(s.records) == 1  # the table still shows it
    assert s.results_note.startswith(f"results not appended to {committed}: commit {commit} ")
    monkeypatch.setenv(harness.RESULTS_ENV, str(committed))  # named explicitly: still refused
    harness.Session().add(*record)
    assert not committed.exists()
    elsewhere = tmp_path / "mine.jsonl"
    monkeypatch.setenv(harness.RESULTS_ENV, str(elsewhere))
    harness.Session().add(*record)
    assert json.loads(elsewhere.read_text())["commit"] == commit
    monkeypatch.delenv(harness.RESULTS_ENV)
    monkeypatch.setattr(harness, "git_commit", lambda: "abc123")
    harness.Session().add(*record)
    assert json.loads(committed.read_text())["commit"] == "abc123"


def rows(table: list[str], suite: str) -> dict[str, str]:
    """'ours / baseline' -> the rest of its row, for one suite's rows."""
    out = {}
    for line in table:
        if line.startswith(suite + " "):
            names = " ".join(line[58:88].split())
            out[names] = line[88:]
    return out


def test_ratio_table_has_a_row_per_pair_and_names_what_is_missing(session):
    train = rows(session.table(), "train_step")
    assert list(train) == ["fastgpt / reference", "fastgpt / reference-compiled"]
    row = train["fastgpt / reference"]
    assert "2.00x" in row  # 1.0 s / 0.5 s
    assert " 50% " in row  # fastgpt's p80 - p20 = 0.7 - 0.45 over its median 0.5
    assert "8,192 / 4,096" in row and "50.0% / 25.0%" in row and "100 / 150" in row
    assert train["fastgpt / reference-compiled"].strip() == "reference-compiled not run on this device"
    ln = rows(session.table(), "layer_norm")
    assert list(ln) == ["triton / eager", "triton / compiled"]
    assert ln["triton / eager"].strip() == "triton not run on this device"
    assert ln["triton / compiled"].strip() == "triton and compiled not run on this device"


def test_every_suite_compares_with_its_compiled_baseline():
    """nanoGPT compiles by default: a claim against eager baselines alone would flatter fastgpt."""
    assert ("fastgpt", "reference-compiled") in harness.SUITE_PAIRS["train_step"]
    assert ("fastgpt", "compiled") in harness.SUITE_PAIRS["adamw"]
    assert ("triton", "compiled") in harness.SUITE_PAIRS["layer_norm"]
    assert {("fastgpt", "compiled"), ("triton", "compiled")} <= set(harness.SUITE_PAIRS["linear_cross_entropy"])
    for suite, pairs in harness.SUITE_PAIRS.items():
        assert pairs and all(len(pair) == 2 and pair[0] != pair[1] for pair in pairs), suite


def test_a_shape_no_pair_ran_is_left_out(tmp_path, monkeypatch):
    """A sweep of one provider's settings (the LayerNorm backward grid) is no pair."""
    monkeypatch.setenv(harness.RESULTS_ENV, str(tmp_path / "results.jsonl"))
    s = harness.Session()
    s.add("test_layer_norm_backward_grid[4]", {"resident_warps": 4}, stats(0.001, [0.001]),
          {"suite": "layer_norm", "shape": [16384, 768]})
    assert s.table()[1:] == []


def test_layer_norm_bench_reports_the_time_of_one_call(benchmark, monkeypatch, tmp_path):
    """pytest-benchmark's median, the results file, the table and bench_targets.py show one
    number: the time of a call, though a round is several calls ending in one synchronize. Each
    call advances a fake clock by 1 ms, so per call reads 1 ms and per round would read 4."""
    if benchmark.disabled:
        pytest.skip("needs pytest-benchmark to time (--benchmark-disable given)")
    clock, syncs = [0.0], []

    def one_ms_layer_norm(provider):
        def fn(x, w, b):
            clock[0] += 1e-3
            return F.layer_norm(x, (x.shape[-1],), w, b)
        return fn

    for name, value in dict(ROWS=256, COLS=512, CALLS_PER_ROUND=4, ROUNDS=5, WARMUP_ROUNDS=1).items():
        monkeypatch.setattr(ln_bench, name, value)
    monkeypatch.setattr(ln_bench, "layer_norm_for", one_ms_layer_norm)
    monkeypatch.setattr(ln_bench, "sync", lambda: syncs.append(clock[0]))
    monkeypatch.setattr(benchmark, "_timer", lambda: clock[0])
    ln_bench.test_layer_norm(benchmark, "eager", "forward", "wall")

    assert benchmark.stats.stats.median == pytest.approx(1e-3)
    assert len(syncs) == 5 + 1  # one a round (timed and warm-up), not one a call
    assert benchmark.extra_info["gb_per_s"] == round(2 * 256 * 512 * 4 / 1e-3 / 1e9, 1)
    monkeypatch.setenv(harness.RESULTS_ENV, str(tmp_path / "results.jsonl"))
    s = harness.Session()
    params = {"provider": "eager", "mode": "forward", "timing": "wall"}
    ours = s.add("test_layer_norm[eager-forward-wall]", params, benchmark.stats.stats, dict(benchmark.extra_info))
    assert ours["median_s"] == pytest.approx(1e-3)
    s.add("test_layer_norm[triton-forward-wall]", {**params, "provider": "triton"}, stats(5e-4, [5e-4]),
          dict(benchmark.extra_info))
    assert rows(s.table(), "layer_norm")["triton / eager"].split()[:4] == ["0.5", "/", "1", "2.00x"]


def test_plot_draws_speedups(session, tmp_path):
    pytest.importorskip("matplotlib")
    path = tmp_path / "results.jsonl"
    with open(path, "a") as f:
        f.write('{"cut off mid-wri\n')  # a line a killed run left behind
    by_run = bench_plot.speedups(bench_plot.read_results(path))
    assert [list(v.items()) for v in by_run.values()] == [[("train_step default 32x128: fastgpt / reference", 2.0)]]
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
