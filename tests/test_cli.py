"""The commands as users type them: `python -m fastgpt.{train,sample,prepare,export,plot}`, in a subprocess
or through their main(argv)."""

import importlib
import os
import pathlib
import re
import subprocess
import sys

import pytest

from fastgpt.errors import ExitStatus

from conftest import write_char_dataset

REPO = pathlib.Path(__file__).resolve().parent.parent


def run(*args, cwd):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("module", ["fastgpt.train", "fastgpt.sample", "fastgpt.prepare"])
def test_help(module, tmp_path):
    proc = run(module, "--help", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "usage" in proc.stdout.lower() and len(proc.stdout.splitlines()) > 5


def test_train_then_sample_from_the_command_line(tmp_path):
    """The default config (configs/shakespeare_char.py) with a short schedule, on a tiny dataset."""
    write_char_dataset(tmp_path / "data" / "tiny")
    short = ["--dataset=tiny", "--max_iters=20", "--eval_interval=10", "--eval_iters=2", "--log_interval=10",
             "--n_layer=1", "--n_embd=32", "--n_head=2", "--batch_size=4", "--block_size=16",
             "--warmup_iters=2", "--lr_decay_iters=20", "--device=cpu"]
    proc = run("fastgpt.train", *short, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "iter 20: loss" in proc.stdout and "tok/s" in proc.stdout and "mfu" in proc.stdout
    assert (tmp_path / "out-shakespeare-char" / "ckpt.pt").exists()  # the default config's out_dir
    proc = run("fastgpt.sample", "--start=abc", "--num_samples=2", "--max_new_tokens=10", "--device=cpu", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("abc") == 2


def test_sample_without_checkpoint_is_one_line(tmp_path):
    proc = run("fastgpt.sample", "--out_dir=nowhere", cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: no checkpoint at nowhere/ckpt.pt") and proc.stderr.count("\n") == 1


# Each command's bad input, from an empty folder: (arguments, the error it raises, words of its one line).
BAD_INPUT = {
    "train": (["--batch_size=0"], "ConfigError", "batch_size=0 must be a positive integer"),
    "sample": (["--num_samples=0"], "OptionError", "num_samples=0 must be a positive integer"),
    "prepare": (["text", "--input", "nope.txt", "--out", "mine"], "FileNotFoundError",
                "input file nope.txt does not exist"),
    "export": (["nowhere", "--hf", "hf"], "CheckpointError", "no checkpoint at nowhere/ckpt.pt"),
    "plot": (["nowhere"], "PlotError", "no nowhere/metrics.jsonl"),
}


@pytest.mark.parametrize("command", sorted(BAD_INPUT))
def test_every_command_s_bad_input_is_one_line_and_status_2(command, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    args, error, words = BAD_INPUT[command]
    main = importlib.import_module(f"fastgpt.{command}").main
    assert main(args) == ExitStatus.BAD_INPUT == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and words in lines[0]
    with pytest.raises(Exception, match=re.escape(words)) as raised:
        main([*args, "--debug"])
    assert type(raised.value).__name__ == error
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("command", sorted(BAD_INPUT))
def test_every_command_takes_debug_and_shows_the_traceback(command, tmp_path):
    args, error, words = BAD_INPUT[command]
    assert "--debug" in run(f"fastgpt.{command}", "--help", cwd=tmp_path).stdout
    proc = run(f"fastgpt.{command}", *args, "--debug", cwd=tmp_path)
    assert proc.returncode == ExitStatus.CRASH and proc.stderr.startswith("Traceback (most recent call last):")
    assert f"{error}: " in proc.stderr.splitlines()[-1] and words in proc.stderr.splitlines()[-1]
