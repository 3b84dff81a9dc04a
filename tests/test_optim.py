"""The learning-rate schedule and AdamW's parameter groups."""

import math

import pytest
import torch

from fastgpt.config import ConfigError, TrainConfig
from fastgpt.model import GPT, GPTConfig
from fastgpt.optim import get_lr, make_optimizer, param_groups

LR, MIN_LR, WARMUP, DECAY = 1e-3, 1e-4, 100, 1100


def lr_at(it):
    return get_lr(it, LR, WARMUP, DECAY, MIN_LR)


def test_warmup_starts_small_and_reaches_peak():
    assert lr_at(0) == pytest.approx(LR / (WARMUP + 1))
    assert lr_at(WARMUP // 2) == pytest.approx(LR * (WARMUP // 2 + 1) / (WARMUP + 1))
    assert lr_at(WARMUP) == pytest.approx(LR)  # end of warmup: the peak, cosine at angle 0


def test_cosine_midpoint_and_floor():
    mid = WARMUP + (DECAY - WARMUP) // 2
    assert lr_at(mid) == pytest.approx((LR + MIN_LR) / 2)
    quarter = WARMUP + (DECAY - WARMUP) // 4
    assert lr_at(quarter) == pytest.approx(MIN_LR + (LR - MIN_LR) * 0.5 * (1 + math.cos(math.pi / 4)))
    assert lr_at(DECAY) == pytest.approx(MIN_LR)
    assert lr_at(DECAY + 1) == MIN_LR and lr_at(10 * DECAY) == MIN_LR


def test_schedule_is_monotone_after_warmup():
    lrs = [lr_at(i) for i in range(WARMUP, DECAY + 10)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


def test_param_groups_decay_matrices_only():
    model = GPT(GPTConfig(block_size=8, vocab_size=64, n_layer=2, n_head=2, n_embd=16, bias=True))
    decay, no_decay = param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() < 2 for p in no_decay["params"])
    # Tied embedding/head weight counted once; every parameter in exactly one group.
    ids = [id(p) for g in (decay, no_decay) for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))
    assert any(p is model.lm_head.weight for p in decay["params"])


def test_optimizer_uses_fused_adamw_on_cpu():
    model = GPT(GPTConfig(block_size=8, vocab_size=64, n_layer=1, n_head=2, n_embd=16))
    opt = make_optimizer(model, 0.1, 1e-3, (0.9, 0.95), "cpu")
    assert isinstance(opt, torch.optim.AdamW) and opt.defaults["fused"] is True
    assert opt.defaults["betas"] == (0.9, 0.95)


# lr_schedule='wsd': the decay takes the last fifth of lr_decay_iters, iterations 880 to 1100.
FRACTION = 0.2
DECAY_START = 880


def wsd_at(it, decay_fraction=FRACTION, warmup=WARMUP):
    return get_lr(it, LR, warmup, DECAY, MIN_LR, "wsd", decay_fraction)


def test_wsd_warms_up_as_cosine_then_holds_the_peak_until_the_decay():
    assert [wsd_at(i) for i in range(WARMUP)] == [lr_at(i) for i in range(WARMUP)]
    assert all(wsd_at(i) == LR for i in range(WARMUP, DECAY_START + 1))


def test_wsd_decays_linearly_to_min_lr_at_lr_decay_iters():
    assert wsd_at(DECAY_START + 1) < LR
    assert wsd_at((DECAY_START + DECAY) // 2) == pytest.approx((LR + MIN_LR) / 2)
    assert wsd_at(DECAY_START + 55) == pytest.approx(LR - (LR - MIN_LR) / 4)
    assert wsd_at(DECAY) == pytest.approx(MIN_LR)
    assert wsd_at(DECAY + 1) == MIN_LR and wsd_at(10 * DECAY) == MIN_LR
    steps = [wsd_at(i) for i in range(DECAY_START, DECAY + 1)]
    assert all(a > b for a, b in zip(steps, steps[1:]))
    assert all(MIN_LR <= wsd_at(i) <= LR for i in range(WARMUP, 2 * DECAY))


def test_wsd_whole_run_decay_and_the_cosine_default():
    assert [wsd_at(i, 1.0, warmup=0) for i in (0, DECAY // 2, DECAY)] == pytest.approx([LR, (LR + MIN_LR) / 2, MIN_LR])
    assert all(get_lr(i, LR, WARMUP, DECAY, MIN_LR, "cosine", 0.5) == lr_at(i) for i in range(0, DECAY + 10, 7))


def test_config_schedule_fields():
    cfg = TrainConfig(learning_rate=LR, min_lr=MIN_LR, warmup_iters=WARMUP, lr_decay_iters=DECAY, lr_schedule="wsd")
    assert cfg.decay_fraction == FRACTION and [cfg.lr_at(i) for i in (0, 900, 2000)] == [wsd_at(i) for i in (0, 900, 2000)]
    assert TrainConfig(decay_lr=False, lr_schedule="wsd", learning_rate=LR).lr_at(DECAY) == LR
    assert TrainConfig(learning_rate=LR, min_lr=MIN_LR, warmup_iters=WARMUP, lr_decay_iters=DECAY).lr_at(600) == lr_at(600)
    for values, message in (
        ({"lr_schedule": "linear"}, r"lr_schedule='linear' is not allowed; choose one of 'cosine', 'wsd'"),
        ({"decay_fraction": 0.0}, r"decay_fraction=0.0 must be in \(0, 1\]"),
        ({"decay_fraction": 1.5}, r"decay_fraction=1.5 must be in \(0, 1\]"),
        ({"lr_schedule": "wsd", "warmup_iters": 100, "lr_decay_iters": 120},
         r"warmup_iters=100 must end before lr_schedule='wsd' starts its decay at iteration 96 \(lr_decay_iters=120"),
    ):
        with pytest.raises(ConfigError, match=message):
            TrainConfig(**values)
    TrainConfig(lr_schedule="wsd", warmup_iters=100, lr_decay_iters=120, decay_lr=False)  # no decay: no conflict
