"""Checkpoints written while training goes on: the state copied to host memory, then written by
one worker thread.

The step waits only for the copy. On a CPU it is a fresh clone (the optimizer updates the
tensors in place); on CUDA, page-locked buffers allocated at the first save and reused, filled
with asynchronous copies and one synchronize. Either way the copy holds the state's bytes once
more in host memory until it is written: the price of not waiting for the disk.
"""

from __future__ import annotations

import concurrent.futures
import copy
import enum
from typing import Callable, Iterator

import torch


class HostCopy(enum.Enum):
    CLONE = "clone"  # in host memory already: a copy of its own, since training updates it in place
    PINNED = "pinned"  # on a CUDA GPU: into a page-locked buffer, asynchronously, kept for the next save
    BLOCKING = "blocking"  # another accelerator (MPS): a plain copy to the host, which waits for it


def host_copy_kind(device: torch.device) -> HostCopy:
    """How a tensor on `device` gets its host copy: only CUDA has page-locked memory to copy into
    without waiting."""
    if device.type == "cpu":
        return HostCopy.CLONE
    if device.type == "cuda":
        return HostCopy.PINNED
    return HostCopy.BLOCKING


def tensors(obj) -> Iterator[torch.Tensor]:
    """Every tensor in nested dicts, lists and tuples (a checkpoint's only containers)."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for value in obj.values():
            yield from tensors(value)
    elif isinstance(obj, (list, tuple)):
        for value in obj:
            yield from tensors(value)


class HostSnapshot:
    """A copy of a checkpoint, its tensors in host memory and its plain data deep-copied, that
    training can no longer change. Tensors sharing a storage (tied embeddings) share it in the
    copy, as torch.save keeps them. Call it again only once the previous copy has been written:
    CUDA tensors' buffers are reused."""

    def __init__(self):
        self._pinned: dict[tuple, torch.Tensor] = {}  # (device, source storage, bytes) -> page-locked buffer

    def __call__(self, checkpoint):
        """(the copy, the bytes of tensor storage it holds)."""
        storages, memo, pinned, devices = {}, {}, {}, set()
        for t in tensors(checkpoint):
            source = t.untyped_storage()
            key = (t.device, source.data_ptr(), source.nbytes())
            if key not in storages:
                storages[key] = self._copy_storage(source, t.device, key, pinned)
                devices.add(t.device)
            memo[id(t)] = torch.empty(0, dtype=t.dtype).set_(storages[key], t.storage_offset(), t.size(), t.stride())
        for device in devices:
            if host_copy_kind(device) is HostCopy.PINNED:
                torch.cuda.synchronize(device)  # CPU-GPU sync: the asynchronous copies have landed
        self._pinned = pinned  # buffers of storages the state no longer holds are freed
        # deepcopy takes the host copies from the memo and copies everything else, keeping each
        # container's type (a state dict's OrderedDict and its _metadata).
        return copy.deepcopy(checkpoint, memo), sum(s.nbytes() for s in storages.values())

    def _copy_storage(self, source: torch.UntypedStorage, device: torch.device, key: tuple,
                      pinned: dict) -> torch.UntypedStorage:
        as_bytes = torch.empty(0, dtype=torch.uint8, device=device).set_(source)
        kind = host_copy_kind(device)
        if kind is HostCopy.CLONE:
            return as_bytes.clone().untyped_storage()
        if kind is HostCopy.BLOCKING:
            return as_bytes.cpu().untyped_storage()
        buffer = self._pinned.get(key)
        if buffer is None:
            buffer = torch.empty(source.nbytes(), dtype=torch.uint8, pin_memory=True)
        buffer.copy_(as_bytes, non_blocking=True)
        pinned[key] = buffer
        return buffer.untyped_storage()


class BackgroundWriter:
    """One worker thread and at most one write in flight: submit() first waits for the previous
    write, and its error, if it failed, is raised there, in the caller's thread."""

    def __init__(self, name: str):
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=name)
        self._pending: concurrent.futures.Future | None = None

    def submit(self, write: Callable, *args) -> None:
        self.wait()
        self._pending = self._executor.submit(write, *args)

    def succeeded(self) -> bool:
        """Whether a write in flight has finished without error (never waits)."""
        return self._pending is not None and self._pending.done() and self._pending.exception() is None

    def wait(self):
        """The in-flight write's result (None if there is none), once it is done; its error raised."""
        pending, self._pending = self._pending, None
        return pending.result() if pending is not None else None

    def close(self) -> None:
        """Wait for the write in flight, then end the thread."""
        try:
            self.wait()
        finally:
            self._executor.shutdown()
