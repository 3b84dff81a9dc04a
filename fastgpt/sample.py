"""Sample text from a trained checkpoint, or from OpenAI's GPT-2.

    python -m fastgpt.sample                                   # out-shakespeare-char/ckpt.pt
    python -m fastgpt.sample --out_dir=out --start="ROMEO:" --num_samples=3 --max_new_tokens=200
    python -m fastgpt.sample --start=FILE:prompt.txt
    python -m fastgpt.sample --init_from=gpt2-xl --start="What is the answer to life?"   # local HF files
    python -m fastgpt.sample --debug ...                       # the traceback behind an error message

The tokenizer is the dataset's (vocab.json or meta.pkl for characters, else GPT-2 BPE), found
through the config stored in the checkpoint; GPT-2's own weights use GPT-2 BPE.
"""

from __future__ import annotations

import argparse
import math
import pathlib
import sys

import torch

from fastgpt import checkpoint as ckpt_io
from fastgpt.cli import OneLineParser, run_command
from fastgpt.errors import FastgptError
from fastgpt.tokenfiles import DEFAULT_DATA_ROOT
from fastgpt.model import GPT, GPTConfig
from fastgpt.pretrained import GPT2_MODELS, load_gpt2
from fastgpt.hardware import DTYPES, autocast, resolve_device, resolve_dtype
from fastgpt.tokenizer import GPT2_VOCAB_SIZE, Gpt2Tokenizer, dataset_vocab_size, load_tokenizer

# The default config's out_dir, so `python -m fastgpt.train && python -m fastgpt.sample` pairs up.
DEFAULT_OUT_DIR = "out-shakespeare-char"
FILE_PREFIX = "FILE:"
DTYPE_CHOICES = ("auto", *DTYPES)


class OptionError(FastgptError):
    """A sampling option is wrong; the message is one line naming it and what would be right."""


def build_parser() -> argparse.ArgumentParser:
    # Numbers arrive as text and are checked by check_options, which names the option and the rule.
    p = OneLineParser(prog="python -m fastgpt.sample", description=__doc__.split("\n\n")[0])
    p.add_argument("--out_dir", default=DEFAULT_OUT_DIR, help="folder holding ckpt.pt (default: %(default)s)")
    p.add_argument("--start", default="\n",
                   help=f"prompt text, or {FILE_PREFIX}path to read it from a UTF-8 file (default: a newline)")
    p.add_argument("--num_samples", default=3, help="samples to draw, >= 1 (default: %(default)s)")
    p.add_argument("--max_new_tokens", default=500, help="tokens per sample, >= 1 (default: %(default)s)")
    p.add_argument("--temperature", default=0.8, help="> 0; <1 sharper, >1 more random (default: %(default)s)")
    p.add_argument("--top_k", default=200, help="sample among the k likeliest tokens; 0 for all (default: %(default)s)")
    p.add_argument("--seed", default=1337, help="random seed (default: %(default)s)")
    p.add_argument("--device", default="auto", help="'auto', 'cpu', 'cuda', 'cuda:N', 'mps' (default: %(default)s)")
    p.add_argument("--dtype", default="auto", help=f"one of {', '.join(DTYPE_CHOICES)} (default: %(default)s)")
    p.add_argument("--data_dir", default=None,
                   help="dataset folder for the tokenizer (default: from the checkpoint's config)")
    p.add_argument("--init_from", default="resume", choices=("resume", *GPT2_MODELS),
                   help="'resume': out_dir's newest checkpoint; or OpenAI's GPT-2 from local files (default: %(default)s)")
    p.add_argument("--hf_dir", default=None,
                   help="with --init_from=gpt2*: a Hugging Face model folder (default: the local Hugging Face cache)")
    return p


def _number(args: argparse.Namespace, name: str, kind: type, ok, rule: str):
    """args.NAME as `kind` (int or float) if `ok` holds for it, else OptionError saying `rule`."""
    text = getattr(args, name)
    try:
        value = text if type(text) is kind else kind(str(text))
    except ValueError:
        raise OptionError(f"{name}={text!r} is not {'an integer' if kind is int else 'a number'}; give {rule}") from None
    if not ok(value):
        raise OptionError(f"{name}={value} must be {rule}")
    return value


def check_options(args: argparse.Namespace) -> argparse.Namespace:
    """A copy of `args` with the numbers converted; OptionError names the first option out of range."""
    checked = argparse.Namespace(**vars(args))
    checked.num_samples = _number(args, "num_samples", int, lambda v: v >= 1, "a positive integer, e.g. 3")
    checked.max_new_tokens = _number(args, "max_new_tokens", int, lambda v: v >= 1, "a positive integer, e.g. 500")
    checked.temperature = _number(args, "temperature", float, lambda v: math.isfinite(v) and v > 0,
                                  "a finite number > 0, e.g. 0.8")
    checked.top_k = _number(args, "top_k", int, lambda v: v >= 0, "an integer >= 0 (0: all tokens), e.g. 200")
    checked.seed = _number(args, "seed", int, lambda v: True, "an integer, e.g. 1337")
    if args.dtype not in DTYPE_CHOICES:
        raise OptionError(f"dtype={args.dtype!r} is not allowed; choose one of {', '.join(map(repr, DTYPE_CHOICES))}")
    return checked


def read_prompt(start: str) -> str:
    """The prompt: `start` itself, or the text of the file that FILE:path names."""
    if not start.startswith(FILE_PREFIX):
        return start
    path = pathlib.Path(start[len(FILE_PREFIX):])
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        reason = "not UTF-8 text" if isinstance(e, UnicodeDecodeError) else e.strerror or type(e).__name__
        raise OptionError(
            f"start={start!r} cannot be read ({reason}); name a UTF-8 text file, or give the prompt itself"
        ) from e


def load_model(ckpt_path: pathlib.Path) -> tuple[GPT, dict]:
    """The checkpoint's model, weights loaded, and the run's config stored with it."""
    checkpoint = ckpt_io.load_checkpoint(ckpt_path, map_location="cpu")
    model_args = checkpoint.get("model_args")
    try:
        model = GPT(GPTConfig(**model_args))
    except TypeError as e:  # absent, or with keys GPTConfig does not have
        raise ckpt_io.CheckpointError(
            f"{ckpt_path}: its model_args {model_args!r} do not describe a GPT ({e}); "
            "sample from a checkpoint fastgpt or nanoGPT wrote"
        ) from e
    ckpt_io.load_model_state(model, checkpoint["model"], ckpt_path)
    config = checkpoint.get("config")
    return model, config if isinstance(config, dict) else {}


def sample(args: argparse.Namespace) -> list[str]:
    args = check_options(args)
    start = read_prompt(args.start)
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    if args.init_from in GPT2_MODELS:
        model, _ = load_gpt2(args.init_from, args.hf_dir)
        config = {}
    else:
        model, config = load_model(ckpt_io.newest_checkpoint(args.out_dir) or ckpt_io.checkpoint_path(args.out_dir))
    model.eval().to(device)

    if args.init_from in GPT2_MODELS and args.data_dir is None:
        data_dir, named_by = None, args.init_from
    elif args.data_dir is not None:
        data_dir, named_by = pathlib.Path(args.data_dir), f"data_dir={args.data_dir!r}"
    else:
        data_dir = pathlib.Path(config.get("data_root", DEFAULT_DATA_ROOT)) / config.get("dataset", "")
        named_by = f"the checkpoint's data_root/dataset {str(data_dir)!r}"
    # Without its folder, the dataset's tokenizer would silently become GPT-2's.
    if data_dir is not None and not data_dir.is_dir():
        raise OptionError(f"{named_by} is not a folder; pass --data_dir=the dataset folder the model was trained on")
    vocab_size = dataset_vocab_size(data_dir) if data_dir else GPT2_VOCAB_SIZE  # before fetching GPT-2's ranks
    if vocab_size > model.config.vocab_size:
        raise OptionError(
            f"{named_by} has a tokenizer of {vocab_size} ids (its meta.pkl, else GPT-2 BPE), more than the model's "
            f"{model.config.vocab_size}; pass --data_dir=the dataset folder the model was trained on"
        )
    tokenizer = load_tokenizer(data_dir) if data_dir else Gpt2Tokenizer()
    try:
        ids = tokenizer.encode(start)
    except ValueError as e:  # a character the vocabulary lacks
        raise OptionError(f"start={start[:40]!r}: {e}") from e
    if not ids:
        raise OptionError(f"start={start!r} encodes to no tokens; give --start some text")
    x = torch.tensor(ids, dtype=torch.long, device=device)[None, :]  # (1, T)
    generator = torch.Generator(device=device).manual_seed(args.seed)
    samples = []
    with torch.no_grad(), autocast(device, dtype):
        for _ in range(args.num_samples):
            y = model.generate(
                x, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k or None,
                vocab_limit=tokenizer.vocab_size, generator=generator,
            )
            samples.append(tokenizer.decode(y[0].tolist()))
    return samples


def _run(argv: list[str]) -> None:
    for text in sample(build_parser().parse_args(argv)):
        print(text)
        print("---------------")


def main(argv: list[str] | None = None) -> int:
    return run_command(_run, argv)


if __name__ == "__main__":
    sys.exit(main())
