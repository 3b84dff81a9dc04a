"""OpenWebText in GPT-2 BPE by nanoGPT's recipe, and the shard-by-shard writer it uses.

The corpus comes from the Hugging Face Hub through the optional `datasets` package
(`pip install -e '.[openwebtext]'`) and is split and encoded as nanoGPT does, so its
train.bin/val.bin match nanoGPT's: ~8M documents, 0.05% of them (seed 2357) for val, each
document in GPT-2 BPE followed by <|endoftext|>. nanoGPT reports ~54 GB in the Hugging Face
cache, then ~9B train tokens (17 GB) and ~4M val tokens.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import os
import time
from pathlib import Path
from typing import Any, Iterator, Mapping, NamedTuple

import numpy as np

from fastgpt import fileio
from fastgpt.corpora.encode import encode_gpt2_batch, resolve_threads
from fastgpt.errors import DataError, FetchError, MissingPackageError
from fastgpt.tokenfiles import BIN_SUFFIX, DEFAULT_DATA_ROOT, TOKEN_DTYPE, check_out_dir, remove_stale_meta, write_identity

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


class SplitCounts(NamedTuple):
    """What one split of a document collection came to."""

    documents: int
    tokens: int


def _check_docs_per_shard(docs_per_shard: int) -> None:
    if docs_per_shard < 1:
        raise DataError(f"--docs-per-shard must be at least 1, got {docs_per_shard}")


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
    The files are written through `fileio.atomic_writer` and all replaced at the end, only
    when every split is complete and non-empty, so an interrupted or failed run leaves the
    previous files (or none). A stale meta.pkl is removed. Raises `ValueError` for an empty
    split, a split name that is not a plain file name, or a bad thread or shard size.
    """
    if not splits:
        raise ValueError("no splits to write; expected a mapping such as {'train': ..., 'val': ...}")
    for name in splits:
        if not name or Path(name).name != name or name.startswith("."):
            raise ValueError(f"split name {name!r} must be a plain file name such as 'train' or 'val'")
    threads = resolve_threads(threads, "threads")
    _check_docs_per_shard(docs_per_shard)
    out = Path(out_dir)
    counts: dict[str, SplitCounts] = {}
    with contextlib.ExitStack() as stack:
        for name, source in splits.items():
            file = stack.enter_context(fileio.atomic_writer(out / f"{name}{BIN_SUFFIX}"))
            counts[name] = _append_split(name, source, file, threads, docs_per_shard, text_column)
        # Checked before leaving the `with`, so an unusable result never replaces old files.
        empty = [name for name, count in counts.items() if count.documents == 0]
        if empty:
            raise DataError(f"split {empty[0]!r} has no documents; give every split at least one")
    remove_stale_meta(out)
    return counts


def _import_datasets() -> Any:
    """Return the `datasets` module, or raise MissingPackageError saying how to install it."""
    try:
        import datasets
    except ImportError:
        raise MissingPackageError(
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
            raise FetchError(
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
    the threads that encode. Needs the optional `datasets` package (MissingPackageError naming the
    install command otherwise); see `load_openwebtext` and `write_document_splits`. Returns
    the folder.
    """
    # Checked before the download, which takes hours the first time.
    if not 0 < val_fraction < 1:
        raise DataError(f"--val-fraction must be between 0 and 1 (exclusive), got {val_fraction}")
    num_proc = resolve_threads(num_proc, "--num-proc")
    _check_docs_per_shard(docs_per_shard)
    out = Path(out_dir) if out_dir is not None else DEFAULT_DATA_ROOT / OPENWEBTEXT
    check_out_dir(out)
    splits = load_openwebtext(num_proc, val_fraction, seed)
    sizes = ", ".join(f"{name} {len(source):,}" for name, source in splits.items())
    print(f"{OPENWEBTEXT}: documents {sizes}; encoding on {num_proc} threads", flush=True)
    counts = write_document_splits(splits, out, num_proc, docs_per_shard)
    write_identity(out)
    totals = ", ".join(f"{name}: {count.tokens:,} tokens" for name, count in counts.items())
    print(f"{OPENWEBTEXT}: {totals} -> {out}")
    return out
