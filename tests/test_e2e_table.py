"""scripts/e2e_table.py: gpu_check.sh's end-to-end table and the measurement kernels='auto' reads,
from a log of the formats the three trainers print."""

from __future__ import annotations

import json
import pathlib
import re
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))
import e2e_table  # noqa: E402


def fastgpt_lines(ms_by_iter, peak="7,852.5"):
    return [f"iter {i}: loss 10.9, lr 5.45e-04, {ms:.1f} ms/iter, {65536 / ms * 1e3:,.0f} tok/s, mfu 40.1%, eta 10s"
            for i, ms in ms_by_iter] + [
        "step 300: train loss 3.2100, val loss 3.4567",
        f"done: 300 iterations in 60 s; best val loss 3.4567; peak memory {peak} MiB (torch.cuda.max_memory_allocated)"]


def bracket(name, shape, what, lines, rc=0):
    return [f"=== e2e run {name} | {shape} | 65536 | {what}", *lines] + ([f"=== e2e end {name} rc={rc}"] if rc is not None else [])


LOG = [
    "=== environment", "NVIDIA H200",
    # iteration 5 holds the compile and is left out of the median
    *bracket("torch-A", "16x1024 x4", "all torch", fastgpt_lines([(5, 3000.0), (10, 131.0), (15, 132.0), (20, 130.0)])),
    *bracket("reference-A", "16x1024 x4", "reference",
             [f"iter {i}: loss 10.9, {ms:.1f} ms/iter, {65536 / ms * 1e3:,.0f} tok/s" for i, ms in ((5, 2900.0), (10, 140.0), (15, 140.0))]
             + ["peak memory 12,276.0 MiB (torch.cuda.max_memory_allocated)"]),
    *bracket("optimizer-A", "16x1024 x4", "Triton AdamW", fastgpt_lines([(10, 128.0), (15, 128.0)])),
    *bracket("head_loss-A", "16x1024 x4", "Triton head", fastgpt_lines([(10, 140.0)]), rc=1),
    *bracket("nanogpt-A", "16x1024 x4", "nanoGPT", [f"iter {i}: loss 10.9, time {ms:.2f}ms, mfu 136.26%" for i, ms in ((9, 500.0), (10, 132.0), (11, 134.0))]),
    *bracket("fp8-B", "64x1024 x1", "fp8 head", fastgpt_lines([(10, 120.0)]), rc=None),  # cut off by a cap
]


def test_rows_are_steady_medians_against_the_reference():
    runs = {r.name: r for r in e2e_table.read_runs(LOG)}
    assert runs["torch-A"].steady_ms == 131.0 and runs["torch-A"].tokens_per_s == pytest.approx(65536 / 0.131)
    assert runs["torch-A"].peak_mib == 7852.5 and runs["torch-A"].val_loss == (300, 3.4567)
    assert runs["reference-A"].steady_ms == 140.0 and runs["reference-A"].peak_mib == 12276.0
    assert runs["nanogpt-A"].steady_ms == 133.0 and runs["nanogpt-A"].mfu == []  # nanoGPT's MFU is an A100's
    assert runs["head_loss-A"].rc == 1 and runs["fp8-B"].rc is None
    table = e2e_table.markdown(list(runs.values()))
    row = next(line for line in table.splitlines() if line.startswith("| torch-A "))
    assert re.search(r"\| 131\.0 \| 500,275 \| 1\.069x \| 40\.1% \| 7,852 \| 3\.4567 @ 300 \| ok \|$", row), row
    assert "| fp8-B | 64x1024 x1 |" in table and "cut off" in table  # no reference at B: no ratio
    assert re.search(r"\| fp8-B .*\| - \| 40\.1%", table)


def test_the_measurement_holds_the_runs_that_finished():
    entry = e2e_table.measurement(e2e_table.read_runs(LOG), "a run")
    # head_loss-A failed and layer_norm-A never ran: 'auto' keeps those ops in torch
    assert entry["tokens_per_s"] == {"torch": round(65536 / 0.131), "optimizer=triton": round(65536 / 0.128)}
    assert "16x1024 x4" in entry["step"] and entry["source"] == "a run"
    assert e2e_table.measurement(e2e_table.read_runs(LOG[:2]), "nothing") is None


def test_the_measurement_file_is_what_ops_reads(tmp_path):
    """The script's output, for a known GPU, is an entry fastgpt.ops takes as it is."""
    from fastgpt import ops

    log = tmp_path / "gpu_check.log"
    log.write_text("\n".join(LOG) + "\n")
    out = tmp_path / "m.json"
    assert e2e_table.main([str(log), "--measurements", str(out), "--gpu", "NVIDIA H200", "--commit", "abc"]) == 0
    table = json.loads(out.read_text())
    assert list(table) == ["H200"]
    assert ops.triton_winners(table["H200"]) == {"optimizer"}  # 131 -> 128 ms: 2.3% faster
