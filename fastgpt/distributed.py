"""Data-parallel training across processes started by torchrun (DDP).

    torchrun --standalone --nproc_per_node=8 -m fastgpt.train configs/owt.py
    torchrun --nnodes=2 --node_rank=0 --rdzv_endpoint=HOST:PORT --nproc_per_node=8 -m fastgpt.train configs/owt.py

torchrun sets RANK, LOCAL_RANK and WORLD_SIZE; without them the run is a single process. The
backend is NCCL on CUDA and gloo on CPU, so the whole path runs (and is tested) on a laptop.
Every collective has a timeout: a rank that dies never leaves the others waiting forever, and
torchrun stops the surviving ranks as soon as one exits with an error.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from fastgpt.errors import FastgptError


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def enabled(self) -> bool:
        return self.world_size > 1 or dist.is_initialized()

    @property
    def is_master(self) -> bool:
        """Rank 0 logs, evaluates into the log and writes checkpoints."""
        return self.rank == 0


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


class LaunchError(FastgptError):
    """A setting that does not fit the number of ranks torchrun started."""


def indexed_device(device: torch.device | str, current_index: Callable[[], int] | None = None) -> torch.device:
    """`device` with its GPU named: an index-less 'cuda' becomes cuda:N, N the current device
    (`current_index()`, default torch.cuda.current_device, asked only then). torch.cuda.set_device,
    and so a worker thread that must use the caller's GPU, refuses an index-less device."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", (current_index or torch.cuda.current_device)())
    return device


def rank_placement(device: torch.device, backend: str,
                   local_rank: int) -> tuple[torch.device, str, torch.device | None]:
    """(this rank's device, the backend, the device_id to bind the process group to). On CUDA
    each rank of a node takes GPU local_rank, and NCCL's communicator is bound to it at once
    (without a device_id NCCL guesses the GPU from the global rank, which torch warns can hang);
    elsewhere the backend is gloo (NCCL needs GPUs), bound to no device."""
    if device.type != "cuda":
        return device, "gloo", None
    device = torch.device("cuda", local_rank)
    return device, backend, device if backend == "nccl" else None


def setup(device: torch.device, backend: str, timeout_s: int) -> tuple[DistInfo, torch.device]:
    """Join the process group torchrun describes and return this rank's device (its own GPU
    under CUDA); a no-op for a plain `python -m` run."""
    if not launched_by_torchrun():
        return DistInfo(), device
    info = DistInfo(int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", 0)), int(os.environ["WORLD_SIZE"]))
    device, backend, device_id = rank_placement(device, backend, info.local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s), device_id=device_id)
    return info, device


def micro_steps_per_rank(gradient_accumulation_steps: int, info: DistInfo) -> int:
    """Each rank's share of the global micro-step count (nanoGPT's convention)."""
    if gradient_accumulation_steps % info.world_size:
        raise LaunchError(f"gradient_accumulation_steps={gradient_accumulation_steps} is the global count and must be "
                          f"divisible by the {info.world_size} ranks")
    return gradient_accumulation_steps // info.world_size


# torchrun's agent keeps one rendezvous store for every attempt, and a restarted rank can read the
# previous attempt's addresses from it and fail to connect (pytorch/pytorch#135712). This variable,
# set where torchrun runs, gives each attempt a fresh store.
FRESH_STORE_ENV = "TORCH_DISABLE_SHARE_RDZV_TCP_STORE"


def restart_warning() -> str | None:
    """A line for the log when torchrun may restart this job on a store shared across attempts."""
    if int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0")) > 0 and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        return (f"warning: torchrun --max-restarts shares one rendezvous store across attempts, and a restart can then "
                f"fail to connect (pytorch/pytorch#135712); launch as {FRESH_STORE_ENV}=1 torchrun ...")
    return None


def teardown() -> None:
    """Leave the process group, on success and on failure alike."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def rank_zero_first(info: DistInfo, fn) -> None:
    """Run fn on rank 0, then, after a barrier, on the others: rank 0 prepares what a shared disk
    gives every rank, and a node without one prepares its own copy after."""
    if info.is_master:
        fn()
    barrier(info)
    if not info.is_master:
        fn()


def wrap(model: torch.nn.Module, info: DistInfo, device: torch.device) -> torch.nn.Module:
    """Wrap in DDP (after torch.compile, as nanoGPT and the DDP docs do) when there are ranks."""
    if not info.enabled:
        return model
    return DDP(model, device_ids=ddp_device_ids(device))


def ddp_device_ids(device: torch.device) -> list[int] | None:
    """DDP's device_ids: the one GPU this rank's module lives on, or None for a CPU module."""
    if device.type != "cuda":
        return None
    return [indexed_device(device).index]


def grad_sync(model: torch.nn.Module, last_micro_step: bool, info: DistInfo) -> contextlib.AbstractContextManager:
    """Where a micro-step runs: DDP all-reduces gradients only on the last micro-step. no_sync
    covers the forward too, which is where DDP decides whether the coming backward synchronises."""
    return contextlib.nullcontext() if last_micro_step or not info.enabled else model.no_sync()


def mean_over_ranks(value: float, info: DistInfo, device: torch.device) -> float:
    """The average of a scalar across ranks (a collective: every rank must call it)."""
    if not info.enabled:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.item() / info.world_size


def gather_objects(obj, info: DistInfo) -> list:
    """Every rank's `obj`, in rank order (a collective)."""
    if not info.enabled:
        return [obj]
    out = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out
