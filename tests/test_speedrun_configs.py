"""configs/owt_speedrun.py is configs/owt.py with the speedrun's switches on: the same model shape,
data and batch, and exactly the changes its header lists."""

from __future__ import annotations

import pathlib

from fastgpt.config import TrainConfig, load_config

CONFIGS = pathlib.Path(__file__).resolve().parent.parent / "configs"
# What owt_speedrun.py's header says it changes from owt.py, and nothing else.
CHANGED = {"out_dir", "target_loss", "optimizer", "muon_lr", "muon_momentum", "activation", "rope", "qk_norm",
           "tie_embeddings", "zero_init_proj", "logit_softcap", "lr_schedule", "warmup_iters", "max_iters",
           "lr_decay_iters", "min_lr"}


def test_owt_speedrun_changes_only_what_its_header_lists():
    base = load_config(str(CONFIGS / "owt.py"), []).to_dict()
    speedrun = load_config(str(CONFIGS / "owt_speedrun.py"), []).to_dict()
    differs = {k for k in base if base[k] != speedrun[k]}
    assert differs <= CHANGED and CHANGED - differs <= {"muon_lr", "muon_momentum"}  # those two are the defaults
    header = (CONFIGS / "owt_speedrun.py").read_text().split("\n\n")[0]
    for field in CHANGED - {"out_dir", "target_loss", "muon_lr", "muon_momentum", "warmup_iters", "max_iters",
                            "lr_decay_iters", "min_lr"}:
        assert field in header, f"the header does not list {field}"


def test_every_speedrun_switch_is_on_and_off_by_default():
    speedrun = load_config(str(CONFIGS / "owt_speedrun.py"), [])
    default = TrainConfig()
    for field in ("optimizer", "activation", "rope", "qk_norm", "tie_embeddings", "zero_init_proj", "logit_softcap",
                  "lr_schedule"):
        assert getattr(speedrun, field) != getattr(default, field), field


def test_shakespeare_speedrun_changes_only_its_switches_and_schedule():
    """The CPU recipe keeps shakespeare_char.py's data, batch and width; the rest its header lists."""
    base = load_config(str(CONFIGS / "shakespeare_char.py"), []).to_dict()
    speedrun = load_config(str(CONFIGS / "shakespeare_char_speedrun.py"), []).to_dict()
    differs = {k for k in base if base[k] != speedrun[k]}
    listed = {"optimizer", "activation", "rope", "qk_norm", "tie_embeddings", "zero_init_proj", "lr_schedule"}
    schedule = {"out_dir", "eval_interval", "log_interval", "target_loss", "max_iters", "lr_decay_iters",
                "decay_fraction", "warmup_iters", "min_lr", "dtype"}
    assert listed <= differs <= listed | schedule
    header = (CONFIGS / "shakespeare_char_speedrun.py").read_text().split("\n\n")[0]
    assert all(field in header for field in listed)
