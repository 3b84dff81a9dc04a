"""The run folder: checked before the first step, and a record that traces the run."""

import json
import shutil
import subprocess

import pytest
import torch

from fastgpt import checkpoint as ckpt_io
from fastgpt import outdir
from fastgpt.outdir import RunDirError
from fastgpt.train import train

from conftest import tiny_config


def test_the_record_names_config_versions_device_and_commit(tmp_path, tiny_data):
    data_root, _ = tiny_data
    cfg = tiny_config(tmp_path, data_root, max_iters=2, eval_interval=2)
    train(cfg)
    record = json.loads((tmp_path / "out" / "run.json").read_text())
    assert record["config"] == cfg.to_dict()
    assert record["host"]["torch"] == torch.__version__ and record["host"]["python"]
    assert "triton" in record["host"] and "cuda" in record["host"]
    assert record["device"] == "cpu" and record["device_name"] and record["world_size"] == 1
    head = subprocess.run(["git", "-C", str(outdir.PACKAGE_DIR), "rev-parse", "HEAD"], capture_output=True, text=True)
    if head.returncode == 0:  # a source checkout: the commit, marked when the tree has changes
        assert record["git_commit"].split("+")[0] == head.stdout.strip()
    assert ckpt_io.load_checkpoint(tmp_path / "out" / "ckpt.pt")["run"] == record  # and every checkpoint carries it


def test_git_outside_a_checkout_is_none(monkeypatch, tmp_path):
    monkeypatch.setattr(outdir, "PACKAGE_DIR", tmp_path)
    assert outdir.git_commit() is None


def test_a_full_disk_is_refused_before_the_first_step(tmp_path, tiny_data, monkeypatch):
    data_root, _ = tiny_data
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9 - 1000, 1000))
    steps = []
    monkeypatch.setattr("fastgpt.train.clip_and_step", lambda *a, **k: steps.append(1))
    with pytest.raises(RunDirError, match=r"has 0 MiB free, and a checkpoint of this model needs about 0 MiB"):
        train(tiny_config(tmp_path, data_root))
    assert not steps


def test_a_file_in_the_way_of_a_checkpoint_is_named(tmp_path):
    (tmp_path / "ckpt.pt").mkdir()
    with pytest.raises(RunDirError, match=r"ckpt.pt is a folder where this run writes a file"):
        outdir.check_writable(tmp_path)
