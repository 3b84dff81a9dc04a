"""Bad input loses nothing: a mistake in a config, a command line, a data folder, a checkpoint or
a run folder exits non-zero with one line, `error: ...`, that names the problem and what would be
right; no traceback reaches the terminal, and every file the command found is byte-identical
afterwards (it creates none either).

Each case runs the command's main(argv) in this process, except the few marked `real`, which run
`python -m fastgpt.COMMAND` to check the exit status and the terminal as a user sees them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import pathlib
import pickle
import shutil
import subprocess
import sys
from typing import Callable

import numpy as np
import pytest
import torch

from fastgpt import prepare, sample, train
from fastgpt.config import ConfigError
from fastgpt.outdir import LOCK_NAME

from conftest import cli_args, tiny_config, write_char_dataset

REPO = pathlib.Path(__file__).resolve().parent.parent
COMMANDS = {"train": train.main, "sample": sample.main, "prepare": prepare.main}
# The good run's model: the tiny dataset's 32 characters padded to the default vocab_multiple of 64.
MODEL_VOCAB = 64
CUDA = torch.cuda.is_available()
SUBPROCESS_TIMEOUT_S = 120


@dataclasses.dataclass
class Case:
    id: str
    command: str  # a key of COMMANDS
    args: list[str]  # '{root}', '{data}' and '{out}' become the case's folders
    expect: str  # a substring of the one error line that names the problem
    setup: Callable[[pathlib.Path], None] | None = None  # damages the case's folder before the run
    patch: Callable[[pytest.MonkeyPatch], None] | None = None  # changes what the machine reports
    base: bool = True  # prepend the command's working arguments (a tiny model, the tiny dataset)
    real: bool = False  # run as a subprocess, not main(argv)
    marks: tuple = ()


def data_dir(root: pathlib.Path) -> pathlib.Path:
    return root / "data" / "tiny"


def out_dir(root: pathlib.Path) -> pathlib.Path:
    return root / "out"


def base_args(command: str, root: pathlib.Path) -> list[str]:
    """Arguments with which the command succeeds in a fresh case folder (test_the_base_commands_succeed)."""
    if command == "train":
        cfg = tiny_config(root, root / "data", max_iters=2, eval_interval=2, eval_iters=1, log_interval=1,
                          warmup_iters=1, lr_decay_iters=2)
        return cli_args(cfg)
    if command == "sample":
        return [f"--out_dir={out_dir(root)}", f"--data_dir={data_dir(root)}", "--device=cpu", "--dtype=float32",
                "--start=abc", "--num_samples=1", "--max_new_tokens=2"]
    return ["text", "--input", str(root / "corpus.txt"), "--out", str(root / "mine"), "--piece-chars", "100",
            "--threads", "1"]


# --- setups: each damages one thing in the case's folder


def write_file(relative: str, content: bytes | str) -> Callable:
    def setup(root):
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content.encode() if isinstance(content, str) else content)
    return setup


def write_meta(meta) -> Callable:
    return write_file("data/tiny/meta.pkl", pickle.dumps(meta))


def edit_checkpoint(change: Callable[[dict], None]) -> Callable:
    def setup(root):
        path = out_dir(root) / "ckpt.pt"
        checkpoint = torch.load(path, weights_only=True)
        change(checkpoint)
        torch.save(checkpoint, path)
    return setup


def truncate_checkpoint(root):
    path = out_dir(root) / "ckpt.pt"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def without(key: str) -> Callable:
    return edit_checkpoint(lambda c: c.pop(key))


def remove_data(root):
    shutil.rmtree(data_dir(root))


def write_tokens(name: str, ids) -> Callable:
    return write_file(f"data/tiny/{name}", np.asarray(ids, dtype=np.uint16).tobytes())


def odd_bytes(root):
    path = data_dir(root) / "val.bin"
    path.write_bytes(path.read_bytes()[:-1])


def out_dir_is_a_file(root):
    shutil.rmtree(out_dir(root))
    out_dir(root).write_text("not a folder")


def ckpt_is_a_folder(root):
    (out_dir(root) / "ckpt.pt").unlink()
    (out_dir(root) / "ckpt.pt").mkdir()


def read_only_out_dir(root):
    out_dir(root).chmod(0o500)
    probe = out_dir(root) / "probe"
    try:
        probe.write_bytes(b"")
    except PermissionError:
        return
    probe.unlink()
    out_dir(root).chmod(0o700)
    pytest.skip("running as root, where chmod 0o500 does not stop writes; out_dir=/proc covers an unwritable folder")


def two_files(*names: str) -> Callable:
    def setup(root):
        for name in names:
            (root / name).write_text("")
    return setup


def meta_is_a_folder(root):
    (data_dir(root) / "meta.pkl").unlink()
    (data_dir(root) / "meta.pkl").mkdir()


def one_cuda_device(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)


def sixteen_chars_meta():
    itos = {i: chr(ord("a") + i) for i in range(16)}
    return {"vocab_size": 16, "itos": itos, "stoi": {c: i for i, c in itos.items()}}


class RunsCode:
    """Pickled as a call of os.system, as a malicious checkpoint is (the command itself is harmless)."""

    def __reduce__(self):
        return (os.system, ("true",))


no_cuda = pytest.mark.skipif(CUDA, reason="needs a machine without CUDA")
linux_proc = pytest.mark.skipif(not pathlib.Path("/proc/self").is_dir(), reason="needs Linux's /proc")


RESUME = ["--init_from='resume'"]
CASES = [
    # ---- configs: keys
    Case("misspelled-key", "train", ["--n_layr=3"], "unknown config key 'n_layr'; did you mean n_layer"),
    Case("misspelled-key-2", "train", ["--learning_rte=1e-3"], "did you mean learning_rate"),
    Case("unknown-key", "train", ["--colour=3"], "unknown config key 'colour'; see --help"),
    # ---- configs: types
    Case("str-for-int", "train", ["--batch_size=abc"], "batch_size must be int, got str 'abc'"),
    Case("float-for-int", "train", ["--max_iters=2.5"], "max_iters must be int, got float 2.5"),
    Case("int-for-bool", "train", ["--bias=1"], "bias must be bool, got int 1"),
    Case("str-for-float", "train", ["--learning_rate=fast"], "learning_rate must be float, got str 'fast'"),
    Case("list-for-int", "train", ["--eval_iters=[1]"], "eval_iters must be int, got list [1]"),
    # ---- configs: values
    Case("zero-batch", "train", ["--batch_size=0"], "batch_size=0 must be a positive integer"),
    Case("negative-layers", "train", ["--n_layer=-1"], "n_layer=-1 must be a positive integer"),
    Case("zero-block", "train", ["--block_size=0"], "block_size=0 must be a positive integer"),
    Case("negative-lr", "train", ["--learning_rate=-0.1"], "learning_rate=-0.1 must be >= 0"),
    Case("infinite-lr", "train", ["--learning_rate=1e999"], "learning_rate=inf must be a finite number"),
    Case("indivisible-heads", "train", ["--n_embd=30", "--n_head=4"], "n_embd=30 must be divisible by n_head=4"),
    Case("dropout-one", "train", ["--dropout=1.0"], "dropout=1.0 must be in [0, 1)"),
    Case("dropout-negative", "train", ["--dropout=-0.5"], "dropout=-0.5 must be in [0, 1)"),
    Case("beta2-one", "train", ["--beta2=1.0"], "beta2=1.0 must be in [0, 1)"),
    Case("min-lr-above-lr", "train", ["--min_lr=0.5"], "min_lr=0.5 must not exceed learning_rate=0.01"),
    Case("impossible-dtype", "train", ["--dtype=float64"], "dtype='float64' is not allowed; choose one of 'auto'"),
    Case("unknown-init-from", "train", ["--init_from=continue"], "init_from='continue' is not allowed"),
    Case("compile-maybe", "train", ["--compile=maybe"], "compile='maybe' is not allowed; choose True, False or 'auto'"),
    Case("empty-out-dir", "train", ["--out_dir="], "out_dir='' must name a folder"),
    # ---- configs: devices
    Case("no-cuda", "train", ["--device=cuda"], "device='cuda' but CUDA is not available here; use --device=cpu",
         marks=(no_cuda,)),
    Case("no-cuda-7", "train", ["--device=cuda:7"], "device='cuda:7' but CUDA is not available", marks=(no_cuda,)),
    Case("cuda-7-of-1", "train", ["--device=cuda:7"], "device='cuda:7' but this machine has 1 CUDA device(s)",
         patch=one_cuda_device),
    Case("tpu", "train", ["--device=tpu"], "device='tpu' is not a device; use 'auto', 'cpu'"),
    Case("meta-device", "train", ["--device=meta"], "device='meta' is not a device"),
    # ---- config files
    Case("config-missing", "train", ["{root}/nope.py"], "config file '{root}/nope.py' not found"),
    Case("config-syntax", "train", ["{root}/cfg.py"], "cfg.py: SyntaxError",
         setup=write_file("cfg.py", "n_layer = = 2\n")),
    Case("config-non-field", "train", ["{root}/cfg.py"], "cfg.py: unknown config key 'n_layr'; did you mean n_layer",
         setup=write_file("cfg.py", "n_layr = 2\n")),
    Case("config-wrong-type", "train", ["{root}/cfg.py"], "cfg.py: max_iters must be int, got str '2'",
         setup=write_file("cfg.py", "max_iters = '2'\n")),
    Case("config-not-utf8", "train", ["{root}/cfg.py"], "cfg.py: UnicodeDecodeError",
         setup=write_file("cfg.py", b"n_layer = 2  # \xff\n")),
    # ---- command lines
    Case("two-config-files", "train", ["{root}/a.py", "{root}/b.py"], "expected at most one config file",
         setup=two_files("a.py", "b.py")),
    Case("override-without-value", "train", ["--n_layer"], "cannot read '--n_layer': overrides look like --key=value"),
    Case("override-without-dashes", "train", ["n_layer=3"], "an override needs two dashes: --n_layer=3"),
    # ---- data folders
    Case("data-missing", "train", [], "train.bin not found; prepare the dataset with", setup=remove_data),
    Case("train-bin-empty", "train", [], "train.bin is empty; prepare the dataset again",
         setup=write_file("data/tiny/train.bin", b"")),
    Case("val-bin-odd-bytes", "train", [], "val.bin is truncated", setup=odd_bytes),
    Case("ids-beyond-vocab", "train", [], "holds token id 40 (first bad id at position 100)",
         setup=write_tokens("train.bin", [5] * 100 + [40] + [5] * 100)),
    Case("data-shorter-than-block", "train", ["--block_size=4096"], "fewer than block_size + 1 = 4097; lower block_size"),
    Case("meta-garbage", "train", [], "is not a plain-data nanoGPT meta.pkl",
         setup=write_file("data/tiny/meta.pkl", b"\x80\x04garbage"), real=True),
    Case("meta-not-a-dict", "train", [], "is not a nanoGPT meta.pkl: expected a dict", setup=write_meta([1, 2])),
    Case("meta-vocab-not-int", "train", [], "has vocab_size='32'", setup=write_meta({"vocab_size": "32"})),
    Case("meta-is-a-folder", "train", [], "meta.pkl is not a file", setup=meta_is_a_folder),
    Case("meta-vocab-below-data", "train", [], "holds token id 31", setup=write_meta(sixteen_chars_meta())),
    Case("vocab-size-below-dataset", "train", ["--vocab_size=8"], "give the model vocab_size >= 32"),
    # ---- checkpoints, --init_from=resume
    Case("resume-nothing", "train", RESUME, "no checkpoint at", setup=lambda root: shutil.rmtree(out_dir(root))),
    Case("ckpt-truncated", "train", RESUME, "cannot read checkpoint", setup=truncate_checkpoint),
    Case("ckpt-random-bytes", "train", RESUME, "not a torch checkpoint",
         setup=write_file("out/ckpt.pt", np.random.default_rng(0).bytes(4096))),
    Case("ckpt-not-a-dict", "train", RESUME, "is not a GPT checkpoint",
         setup=lambda root: torch.save([1, 2], out_dir(root) / "ckpt.pt")),
    Case("ckpt-runs-code", "train", RESUME, "refusing to load",
         setup=lambda root: torch.save({"model": {}, "config": RunsCode()}, out_dir(root) / "ckpt.pt")),
    Case("ckpt-no-optimizer", "train", RESUME, "its 'optimizer' entry is not an optimizer state_dict",
         setup=without("optimizer")),
    Case("ckpt-no-iter-num", "train", RESUME, "'iter_num'", setup=without("iter_num")),
    Case("ckpt-model-not-a-state-dict", "train", RESUME, "'model'",
         setup=edit_checkpoint(lambda c: c.update(model=torch.zeros(3)))),
    Case("ckpt-data-not-a-dict", "train", RESUME, "'data'", setup=edit_checkpoint(lambda c: c.update(data="x"))),
    Case("ckpt-rng-not-a-list", "train", RESUME, "'rng'", setup=edit_checkpoint(lambda c: c.update(rng="x"))),
    Case("ckpt-vocab-below-dataset", "train", RESUME, "has a vocabulary of 16 ids, but the dataset's has 32",
         setup=edit_checkpoint(lambda c: c["model_args"].update(vocab_size=16))),
    Case("ckpt-args-disagree-with-weights", "train", RESUME, "does not fit this model: missing transformer.h.2",
         setup=edit_checkpoint(lambda c: c["model_args"].update(n_layer=3))),
    Case("ckpt-format-99", "train", RESUME, "has checkpoint format 99, and this fastgpt reads format 1",
         setup=edit_checkpoint(lambda c: c.update(format=99))),
    Case("ckpt-other-batch", "train", [*RESUME, "--batch_size=3"], "resume with the batch size it was saved with"),
    # ---- run folders
    Case("out-dir-is-a-file", "train", [], "is a file, not a folder", setup=out_dir_is_a_file),
    Case("out-dir-under-a-file", "train", ["--out_dir='{root}/corpus.txt/out'"], "cannot write to out_dir"),
    Case("out-dir-read-only", "train", [], "cannot write to out_dir", setup=read_only_out_dir),
    Case("out-dir-proc", "train", ["--out_dir='/proc'"], "cannot write to out_dir='/proc'", marks=(linux_proc,)),
    Case("ckpt-path-is-a-folder", "train", [], "ckpt.pt is a folder where this run writes a file",
         setup=ckpt_is_a_folder),
    # ---- fastgpt.sample options
    Case("sample-zero-samples", "sample", ["--num_samples=0"], "num_samples=0 must be a positive integer"),
    Case("sample-samples-not-int", "sample", ["--num_samples=abc"], "num_samples='abc' is not an integer"),
    Case("sample-negative-tokens", "sample", ["--max_new_tokens=-5"], "max_new_tokens=-5 must be a positive integer"),
    Case("sample-tokens-not-int", "sample", ["--max_new_tokens=1e3"], "max_new_tokens='1e3' is not an integer"),
    Case("sample-zero-temperature", "sample", ["--temperature=0"], "temperature=0.0 must be a finite number > 0"),
    Case("sample-nan-temperature", "sample", ["--temperature=nan"], "temperature=nan must be a finite number > 0",
         real=True),
    Case("sample-inf-temperature", "sample", ["--temperature=inf"], "temperature=inf must be a finite number > 0"),
    Case("sample-negative-top-k", "sample", ["--top_k=-1"], "top_k=-1 must be an integer >= 0"),
    Case("sample-fractional-top-k", "sample", ["--top_k=1.5"], "top_k='1.5' is not an integer"),
    Case("sample-seed-not-int", "sample", ["--seed=x"], "seed='x' is not an integer"),
    Case("sample-dtype", "sample", ["--dtype=float64"], "dtype='float64' is not allowed"),
    Case("sample-start-file-missing", "sample", ["--start=FILE:{root}/nope.txt"],
         "cannot be read (No such file or directory)"),
    Case("sample-start-file-folder", "sample", ["--start=FILE:{root}"], "cannot be read (Is a directory)"),
    Case("sample-start-file-not-utf8", "sample", ["--start=FILE:{root}/p.txt"], "cannot be read (not UTF-8 text)",
         setup=write_file("p.txt", b"\xff\xfe")),
    Case("sample-start-outside-vocab", "sample", ["--start=ZZZ"], "character 'Z' is not in the dataset's vocabulary"),
    Case("sample-start-empty", "sample", ["--start="], "start='' encodes to no tokens"),
    Case("sample-no-checkpoint", "sample", ["--out_dir={root}/nowhere"], "no checkpoint at"),
    Case("sample-no-cuda", "sample", ["--device=cuda"], "CUDA is not available here", marks=(no_cuda,)),
    Case("sample-tpu", "sample", ["--device=tpu"], "device='tpu' is not a device"),
    Case("sample-unknown-option", "sample", ["--topk=5"],
         "unrecognized arguments: --topk=5; see python -m fastgpt.sample --help"),
    Case("sample-option-without-value", "sample", ["--num_samples"], "argument --num_samples: expected one argument"),
    Case("sample-data-dir-missing", "sample", ["--data_dir={root}/nowhere"], "is not a folder; pass --data_dir="),
    Case("sample-data-dir-of-another-tokenizer", "sample", [], f"more than the model's {MODEL_VOCAB}",
         setup=lambda root: (data_dir(root) / "meta.pkl").unlink()),
    Case("sample-checkpoint-dataset-gone", "sample", ["--out_dir={out}", "--device=cpu", "--dtype=float32", "--start=abc"],
         "the checkpoint's data_root/dataset '/nonexistent/tiny' is not a folder", base=False,
         setup=edit_checkpoint(lambda c: c["config"].update(data_root="/nonexistent"))),
    Case("sample-ckpt-no-model-args", "sample", [], "do not describe a GPT", setup=without("model_args")),
    # ---- fastgpt.prepare options
    Case("prepare-no-dataset", "prepare", [], "the following arguments are required: DATASET", base=False),
    Case("prepare-unknown-dataset", "prepare", ["shakespear"],
         "invalid choice: 'shakespear' (choose from 'shakespeare_char'", base=False, real=True),
    Case("prepare-text-without-out", "prepare", ["text", "--input", "{root}/corpus.txt"], "required: --out", base=False),
    Case("prepare-input-missing", "prepare", ["--input", "{root}/nope.txt"], "input file {root}/nope.txt does not exist"),
    Case("prepare-input-not-utf8", "prepare", ["--input", "{root}/p.txt"], "is not UTF-8 text",
         setup=write_file("p.txt", b"\xff\xfe")),
    Case("prepare-val-fraction-2", "prepare", ["--val-fraction", "2"], "--val-fraction must be between 0 and 1"),
    Case("prepare-val-fraction-nan", "prepare", ["--val-fraction", "nan"], "--val-fraction must be between 0 and 1"),
    Case("prepare-val-fraction-word", "prepare", ["--val-fraction", "abc"],
         "argument --val-fraction: invalid float value: 'abc'"),
    Case("prepare-zero-threads", "prepare", ["--threads", "0"], "--threads must be at least 1"),
    Case("prepare-zero-piece", "prepare", ["--piece-chars", "0"], "--piece-chars must be a positive number"),
    Case("prepare-piece-not-int", "prepare", ["--piece-chars", "1e3"], "argument --piece-chars: invalid int value: '1e3'"),
    Case("prepare-out-is-a-file", "prepare", ["--out", "{root}/corpus.txt"], "corpus.txt is a file, not a folder"),
    Case("prepare-no-val-keeps-old-files", "prepare", ["--out", "{data}", "--piece-chars", "100000"],
         "train and 0 val tokens"),
    Case("prepare-builtin-out-under-a-file", "prepare", ["shakespeare_char", "--out", "{root}/corpus.txt/x"],
         "corpus.txt is a file, not a folder", base=False),
    Case("prepare-builtin-unknown-option", "prepare", ["shakespeare_char", "--bogus"], "unrecognized arguments: --bogus",
         base=False),
    Case("prepare-owt-zero-shard", "prepare", ["openwebtext", "--docs-per-shard", "0"],
         "--docs-per-shard must be at least 1", base=False),
    Case("prepare-owt-zero-procs", "prepare", ["openwebtext", "--num-proc", "0"], "--num-proc must be at least 1",
         base=False),
]


@pytest.fixture(scope="module")
def good_run(tmp_path_factory):
    """A finished 2-step run of the tiny model: the out folder that resume and sample cases damage."""
    root = tmp_path_factory.mktemp("good")
    write_char_dataset(data_dir(root))
    train.train(tiny_config(root, root / "data", max_iters=2, eval_interval=2, eval_iters=1, log_interval=1,
                            warmup_iters=1, lr_decay_iters=2))
    return out_dir(root)


def make_case_folder(root: pathlib.Path, good_out: pathlib.Path) -> None:
    """The tiny dataset, a previous run's out folder and a small corpus: what each case may damage."""
    write_char_dataset(data_dir(root))
    shutil.copytree(good_out, out_dir(root))
    (root / "corpus.txt").write_text("Hello world\n" * 200)


def file_hashes(root: pathlib.Path) -> dict[str, str]:
    """Every file's hash but the run lock's, which names whichever process took it last."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != LOCK_NAME}


def fill(args: list[str], root: pathlib.Path) -> list[str]:
    return [a.format(root=root, data=data_dir(root), out=out_dir(root)) for a in args]


def run_in_process(command: str, argv: list[str], capsys) -> tuple[int, str, str]:
    try:
        code = COMMANDS[command](argv)
    except SystemExit as e:  # argparse's exits (our parsers print one line first)
        code = e.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def run_subprocess(command: str, argv: list[str], cwd: pathlib.Path) -> tuple[int, str, str]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", f"fastgpt.{command}", *argv], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT_S)
    return proc.returncode, proc.stdout, proc.stderr


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id, marks=c.marks) for c in CASES])
def test_bad_input_is_one_line_and_changes_nothing(case: Case, tmp_path, good_run, capsys, monkeypatch):
    root = tmp_path
    make_case_folder(root, good_run)
    monkeypatch.chdir(root)  # relative defaults (sample's out_dir, prepare's data/) land in the case folder
    try:
        if case.setup is not None:
            case.setup(root)
        if case.patch is not None:
            case.patch(monkeypatch)
        before = file_hashes(root)
        argv = (base_args(case.command, root) if case.base else []) + fill(case.args, root)
        if case.real:
            code, out, err = run_subprocess(case.command, argv, root)
        else:
            code, out, err = run_in_process(case.command, argv, capsys)
        after = file_hashes(root)
    finally:
        if out_dir(root).is_dir():
            out_dir(root).chmod(0o700)  # a read-only case's, so that pytest can remove it
    lines = [line for line in err.splitlines() if line.strip()]
    assert code not in (0, None), f"exit status {code!r}; stderr: {err}"
    assert "Traceback" not in out + err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert case.expect.format(root=root) in lines[0]
    assert after == before, "files changed, appeared or disappeared"


def test_the_base_commands_succeed(tmp_path, good_run, capsys, monkeypatch):
    """Each case's failure comes from its one bad value: without it the command runs."""
    make_case_folder(tmp_path, good_run)
    monkeypatch.chdir(tmp_path)
    resume = [*base_args("train", tmp_path), *RESUME, "--max_iters=3", "--eval_interval=3"]
    for command, argv in (("train", resume), ("sample", base_args("sample", tmp_path)),
                          ("prepare", base_args("prepare", tmp_path))):
        code, _, err = run_in_process(command, argv, capsys)
        assert code == 0, f"{command}: {err}"


def test_the_table_covers_every_command_and_source_of_input():
    assert len(CASES) >= 40 and len({c.id for c in CASES}) == len(CASES)
    assert {c.command for c in CASES} == set(COMMANDS)
    assert {c.command for c in CASES if c.real} == set(COMMANDS)


def test_debug_shows_the_traceback(tmp_path, good_run, monkeypatch):
    make_case_folder(tmp_path, good_run)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="batch_size=0 must be a positive integer"):
        train.main([*base_args("train", tmp_path), "--batch_size=0", "--debug"])
    with pytest.raises(sample.OptionError, match="num_samples=0 must be a positive integer"):
        sample.main([*base_args("sample", tmp_path), "--num_samples=0", "--debug"])
