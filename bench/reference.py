"""An independent reference: a GPT-2 train step in plain PyTorch, written the way nanoGPT writes it.

It imports nothing from `fastgpt/` or `kernels/`, so the benchmarks can time fastgpt against it
and the tests can use it as an oracle (the same weights give the same logits, loss and
gradients). What it does, each as nanoGPT's model.py and train.py do:
  - eager modules, `F.layer_norm`, exact GELU, `F.scaled_dot_product_attention(is_causal=True)`,
    the LM head over every position and `F.cross_entropy` on the full (B*T, V) logits;
  - `torch.optim.AdamW` with its defaults (no fused or foreach argument; fused on request, as
    nanoGPT asks for on CUDA), matrices decayed and gains and biases not;
  - `get_batch`: a memmap opened, sliced into windows, stacked and copied on every call, on the
    caller's thread;
  - nanoGPT's dtype policy: fp32 on a CPU; bf16 autocast on a GPU that has it, else fp16 with a
    GradScaler; TF32 matmuls on.
Parameter names are nanoGPT's, so a state dict moves between this model, nanoGPT's and fastgpt's.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class ReferenceConfig:
    block_size: int = 1024
    vocab_size: int = 50304
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True


class LayerNorm(nn.Module):
    def __init__(self, ndim: int, bias: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))
        self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None

    def forward(self, x):
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, 1e-5)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: ReferenceConfig):
        super().__init__()
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head, self.dropout = config.n_head, config.dropout

    def forward(self, x):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config: ReferenceConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, config: ReferenceConfig):
        super().__init__()
        self.ln_1 = LayerNorm(config.n_embd, config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = LayerNorm(config.n_embd, config.bias)
        self.mlp = MLP(config)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class ReferenceGPT(nn.Module):
    def __init__(self, config: ReferenceConfig):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=LayerNorm(config.n_embd, config.bias),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # tied, as GPT-2
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def forward(self, idx, targets=None):
        B, T = idx.size()
        pos = torch.arange(0, T, dtype=torch.long, device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        for block in self.transformer.h:
            x = block(x)
        x = self.transformer.ln_f(x)
        logits = self.lm_head(x)  # (B, T, V): nanoGPT forms the full logits in training
        if targets is None:
            return logits, None
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)
        return logits, loss


def configure_optimizer(model: nn.Module, weight_decay: float, learning_rate: float, betas,
                        fused: bool = False) -> torch.optim.AdamW:
    """nanoGPT's groups (2-D and larger decayed) and torch's AdamW: with its default
    implementation, or fused (what nanoGPT's configure_optimizers asks for on CUDA)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, fused=fused or None)  # None: torch's default


def get_batch(path, batch_size: int, block_size: int, device: torch.device, generator=None):
    """nanoGPT's get_batch: a fresh memmap per call (its fix for a memory leak), random windows
    sliced and stacked on the caller's thread, pinned and copied asynchronously on CUDA."""
    data = np.memmap(path, dtype=np.uint16, mode="r")
    ix = torch.randint(len(data) - block_size, (batch_size,), generator=generator)
    x = torch.stack([torch.from_numpy(data[i : i + block_size].astype(np.int64)) for i in ix])
    y = torch.stack([torch.from_numpy(data[i + 1 : i + 1 + block_size].astype(np.int64)) for i in ix])
    if device.type == "cuda":
        return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    return x.to(device), y.to(device)


def nanogpt_dtype(device: torch.device) -> torch.dtype:
    """nanoGPT's train.py: bf16 on a GPU that supports it, else fp16; a CPU runs fp32 (its
    autocast context is a no-op there)."""
    if device.type != "cuda":
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def make_train_step(model, optimizer, next_batch, device: torch.device, dtype: torch.dtype,
                    gradient_accumulation_steps: int = 1, grad_clip: float = 1.0):
    """One optimizer step as nanoGPT's loop runs it, returning the last micro-step's loss tensor.
    The batch for the next micro-step is fetched right after the forward, as nanoGPT does, so
    that on a GPU the copy overlaps the backward."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    ctx = contextlib.nullcontext() if device.type == "cpu" else torch.autocast(device.type, dtype=dtype)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype is torch.float16)
    batch = [next_batch()]

    def step():
        for _ in range(gradient_accumulation_steps):
            x, y = batch[0]
            with ctx:
                _, loss = model(x, y)
                loss = loss / gradient_accumulation_steps
            batch[0] = next_batch()
            scaler.scale(loss).backward()
        if grad_clip != 0.0:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        return loss

    return step
