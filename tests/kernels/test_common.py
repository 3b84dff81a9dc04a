"""kernels/common.py: the launch helpers every kernel file shares."""

from __future__ import annotations

import contextlib
from types import SimpleNamespace

import torch

from kernels.common import on_device


def test_on_device_switches_only_to_another_gpu(monkeypatch):
    """Triton launches on the current CUDA device: a tensor on another GPU needs a guard."""
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    on = lambda device: on_device(SimpleNamespace(device=torch.device(device)))  # noqa: E731
    assert isinstance(on("cpu"), contextlib.nullcontext)
    assert isinstance(on("cuda:0"), contextlib.nullcontext)
    guard = on("cuda:1")
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1
