"""Token files are validated at open; batch streams are reproducible and resumable."""

import numpy as np
import pytest
import torch

from fastgpt.data import BatchStream, Prefetcher, open_tokens
from fastgpt.errors import DataError
from fastgpt.train import main

from conftest import cli_args, tiny_config


def write(path, ids):
    np.asarray(ids, dtype=np.uint16).tofile(path)
    return path


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match=r"nope.bin not found"):
        open_tokens(tmp_path / "nope.bin", 64, 8)


def test_empty_file(tmp_path):
    (tmp_path / "e.bin").write_bytes(b"")
    with pytest.raises(DataError, match=r"e.bin is empty"):
        open_tokens(tmp_path / "e.bin", 64, 8)


def test_truncated_file_odd_bytes(tmp_path):
    (tmp_path / "t.bin").write_bytes(b"\x01\x00" * 50 + b"\x01")
    with pytest.raises(DataError, match=r"t.bin is truncated: 101 bytes is not a whole number of uint16 tokens"):
        open_tokens(tmp_path / "t.bin", 64, 8)


def test_too_short_for_block(tmp_path):
    path = write(tmp_path / "s.bin", range(8))
    with pytest.raises(DataError, match=r"holds 8 tokens, fewer than block_size \+ 1 = 9"):
        open_tokens(path, 64, 8)


def test_out_of_vocabulary_names_id_position_and_vocab(tmp_path):
    ids = np.zeros(1000, dtype=np.uint16)
    ids[777] = 70
    path = write(tmp_path / "v.bin", ids)
    with pytest.raises(DataError, match=r"token id 70 \(first bad id at position 777\).*has 64 ids \(0\.\.63\)"):
        open_tokens(path, 64, 8)
    assert len(open_tokens(path, 71, 8)) == 1000


def test_oov_found_past_the_first_scan_chunk(tmp_path, monkeypatch):
    monkeypatch.setattr("fastgpt.data.SCAN_CHUNK_TOKENS", 100)
    ids = np.zeros(1000, dtype=np.uint16)
    ids[950] = 64
    with pytest.raises(DataError, match=r"position 950"):
        open_tokens(write(tmp_path / "v.bin", ids), 64, 8)


OPEN = []


@pytest.fixture(autouse=True)
def _close_prefetchers():
    yield
    while OPEN:
        OPEN.pop().close()


def stream(tokens, batch_size=4, block=8, seed=1, split="train", rank=0, world_size=1):
    p = Prefetcher(BatchStream(tokens, batch_size, block, seed, split, rank, world_size), "cpu")
    OPEN.append(p)
    return p


def test_batches_are_shifted_windows_of_the_file():
    tokens = np.arange(5000, dtype=np.uint16)
    x, y = stream(tokens).next()
    assert x.shape == y.shape == (4, 8) and x.dtype == torch.int64
    assert torch.equal(y, x + 1)  # the file counts up, so the target is the next id
    assert torch.equal(x[:, 1:], x[:, :-1] + 1)  # contiguous windows


def test_stream_reproducible_seeded_and_split_separated():
    tokens = np.arange(50_000, dtype=np.uint16)
    a, b = stream(tokens), stream(tokens)
    for _ in range(3):
        assert torch.equal(a.next()[0], b.next()[0])
    assert not torch.equal(stream(tokens, seed=1).next()[0], stream(tokens, seed=2).next()[0])
    assert not torch.equal(stream(tokens, split="train").next()[0], stream(tokens, split="train_eval").next()[0])


def test_windows_cover_the_file_uniformly():
    tokens = np.arange(10_000, dtype=np.uint16)
    starts = BatchStream(tokens, 4, 16, 1, "train").starts(0, 200_000)
    assert starts.min() == 0 and starts.max() == len(tokens) - 17  # the last full window
    counts = np.bincount(starts // 1000)
    assert counts[:-1].min() > 0.9 * counts[:-1].mean()


def test_batch_size_does_not_change_the_sequence_order():
    tokens = np.arange(50_000, dtype=np.uint16)
    big = stream(tokens, batch_size=8).next()[0]
    small = stream(tokens, batch_size=4)
    assert torch.equal(torch.cat([small.next()[0], small.next()[0]]), big)


def test_stream_resumes_from_state():
    tokens = np.arange(50_000, dtype=np.uint16)
    a = stream(tokens)
    a.next()
    state = a.state_dict()
    expected = a.next()[0]
    b = stream(tokens)
    b.load_state_dict(state)
    assert torch.equal(b.next()[0], expected)


@pytest.mark.parametrize("damage", ["missing", "empty", "odd", "oov"])
def test_train_refuses_bad_data_before_training(tmp_path, tiny_data, capsys, damage):
    data_root, name = tiny_data
    val = data_root / name / "val.bin"
    if damage == "missing":
        val.unlink()
    elif damage == "empty":
        val.write_bytes(b"")
    elif damage == "odd":
        val.write_bytes(val.read_bytes()[:-1])
    else:
        write(val, [5] * 100 + [40] + [5] * 100)  # the tiny vocabulary has 32 ids
    cfg = tiny_config(tmp_path, data_root)
    assert main(cli_args(cfg)) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("error: ") and captured.err.count("\n") == 1
    assert "val.bin" in captured.err
    assert "iter " not in captured.out  # no training step ran
    assert not (tmp_path / "out" / "ckpt.pt").exists()
