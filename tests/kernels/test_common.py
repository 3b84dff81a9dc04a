"""kernels/common.py: the launch helpers every kernel file shares."""

from __future__ import annotations

import contextlib
from types import SimpleNamespace

import torch

from fastgpt_kernels.common import kernels_source_tag, on_device, tag_compile_caches


def test_on_device_switches_only_to_another_gpu(monkeypatch):
    """Triton launches on the current CUDA device: a tensor on another GPU needs a guard."""
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    on = lambda device: on_device(SimpleNamespace(device=torch.device(device)))  # noqa: E731
    assert isinstance(on("cpu"), contextlib.nullcontext)
    assert isinstance(on("cuda:0"), contextlib.nullcontext)
    guard = on("cuda:1")
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1


def test_compile_caches_are_keyed_by_the_kernels_source(tmp_path):
    """torch.compile's caches know the ops in a graph by name only: without the tag, a graph
    compiled against older kernel code would be reused after an upgrade. Importing the kernels
    leaves the tag alone (tests/test_layers.py); tag_compile_caches sets it."""
    with torch.compiler.config.patch(cache_key_tag=""):
        tag_compile_caches()
        assert torch.compiler.config.cache_key_tag == kernels_source_tag()

    (tmp_path / "op.py").write_text("def f(): return 1\n")
    before = kernels_source_tag(tmp_path)
    (tmp_path / "op.py").write_text("def f(): return 2\n")
    kernels_source_tag.cache_clear()
    assert kernels_source_tag(tmp_path) != before

    with torch.compiler.config.patch(cache_key_tag="users-own"):
        tag_compile_caches()
        tag_compile_caches()
        assert torch.compiler.config.cache_key_tag == f"users-own+{kernels_source_tag()}"
