"""The learning-rate schedule and AdamW's parameter groups."""

import math

import pytest
import torch

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
