"""The training loop end to end on tiny models: learning, accumulation, resume, checkpoints."""

import math

import pytest
import torch

from fastgpt import checkpoint as ckpt_io
from fastgpt.checkpoint import CheckpointError
from fastgpt.train import train

from conftest import tiny_config, write_char_dataset


def params(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_short_run_learns(tmp_path, tiny_data):
    data_root, _ = tiny_data
    result = train(tiny_config(tmp_path, data_root, max_iters=150, eval_interval=150, eval_iters=10,
                               lr_decay_iters=150, batch_size=8, block_size=32))
    first_val = result.history["eval"][0][2]
    last_val = result.losses["val"]
    assert first_val == pytest.approx(math.log(64), abs=0.2)  # uniform over 32 ids padded to 64 at init
    assert last_val < 0.6 * first_val  # a 10%-noise counting pattern: well below the initial loss
    assert (tmp_path / "out" / "ckpt.pt").exists()


def first_moments(out_dir):
    """AdamW's exp_avg after one step is (1 - beta1) * gradient: the gradient itself, at its scale
    (the parameter update would not do: Adam's update is invariant to the gradient's scale)."""
    state = ckpt_io.load_checkpoint(out_dir / "ckpt.pt")["optimizer"]["state"]
    return [state[i]["exp_avg"] for i in sorted(state)]


def test_accumulation_equals_one_big_batch(tmp_path, tiny_data):
    """k micro-batches of B with the loss scaled by 1/k give the gradient of one batch of kB:
    the data stream hands out the same sequences either way."""
    data_root, _ = tiny_data
    common = dict(max_iters=1, eval_interval=1, grad_clip=0.0)
    train(tiny_config(tmp_path / "a", data_root, batch_size=8, gradient_accumulation_steps=1, **common))
    train(tiny_config(tmp_path / "b", data_root, batch_size=2, gradient_accumulation_steps=4, **common))
    big, acc = first_moments(tmp_path / "a" / "out"), first_moments(tmp_path / "b" / "out")
    assert len(big) == len(acc) > 0
    for g_big, g_acc in zip(big, acc):
        torch.testing.assert_close(g_acc, g_big, rtol=1e-5, atol=1e-9)


def test_resume_continues_exactly(tmp_path, tiny_data):
    data_root, _ = tiny_data
    common = dict(max_iters=20, lr_decay_iters=20, eval_interval=10, log_interval=1, dropout=0.1)
    whole = train(tiny_config(tmp_path / "whole", data_root, **common))
    out = tmp_path / "parts"
    first = train(tiny_config(out, data_root, **{**common, "max_iters": 10}))
    assert first.iter_num == 10
    second = train(tiny_config(out, data_root, init_from="resume", **common))
    losses_whole = dict(whole.history["train"])
    losses_resumed = dict(second.history["train"])
    assert sorted(losses_resumed) == list(range(11, 21))
    for it in range(11, 21):
        assert losses_resumed[it] == pytest.approx(losses_whole[it], rel=1e-6, abs=1e-7), it
    for k, v in params(whole.model).items():
        torch.testing.assert_close(params(second.model)[k], v, rtol=1e-6, atol=1e-7)


def test_resume_takes_the_checkpoints_shape_and_says_so(tmp_path, tiny_data, capsys):
    data_root, _ = tiny_data
    train(tiny_config(tmp_path, data_root, max_iters=10, vocab_multiple=1, block_size=8))
    # As with a nanoGPT checkpoint: another depth, no vocabulary padding, a shorter context.
    result = train(tiny_config(tmp_path, data_root, init_from="resume", n_layer=3, max_iters=12))
    assert ("took the model's shape from ckpt.pt: n_layer=2 (config: 3), block_size=8 (config: 16), vocab_size=32 "
            "(config: 64)") in capsys.readouterr().out
    model = result.model
    assert (len(model.transformer.h), model.config.block_size, model.config.vocab_size) == (2, 8, 32)
    assert ckpt_io.load_checkpoint(tmp_path / "out" / "ckpt.pt")["config"]["block_size"] == 8  # batches followed


def test_resume_refuses_a_vocabulary_smaller_than_the_datasets(tmp_path, tiny_data):
    data_root, _ = tiny_data
    train(tiny_config(tmp_path, data_root, max_iters=10, vocab_multiple=1))
    write_char_dataset(data_root / "tiny", vocab=40)
    with pytest.raises(CheckpointError, match=r"has a vocabulary of 32 ids, but the dataset's has 40"):
        train(tiny_config(tmp_path, data_root, init_from="resume"))


def test_resume_without_checkpoint_is_clear(tmp_path, tiny_data):
    data_root, _ = tiny_data
    with pytest.raises(CheckpointError, match=r"no checkpoint at .*ckpt.pt"):
        train(tiny_config(tmp_path, data_root, init_from="resume"))


def test_new_run_keeps_the_previous_checkpoint(tmp_path, tiny_data):
    data_root, _ = tiny_data
    train(tiny_config(tmp_path, data_root, max_iters=10))
    before = (tmp_path / "out" / "ckpt.pt").read_bytes()
    train(tiny_config(tmp_path, data_root, max_iters=10, seed=7))
    kept = [p for p in (tmp_path / "out").glob("ckpt.*.pt")]
    assert len(kept) == 1 and kept[0].read_bytes() == before


def test_checkpoint_holds_uncompiled_state_and_config(tmp_path, tiny_data):
    data_root, _ = tiny_data
    cfg = tiny_config(tmp_path, data_root, max_iters=10)
    train(cfg)
    ck = ckpt_io.load_checkpoint(tmp_path / "out" / "ckpt.pt")
    assert {"model", "optimizer", "model_args", "iter_num", "best_val_loss", "config"} <= set(ck)
    assert ck["iter_num"] == 10 and ck["config"] == cfg.to_dict()
    assert not any(k.startswith("_orig_mod.") for k in ck["model"])
    assert ck["model_args"]["vocab_size"] == 64  # 32 ids padded to a multiple of 64
