"""Token files and the batches drawn from them.

A split is a flat file of uint16 token ids (nanoGPT's `train.bin` / `val.bin`). It is opened once
as a read-only memmap, so its pages live in the page cache, shared and reclaimable, rather than in
the process's private memory. Validation happens once, at open, before any training step: a
missing, empty, truncated or out-of-vocabulary file is a one-line error.

Sequence n of a stream starts at a position hashed from (seed, split, n), so the stream's whole
state is the integer n: reproducible, independent of how sequences are grouped into batches or
ranks, and resumable from a checkpoint exactly. A Prefetcher moves the batches to the device on
a background thread, so the training loop never waits for them.
"""

from __future__ import annotations

import atexit
import functools
import pathlib
import queue
import threading
import weakref

import numpy as np
import torch

from fastgpt.tokenfiles import TOKEN_DTYPE
from fastgpt.distributed import DistInfo, indexed_device
from fastgpt.errors import DataError

# Scan for the largest token id this many tokens at a time (128 MiB of uint16), so validating a
# many-GB file needs bounded memory.
SCAN_CHUNK_TOKENS = 64 * 1024 * 1024
# Stable ids for the splits in the batch seed (a string's hash() changes per process).
SPLIT_IDS = {"train": 0, "val": 1, "train_eval": 2, "val_eval": 3}


def open_tokens(path: str | pathlib.Path, vocab_size: int, block_size: int) -> np.memmap:
    """Memmap a uint16 token file after checking that it can feed a model with this vocabulary
    and context: it exists, holds whole tokens, at least block_size + 1 of them, all < vocab_size."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise DataError(f"data file {path} not found; prepare the dataset into {path.parent} (python -m fastgpt.prepare)")
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
        raise DataError(
            f"data file {path} holds {len(tokens)} tokens, fewer than block_size + 1 = {block_size + 1}; "
            "lower block_size or give the split more text"
        )
    # Scan with read() into one reused buffer, not through the memmap: pages read through a
    # mapping stay mapped, and a many-GB file would then show as many GB of this process's RSS.
    buffer = np.empty(min(SCAN_CHUNK_TOKENS, len(tokens)), dtype=TOKEN_DTYPE)
    with open(path, "rb", buffering=0) as f:
        start = 0
        while n := f.readinto(memoryview(buffer).cast("B")) // itemsize:
            chunk = buffer[:n]
            top = int(chunk.max())
            if top >= vocab_size:
                where = start + int(np.argmax(chunk >= vocab_size))
                raise DataError(
                    f"data file {path} holds token id {top} (first bad id at position {where}) but the model's "
                    f"vocabulary has {vocab_size} ids (0..{vocab_size - 1}); was it prepared with another tokenizer? "
                    f"Prepare it again, or give the model vocab_size >= {top + 1} (None: the dataset's meta.pkl)"
                )
            start += n
    return tokens


def mix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser (Steele et al. 2014): a bijective hash of uint64s whose outputs pass
    BigCrush, so hashing consecutive counters gives independent-looking uniform draws."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


class BatchStream:
    """Random (x, y) windows of a token file on the CPU; y is x shifted by one token.

    Sequence n of the stream starts at a position hashed from (seed, split, n): a counter-based
    generator, so a position is just a count, and batch size does not change which windows come
    in which order (4 micro-batches of 8 draw exactly the windows of one batch of 32).

    Under DDP the ranks interleave: micro-batch i of rank r holds sequences
    (i * world_size + r) * B ... + B - 1. The ranks draw different windows, and together, in each
    optimizer step, exactly the windows one process would draw with their combined batch; the
    position is the global count of sequences, the same on every rank, so a checkpoint resumes
    on any world size that divides the batch."""

    def __init__(
        self,
        tokens: np.ndarray,
        batch_size: int,
        block_size: int,
        seed: int,
        split: str,
        rank: int = 0,
        world_size: int = 1,
    ):
        self.tokens = tokens
        self.batch_size = batch_size
        self.block_size = block_size
        self.rank = rank
        self.world_size = world_size
        self.key = mix64(np.array([seed * len(SPLIT_IDS) + SPLIT_IDS[split]], dtype=np.uint64))[0]
        self.i = 0  # micro-batches drawn by this rank
        self._offsets = np.arange(block_size + 1)

    def starts(self, first: int, count: int) -> np.ndarray:
        """Start positions of sequences first .. first + count - 1."""
        counters = np.arange(first, first + count, dtype=np.uint64) + self.key
        with np.errstate(over="ignore"):  # uint64 arithmetic wraps on purpose
            h = mix64(counters)
        n_starts = len(self.tokens) - self.block_size  # a window needs block_size + 1 tokens
        # Multiply-shift maps a 53-bit uniform to [0, n_starts) with bias below 2^-30 for any file.
        return ((h >> np.uint64(11)).astype(np.float64) * (n_starts / 2.0**53)).astype(np.int64)

    def batch(self, i: int) -> np.ndarray:
        """This rank's micro-batch i as a (B, T + 1) uint16 array."""
        first = (i * self.world_size + self.rank) * self.batch_size
        return self.tokens[self.starts(first, self.batch_size)[:, None] + self._offsets]  # reads only those pages

    def __next__(self) -> np.ndarray:
        xy = self.batch(self.i)
        self.i += 1
        return xy

    def __iter__(self):
        return self

    def state_dict(self, i: int | None = None) -> dict:
        """The position before this rank's micro-batch i (default: the next one to draw), as the
        global count of sequences all ranks have drawn by then."""
        return {"sequences": (self.i if i is None else i) * self.world_size * self.batch_size}

    def load_state_dict(self, state: dict) -> None:
        per_step = self.world_size * self.batch_size
        sequences = int(state["sequences"])
        if sequences % per_step:
            raise DataError(
                f"the checkpoint's data position ({sequences} sequences) is not a whole number of "
                f"batches of {self.batch_size} x {self.world_size} ranks; resume with the batch size it was saved with"
            )
        self.i = sequences // per_step


class _Failure:
    """An exception raised on the worker thread, carried to the consumer."""

    def __init__(self, error: BaseException):
        self.error = error


# Prefetchers whose worker thread is running, closed at interpreter exit (below).
_RUNNING: "weakref.WeakSet[Prefetcher]" = weakref.WeakSet()


def _close_running_prefetchers() -> None:
    """Stop every worker before the interpreter tears down: a daemon thread still inside torch
    while it does can abort the process ("terminate called without an active exception", exit
    status 134) in a script that never called close()."""
    for prefetcher in list(_RUNNING):
        prefetcher.close()


@functools.cache
def _close_prefetchers_at_exit() -> None:
    """Register _close_running_prefetchers with atexit, once, when the first worker starts: a
    process that imports this module without prefetching gets no exit hook of ours."""
    atexit.register(_close_running_prefetchers)


class Prefetcher:
    """Batches of a BatchStream on a device, prepared by a background thread.

    The thread reads each window from the memmap into a reused (pinned, on CUDA) host buffer,
    copies it to the device with non_blocking=True on its own CUDA stream, and queues it, staying
    at most `depth` batches ahead; `next()` costs a queue get. An exception on the thread is
    raised by the next `next()`, with its original traceback. `close()` stops the thread;
    a forgotten prefetcher is closed at interpreter exit, and its thread is a daemon, so it never
    blocks the exit. The position saved
    in checkpoints counts the batches handed out, not the ones prepared ahead.
    """

    # How often a blocked worker re-checks for close(): bounds close()'s latency.
    POLL_SECONDS = 0.05

    def __init__(self, stream: BatchStream, device: torch.device | str, depth: int = 2):
        self.stream = stream
        # The GPU is named here, on the caller's thread: the worker's set_device needs an index,
        # and the worker thread's own current device is always cuda:0.
        self.device = indexed_device(device)
        self.depth = depth
        self.consumed = stream.i
        self._thread: threading.Thread | None = None
        self._queue: queue.Queue | None = None
        self._stop = threading.Event()

    # ---- consumer side
    def __iter__(self):
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._thread is None:
            self._start()
        item = self._queue.get()
        if isinstance(item, _Failure):
            self.close()
            raise item.error
        xy, ready = item
        if ready is not None:
            torch.cuda.current_stream(self.device).wait_event(ready)  # the copy finished on its stream
            xy.record_stream(torch.cuda.current_stream(self.device))  # keep the allocator off it until we are done
        self.consumed += 1
        return xy[:, :-1], xy[:, 1:]  # (B, T), (B, T)

    next = __next__

    def state_dict(self) -> dict:
        return self.stream.state_dict(self.consumed)

    def load_state_dict(self, state: dict) -> None:
        self.close()
        self.stream.load_state_dict(state)
        self.consumed = self.stream.i

    def close(self) -> None:
        if self._thread is None:
            return
        self._stop.set()
        while self._thread.is_alive():
            try:  # unblock a worker waiting on a full queue
                self._queue.get_nowait()
            except queue.Empty:
                pass
            self._thread.join(self.POLL_SECONDS)
        self._thread, self._queue = None, None
        _RUNNING.discard(self)

    # ---- worker side
    def _start(self) -> None:
        self.stream.i = self.consumed
        self._stop.clear()
        self._queue = queue.Queue(maxsize=self.depth)
        self._thread = threading.Thread(target=self._work, name="fastgpt-prefetch", daemon=True)
        _close_prefetchers_at_exit()
        self._thread.start()
        _RUNNING.add(self)

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=self.POLL_SECONDS)
                return True
            except queue.Full:
                continue
        return False

    def _work(self) -> None:
        try:
            cuda = self.device.type == "cuda"
            if cuda:
                torch.cuda.set_device(self.device)
                copy_stream = torch.cuda.Stream(self.device)
                # A ring of pinned buffers: one per batch that can be queued, in flight to the
                # device, or being filled; each is reused only after its last copy completed.
                shape = (self.stream.batch_size, self.stream.block_size + 1)
                ring = [torch.empty(shape, dtype=torch.int64).pin_memory() for _ in range(self.depth + 2)]
                done = [None] * len(ring)
            slot = 0
            while not self._stop.is_set():
                windows = next(self.stream)
                if not cuda:
                    item = (torch.from_numpy(windows.astype(np.int64)).to(self.device), None)
                else:
                    if done[slot] is not None:
                        done[slot].synchronize()
                    host = ring[slot]
                    host.numpy()[:] = windows  # uint16 -> int64 straight into pinned memory
                    with torch.cuda.stream(copy_stream):
                        xy = host.to(self.device, non_blocking=True)
                        done[slot] = torch.cuda.Event()
                        done[slot].record(copy_stream)
                    item = (xy, done[slot])
                    slot = (slot + 1) % len(ring)
                if not self._put(item):
                    return
        except BaseException as e:  # noqa: BLE001 - every failure must reach the training loop
            self._put(_Failure(e))


# A training run's streams: name -> the split it reads. The evaluation streams are separate from
# the training one, so estimating the loss never moves the training stream.
STREAMS = {"train": "train", "train_eval": "train", "val_eval": "val"}


def open_streams(data_dir: str | pathlib.Path, vocab_size: int, batch_size: int, block_size: int, seed: int,
                 dist_info: DistInfo, device: torch.device | str) -> dict[str, Prefetcher]:
    """A prefetcher for each of STREAMS over data_dir's train.bin and val.bin, each file checked
    first (open_tokens), each rank reading its own rows; close each when done."""
    splits = {s: open_tokens(pathlib.Path(data_dir) / f"{s}.bin", vocab_size, block_size) for s in ("train", "val")}
    return {name: Prefetcher(BatchStream(splits[split], batch_size, block_size, seed, name, dist_info.rank,
                                         dist_info.world_size), device)
            for name, split in STREAMS.items()}
