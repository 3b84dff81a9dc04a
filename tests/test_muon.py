"""optimizer='muon': torch's Muon over the blocks' matrices and AdamW over the rest, as one optimizer."""

import copy
import io

import pytest
import torch
import torch.nn as nn

from fastgpt import checkpoint as ckpt_io
from fastgpt.checkpoint import CheckpointError
from fastgpt.config import ConfigError, TrainConfig
from fastgpt.distributed import DistInfo
from fastgpt.model import GPT, GPTConfig
from fastgpt.optim import (KIND_KEY, MuonAdamW, MuonSettings, clip_and_step, hidden_matrices, make_optimizer, param_groups,
                           set_lr)
from fastgpt.train import train

from conftest import tiny_config

LR, WD, BETAS = 1e-3, 0.1, (0.9, 0.95)
MUON = MuonSettings(lr=0.02, momentum=0.95, weight_decay=0.01)
# Per block: attention's c_attn and c_proj, the MLP's c_fc and c_proj.
BLOCK_MATRICES = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def small_gpt(bias=True, n_layer=2) -> GPT:
    return GPT(GPTConfig(block_size=8, vocab_size=64, n_layer=n_layer, n_head=2, n_embd=16, bias=bias))


def untie(model: GPT) -> GPT:
    """The model with a head of its own, as an untied-head GPT has: lm_head.weight is then a
    parameter by that name."""
    model.lm_head.weight = nn.Parameter(model.lm_head.weight.detach().clone())
    return model


def set_grads(model: nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=gen)


def names(model: nn.Module, params) -> set[str]:
    ids = {id(p) for p in params}
    return {name for name, p in model.named_parameters() if id(p) in ids}


@pytest.mark.parametrize("tied", [True, False])
def test_every_parameter_in_exactly_one_group_and_the_matrices_with_muon(tied):
    model = small_gpt() if tied else untie(small_gpt())
    opt = make_optimizer(model, WD, LR, BETAS, "cpu", muon=MUON)
    muon_group, = opt.muon.param_groups
    decay, no_decay = opt.adamw.param_groups
    groups = [muon_group["params"], decay["params"], no_decay["params"]]
    ids = [id(p) for g in groups for p in g]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))
    assert names(model, groups[0]) == {f"transformer.h.{i}.{m}" for i in range(2) for m in BLOCK_MATRICES}
    head = {"transformer.wte.weight"} if tied else {"transformer.wte.weight", "lm_head.weight"}
    assert names(model, groups[1]) == head | {"transformer.wpe.weight"}
    assert all(p.dim() == 1 for p in groups[2]) and names(model, groups[2]) >= {"transformer.ln_f.weight",
                                                                                 "transformer.h.0.attn.c_attn.bias"}
    assert (muon_group["lr"], muon_group["momentum"], muon_group["weight_decay"]) == (0.02, 0.95, 0.01)
    assert (decay["weight_decay"], no_decay["weight_decay"], decay["lr"], decay["betas"]) == (WD, 0.0, LR, BETAS)
    assert opt.param_groups == [muon_group, decay, no_decay]


def test_steps_equal_torchs_muon_and_adamw_applied_directly():
    """Three steps under a changing schedule: Muon's rate moves by the same factor as AdamW's."""
    model = untie(small_gpt())
    direct, initial = copy.deepcopy(model), copy.deepcopy(model)
    opt = make_optimizer(model, WD, LR, BETAS, "cpu", muon=MUON)
    matrices = hidden_matrices(direct)
    muon = torch.optim.Muon(matrices, lr=MUON.lr, momentum=MUON.momentum, weight_decay=MUON.weight_decay)
    adamw = torch.optim.AdamW(param_groups(direct, WD, skip=matrices), lr=LR, betas=BETAS, fused=True)
    for step, lr in enumerate([LR / 3, LR, LR / 10]):
        set_grads(model, step)
        set_grads(direct, step)
        set_lr(opt, lr)
        opt.step()
        muon.param_groups[0]["lr"] = MUON.lr * lr / LR
        for group in adamw.param_groups:
            group["lr"] = lr
        muon.step()
        adamw.step()
    assert opt.muon.param_groups[0]["lr"] == pytest.approx(MUON.lr / 10)
    for (name, p), q, p0 in zip(model.named_parameters(), direct.parameters(), initial.parameters()):
        assert torch.equal(p, q) and not torch.equal(p, p0), name


def saved(state_dict: dict) -> dict:
    """The state_dict as a checkpoint brings it back: through torch.save and a weights-only load."""
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def test_state_dict_round_trips_and_the_next_steps_agree():
    model = small_gpt()
    opt = make_optimizer(model, WD, LR, BETAS, "cpu", muon=MUON)
    for step in range(2):
        set_grads(model, step)
        opt.step()
    state = opt.state_dict()
    n_matrices = len(hidden_matrices(model))
    assert state[KIND_KEY] == "muon" and len(state["param_groups"]) == 3
    assert state["param_groups"][0]["params"] == list(range(n_matrices))
    assert set(state["state"]) == set(range(len(list(model.parameters()))))
    assert all(set(state["state"][i]) == {"momentum_buffer"} for i in range(n_matrices))
    assert set(state["state"][n_matrices]) == {"step", "exp_avg", "exp_avg_sq"}

    resumed_model = copy.deepcopy(model)
    resumed = make_optimizer(resumed_model, WD, LR, BETAS, "cpu", muon=MUON)
    resumed.load_state_dict(saved(state))
    assert resumed.param_groups == [*resumed.muon.param_groups, *resumed.adamw.param_groups]
    for step in range(2, 4):
        for m, o in ((model, opt), (resumed_model, resumed)):
            set_grads(m, step)
            set_lr(o, LR / step)
            o.step()
    for p, q in zip(model.parameters(), resumed_model.parameters()):
        assert torch.equal(p, q)


def test_resume_refuses_the_other_optimizers_checkpoint_naming_the_field():
    model = small_gpt()
    adamw = make_optimizer(model, WD, LR, BETAS, "cpu")
    muon = make_optimizer(model, WD, LR, BETAS, "cpu", muon=MUON)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    for saved_opt, live, was, now in ((adamw, muon, "adamw", "muon"), (muon, adamw, "muon", "adamw")):
        ck = {"optimizer": saved_opt.state_dict(), "iter_num": 1, "best_val_loss": 2.0, "config": {}}
        message = rf"x.pt was trained with optimizer='{was}', and this run has optimizer='{now}'; resume with --optimizer={was}"
        with pytest.raises(CheckpointError, match=message):
            ckpt_io.restore_training_state(ck, live, scaler, {}, "x.pt", DistInfo())
    with pytest.raises(ValueError, match="optimizer='adamw' state_dict does not load"):
        muon.load_state_dict(adamw.state_dict())
    ck = {"optimizer": muon.state_dict(), "iter_num": 1, "best_val_loss": 2.0, "config": {}}
    again = make_optimizer(model, WD, LR, BETAS, "cpu", muon=MUON)
    assert ckpt_io.restore_training_state(ck, again, scaler, {}, "x.pt", DistInfo()) == (1, 2.0)
    assert [g.get("fused") for g in again.param_groups] == [None, True, True]  # this run's fused AdamW kept


def test_fp16_grad_scaler_unscales_every_group_and_skips_an_overflow():
    """GradScaler steps the combined optimizer as one: gradients scaled by S and unscaled give
    the step an unscaled run takes; an inf gradient skips both optimizers' steps."""
    plain, scaled = small_gpt(), small_gpt()
    scaled.load_state_dict(plain.state_dict())
    opts = [make_optimizer(m, WD, LR, BETAS, "cpu", muon=MUON) for m in (plain, scaled)]
    scaler = torch.amp.GradScaler("cpu", enabled=True)
    set_grads(plain, 0)
    set_grads(scaled, 0)
    factor = scaler.scale(torch.ones(())).item()  # as scaler.scale(loss) would; a power of two: exact
    for p in scaled.parameters():
        p.grad *= factor
    assert clip_and_step(plain, opts[0], torch.amp.GradScaler("cpu", enabled=False), 1.0, False)
    assert clip_and_step(scaled, opts[1], scaler, 1.0, False)
    for p, q in zip(plain.parameters(), scaled.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-6, atol=1e-7)
    before = copy.deepcopy(scaled.state_dict())
    set_grads(scaled, 1)
    next(scaled.parameters()).grad[0, 0] = float("inf")
    scaler.scale(torch.ones(()))
    clip_and_step(scaled, opts[1], scaler, 1.0, False)
    assert all(torch.equal(v, before[k]) for k, v in scaled.state_dict().items())


@pytest.mark.parametrize(
    "values, message",
    [
        ({"optimizer": "sgd"}, r"optimizer='sgd' is not allowed; choose one of 'adamw', 'muon'"),
        ({"optimizer": "muon", "learning_rate": 0.0, "min_lr": 0.0}, r"learning_rate=0.0 must be > 0 with optimizer='muon'"),
        ({"muon_lr": -0.1}, r"muon_lr=-0.1 must be >= 0"),
        ({"muon_momentum": 1.0}, r"muon_momentum=1.0 must be in \[0, 1\)"),
        ({"muon_weight_decay": -1.0}, r"muon_weight_decay=-1.0 must be >= 0"),
    ],
)
def test_config_names_the_field(values, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig(**values)


def test_config_gives_muons_settings_only_when_chosen():
    assert TrainConfig().optimizer == "adamw" and TrainConfig().muon_settings() is None
    cfg = TrainConfig(optimizer="muon", muon_lr=0.05, muon_momentum=0.9, muon_weight_decay=0.1)
    assert cfg.muon_settings() == MuonSettings(0.05, 0.9, 0.1)


def test_short_muon_run_learns(tmp_path, tiny_data):
    data_root, _ = tiny_data
    result = train(tiny_config(tmp_path, data_root, max_iters=60, eval_interval=60, eval_iters=10, lr_decay_iters=60,
                               batch_size=8, block_size=32, optimizer="muon"))
    first_val, last_val = result.history["eval"][0][2], result.losses["val"]
    assert last_val < 0.4 * first_val  # ~4.16 (uniform over 64 ids) down to ~1.0 in 60 steps
    ck = ckpt_io.load_checkpoint(tmp_path / "out" / "ckpt.pt")
    assert ck["optimizer"][KIND_KEY] == "muon" and ck["config"]["optimizer"] == "muon"


def test_muon_resume_continues_exactly(tmp_path, tiny_data):
    """Stopped at 10 of 20 steps and resumed (dropout on, inside the WSD decay): every later loss,
    weight and momentum buffer equals the uninterrupted run's."""
    data_root, _ = tiny_data
    run = dict(max_iters=20, lr_decay_iters=20, eval_interval=10, log_interval=1, dropout=0.1, optimizer="muon",
               lr_schedule="wsd", decay_fraction=0.6)
    whole = train(tiny_config(tmp_path / "whole", data_root, **run))
    train(tiny_config(tmp_path / "parts", data_root, **{**run, "max_iters": 10}))
    resumed = train(tiny_config(tmp_path / "parts", data_root, init_from="resume", **run))
    whole_losses = dict(whole.history["train"])
    assert dict(resumed.history["train"]) == {it: whole_losses[it] for it in range(11, 21)}
    for (name, p), q in zip(whole.model.named_parameters(), resumed.model.parameters()):
        assert torch.equal(p, q), name
    states = [ckpt_io.load_checkpoint(tmp_path / run_dir / "out" / "ckpt.pt")["optimizer"]["state"]
              for run_dir in ("whole", "parts")]
    for index, state in states[0].items():
        for key, value in state.items():
            assert torch.equal(states[1][index][key], value), (index, key)


def test_a_muon_checkpoint_resumed_as_adamw_is_refused(tmp_path, tiny_data):
    data_root, _ = tiny_data
    train(tiny_config(tmp_path, data_root, max_iters=2, eval_interval=2, optimizer="muon"))
    with pytest.raises(CheckpointError, match=r"optimizer='muon', and this run has optimizer='adamw'"):
        train(tiny_config(tmp_path, data_root, max_iters=4, eval_interval=2, init_from="resume"))


def test_muonadamw_is_a_torch_optimizer():
    opt = make_optimizer(small_gpt(), WD, LR, BETAS, "cpu", muon=MUON)
    assert isinstance(opt, MuonAdamW) and isinstance(opt, torch.optim.Optimizer)
    assert isinstance(opt.muon, torch.optim.Muon) and isinstance(opt.adamw, torch.optim.AdamW)
