"""One AdamW step over GPT-2 124M's parameters: the Triton kernel against torch's fused and
foreach AdamW, in the same run.

    pytest bench/test_bench_adamw.py --benchmark-only

Providers:
  fastgpt  what the trainer builds on this device (fastgpt.optim.make_optimizer with the ops that
           kernels='auto' picks): TritonAdamW on CUDA, torch's fused AdamW on a CPU
  default  torch.optim.AdamW with no implementation argument, as the reference trainer
           (bench/reference.py) builds it: foreach on CUDA, a loop over parameters on a CPU
  triton   fastgpt_kernels.adamw.TritonAdamW: one launch per param group over all its parameters
  fused    torch.optim.AdamW(fused=True)
  foreach  torch.optim.AdamW(foreach=True), torch's default on CUDA (nanoGPT asks for fused)
  compiled torch.optim.AdamW(foreach=True) with its step under torch.compile, which inductor
           turns into a few fused kernels (torch's "compiled optimizer"; the lr is constant here,
           a changing float lr would recompile)

The parameters are GPT-2 124M's, built from the architecture (12 layers, 768 wide, vocab 50304,
block 1024, no biases, lm_head tied to wte), in fp32, split into the two groups fastgpt uses
(matrices decayed, LayerNorm gains not). Gradients are fixed random tensors and are not zeroed,
so a round is the step alone: its host work (Python, launches) and its GPU work, synchronized at
the end, as an isolated step; in training the host work overlaps the end of the backward. Each
result records ms and GB/s in `extra_info`; GB/s counts the bytes an AdamW step must move, read
p, g, m, v and write p, m, v: 28 bytes per fp32 element (3.5 GB per step here), the same count
for every provider, so it understates a kernel whose step is partly host time.

On CUDA a second group, run first, times TritonAdamW with 1024 to 8192 elements a program (the
compiled provider runs last: its compile is the slowest part of the file).

Without CUDA the triton provider is skipped (Triton's CPU interpreter would time numpy, not the
kernel). At size "cpu" (bench/harness.py) the parameters are a scaled-down GPT (2 layers, 128
wide, vocab 2048, block 128), so the file runs in seconds.
"""

from __future__ import annotations

import pytest
import torch

from bench.harness import CUDA, DEVICE, LARGE, sync
from fastgpt.ops import choose_ops
from fastgpt.optim import build_adamw

# GPT-2 124M (vocab padded to a multiple of 64, as nanoGPT does), or a CPU-sized stand-in.
N_LAYER, N_EMBD, VOCAB, BLOCK_SIZE = (12, 768, 50304, 1024) if LARGE else (2, 128, 2048, 128)
ROUNDS, WARMUP_ROUNDS = (50, 5) if LARGE else (20, 3)
# nanoGPT's GPT-2 recipe.
LR, BETAS, WEIGHT_DECAY = 6e-4, (0.9, 0.95), 0.1
# Read p, g, m, v and write p, m, v, 4 bytes each.
BYTES_PER_FP32_ELEMENT = 7 * 4


def gpt_param_shapes(n_layer: int, n_embd: int, vocab: int, block_size: int) -> tuple[list, list]:
    """(decayed, not decayed) parameter shapes of a bias-free GPT, in model.parameters() order."""
    decay = [(vocab, n_embd), (block_size, n_embd)]  # wte (= lm_head, tied), wpe
    no_decay = []
    for _ in range(n_layer):
        no_decay += [(n_embd,), (n_embd,)]  # ln_1, ln_2 gains
        decay += [
            (3 * n_embd, n_embd),  # attn.c_attn: q, k, v
            (n_embd, n_embd),  # attn.c_proj
            (4 * n_embd, n_embd),  # mlp.c_fc
            (n_embd, 4 * n_embd),  # mlp.c_proj
        ]
    no_decay.append((n_embd,))  # ln_f gain
    return decay, no_decay


def build(provider: str, block_size: int | None = None):
    torch.manual_seed(0)
    decay, no_decay = gpt_param_shapes(N_LAYER, N_EMBD, VOCAB, BLOCK_SIZE)
    groups = []
    for shapes, weight_decay in ((decay, WEIGHT_DECAY), (no_decay, 0.0)):
        params = [(torch.randn(s, device=DEVICE) * 0.02).requires_grad_() for s in shapes]
        for p in params:
            p.grad = torch.randn_like(p) * 1e-3
        groups.append({"params": params, "weight_decay": weight_decay})
    if provider == "fastgpt":
        opt = build_adamw(groups, LR, BETAS, DEVICE.type, choose_ops("auto", DEVICE).optimizer)
    elif provider == "default":
        opt = torch.optim.AdamW(groups, lr=LR, betas=BETAS)
    elif provider == "triton":
        from fastgpt_kernels.adamw import TritonAdamW  # imports triton: only where it runs

        opt = TritonAdamW(groups, lr=LR, betas=BETAS, **({"block_size": block_size} if block_size else {}))
    elif provider == "compiled":
        opt = torch.optim.AdamW(groups, lr=LR, betas=BETAS, foreach=True)
    else:
        opt = torch.optim.AdamW(groups, lr=LR, betas=BETAS, **{provider: True})
    numel = sum(p.numel() for g in groups for p in g["params"])
    opt_step = torch.compile(opt.step) if provider == "compiled" else opt.step

    def step():
        opt_step()
        sync()

    return step, numel


def run(benchmark, step, numel) -> None:
    step()  # state allocation (and, for triton and compiled, compilation) stays out of the timing
    benchmark.pedantic(step, rounds=ROUNDS, warmup_rounds=WARMUP_ROUNDS)
    seconds = benchmark.stats.stats.median
    benchmark.extra_info.update(
        suite="adamw", shape_name=f"{numel / 1e6:.1f}M fp32", dtype="float32",
        params=numel,
        ms=round(seconds * 1e3, 3),
        gb_per_s=round(numel * BYTES_PER_FP32_ELEMENT / seconds / 1e9, 1),
    )


@pytest.mark.benchmark(group="adamw block")
@pytest.mark.skipif(not CUDA, reason="times the Triton kernel's chunk size on a GPU")
@pytest.mark.parametrize("block_size", [1024, 2048, 4096, 8192])
def test_adamw_block_size(benchmark, block_size):
    """TritonAdamW with `block_size` elements a program (fastgpt_kernels.adamw.DEFAULT_BLOCK is 4096): more
    programs with fewer registers each, or fewer with more, to check the default on a GPU."""
    run(benchmark, *build("triton", block_size))


@pytest.mark.benchmark(group="adamw")
@pytest.mark.parametrize("provider", ["fastgpt", "default", "triton", "fused", "foreach", "compiled"])
def test_adamw_step(benchmark, provider):
    if provider == "triton" and not CUDA:
        pytest.skip("the Triton provider is timed on CUDA only")
    run(benchmark, *build(provider))
