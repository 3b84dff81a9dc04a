"""Config loading: files, overrides, types, and the one-line errors users see."""

import pytest

from fastgpt.config import ConfigError, TrainConfig, load_config, parse_override, read_config_file
from fastgpt.train import main


def test_defaults_are_nanogpts_gpt2_recipe():
    cfg = TrainConfig()
    assert (cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.block_size) == (12, 12, 768, 1024)
    assert (cfg.learning_rate, cfg.min_lr, cfg.max_iters, cfg.weight_decay) == (6e-4, 6e-5, 600000, 0.1)
    assert (cfg.beta1, cfg.beta2, cfg.grad_clip, cfg.gradient_accumulation_steps) == (0.9, 0.95, 1.0, 40)


def test_override_literals_and_bare_strings():
    assert parse_override("--max_iters=10") == ("max_iters", 10)
    assert parse_override("--learning_rate=1e-3") == ("learning_rate", 1e-3)
    assert parse_override("--learning_rate=1") == ("learning_rate", 1.0)  # an int where a float goes is fine
    assert parse_override("--compile=False") == ("compile", False)
    assert parse_override("--device=cpu") == ("device", "cpu")
    assert parse_override("--wandb_run_name=124") == ("wandb_run_name", "124")
    assert parse_override("--vocab_size=None") == ("vocab_size", None)


def test_unknown_key_names_close_matches():
    with pytest.raises(ConfigError, match=r"unknown config key 'learning_rte'.*learning_rate"):
        parse_override("--learning_rte=1e-3")


def test_unknown_key_without_close_match_points_to_help():
    with pytest.raises(ConfigError, match=r"unknown config key 'zzz'.*--help"):
        parse_override("--zzz=1")


@pytest.mark.parametrize(
    "arg, message",
    [
        ("--max_iters=1.5", r"max_iters must be int, got float 1.5"),
        ("--compile=1", r"compile must be bool or str, got int 1"),
        ("--batch_size=True", r"batch_size must be int, got bool True"),
        ("--learning_rate=fast", r"learning_rate must be float, got str 'fast'"),
    ],
)
def test_wrong_type_names_field_and_types(arg, message):
    with pytest.raises(ConfigError, match=message):
        parse_override(arg)


def test_malformed_override():
    with pytest.raises(ConfigError, match="--key=value"):
        parse_override("--max_iters")


@pytest.mark.parametrize(
    "values, message",
    [
        ({"n_embd": 100, "n_head": 3}, r"n_embd=100 must be divisible by n_head=3"),
        ({"dtype": "fp8"}, r"dtype='fp8' is not allowed; choose one of"),
        ({"init_from": "gpt3"}, r"init_from='gpt3' is not allowed"),
        ({"batch_size": 0}, r"batch_size=0 must be a positive integer"),
        ({"dropout": 1.5}, r"dropout=1.5 must be in \[0, 1\)"),
        ({"min_lr": 1.0, "learning_rate": 0.1}, r"min_lr=1.0 must not exceed learning_rate=0.1"),
    ],
)
def test_validation_names_the_field(values, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig(**values)


NANOGPT_STYLE_CONFIG = """
# a nanoGPT-style config: plain assignments, a module import, arithmetic
import math
out_dir = 'out-test'
eval_interval = 250
eval_iters = 200
log_interval = 10
always_save_checkpoint = False
wandb_log = False
wandb_project = 'shakespeare-char'
wandb_run_name = 'mini-gpt'
dataset = 'shakespeare_char'
gradient_accumulation_steps = 1
batch_size = 64
block_size = 256
n_layer = 6
n_head = 6
n_embd = 384
dropout = 0.2
learning_rate = 1e-3
max_iters = 5000
lr_decay_iters = 5000
min_lr = 1e-4
beta2 = 0.99
warmup_iters = 100
device = 'cpu'
compile = False
"""


def test_nanogpt_style_config_file_loads(tmp_path):
    path = tmp_path / "cfg.py"
    path.write_text(NANOGPT_STYLE_CONFIG)
    cfg = load_config(str(path), ["--batch_size=12"])
    assert (cfg.n_layer, cfg.dropout, cfg.beta2, cfg.out_dir) == (6, 0.2, 0.99, "out-test")
    assert cfg.batch_size == 12  # the command line wins over the file


def test_config_file_typo_names_file_and_close_match(tmp_path):
    path = tmp_path / "typo.py"
    path.write_text("learnig_rate = 1e-3\n")
    with pytest.raises(ConfigError, match=r"typo.py: unknown config key 'learnig_rate'; did you mean learning_rate"):
        read_config_file(path)


def test_config_file_wrong_type(tmp_path):
    path = tmp_path / "bad.py"
    path.write_text("max_iters = '100'\n")
    with pytest.raises(ConfigError, match=r"bad.py: max_iters must be int, got str '100'"):
        read_config_file(path)


def test_config_file_syntax_error_and_missing_file(tmp_path):
    path = tmp_path / "broken.py"
    path.write_text("max_iters = = 3\n")
    with pytest.raises(ConfigError, match=r"broken.py: SyntaxError"):
        read_config_file(path)
    with pytest.raises(ConfigError, match=r"not found"):
        read_config_file(tmp_path / "nope.py")


def test_cli_error_is_one_line_and_exit_2(capsys):
    assert main(["--max_itres=5"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "max_iters" in err


def test_cli_help_lists_every_field(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for name in ("out_dir", "gradient_accumulation_steps", "learning_rate", "dtype", "compile"):
        assert f"--{name}=" in out


def test_compile_accepts_bools_and_auto_only():
    assert TrainConfig(compile=False).compile is False and TrainConfig().compile == "auto"
    with pytest.raises(ConfigError, match=r"compile='yes' is not allowed; choose True, False or 'auto'"):
        load_config(None, ["--compile=yes"])


def test_wandb_without_the_package_is_a_clear_error(capsys, tmp_path):
    try:
        import wandb  # noqa: F401
        pytest.skip("wandb is installed here; the error path needs it absent")
    except ImportError:
        pass
    assert main(["--wandb_log=True", f"--data_root={tmp_path}", "--device=cpu"]) == 2
    assert "wandb_log=True needs the wandb package" in capsys.readouterr().err
