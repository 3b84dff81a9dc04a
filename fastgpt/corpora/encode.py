"""GPT-2 BPE encoding of many texts at once, on threads: what the streamed corpora share."""

from __future__ import annotations

import os
from typing import Sequence

from fastgpt.errors import DataError
from fastgpt.tokenizer import GPT2_EOT_ID, get_gpt2_encoding


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


def resolve_threads(threads: int | None, flag: str) -> int:
    """Return `threads`, defaulting to every CPU; `flag` names the option in the error."""
    if threads is None:
        return os.cpu_count() or 1
    if threads < 1:
        raise DataError(f"{flag} must be at least 1, got {threads}")
    return threads
