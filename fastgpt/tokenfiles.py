"""The on-disk layout of a dataset folder, nanoGPT's, so its datasets and ours are interchangeable.

`train.bin` and `val.bin` are flat arrays of uint16 token ids (read them with
`np.memmap(path, dtype=np.uint16, mode="r")`); a character-level dataset also has `meta.pkl`,
a pickled `{"vocab_size", "itos", "stoi"}` for nanoGPT, and the same vocabulary as plain JSON in
`vocab.json` for fastgpt; neither means GPT-2 BPE ids. `identity.json` records each split's size
and sha256 (`data_identity`), which a checkpoint keeps so that a resume can tell other data apart.

Every file is written to a temporary file in the same folder and renamed into place, so an
interrupted run never leaves a truncated `.bin` that training would silently accept.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
from pathlib import Path
from typing import Sequence

import numpy as np

from fastgpt import fileio
from fastgpt.errors import DataError
from fastgpt.tokenizer import META_FILENAME, VOCAB_FILENAME, CharTokenizer

# Where a dataset goes by default, relative to the working directory, as in nanoGPT.
DEFAULT_DATA_ROOT = Path("data")
BIN_SUFFIX = ".bin"
TRAIN_FILENAME = f"train{BIN_SUFFIX}"
VAL_FILENAME = f"val{BIN_SUFFIX}"
SPLIT_FILENAMES = {"train": TRAIN_FILENAME, "val": VAL_FILENAME}
IDENTITY_FILENAME = "identity.json"
# Identity records of folders no prepare described live in fastgpt's cache, under the first hex
# digits of the sha256 of the folder's absolute path (64 bits: no two folders of one user collide).
IDENTITY_CACHE_FOLDER = "data-identity"
IDENTITY_KEY_CHARS = 16
# Token ids are stored as uint16, as nanoGPT does: GPT-2's 50,257 ids fit, and it halves the
# disk and page-cache footprint of int32.
TOKEN_DTYPE = np.uint16
MAX_TOKEN_ID = np.iinfo(TOKEN_DTYPE).max


def _check_token_range(ids: np.ndarray | Sequence[int], what: str) -> None:
    if len(ids) and max(ids) > MAX_TOKEN_ID:
        raise DataError(f"{what} has token id {max(ids)}, above uint16's {MAX_TOKEN_ID}")


def write_tokens(path: Path, ids: Sequence[int]) -> None:
    """Write token ids to `path` as raw uint16, atomically."""
    _check_token_range(ids, str(path))
    with fileio.atomic_writer(path) as f:
        np.asarray(ids, dtype=TOKEN_DTYPE).tofile(f)


def write_splits(out_dir: Path, train_ids: Sequence[int], val_ids: Sequence[int]) -> None:
    """Write train.bin and val.bin, then the identity record that describes them."""
    write_tokens(out_dir / TRAIN_FILENAME, train_ids)
    write_tokens(out_dir / VAL_FILENAME, val_ids)
    write_identity(out_dir)


def write_meta(out_dir: Path, tokenizer: CharTokenizer) -> None:
    """Write a character-level dataset's vocabulary, atomically: vocab.json, which fastgpt reads
    and no reader can be made to run code from, and nanoGPT's pickled meta dict for its tools."""
    with fileio.atomic_writer(out_dir / VOCAB_FILENAME, "w") as f:
        json.dump({"vocab_size": tokenizer.vocab_size, "itos": [tokenizer.itos[i] for i in range(tokenizer.vocab_size)]},
                  f, ensure_ascii=False)
    with fileio.atomic_writer(out_dir / META_FILENAME) as f:
        pickle.dump(tokenizer.meta(), f)


def check_out_dir(out_dir: Path) -> None:
    """Raise DataError when `out_dir` cannot be created or written, before any work (a corpus
    may take hours to fetch and encode). Creates nothing: a refused run leaves no folder behind."""
    existing = out_dir
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise DataError(f"cannot write the dataset to {out_dir}: {existing} is a file, not a folder; choose another folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise DataError(f"cannot write the dataset to {out_dir}: {existing} is not writable; choose a folder you can write")


def remove_stale_meta(out_dir: Path) -> None:
    """Delete the vocabulary files left by an earlier character-level run in the same folder.

    Without this, `load_tokenizer` would read the new BPE ids through the old character
    vocabulary.
    """
    for meta in (out_dir / VOCAB_FILENAME, out_dir / META_FILENAME):
        if meta.exists():
            meta.unlink()
            print(f"removed {meta} left by an earlier character-level dataset")


def write_identity(folder: str | os.PathLike, record_path: str | os.PathLike | None = None) -> dict[str, dict]:
    """Measure each split (bytes, sha256, and the mtime that says whether the record still holds)
    and record it in `record_path` (default folder/identity.json), atomically; return the record.
    Called once the splits are written, so a resume never rehashes gigabytes."""
    folder = Path(folder)
    identity = {split: _measure(folder / name) for split, name in SPLIT_FILENAMES.items()}
    with fileio.atomic_writer(record_path or folder / IDENTITY_FILENAME, "w") as f:
        json.dump(identity, f, indent=2)
        f.write("\n")
    return identity


def data_identity(folder: str | os.PathLike) -> dict[str, dict]:
    """{split: {"bytes", "sha256"}} of train.bin and val.bin.

    From identity.json while it describes the files as they are (same size, same mtime). Otherwise
    (a folder prepared before the record existed, data written by another tool, a split replaced
    in place) hashed once and cached in fastgpt's cache folder, keyed by the folder's path: a
    training run writes nothing into a data folder it only reads. A content hash, not size + mtime
    alone: copying a dataset to another disk changes its mtimes, and a resume there is on the same
    data; a rewrite of the same size is not."""
    folder = Path(folder)
    cached = _cache_path(folder)
    for path in (folder / IDENTITY_FILENAME, cached):
        record = _read_record(path)
        if all(_describes(record.get(split), folder / name) for split, name in SPLIT_FILENAMES.items()):
            break
    else:
        try:
            record = write_identity(folder, cached)
        except OSError:  # no cache folder to write: hash again next time
            record = {split: _measure(folder / name) for split, name in SPLIT_FILENAMES.items()}
    return {split: {"bytes": record[split]["bytes"], "sha256": record[split]["sha256"]} for split in SPLIT_FILENAMES}


def _cache_path(folder: Path) -> Path:
    key = hashlib.sha256(str(folder.resolve()).encode()).hexdigest()[:IDENTITY_KEY_CHARS]
    return fileio.cache_dir() / IDENTITY_CACHE_FOLDER / f"{key}.json"


def _read_record(path: Path) -> dict:
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def _measure(path: Path) -> dict:
    stat = path.stat()
    return {"bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": fileio.sha256_file(path)}


def _describes(record, path: Path) -> bool:
    if not (isinstance(record, dict) and isinstance(record.get("sha256"), str)):
        return False
    stat = path.stat()
    return record.get("bytes") == stat.st_size and record.get("mtime_ns") == stat.st_mtime_ns
