"""A GPT-2-style decoder with nanoGPT's parameter names, so nanoGPT checkpoints load as they are.

References: GPT-2 (Radford et al. 2019) and its released code; nanoGPT's model.py for the layout.
Shapes in comments: B batch, T time, C n_embd, nh heads, hs head size, V vocabulary.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from fastgpt.ops import TORCH_OPS, Ops

# GPT-2 initialises weights from N(0, 0.02) (its model.py: `initializer_range`).
INIT_STD = 0.02
GELU_APPROXIMATIONS = ("none", "tanh")


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

    def __post_init__(self) -> None:
        if self.gelu not in GELU_APPROXIMATIONS:
            raise ValueError(f"gelu={self.gelu!r} is not allowed; choose one of {', '.join(map(repr, GELU_APPROXIMATIONS))}")

    def to_model_args(self) -> dict:
        """The checkpoint's `model_args`. nanoGPT's GPTConfig(**model_args) knows no `gelu`, so the
        default (nanoGPT's exact GELU) is left out; fastgpt.init_from reads it back as the default."""
        args = asdict(self)
        if args["gelu"] == "none":
            del args["gelu"]
        return args


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


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        assert config.n_embd % config.n_head == 0
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)  # q, k, v in one matmul
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head = config.n_head
        self.dropout = config.dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(C, dim=2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
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
        self.gelu = nn.GELU(approximate=config.gelu)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


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
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.vocab_size, config.n_embd),
                wpe=nn.Embedding(config.block_size, config.n_embd),
                drop=nn.Dropout(config.dropout),
                h=nn.ModuleList([Block(config, ops) for _ in range(config.n_layer)]),
                ln_f=LayerNorm(config.n_embd, bias=config.bias, ops=ops),
            )
        )
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.tie_weights()
        self.apply(self._init_weights)
        # GPT-2: residual projections scaled by 1/sqrt(2 * n_layer), two per block, so the
        # residual stream's variance does not grow with depth.
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=INIT_STD / math.sqrt(2 * config.n_layer))

    def tie_weights(self) -> None:
        """Weight tying (Press & Wolf 2017): one matrix embeds tokens and scores them."""
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
        """Parameter count; by default without the position embeddings (the token embeddings
        count, since tying makes them the output layer's weights)."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.transformer.wpe.weight.numel()
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
        pos = torch.arange(0, T, dtype=torch.long, device=idx.device)  # (T,)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))  # (B, T, C)
        for block in self.transformer.h:
            x = block(x)
        x = self.transformer.ln_f(x)
        if targets is None:
            return self.lm_head(x[:, [-1], :]), None  # (B, 1, V)
        logits, loss = self.ops.head_and_loss(x.view(B * T, -1), self.lm_head.weight, targets.reshape(-1))
        return (None if logits is None else logits.view(B, T, -1)), loss

    def crop_block_size(self, block_size: int) -> None:
        """Shrink the context, e.g. to finetune a 1024-token model at 256 tokens."""
        if block_size > self.config.block_size:
            raise ValueError(f"cannot grow block_size from {self.config.block_size} to {block_size}")
        self.config.block_size = block_size
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
