"""train() with compile=True on a CPU, so the loop a GPU run takes (torch.compile's graphs, bf16
autocast, gradient accumulation, the Triton ops as torch.library custom ops, DDP's no_sync around
a compiled module) runs in every CI, against the same run uncompiled.

The models are as small as still exercise each path (one layer, 8 positions): Inductor compiles
C++ for every graph, which costs more than the training itself."""

import pytest
import torch
import torch._dynamo.utils

from fastgpt.train import train
from fastgpt_kernels.common import kernels_source_tag, triton_usable

from conftest import tiny_config
from test_ddp import COMMON, assert_same_training, count_allreduces, weights_and_moments

# One layer, 8 positions, 2 sequences per micro-batch; one evaluation batch per split.
SMALL = dict(n_layer=1, block_size=8, batch_size=2, eval_iters=1)


@pytest.mark.skipif(not triton_usable("cpu"), reason="Triton on a CPU needs its interpreter (TRITON_INTERPRET=1, "
                                                     "set by tests/conftest.py where there is no GPU)")
def test_compiled_bf16_run_with_triton_ops_trains_as_the_eager_one(tmp_path, tiny_data):
    data_root, _ = tiny_data
    cfg = dict(SMALL, dtype="bfloat16", kernels="triton", gradient_accumulation_steps=2, max_iters=6,
               eval_interval=6, log_interval=1, lr_decay_iters=12)
    eager = train(tiny_config(tmp_path / "eager", data_root, compile=False, **cfg))
    torch._dynamo.utils.counters.clear()
    with torch.compiler.config.patch(cache_key_tag=""):  # as a fresh process has it
        compiled = train(tiny_config(tmp_path / "compiled", data_root, compile=True, **cfg))
        assert torch.compiler.config.cache_key_tag == kernels_source_tag()  # train() tagged before compiling
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1  # it did compile
    assert not torch._dynamo.utils.counters["graph_break"]  # through the custom ops, not around them
    losses = [loss for _, loss in compiled.history["train"]]
    assert len(losses) == 6 and losses[-1] < losses[0] - 0.5
    # bf16 autocast both ways; Inductor may keep an intermediate in fp32 that eager rounds to bf16.
    assert losses == pytest.approx([loss for _, loss in eager.history["train"]], rel=2e-3)
    assert compiled.losses["val"] == pytest.approx(eager.losses["val"], rel=2e-3)


def test_two_compiled_ranks_accumulating_under_no_sync_equal_one_process(tmp_path, tiny_data):
    """Four micro-steps over two ranks: each rank's first one runs under DDP's no_sync, the
    second all-reduces, all through the compiled module."""
    data_root, _ = tiny_data
    cfg = dict(COMMON, **SMALL, gradient_accumulation_steps=4, max_iters=3, eval_interval=3, lr_decay_iters=6)
    train(tiny_config(tmp_path / "one", data_root, **cfg))
    allreduces = count_allreduces(tiny_config(tmp_path / "two", data_root, compile=True, **cfg), tmp_path, "two")
    # One gradient bucket (a 10k-parameter model is far below DDP's first bucket of 1 MiB), one
    # all-reduce per optimizer step: none from the micro-steps under no_sync.
    assert allreduces == cfg["max_iters"]
    # Compiled kernels sum in another order: gradients agree to fp32 rounding, but AdamW divides
    # by sqrt(v), and a weight whose gradients are near zero moves by up to ~3e-6 more or less
    # (seen). 1e-5 is a thousandth of one step at lr 1e-2; a lost or doubled micro-batch moves
    # weights by a sizeable part of a step.
    assert_same_training(weights_and_moments(tmp_path / "one" / "out"), weights_and_moments(tmp_path / "two" / "out"),
                         weight_atol=1e-5)
