"""Sample text from a trained checkpoint.

    python -m fastgpt.sample                                   # out-shakespeare-char/ckpt.pt
    python -m fastgpt.sample --out_dir=out --start="ROMEO:" --num_samples=3 --max_new_tokens=200
    python -m fastgpt.sample --start=FILE:prompt.txt

The tokenizer is the dataset's (meta.pkl for characters, else GPT-2 BPE), found through the
config stored in the checkpoint.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

import torch

from fastgpt import checkpoint as ckpt_io
from fastgpt.model import GPT, GPTConfig
from fastgpt.runtime import RuntimeConfigError, autocast, resolve_device, resolve_dtype
from fastgpt.tokenizer import load_tokenizer

# The default config's out_dir, so `python -m fastgpt.train && python -m fastgpt.sample` pairs up.
DEFAULT_OUT_DIR = "out-shakespeare-char"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m fastgpt.sample", description=__doc__.split("\n\n")[0])
    p.add_argument("--out_dir", default=DEFAULT_OUT_DIR, help="folder holding ckpt.pt (default: %(default)s)")
    p.add_argument("--start", default="\n", help="prompt text, or FILE:path to read it from a file (default: a newline)")
    p.add_argument("--num_samples", type=int, default=3, help="samples to draw (default: %(default)s)")
    p.add_argument("--max_new_tokens", type=int, default=500, help="tokens per sample (default: %(default)s)")
    p.add_argument("--temperature", type=float, default=0.8, help="<1 sharper, >1 more random (default: %(default)s)")
    p.add_argument("--top_k", type=int, default=200, help="sample among the k likeliest tokens; 0 for all (default: %(default)s)")
    p.add_argument("--seed", type=int, default=1337, help="random seed (default: %(default)s)")
    p.add_argument("--device", default="auto", help="'auto', 'cpu', 'cuda', 'mps' (default: %(default)s)")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"))
    p.add_argument("--data_dir", default=None, help="dataset folder for the tokenizer (default: from the checkpoint's config)")
    return p


def sample(args: argparse.Namespace) -> list[str]:
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    ckpt_path = ckpt_io.checkpoint_path(args.out_dir)
    checkpoint = ckpt_io.load_checkpoint(ckpt_path, map_location="cpu")
    model = GPT(GPTConfig(**checkpoint["model_args"]))
    ckpt_io.load_model_state(model, checkpoint["model"], ckpt_path)
    model.eval().to(device)

    config = checkpoint.get("config", {})
    data_dir = args.data_dir or pathlib.Path(config.get("data_root", "data")) / config.get("dataset", "")
    tokenizer = load_tokenizer(data_dir)
    start = args.start
    if start.startswith("FILE:"):
        start = pathlib.Path(start[5:]).read_text(encoding="utf-8")
    ids = tokenizer.encode(start)
    if not ids:
        raise ValueError("the prompt encodes to no tokens; give --start some text")
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


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        for text in sample(args):
            print(text)
            print("---------------")
    except (ckpt_io.CheckpointError, RuntimeConfigError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
