"""Your own UTF-8 text files in GPT-2 BPE (`python -m fastgpt.prepare text`), streamed.

Each file is one document followed by the end-of-text id 50256. Files are read in pieces cut
where the cut cannot change the tokens (`last_safe_cut`), encoded in parallel, and every piece
goes whole to train or val (`is_val_piece`), so the corpus is never held in memory.
"""

from __future__ import annotations

import contextlib
import math
import os
from fractions import Fraction
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from fastgpt import fileio
from fastgpt.corpora.encode import encode_gpt2_batch, resolve_threads
from fastgpt.errors import DataError
from fastgpt.tokenfiles import (TOKEN_DTYPE, TRAIN_FILENAME, VAL_FILENAME, check_out_dir, remove_stale_meta,
                                write_identity)

# Custom corpora are read and encoded in pieces of about this many characters, and each piece
# goes whole to train or val. 64 Ki characters (~16k tokens, far longer than a training
# context) encode as fast per character as larger pieces, and give a 1 MB corpus 16 pieces,
# so the default 10% val split is not empty.
DEFAULT_PIECE_CHARS = 1 << 16
# Pieces handed to tiktoken per thread per batch: a few, so one slow piece does not idle the
# other threads for long; memory stays bounded by threads x this x piece size.
PIECES_PER_THREAD = 4
DEFAULT_VAL_FRACTION = 0.1
# Characters at which a piece may be cut (see `last_safe_cut`): both are whitespace to
# GPT-2's pre-tokenizer, which never puts them in a token with the non-space before them.
CUT_BEFORE = ("\n", " ")


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
        raise DataError(f"{path} is not UTF-8 text ({e.reason}); convert it to UTF-8 first") from None


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
    memory. Raises `FileNotFoundError` for a missing input, `DataError` for text that is not
    UTF-8 or a split that would be empty.
    """
    paths = [Path(p) for p in inputs]
    if not paths:
        raise DataError("no input files; pass at least one with --input")
    for path in paths:
        if not path.is_file():
            raise FileNotFoundError(f"input file {path} does not exist (or is not a file)")
    if not 0 < val_fraction < 1:
        raise DataError(f"--val-fraction must be between 0 and 1 (exclusive), got {val_fraction}")
    if piece_chars < 1:
        raise DataError(f"--piece-chars must be a positive number of characters, got {piece_chars}")
    threads = resolve_threads(threads, "--threads")
    # repr gives the shortest decimal of the float, so 0.1 becomes exactly 1/10.
    fraction = Fraction(repr(float(val_fraction)))
    out = Path(out_dir)
    check_out_dir(out)

    counts = {"train": 0, "val": 0}
    n_pieces = 0
    with contextlib.ExitStack() as stack:
        files = {
            "train": stack.enter_context(fileio.atomic_writer(out / TRAIN_FILENAME)),
            "val": stack.enter_context(fileio.atomic_writer(out / VAL_FILENAME)),
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
            raise DataError(
                f"the corpus gives {counts['train']} train and {counts['val']} val tokens "
                f"({n_pieces} pieces of up to {piece_chars:,} characters, val fraction "
                f"{val_fraction}); give more text, another --val-fraction, or a smaller --piece-chars"
            )
    remove_stale_meta(out)
    write_identity(out)
    print(
        f"text: {len(paths)} documents, {n_pieces} pieces; train: {counts['train']:,} tokens, "
        f"val: {counts['val']:,} tokens -> {out}"
    )
    return out
