"""Files from elsewhere are data: a checkpoint or meta.pkl whose unpickling would run code is
refused with one line, and the code never runs."""

from __future__ import annotations

import json
import os
import pickle

import pytest
import torch

from fastgpt import checkpoint as ckpt_io
from fastgpt.tokenizer import dataset_vocab_size, load_tokenizer

from conftest import write_char_dataset


class CreatesFile:
    """Unpickling this calls os.system, as a malicious pickle would."""

    def __init__(self, target):
        self.target = str(target)

    def __reduce__(self):
        return (os.system, (f"touch {self.target}",))


def test_a_checkpoint_that_would_run_code_is_refused(tmp_path):
    target = tmp_path / "pwned"
    path = tmp_path / "ckpt.pt"
    torch.save({"model": {"w": torch.zeros(2)}, "config": CreatesFile(target)}, path)
    before = path.read_bytes()
    with pytest.raises(ckpt_io.CheckpointError, match=r"refusing to load .*could run code .*system") as e:
        ckpt_io.load_checkpoint(path)
    assert "\n" not in str(e.value)
    assert not target.exists()
    assert path.read_bytes() == before


def test_our_checkpoints_still_load(tmp_path):
    path = tmp_path / "ckpt.pt"
    state = {"model": {"w": torch.ones(3)}, "optimizer": {"state": {}, "param_groups": [{"betas": (0.9, 0.95)}]},
             "model_args": {"n_layer": 2}, "iter_num": 5, "best_val_loss": float("inf"),
             "config": {"out_dir": "out", "vocab_size": None, "compile": "auto"}}
    torch.save(state, path)
    loaded = ckpt_io.load_checkpoint(path)
    assert loaded["iter_num"] == 5 and loaded["optimizer"]["param_groups"][0]["betas"] == (0.9, 0.95)
    torch.testing.assert_close(loaded["model"]["w"], torch.ones(3))


def test_a_meta_pkl_that_would_run_code_is_refused(tmp_path):
    folder = write_char_dataset(tmp_path / "data")
    target = tmp_path / "pwned"
    with open(folder / "meta.pkl", "wb") as f:
        pickle.dump({"vocab_size": 32, "itos": CreatesFile(target), "stoi": {}}, f)
    for read in (dataset_vocab_size, load_tokenizer):
        with pytest.raises(ValueError, match=r"not a plain-data nanoGPT meta.pkl .*\.system"):
            read(folder)
    assert not target.exists()


def test_nanogpt_meta_pkl_still_loads(tmp_path):
    folder = write_char_dataset(tmp_path / "data")  # pickle.dump of a dict, as nanoGPT's prepare.py
    assert dataset_vocab_size(folder) == 32
    assert load_tokenizer(folder).decode([0, 1, 2]) == "abc"


def test_prepare_writes_a_json_vocabulary_that_is_read_first(tmp_path):
    from fastgpt.tokenfiles import write_meta
    from fastgpt.errors import DataError
    from fastgpt.tokenizer import CharTokenizer

    chars = CharTokenizer.from_text("héllo wörld\n")
    write_meta(tmp_path, chars)
    vocab = json.loads((tmp_path / "vocab.json").read_text(encoding="utf-8"))
    assert vocab == {"vocab_size": chars.vocab_size, "itos": sorted(set("héllo wörld\n"))}
    with open(tmp_path / "meta.pkl", "rb") as f:
        assert pickle.load(f) == chars.meta()  # nanoGPT's tools read this one
    assert load_tokenizer(tmp_path).decode(chars.encode("wörld")) == "wörld"

    # With vocab.json there, meta.pkl is never unpickled on trust: one that disagrees is refused.
    with open(tmp_path / "meta.pkl", "wb") as f:
        pickle.dump(CharTokenizer.from_text("abc").meta(), f)  # as nanoGPT re-preparing the folder would
    with pytest.raises(DataError, match="vocab.json and .*meta.pkl hold different vocabularies"):
        load_tokenizer(tmp_path)
    (tmp_path / "meta.pkl").unlink()
    assert dataset_vocab_size(tmp_path) == chars.vocab_size  # vocab.json alone is enough
    (tmp_path / "vocab.json").write_text('{"vocab_size": 3, "itos": ["a", "b"]}')
    with pytest.raises(DataError, match=r"is not a fastgpt vocabulary: expected"):
        load_tokenizer(tmp_path)
