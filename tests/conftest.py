"""Shared fixtures: tiny datasets and configs that train in seconds on a CPU."""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
import torch

# Kernel tests run on a CPU through Triton's interpreter, which must be chosen before triton is
# first imported; on a GPU machine they run compiled.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from fastgpt.config import TrainConfig
from fastgpt_kernels.common import tag_compile_caches

# A character vocabulary this small keeps the embedding tiny while exercising the meta.pkl path.
TINY_VOCAB = 32
TINY_TOKENS = 20_000


def write_char_dataset(folder, n_tokens: int = TINY_TOKENS, vocab: int = TINY_VOCAB, seed: int = 0):
    """A nanoGPT-layout character dataset of a repetitive, learnable sequence with some noise."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    pattern = np.arange(n_tokens) % (vocab - 1)  # predictable: next = current + 1
    noise = rng.integers(0, vocab, n_tokens)
    ids = np.where(rng.random(n_tokens) < 0.1, noise, pattern).astype(np.uint16)
    split = int(0.9 * n_tokens)
    ids[:split].tofile(folder / "train.bin")
    ids[split:].tofile(folder / "val.bin")
    itos = {i: chr(ord("a") + i) if i < 26 else str(i - 26) for i in range(vocab)}
    with open(folder / "meta.pkl", "wb") as f:
        pickle.dump({"vocab_size": vocab, "itos": itos, "stoi": {c: i for i, c in itos.items()}}, f)
    return folder


@pytest.fixture
def tiny_data(tmp_path):
    """(data_root, dataset name) of a tiny character dataset."""
    write_char_dataset(tmp_path / "data" / "tiny")
    return tmp_path / "data", "tiny"


def tiny_config(tmp_path, data_root, **overrides) -> TrainConfig:
    """A 2-layer, 32-wide model on the tiny dataset, fp32 on the CPU, no compile: seconds per run."""
    values = dict(
        out_dir=str(tmp_path / "out"), data_root=str(data_root), dataset="tiny",
        n_layer=2, n_head=2, n_embd=32, block_size=16, batch_size=4, gradient_accumulation_steps=1,
        max_iters=20, eval_interval=10, eval_iters=2, log_interval=5, learning_rate=1e-2, min_lr=1e-3,
        warmup_iters=2, lr_decay_iters=20, device="cpu", dtype="float32", compile=False, dropout=0.0,
    )
    values.update(overrides)
    return TrainConfig(**values)


def cli_args(cfg: TrainConfig) -> list[str]:
    """cfg as the `--key=value` command line that python -m fastgpt.train parses back into it."""
    return [f"--{k}={v!r}" for k, v in cfg.to_dict().items()]


@pytest.fixture(scope="session", autouse=True)
def _tag_compile_caches():
    """Tests torch.compile graphs holding fastgpt's custom ops, and inductor's caches outlive the
    run (in /tmp): keyed by the ops' names alone, a graph compiled against an earlier version of
    the kernels would be reused. The trainer tags the caches before it compiles; so do the tests."""
    tag_compile_caches()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    np.random.seed(0)
