"""A GPT-2-style decoder with nanoGPT's parameter names, so nanoGPT checkpoints load as they are.

References: GPT-2 (Radford et al. 2019) and its released code; nanoGPT's model.py for the layout.
Switches from the modded-nanogpt speedrun (activation, rope, qk_norm, tie_embeddings,
zero_init_proj, logit_softcap) are off by default, which is GPT-2's and nanoGPT's math.
Shapes in comments: B batch, T time, C n_embd, nh heads, hs head size, V vocabulary.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from fastgpt.ops import TORCH_OPS, Ops, full_logits_loss

# GPT-2 initialises weights from N(0, 0.02) (its model.py: `initializer_range`).
INIT_STD = 0.02
GELU_APPROXIMATIONS = ("none", "tanh")
# The MLP's nonlinearity: GPT-2's GELU, or ReLU squared (So et al. 2021, "Primer"; the speedrun's).
MLP_ACTIVATIONS = ("gelu", "relu2")
# RoFormer's base (Su et al. 2021): channel pair i of a head of size hs turns by t * ROPE_BASE^(-2i/hs)
# at position t, from 1 radian per position for the first pair to ~1/ROPE_BASE for the last.
ROPE_BASE = 10_000.0
# nanoGPT's GPTConfig fields, which a checkpoint's model_args always hold. Every other field is left
# out at its default, so nanoGPT's GPTConfig(**model_args) loads every model nanoGPT can build, and
# a field that model_args lacks reads as its default.
NANOGPT_FIELDS = ("block_size", "vocab_size", "n_layer", "n_head", "n_embd", "dropout", "bias")


@dataclass
class GPTConfig:
    block_size: int = 1024
    vocab_size: int = 50304  # GPT-2's 50257 padded up to a multiple of 64 for faster matmuls
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True  # biases in Linear and LayerNorm, as GPT-2 had
    gelu: str = "none"  # torch's GELU `approximate`: 'none' (erf, nanoGPT's) or 'tanh' (GPT-2's own)
    # The speedrun's switches (see TrainConfig's help for each); every default is GPT-2's.
    activation: str = "gelu"  # the MLP's nonlinearity: 'gelu' or 'relu2' (ReLU squared)
    rope: bool = False  # rotary positions in q and k (RoFormer) instead of the learned wpe table
    qk_norm: bool = False  # q and k scaled to unit RMS per head before attention
    tie_embeddings: bool = True  # lm_head shares wte's weight (Press & Wolf 2017), as in GPT-2
    zero_init_proj: bool = False  # c_proj (and an untied lm_head) start at zero, not GPT-2's scaled normal
    logit_softcap: float = 0.0  # > 0: logits -> cap * tanh(logits / cap) (Gemma 2); 0: off

    def __post_init__(self) -> None:
        for name, allowed in (("gelu", GELU_APPROXIMATIONS), ("activation", MLP_ACTIVATIONS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}={getattr(self, name)!r} is not allowed; choose one of {', '.join(map(repr, allowed))}")
        if not (math.isfinite(self.logit_softcap) and self.logit_softcap >= 0):
            raise ValueError(f"logit_softcap={self.logit_softcap} must be a finite number >= 0 (0: off)")
        if self.rope and (self.n_embd // self.n_head) % 2:
            raise ValueError(f"rope=True rotates channel pairs: the head size n_embd / n_head = "
                             f"{self.n_embd // self.n_head} must be even")

    def to_model_args(self) -> dict:
        """The checkpoint's `model_args`: nanoGPT's fields, and the others only where they are not
        the default (see NANOGPT_FIELDS); fastgpt.init_from reads a missing one as its default."""
        defaults = GPTConfig()
        return {k: v for k, v in asdict(self).items() if k in NANOGPT_FIELDS or v != getattr(defaults, k)}


def padded_vocab_size(vocab_size: int, multiple: int) -> int:
    """Round the vocabulary up so the embedding and head matmuls get tile-friendly shapes."""
    return -(-vocab_size // multiple) * multiple


class LayerNorm(nn.Module):
    """LayerNorm with an optional bias (torch's has no bias=False before 2.1; kept for checkpoints).

    Given a `branch` (a sublayer's output), it first adds it to the residual stream x and returns
    (x + branch, LayerNorm(x + branch)): one fused pass with the Triton kernels."""

    def __init__(self, ndim: int, bias: bool, ops: Ops = TORCH_OPS):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))
        self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None
        self.ops = ops

    def forward(self, x: torch.Tensor, branch: torch.Tensor | None = None):
        if branch is None:
            return self.ops.layer_norm(x, self.weight, self.bias)
        return self.ops.add_layer_norm(x, branch, self.weight, self.bias)


class Rotary(nn.Module):
    """Rotary position embeddings (Su et al. 2021, RoFormer): the adjacent channel pairs (2i, 2i+1)
    of a head turn by the angle t * ROPE_BASE^(-2i/hs) at position t, so q at s dotted with k at t
    depends on s - t alone, and no vector changes length. cos and sin are buffers no checkpoint
    holds. Adjacent pairs (RoFormer's and Meta LLaMA's layout) rather than the halves (i, i + hs/2)
    that modded-nanogpt and GPT-NeoX rotate: a pair is then one complex number, and the turn one
    complex multiply forward and back, where the halves take six elementwise ops and a cat. Inductor
    runs complex ops unfused through aten, so a compiled model turns the same pairs with real
    arithmetic, which it fuses into one kernel."""

    def __init__(self, head_size: int, block_size: int):
        super().__init__()
        # Real values even under torch.device('meta') (a model built there takes its weights with
        # assign=True): no state dict restores these.
        device = torch.get_default_device()
        device = torch.device("cpu") if device.type == "meta" else device
        inv_freq = ROPE_BASE ** (-torch.arange(0, head_size, 2, dtype=torch.float32, device=device) / head_size)
        angles = torch.outer(torch.arange(block_size, dtype=torch.float32, device=device), inv_freq)  # (T, hs/2)
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, nh, T, hs), rotated in fp32 and returned in its own dtype."""
        cos, sin = self.cos[: x.size(-2)], self.sin[: x.size(-2)]  # (T, hs/2)
        turn = rotate_pairs_real if torch.compiler.is_compiling() else rotate_pairs_complex
        return turn(x.float(), cos, sin).type_as(x)


def rotate_pairs_complex(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (..., T, hs) fp32 with each pair (2i, 2i+1) turned by (cos, sin)[t, i], as complex numbers."""
    pairs = torch.view_as_complex(x.unflatten(-1, (-1, 2)))  # (..., T, hs/2)
    return torch.view_as_real(pairs * torch.complex(cos, sin)).flatten(-2)


def rotate_pairs_real(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """rotate_pairs_complex's turn written out in real arithmetic, for inductor to fuse."""
    pairs = x.unflatten(-1, (-1, 2))  # (..., T, hs/2, 2)
    re, im = pairs[..., 0], pairs[..., 1]
    return torch.stack((re * cos - im * sin, re * sin + im * cos), dim=-1).flatten(-2)


def rms_norm_heads(x: torch.Tensor) -> torch.Tensor:
    """x (..., hs) with each head's vector scaled to unit RMS, in fp32, returned in x's dtype (so q,
    k and v agree under autocast)."""
    return F.rms_norm(x.float(), (x.size(-1),)).type_as(x)


class ReluSquared(nn.Module):
    """relu(x)^2 (So et al. 2021, "Primer"; the modded-nanogpt speedrun's MLP)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x).square()


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        assert config.n_embd % config.n_head == 0
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)  # q, k, v in one matmul
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head = config.n_head
        self.dropout = config.dropout
        # QK-norm (Dehghani et al. 2023; the speedrun) bounds the attention logits, whose growth
        # saturates the softmax and destabilises training. The speedrun's RMSNorm without a gain, not
        # the paper's LayerNorm: it adds no parameters, so the state dict keeps nanoGPT's keys.
        self.qk_norm = config.qk_norm
        self.rotary = Rotary(config.n_embd // config.n_head, config.block_size) if config.rope else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(C, dim=2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        if self.qk_norm:
            q, k = rms_norm_heads(q), rms_norm_heads(k)
        if self.rotary is not None:  # after the norm, as the speedrun: a rotation keeps the unit RMS
            q, k = self.rotary(q), self.rotary(k)
        y = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True
        )  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        # Exact (erf) GELU by default, as nanoGPT uses: on CPUs it runs faster than GPT-2's tanh
        # approximation. Pretrained GPT-2 weights load with 'tanh', so their logits are OpenAI's.
        self.act = nn.GELU(approximate=config.gelu) if config.activation == "gelu" else ReluSquared()
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.act(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, config: GPTConfig, ops: Ops = TORCH_OPS):
        super().__init__()
        self.ln_1 = LayerNorm(config.n_embd, bias=config.bias, ops=ops)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = LayerNorm(config.n_embd, bias=config.bias, ops=ops)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, h = self.ln_2(x, branch=self.attn(self.ln_1(x)))  # x += attn(ln_1(x)); h = ln_2(x)
        return x + self.mlp(h)


class GPT(nn.Module):
    """`ops` picks torch or Triton implementations (fastgpt.ops); the parameters, and so the
    checkpoints, are the same either way."""

    def __init__(self, config: GPTConfig, ops: Ops = TORCH_OPS):
        super().__init__()
        self.config = config
        self.ops = ops
        modules = dict(wte=nn.Embedding(config.vocab_size, config.n_embd))
        if not config.rope:  # with RoPE, attention gives q and k their positions instead
            modules["wpe"] = nn.Embedding(config.block_size, config.n_embd)
        modules.update(
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config, ops) for _ in range(config.n_layer)]),
            ln_f=LayerNorm(config.n_embd, bias=config.bias, ops=ops),
        )
        self.transformer = nn.ModuleDict(modules)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.tie_weights()
        self.apply(self._init_weights)
        # GPT-2: residual projections scaled by 1/sqrt(2 * n_layer), two per block, so the
        # residual stream's variance does not grow with depth. The speedrun starts them at zero
        # instead, so every block begins as the identity, and an untied head too (uniform logits).
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                if config.zero_init_proj:
                    nn.init.zeros_(p)
                else:
                    nn.init.normal_(p, mean=0.0, std=INIT_STD / math.sqrt(2 * config.n_layer))
        if config.zero_init_proj and not config.tie_embeddings:
            nn.init.zeros_(self.lm_head.weight)

    def tie_weights(self) -> None:
        """Weight tying (Press & Wolf 2017): one matrix embeds tokens and scores them, unless
        tie_embeddings=False."""
        if self.config.tie_embeddings:
            self.transformer.wte.weight = self.lm_head.weight

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=INIT_STD)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=INIT_STD)

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameter count; by default without the tables that are only looked up: the position
        embeddings, and the token embeddings when untied (tied, they are the head's matmul and count)."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            if "wpe" in self.transformer:
                n -= self.transformer.wpe.weight.numel()
            if not self.config.tie_embeddings:
                n -= self.transformer.wte.weight.numel()
        return n

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        """idx (B, T) token ids -> (logits, loss). With targets, loss is the mean cross-entropy
        over targets != -1 and logits are (B, T, V), or None where the head and the loss are fused
        without ever forming the logits (the Triton kernels; a large vocabulary on a CPU); without
        targets, only the last position's logits (B, 1, V) are computed, which is all generation
        needs."""
        B, T = idx.size()
        if T > self.config.block_size:
            raise ValueError(f"sequence length {T} exceeds block_size {self.config.block_size}")
        x = self.transformer.wte(idx)  # (B, T, C)
        if "wpe" in self.transformer:
            x = x + self.transformer.wpe(torch.arange(0, T, dtype=torch.long, device=idx.device))
        x = self.transformer.drop(x)
        for block in self.transformer.h:
            x = block(x)
        x = self.transformer.ln_f(x)
        if targets is None:
            return self.logits(x[:, [-1], :]), None  # (B, 1, V)
        if self.config.logit_softcap:
            # The fused head + loss kernels know no cap: form the capped logits, then the plain loss.
            logits = self.logits(x)  # (B, T, V) fp32
            return logits, full_logits_loss(logits.view(B * T, -1), targets.reshape(-1))
        logits, loss = self.ops.head_and_loss(x.view(B * T, -1), self.lm_head.weight, targets.reshape(-1))
        return (None if logits is None else logits.view(B, T, -1)), loss

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """The head over hidden states x (..., C): lm_head's logits, or with logit_softcap > 0
        cap * tanh(logits / cap) in fp32 (Gemma 2; the speedrun), which keeps every |logit| < cap."""
        logits = self.lm_head(x)
        cap = self.config.logit_softcap
        return cap * torch.tanh(logits.float() / cap) if cap else logits

    def crop_block_size(self, block_size: int) -> None:
        """Shrink the context, e.g. to finetune a 1024-token model at 256 tokens."""
        if block_size > self.config.block_size:
            raise ValueError(f"cannot grow block_size from {self.config.block_size} to {block_size}")
        self.config.block_size = block_size
        if "wpe" in self.transformer:  # RoPE's longer tables do no harm: forward takes their first T rows
            self.transformer.wpe.weight = nn.Parameter(self.transformer.wpe.weight[:block_size])

    def flops_per_token(self) -> int:
        """Training FLOPs per token: 6 per parameter (forward 2, backward 4) plus attention's
        QK^T and AV matmuls, 12 * n_layer * n_embd * T (PaLM paper, appendix B)."""
        cfg = self.config
        return 6 * self.num_params() + 12 * cfg.n_layer * cfg.n_embd * cfg.block_size

    @torch.no_grad()
    def generate(
        self,
        idx: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        vocab_limit: int | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Extend idx (B, T) by max_new_tokens sampled tokens. `vocab_limit` masks the padding
        rows of a padded vocabulary, which no tokenizer can decode."""
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        for _ in range(max_new_tokens):
            idx_cond = idx if idx.size(1) <= self.config.block_size else idx[:, -self.config.block_size :]
            logits, _ = self(idx_cond)
            logits = logits[:, -1, :].float() / temperature  # (B, V)
            if vocab_limit is not None:
                logits[:, vocab_limit:] = -float("inf")
            if top_k is not None:
                v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
                logits[logits < v[:, [-1]]] = -float("inf")
            probs = F.softmax(logits, dim=-1)
            idx_next = torch.multinomial(probs, num_samples=1, generator=generator)  # (B, 1)
            idx = torch.cat((idx, idx_next), dim=1)
        return idx
