"""The training stall per save: a synchronous save against a background one, at GPT-2 124M.

    pytest bench/test_bench_checkpoint.py --benchmark-only

Both call what the training loop calls, `Saver.save`, to a folder on local disk (pytest's tmp
folder), and a round is the time until it returns: training is stalled for exactly that long.
  synchronous  async_save=False: the file written, fsynced and renamed, then hard-linked as
               ckpt-ITER.pt, while the step waits
  background   async_save=True: the state copied to host memory; the worker writes it after the
               call returns (each round first waits for the previous write, outside the timing)

The state is GPT-2 124M's (12 layers, 768 wide, vocab 50304, block 1024, lm_head tied to wte) in
fp32 with AdamW's two moments, after one step so that they exist: about 1.5 GB, at every size
(bench/harness.py), since the stall is a matter of bytes. Each result records the stall in ms and
the bytes a background save holds in host memory until its write ends (`host_copy_mb`).
"""

from __future__ import annotations

import pytest
import torch

from bench.harness import DEVICE, sync
from fastgpt import checkpoint as ckpt_io
from fastgpt.background_save import HostSnapshot
from fastgpt.distributed import DistInfo
from fastgpt.model import GPT, GPTConfig
from fastgpt.optim import param_groups
from fastgpt.stopping import LossWatch

GPT2_124M = dict(n_layer=12, n_head=12, n_embd=768, vocab_size=50304, block_size=1024, bias=False)
# A save writes 1.5 GB; a few rounds give a median without spending minutes on the disk.
ROUNDS, WARMUP_ROUNDS = 5, 1
KEEP = 2  # the default keep_checkpoints: ckpt.pt and a hard-linked ckpt-ITER.pt


@pytest.fixture(scope="module")
def state() -> ckpt_io.TrainingState:
    model = GPT(GPTConfig(**GPT2_124M)).to(DEVICE)
    optimizer = torch.optim.AdamW(param_groups(model, 0.1), lr=6e-4)
    for p in model.parameters():  # any gradient: the step only has to create both moments
        p.grad = torch.full_like(p, 1e-3)
    optimizer.step()
    sync()
    return ckpt_io.TrainingState(model, optimizer, torch.amp.GradScaler(DEVICE.type, enabled=False), {},
                                 model.config.to_model_args(), {}, {})


@pytest.mark.benchmark(group="checkpoint_stall")
@pytest.mark.parametrize("provider", ["synchronous", "background"])
def test_checkpoint_stall(benchmark, provider, state, tmp_path):
    saver = ckpt_io.Saver(tmp_path, KEEP, state, DistInfo(), LossWatch(DEVICE), lambda *_: None, None,
                          background=provider == "background")
    iteration = iter(range(1, 1_000_000))
    with saver:
        # The timed call alone: the previous round's write has ended before it starts.
        benchmark.pedantic(lambda: saver.save(next(iteration), 1.0), setup=saver.wait, rounds=ROUNDS,
                           warmup_rounds=WARMUP_ROUNDS)
    assert ckpt_io.load_checkpoint(tmp_path / "ckpt.pt")["iter_num"] == ROUNDS + WARMUP_ROUNDS
    _, host_copy_bytes = HostSnapshot()(state.checkpoint(1, 1.0, [ckpt_io.rng_state()]))
    benchmark.extra_info.update(suite="checkpoint_stall", shape_name="GPT-2 124M fp32 + AdamW",
                                median_ms=round(benchmark.stats.stats.median * 1e3, 1),
                                state_mb=round(host_copy_bytes / 1e6, 1),
                                host_copy_mb=round(host_copy_bytes / 1e6, 1) if provider == "background" else 0)
