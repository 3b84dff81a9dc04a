"""Where a run's model comes from: a new one of the config's shape, out_dir's newest checkpoint,
or OpenAI's GPT-2 weights; and the config that shape implies.

A checkpoint's or GPT-2's shape wins over the config's (nanoGPT's rule for init_from='resume' and
'gpt2*'), each field taken is reported, and only what cannot be reconciled is refused: a dataset
with more token ids than the weights' vocabulary.
"""

from __future__ import annotations

import dataclasses
import pathlib

import torch

from fastgpt import checkpoint as ckpt_io
from fastgpt.config import TrainConfig
from fastgpt.model import GPT, GPTConfig, padded_vocab_size
from fastgpt.pretrained import GPT2_MODELS, PretrainedError, load_gpt2_state

# The TrainConfig fields that a start's shape overrides (vocab_size stays: None means the dataset's).
ADOPTED_FIELDS = ("n_layer", "n_head", "n_embd", "block_size", "bias")


@dataclasses.dataclass
class Start:
    model_args: GPTConfig
    weights: dict[str, torch.Tensor] | None  # None: initialise
    checkpoint: dict | None  # the training state to resume, when resuming
    source: str  # 'scratch', the checkpoint's path, or the GPT-2 name
    taken: list[str]  # 'field=value (config: value)' for each shape field taken from the source


def resolve_start(cfg: TrainConfig, data_vocab: int) -> Start:
    """Read what cfg.init_from names (every rank reads the same files)."""
    wanted = GPTConfig(block_size=cfg.block_size, vocab_size=padded_vocab_size(data_vocab, cfg.vocab_multiple),
                       n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd, dropout=cfg.dropout, bias=cfg.bias)
    newest = ckpt_io.newest_checkpoint(cfg.out_dir)
    if cfg.init_from == "resume" or (cfg.init_from == "auto" and newest):
        path = newest or ckpt_io.checkpoint_path(cfg.out_dir)
        checkpoint = ckpt_io.load_checkpoint(path, map_location="cpu")
        model_args, taken = ckpt_io.adopt_model_args(checkpoint.get("model_args", {}), wanted, data_vocab, path)
        return Start(model_args, checkpoint["model"], checkpoint, str(path), taken)
    if cfg.init_from in GPT2_MODELS:
        model_args, weights, vocab = load_gpt2_state(cfg.init_from, cfg.hf_dir, cfg.block_size, cfg.dropout,
                                                     cfg.vocab_multiple)
        if vocab < data_vocab:
            raise PretrainedError(f"{cfg.init_from} has a vocabulary of {vocab} ids, but dataset {cfg.dataset!r} has "
                                  f"{data_vocab}; finetune it on GPT-2 BPE data (python -m fastgpt.prepare shakespeare)")
        taken = [f"{k}={getattr(model_args, k)!r} (config: {getattr(wanted, k)!r})"
                 for k in ckpt_io.SHAPE_FIELDS if getattr(model_args, k) != getattr(wanted, k)]
        return Start(model_args, weights, None, cfg.init_from, taken)
    return Start(wanted, None, None, "scratch", [])


def build_model(start: Start, ops) -> GPT:
    """The model the start describes, on the CPU. Loaded weights are dropped from `start` (and
    from its checkpoint) once in the model, so a large model's CPU copy is freed early."""
    if start.weights is None:
        return GPT(start.model_args, ops)
    with torch.device("meta"):  # no random initialisation: every weight comes from the file
        model = GPT(start.model_args, ops)
    ckpt_io.load_model_state(model, start.weights, start.source, assign=True)
    start.weights = None
    if start.checkpoint is not None:
        start.checkpoint.pop("model", None)
    return model


def adopt_shape(cfg: TrainConfig, model_args: GPTConfig) -> TrainConfig:
    """cfg with the model's shape, so the batches, the logs and the saved config all agree with it."""
    return dataclasses.replace(cfg, **{k: getattr(model_args, k) for k in ADOPTED_FIELDS})


def describe(start: Start) -> str | None:
    if not start.taken:
        return None
    where = pathlib.Path(start.source).name if start.checkpoint is not None else start.source
    return f"took the model's shape from {where}: {', '.join(start.taken)}"
