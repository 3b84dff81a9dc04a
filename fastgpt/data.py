"""Token files and the batches drawn from them.

A split is a flat file of uint16 token ids (nanoGPT's `train.bin` / `val.bin`). It is opened once
as a read-only memmap, so its pages live in the page cache, shared and reclaimable, rather than in
the process's private memory. Validation happens once, at open, before any training step: a
missing, empty, truncated or out-of-vocabulary file is a one-line error.

Sequence n of a stream starts at a position hashed from (seed, split, n), so the stream's whole
state is the integer n: reproducible, independent of how sequences are grouped into batches, and
resumable from a checkpoint exactly.
"""

from __future__ import annotations

import pathlib

import numpy as np
import torch

TOKEN_DTYPE = np.uint16
# Scan for the largest token id this many tokens at a time (128 MiB of uint16), so validating a
# many-GB file needs bounded memory.
SCAN_CHUNK_TOKENS = 64 * 1024 * 1024
# Stable ids for the splits in the batch seed (a string's hash() changes per process).
SPLIT_IDS = {"train": 0, "val": 1, "train_eval": 2, "val_eval": 3}


class DataError(ValueError):
    """A data file is missing, corrupt or does not fit the model; the message is one line."""


def open_tokens(path: str | pathlib.Path, vocab_size: int, block_size: int) -> np.memmap:
    """Memmap a uint16 token file after checking that it can feed a model with this vocabulary
    and context: it exists, holds whole tokens, at least block_size + 1 of them, all < vocab_size."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise DataError(f"data file {path} not found")
    nbytes = path.stat().st_size
    itemsize = np.dtype(TOKEN_DTYPE).itemsize
    if nbytes == 0:
        raise DataError(f"data file {path} is empty; prepare the dataset again")
    if nbytes % itemsize:
        raise DataError(
            f"data file {path} is truncated: {nbytes} bytes is not a whole number of uint16 tokens; prepare it again"
        )
    tokens = np.memmap(path, dtype=TOKEN_DTYPE, mode="r")
    if len(tokens) < block_size + 1:
        raise DataError(f"data file {path} holds {len(tokens)} tokens, fewer than block_size + 1 = {block_size + 1}")
    for start in range(0, len(tokens), SCAN_CHUNK_TOKENS):
        chunk = tokens[start : start + SCAN_CHUNK_TOKENS]
        top = int(chunk.max())
        if top >= vocab_size:
            where = start + int(np.argmax(chunk >= vocab_size))
            raise DataError(
                f"data file {path} holds token id {top} (first bad id at position {where}) but the model's "
                f"vocabulary has {vocab_size} ids (0..{vocab_size - 1}); was it prepared with another tokenizer?"
            )
    return tokens


def mix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser (Steele et al. 2014): a bijective hash of uint64s whose outputs pass
    BigCrush, so hashing consecutive counters gives independent-looking uniform draws."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


class BatchStream:
    """Random (x, y) windows of a token file; y is x shifted by one token.

    Sequence n of the stream starts at a position hashed from (seed, split, n): a counter-based
    generator, so the stream's state is the count of sequences drawn, batch size does not change
    which windows come in which order (4 micro-batches of 8 draw exactly the windows of one
    batch of 32), and any position can be resumed without replaying the ones before it."""

    def __init__(
        self,
        tokens: np.ndarray,
        batch_size: int,
        block_size: int,
        device: torch.device,
        seed: int,
        split: str,
    ):
        self.tokens = tokens
        self.batch_size = batch_size
        self.block_size = block_size
        self.device = torch.device(device)
        self.key = mix64(np.array([seed * len(SPLIT_IDS) + SPLIT_IDS[split]], dtype=np.uint64))[0]
        self.n = 0  # sequences drawn so far
        self._offsets = np.arange(block_size + 1)

    def starts(self, first: int, count: int) -> np.ndarray:
        """Start positions of sequences first .. first + count - 1."""
        counters = np.arange(first, first + count, dtype=np.uint64) + self.key
        with np.errstate(over="ignore"):  # uint64 arithmetic wraps on purpose
            h = mix64(counters)
        n_starts = len(self.tokens) - self.block_size  # a window needs block_size + 1 tokens
        # Multiply-shift maps a 53-bit uniform to [0, n_starts) with bias below 2^-30 for any file.
        return ((h >> np.uint64(11)).astype(np.float64) * (n_starts / 2.0**53)).astype(np.int64)

    def read(self, first: int, count: int) -> torch.Tensor:
        """Sequences first .. first + count - 1 as one (count, T + 1) int64 CPU tensor."""
        windows = self.tokens[self.starts(first, count)[:, None] + self._offsets]  # reads only those pages
        return torch.from_numpy(windows.astype(np.int64))

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        xy = self.read(self.n, self.batch_size)
        self.n += self.batch_size
        if self.device.type == "cuda":
            # Pinned memory makes the host-to-device copy asynchronous with the compute.
            xy = xy.pin_memory().to(self.device, non_blocking=True)
        else:
            xy = xy.to(self.device)
        return xy[:, :-1], xy[:, 1:]  # (B, T), (B, T)

    def state_dict(self) -> dict:
        return {"n": self.n}

    def load_state_dict(self, state: dict) -> None:
        self.n = int(state["n"])
