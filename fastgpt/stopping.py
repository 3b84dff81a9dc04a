"""Reasons for the training loop to stop early, agreed on by every rank at the same iteration:
a scheduler's SIGTERM or a Ctrl-C (checkpoint, then exit 0), and a loss that is no longer
finite (stop before a poisoned state is saved).

Neither costs a host sync per step: the stop vote is all-reduced asynchronously and read one step
later, and the loss watch keeps its flag on the device until the loop syncs anyway (log steps,
saves).
"""

from __future__ import annotations

import os
import signal
import threading
import time
from typing import Callable

import torch
import torch.distributed as dist

from fastgpt.errors import ExitStatus, FastgptError

# A signal repeated within this window is one request delivered twice: under torchrun a Ctrl-C
# reaches each worker from the terminal and again forwarded by torchrun, and a scheduler's SIGTERM
# likewise reaches the whole job and comes forwarded.
DUPLICATE_WINDOW_S = 1.0
# The watch's "no bad iteration yet": larger than any iteration, so a MIN over ranks finds the first.
NONE_SEEN = torch.iinfo(torch.int64).max


class NonFiniteLossError(FastgptError, RuntimeError):
    """The loss became NaN or inf; one line naming the iteration and the last good checkpoint, and
    a status a scheduler can tell from a crash and from bad input."""

    exit_status = ExitStatus.DIVERGED


class StopSignal:
    """The first SIGTERM or SIGINT asks the loop to finish its step, save and exit; another one
    (after DUPLICATE_WINDOW_S) exits at once with the signal's default action. Outside the main
    thread Python cannot install handlers, and the process keeps the defaults."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, log: Callable[[str], None]):
        self.log = log
        self.received: str | None = None  # the name of the first signal
        self._when = 0.0
        self._previous: dict = {}

    def __enter__(self) -> "StopSignal":
        if threading.current_thread() is threading.main_thread():
            self._previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame) -> None:
        if self.received is None:
            self.received, self._when = signal.Signals(signum).name, time.monotonic()
            self.log(f"received {self.received}: finishing this step, then saving a checkpoint and exiting "
                     "(send it again to exit at once)")
        elif time.monotonic() - self._when > DUPLICATE_WINDOW_S:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)


class StopVote:
    """Whether any rank received a stop signal, the same answer on every rank. Call once per
    optimizer step on every rank (it is a collective under DDP): each call starts an all-reduce of
    this rank's flag and answers from the previous call's, which has long finished, so a stop
    lands one step after the signal and the host never waits on the device."""

    def __init__(self, stop: StopSignal, enabled: bool, device: torch.device):
        self.stop, self.enabled, self.device = stop, enabled, device
        self._pending = None  # (work, flag on the device, flag on the host, CUDA event)

    def __call__(self) -> bool:
        if not self.enabled:
            return self.stop.received is not None
        decided = self._result() if self._pending else False
        # A fill, not torch.tensor([...], device=...): copying a host value to a GPU waits for
        # everything queued on the stream, a whole step, which this vote exists to avoid.
        flag = torch.full((1,), float(self.stop.received is not None), device=self.device)
        work = dist.all_reduce(flag, op=dist.ReduceOp.MAX, async_op=True)
        host, event = flag, None
        if self.device.type == "cuda":  # copy out behind the reduction, and wait later for only that
            work.wait()  # on CUDA: makes the current stream wait for NCCL; the host goes on
            host = torch.empty(1, pin_memory=True)
            host.copy_(flag, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
        self._pending = (work, flag, host, event)
        return decided

    def message(self, iter_num: int) -> str:
        return (f"stopped by {self.stop.received or 'a signal to another rank'} at iteration {iter_num}; resume with "
                "--init_from=resume (or 'auto')")

    def _result(self) -> bool:
        work, _, host, event = self._pending
        if event is not None:
            event.synchronize()  # CPU-GPU sync, but on the previous step's tail only
        else:
            work.wait()
        return bool(host.item())

    def close(self) -> None:
        """Finish the vote in flight, so no collective outlives the loop."""
        if self._pending:
            self._result()
            self._pending = None


class LossWatch:
    """The first iteration whose loss was not finite, kept on the device; update() costs two
    tiny kernels and no sync, check() is a sync (and under DDP a collective). Disabled (the
    config's on_nonfinite_loss is not 'stop'), both do nothing."""

    def __init__(self, device: torch.device, enabled: bool = True):
        self.enabled = enabled
        self.first_bad = torch.full((), NONE_SEEN, dtype=torch.int64, device=device)

    def update(self, loss: torch.Tensor, iter_num: int) -> None:
        if not self.enabled:
            return
        seen = torch.where(torch.isfinite(loss.detach()), NONE_SEEN, iter_num)
        self.first_bad = torch.minimum(self.first_bad, seen)

    def check(self, distributed: bool, last_good) -> None:
        """Raise NonFiniteLossError, naming the first bad iteration and `last_good` (the newest
        checkpoint saved before it, or None), when any rank has seen a non-finite loss."""
        if not self.enabled:
            return
        first = self.first_bad.clone()
        if distributed:
            dist.all_reduce(first, op=dist.ReduceOp.MIN)
        bad = first.item()  # CPU-GPU sync
        if bad != NONE_SEEN:
            raise NonFiniteLossError(
                f"the loss was NaN or inf at iteration {bad}; stopped without saving. Last good checkpoint: "
                f"{last_good or 'none from this run'}. Lower learning_rate, keep grad_clip > 0, use dtype='bfloat16' "
                "or 'float32', or set on_nonfinite_loss='skip'"
            )
