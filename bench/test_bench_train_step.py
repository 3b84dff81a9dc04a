"""One optimizer step of the default config's model (shakespeare_char: 4 layers of 128, 0.8M
parameters, batch 32 x 128; launch-bound on a GPU, not GPT-2): fastgpt's step against plain
PyTorch.

    pytest bench/test_bench_train_step.py --benchmark-only

Providers, measured in the same run so their ratio means something:
  fastgpt    what `python -m fastgpt.train` does with its defaults: kernels='auto' (Triton
             LayerNorm, fused head + loss and AdamW on CUDA; torch and fused AdamW elsewhere),
             compile='auto' (torch.compile on CUDA), autocast dtype picked by dtype='auto' (fp32
             on a CPU without fast bf16), exact GELU, flash SDPA
  reference  nanoGPT's fp32 path in plain PyTorch (TF32 matmuls on CUDA, as nanoGPT and the
             trainer set them), foreach (unfused) AdamW

Each result carries tokens/s and MFU in `extra_info`; MFU is against this machine's measured
matmul peak for the dtype in use (on CUDA, the datasheet peak).
"""

from __future__ import annotations

import pathlib

import pytest
import torch

from fastgpt.config import read_config_file
from fastgpt.metrics import peak_flops
from fastgpt.model import GPT, GPTConfig
from fastgpt.ops import TORCH_OPS, get_ops, resolve_kernels
from fastgpt.optim import make_optimizer, param_groups
from fastgpt.runtime import autocast, configure_backends, resolve_device, resolve_dtype

CONFIG = pathlib.Path(__file__).resolve().parent.parent / "configs" / "shakespeare_char.py"
# The shakespeare_char vocabulary (84 characters) padded to a multiple of 64.
VOCAB = 128
ROUNDS, WARMUP_ROUNDS = 30, 5
MODEL = CONFIG.stem  # named in extra_info: not the GPT-2 shapes of the kernel benches


@pytest.fixture(autouse=True)
def trainer_backends():
    """The trainer's backend settings (TF32 on CUDA, which the fp32 peak assumes), then the
    previous ones back for whatever runs next in this process."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    configure_backends(resolve_device("auto"))
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def build(provider: str):
    cfg = read_config_file(CONFIG)
    device = resolve_device("auto")
    dtype = resolve_dtype("auto", device) if provider == "fastgpt" else torch.float32
    ops = get_ops(resolve_kernels("auto", device)) if provider == "fastgpt" else TORCH_OPS
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=cfg["block_size"], vocab_size=VOCAB, n_layer=cfg["n_layer"],
                          n_head=cfg["n_head"], n_embd=cfg["n_embd"], dropout=0.0, bias=False), ops).to(device)
    if provider == "fastgpt":
        opt = make_optimizer(model, 0.1, 1e-3, (0.9, 0.99), device.type, ops.optimizer)
    else:
        opt = torch.optim.AdamW(param_groups(model, 0.1), lr=1e-3, betas=(0.9, 0.99), foreach=True)
    # The trainer's compile='auto': compiled on CUDA (the warmup rounds absorb the compile).
    forward = torch.compile(model) if provider == "fastgpt" and device.type == "cuda" else model
    x = torch.randint(0, VOCAB, (cfg["batch_size"], cfg["block_size"]), device=device)
    y = torch.randint(0, VOCAB, (cfg["batch_size"], cfg["block_size"]), device=device)

    def step():
        with autocast(device, dtype):
            _, loss = forward(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()  # time the step, not its launch

    tokens = x.numel()
    flops = model.flops_per_token() * tokens
    return step, tokens, flops, peak_flops(device, dtype), dtype, ops.name, forward is not model


@pytest.mark.benchmark(group="train_step")
@pytest.mark.parametrize("provider", ["fastgpt", "reference"])
def test_train_step(benchmark, provider):
    step, tokens, flops, peak, dtype, kernels, compiled = build(provider)
    benchmark.pedantic(step, rounds=ROUNDS, warmup_rounds=WARMUP_ROUNDS)
    seconds = benchmark.stats.stats.median
    benchmark.extra_info.update(
        model=MODEL,
        dtype=str(dtype).removeprefix("torch."),
        kernels=kernels,
        compiled=compiled,
        tokens_per_s=round(tokens / seconds),
        mfu=round(flops / seconds / peak, 4) if peak else None,
        peak_tflops=peak / 1e12 if peak else None,
    )
