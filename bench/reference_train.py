"""The reference trainer: nanoGPT's train.py loop over bench/reference.py's GPT, the baseline of
scripts/gpu_check.sh's end-to-end table.

    python -m bench.reference_train --data_dir=DIR [--batch_size=16 --block_size=1024
        --gradient_accumulation_steps=4 --max_iters=30 --log_interval=5 --compile=True
        --dtype=bfloat16 --device=cuda ...]

DIR/train.bin holds uint16 token ids (nanoGPT's format). Like bench/reference.py it imports
nothing from fastgpt/ or kernels/ (tests/test_layers.py checks), so it stays an independent
baseline. What it does, each as nanoGPT's train.py does with its GPT-2 124M defaults:
get_batch from a memmap re-opened per call (pinned, non_blocking copies on CUDA), the next batch
fetched right after each forward, bf16 autocast (fp16 with a GradScaler on a GPU without bf16;
fp32 on a CPU), the loss over the accumulation steps, gradient clipping, fused AdamW on CUDA,
zero_grad(set_to_none=True), torch.compile, warmup then cosine decay to lr/10.

It differs from train.py only where fastgpt's trainer logs differently, so that both logs read
the same way: it counts iterations from 1 (`iter N` after N optimizer steps) and stops after
max_iters; it evaluates nothing; and each log line times the window since the previous one,
synchronized, as a mean per iteration (train.py times one iteration, unsynchronized):

    iter 5: loss 10.9436, 3046.0 ms/iter, 21,516 tok/s
    peak memory 12,276.0 MiB (torch.cuda.max_memory_allocated)      (CUDA only, at the end)

The first window holds the compile. gpu_check.sh reads both trainers' lines with
`^iter (\\d+):.* ([\\d,]+) tok/s`.
"""

from __future__ import annotations

import argparse
import math
import pathlib
import sys
import time

import torch

from bench import reference

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_bool(text: str) -> bool:
    """nanoGPT's --compile=True / --compile=False."""
    if text not in ("True", "False"):
        raise argparse.ArgumentTypeError(f"{text!r} is not True or False")
    return text == "True"


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.reference_train", description=__doc__.splitlines()[0])
    p.add_argument("--data_dir", required=True, help="folder holding train.bin (uint16 token ids)")
    # nanoGPT's config/train_gpt2.py batch on one GPU: 16 x 1024 tokens, 4 micro-steps an iteration
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--block_size", type=int, default=1024)
    p.add_argument("--gradient_accumulation_steps", type=int, default=4)
    p.add_argument("--max_iters", type=int, default=30, help="optimizer steps; the cosine decay ends here")
    p.add_argument("--log_interval", type=int, default=5, help="iterations a log line (each one a CPU-GPU sync)")
    p.add_argument("--compile", type=parse_bool, default=True, help="torch.compile the model (True/False)")
    p.add_argument("--dtype", choices=list(DTYPES), default="bfloat16",
                   help="autocast dtype on CUDA (bfloat16 falls back to float16 without bf16); a CPU runs float32")
    p.add_argument("--device", default="cuda")
    p.add_argument("--seed", type=int, default=1337)
    # GPT-2 124M, vocabulary padded to a multiple of 64 as nanoGPT does; no biases, no dropout
    p.add_argument("--n_layer", type=int, default=12)
    p.add_argument("--n_head", type=int, default=12)
    p.add_argument("--n_embd", type=int, default=768)
    p.add_argument("--vocab_size", type=int, default=50304)
    p.add_argument("--bias", type=parse_bool, default=False)
    p.add_argument("--dropout", type=float, default=0.0)
    # nanoGPT's AdamW recipe for GPT-2
    p.add_argument("--learning_rate", type=float, default=6e-4)
    p.add_argument("--min_lr", type=float, default=None, help="default: learning_rate / 10")
    p.add_argument("--warmup_iters", type=int, default=10)
    p.add_argument("--weight_decay", type=float, default=0.1)
    p.add_argument("--beta1", type=float, default=0.9)
    p.add_argument("--beta2", type=float, default=0.95)
    p.add_argument("--grad_clip", type=float, default=1.0, help="0 turns clipping off")
    args = p.parse_args(argv)
    if args.min_lr is None:
        args.min_lr = args.learning_rate / 10
    return args


def get_lr(it: int, learning_rate: float, warmup_iters: int, lr_decay_iters: int, min_lr: float) -> float:
    """nanoGPT's schedule: linear warmup, then cosine decay to min_lr at lr_decay_iters."""
    if it < warmup_iters:
        return learning_rate * (it + 1) / (warmup_iters + 1)
    if it > lr_decay_iters:
        return min_lr
    decay_ratio = (it - warmup_iters) / max(1, lr_decay_iters - warmup_iters)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * decay_ratio)) * (learning_rate - min_lr)


def train_dtype(name: str, device: torch.device) -> torch.dtype:
    """nanoGPT's policy (reference.nanogpt_dtype) for its default bfloat16: fp32 on a CPU, fp16
    with a GradScaler on a GPU without bf16; another dtype asked for on a GPU, as it is."""
    if device.type != "cuda" or name == "bfloat16":
        return reference.nanogpt_dtype(device)
    return DTYPES[name]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # CPU-GPU sync: the clock reads finished work, not launches


def train(args: argparse.Namespace) -> None:
    device = torch.device(args.device)
    dtype = train_dtype(args.dtype, device)
    path = pathlib.Path(args.data_dir) / "train.bin"
    torch.manual_seed(args.seed)
    model = reference.ReferenceGPT(reference.ReferenceConfig(
        block_size=args.block_size, vocab_size=args.vocab_size, n_layer=args.n_layer, n_head=args.n_head,
        n_embd=args.n_embd, dropout=args.dropout, bias=args.bias)).to(device)
    optimizer = reference.configure_optimizer(model, args.weight_decay, args.learning_rate, (args.beta1, args.beta2),
                                              fused=device.type == "cuda")
    forward = torch.compile(model) if args.compile else model  # after the optimizer, as nanoGPT
    step = reference.make_train_step(
        forward, optimizer, lambda: reference.get_batch(path, args.batch_size, args.block_size, device), device, dtype,
        args.gradient_accumulation_steps, args.grad_clip)  # sets TF32 on CUDA, fetches the first batch
    tokens_per_iter = args.gradient_accumulation_steps * args.batch_size * args.block_size
    print(f"reference trainer (nanoGPT's loop): {sum(p.numel() for p in model.parameters()):,} parameters, "
          f"{tokens_per_iter:,} tokens an iteration, {str(dtype).removeprefix('torch.')}, compile {args.compile}, "
          f"{device}", flush=True)

    sync(device)
    t_window, last_logged = time.perf_counter(), 0
    for it in range(args.max_iters):
        lr = get_lr(it, args.learning_rate, args.warmup_iters, args.max_iters, args.min_lr)
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss = step()
        n = it + 1
        if n % args.log_interval == 0 or n == args.max_iters:
            lossf = loss.item() * args.gradient_accumulation_steps  # CPU-GPU sync; the last micro-step's loss
            sync(device)
            now = time.perf_counter()
            seconds = (now - t_window) / (n - last_logged)
            print(f"iter {n}: loss {lossf:.4f}, {seconds * 1e3:.1f} ms/iter, {tokens_per_iter / seconds:,.0f} tok/s",
                  flush=True)
            t_window, last_logged = now, n
    if device.type == "cuda":
        print(f"peak memory {torch.cuda.max_memory_allocated(device) / 2**20:,.1f} MiB "
              "(torch.cuda.max_memory_allocated)")


def data_error(args: argparse.Namespace) -> str | None:
    """Why DIR/train.bin cannot feed this run, or None."""
    path = pathlib.Path(args.data_dir) / "train.bin"
    if not path.is_file():
        return f"no {path}: --data_dir must hold train.bin, uint16 token ids"
    tokens = path.stat().st_size // 2
    if tokens <= args.block_size:
        return f"{path} holds {tokens} tokens; a window of --block_size={args.block_size} needs at least {args.block_size + 1}"
    return None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    for name in ("batch_size", "block_size", "gradient_accumulation_steps", "max_iters", "log_interval"):
        if getattr(args, name) < 1:
            print(f"error: --{name}={getattr(args, name)} must be at least 1", file=sys.stderr)
            return 2
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        print(f"error: --device={args.device} but torch sees no GPU; use --device=cpu", file=sys.stderr)
        return 2
    error = data_error(args)
    if error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    train(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
