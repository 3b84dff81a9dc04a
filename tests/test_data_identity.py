"""Data identity: prepare records each split's size and sha256 beside the data, a checkpoint keeps
it, and a resume on other token files stops with one line naming the split, unless
allow_data_change says the change was meant; a checkpoint without the record resumes as before."""

from __future__ import annotations

import json
import pathlib

import numpy as np
import pytest
import torch

from fastgpt import fileio, prepare, tokenfiles, train

from conftest import cli_args, tiny_config

TEXT = "The quick brown fox jumps over the lazy dog. " * 200


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv(fileio.CACHE_DIR_ENV, str(tmp_path / "cache"))


def test_prepare_records_identity_and_a_resume_reads_it_without_hashing(tmp_path, monkeypatch):
    source = tmp_path / "a.txt"
    source.write_text(TEXT)
    out = tmp_path / "data"
    assert prepare.main(["text", "--input", str(source), "--out", str(out), "--piece-chars", "100"]) == 0
    record = json.loads((out / tokenfiles.IDENTITY_FILENAME).read_text())
    for split, name in tokenfiles.SPLIT_FILENAMES.items():
        assert record[split]["bytes"] == (out / name).stat().st_size
        assert record[split]["sha256"] == fileio.sha256_file(out / name)
    monkeypatch.setattr(fileio, "sha256_file", lambda path: pytest.fail(f"rehashed {path}"))
    assert tokenfiles.data_identity(out) == {s: {"bytes": r["bytes"], "sha256": r["sha256"]} for s, r in record.items()}


@pytest.fixture
def trained(tmp_path, tiny_data):
    """A checkpoint trained on the tiny dataset (which no prepare wrote: its identity is hashed at
    the first run and cached outside it), and the arguments that resume it."""
    cfg = tiny_config(tmp_path, tiny_data[0], max_iters=10, eval_interval=5)
    assert train.main(cli_args(cfg)) == 0
    assert not (tiny_data[0] / tiny_data[1] / tokenfiles.IDENTITY_FILENAME).exists()
    args = [*cli_args(cfg), "--max_iters=20", "--lr_decay_iters=20", "--init_from='resume'"]
    return pathlib.Path(cfg.out_dir), tiny_data[0] / tiny_data[1], args


def change_tokens(path: pathlib.Path) -> None:
    """Same size, other content: only the hash can tell."""
    ids = np.fromfile(path, dtype=np.uint16)
    ids[:100] = (ids[:100] + 1) % 32
    ids.tofile(path)


def test_a_resume_on_changed_data_is_refused_naming_the_split(trained, capsys):
    out, data, args = trained
    change_tokens(data / "train.bin")
    before = (out / "ckpt.pt").read_bytes()
    capsys.readouterr()
    assert train.main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "another train split" in err and "same size, other content" in err, err
    assert "--allow_data_change=True" in err, err
    assert (out / "ckpt.pt").read_bytes() == before


def test_a_resume_on_a_shorter_split_names_the_sizes(trained, capsys):
    out, data, args = trained
    ids = np.fromfile(data / "val.bin", dtype=np.uint16)
    ids[:-10].tofile(data / "val.bin")
    capsys.readouterr()
    assert train.main(args) == 2
    err = capsys.readouterr().err.strip()
    assert "another val split" in err and f"{ids.nbytes} bytes then, {ids.nbytes - 20} now" in err, err


def test_allow_data_change_continues_and_records_the_new_data(trained, capsys):
    out, data, args = trained
    change_tokens(data / "train.bin")
    capsys.readouterr()
    assert train.main([*args, "--allow_data_change=True"]) == 0
    assert "train data changed since" in capsys.readouterr().out
    saved = torch.load(out / "ckpt.pt", weights_only=True)
    assert saved["iter_num"] == 20 and saved["data_identity"] == tokenfiles.data_identity(data)


def test_a_checkpoint_without_the_record_resumes_as_before(trained):
    out, data, args = trained
    saved = torch.load(out / "ckpt.pt", weights_only=True)
    del saved["data_identity"]
    torch.save(saved, out / "ckpt.pt")
    change_tokens(data / "train.bin")
    assert train.main(args) == 0


def test_an_unprepared_folder_is_hashed_once(tmp_path, tiny_data, monkeypatch):
    data = tiny_data[0] / tiny_data[1]
    first = tokenfiles.data_identity(data)
    monkeypatch.setattr(fileio, "sha256_file", lambda path: pytest.fail(f"rehashed {path}"))
    assert tokenfiles.data_identity(data) == first
