"""The on-disk layout of a dataset folder, nanoGPT's, so its datasets and ours are interchangeable.

`train.bin` and `val.bin` are flat arrays of uint16 token ids (read them with
`np.memmap(path, dtype=np.uint16, mode="r")`); a character-level dataset also has `meta.pkl`,
a pickled `{"vocab_size", "itos", "stoi"}` for nanoGPT, and the same vocabulary as plain JSON in
`vocab.json` for fastgpt; neither means GPT-2 BPE ids.

Every file is written to a temporary file in the same folder and renamed into place, so an
interrupted run never leaves a truncated `.bin` that training would silently accept.
"""

from __future__ import annotations

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
