"""scripts/bench_targets.py: the kernel targets read off a pytest-benchmark report."""

from __future__ import annotations

import importlib.util
import json
import pathlib
import re
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("bench_targets", ROOT / "scripts" / "bench_targets.py")
bench_targets = importlib.util.module_from_spec(spec)
sys.modules["bench_targets"] = bench_targets  # dataclasses look their module up there
spec.loader.exec_module(bench_targets)


def entry(test, provider, median, **params_and_extra):
    params = {"provider": provider, **{k: params_and_extra.pop(k) for k in ("mode", "timing") if k in params_and_extra}}
    name = f"{test}[{'-'.join(params.values())}]"
    return {"name": name, "params": params, "stats": {"median": median}, "extra_info": params_and_extra}


def report():
    both = "forward+backward"
    return {"benchmarks": [
        entry("test_layer_norm", "triton", 1.0, mode=both, timing="graph"),
        entry("test_layer_norm", "eager", 2.0, mode=both, timing="graph"),  # 2x: met
        entry("test_layer_norm", "compiled", 0.9, mode=both, timing="graph"),  # 0.9x: missed
        entry("test_layer_norm", "triton", 3.0, mode=both, timing="wall"),
        entry("test_layer_norm", "eager", 2.0, mode=both, timing="wall"),  # 0.67x: missed; no compiled: not measured
        entry("test_layer_norm", "eager", 5.0, mode="forward", timing="graph"),  # another mode: ignored
        entry("test_cross_entropy_rows", "triton", 1.0, peak_mb=1700.0),
        entry("test_cross_entropy_rows", "eager", 1.9, peak_mb=3400.0),  # 1.9x: missed; memory 0.5x: met
        entry("test_linear_cross_entropy", "triton", 1.0, peak_mb=400.0),
        entry("test_linear_cross_entropy", "eager", 1.25, peak_mb=2000.0),  # 1.25x: met; memory 0.2x: met
        entry("test_adamw_step", "fused", 1.0),  # no triton provider: not measured
        entry("test_adamw_step", "foreach", 2.0),
    ]}


def test_verdicts():
    rows = {t.what: (ratio, verdict) for t, ratio, verdict in bench_targets.evaluate(report())}
    assert rows["LayerNorm fwd+bwd vs torch eager, GPU time"] == (2.0, "met")
    assert rows["LayerNorm fwd+bwd vs torch.compile, GPU time"][1] == "MISSED"
    assert abs(rows["LayerNorm fwd+bwd vs torch.compile, GPU time"][0] - 0.9) < 1e-12
    assert rows["LayerNorm fwd+bwd vs torch eager, wall time"][1] == "MISSED"
    assert rows["LayerNorm fwd+bwd vs torch.compile, wall time"] == (None, "not measured")
    assert rows["cross-entropy fwd+bwd vs torch eager"][1] == "MISSED"
    assert rows["cross-entropy fwd+bwd peak memory vs eager"] == (0.5, "met")
    assert rows["head + loss fwd+bwd vs torch eager"] == (1.25, "met")
    assert rows["head + loss fwd+bwd peak memory vs unchunked"] == (0.2, "met")
    assert rows["AdamW step vs torch fused AdamW"] == (None, "not measured")


def test_cli_merges_reports_and_prints_every_target(tmp_path, capsys):
    benches = report()["benchmarks"]
    first, second, merged = tmp_path / "a.json", tmp_path / "b.json", tmp_path / "merged.json"
    first.write_text(json.dumps({"machine_info": {"node": "gpu-box"}, "benchmarks": benches[:6]}))
    second.write_text(json.dumps({"benchmarks": benches[6:]}))
    cut_off = tmp_path / "cut.json"  # a benchmark run killed at its cap leaves no file
    assert bench_targets.main(["--merge", str(merged), str(first), str(second), str(cut_off)]) == 0
    out = capsys.readouterr().out
    assert f"skipping {cut_off}" in out and "2 report(s) (gpu-box)" in out
    assert out.count(" met") == 4 and out.count("MISSED") == 3 and out.count("not measured") == 2
    # the medians as pytest-benchmark holds them (per call in every benchmark), in ms
    assert re.search(r"test_layer_norm\[triton-forward\+backward-graph\] +1000\.000 ", out)
    assert json.loads(merged.read_text())["benchmarks"] == benches
    with pytest.raises(SystemExit):
        bench_targets.main([])


def test_finished_benchmarks_of_a_run_cut_off_count_once(tmp_path, capsys):
    """gpu_check passes each file's JSON and the JSONL its benchmarks appended as they finished;
    a run killed at its cap leaves only JSONL lines, the last maybe half-written."""
    benches = report()["benchmarks"]
    for b in benches:
        b["fullname"] = "bench/x.py::" + b["name"]
    complete, lines = tmp_path / "a.json", tmp_path / "bench.jsonl"
    complete.write_text(json.dumps({"benchmarks": benches[:6]}))
    lines.write_text("".join(json.dumps(b) + "\n" for b in benches) + '{"name": "test_cut')
    merged = tmp_path / "merged.json"
    assert bench_targets.main(["--merge", str(merged), str(complete), str(lines)]) == 0
    assert json.loads(merged.read_text())["benchmarks"] == benches
    assert capsys.readouterr().out.count("MISSED") == 3
