"""Where a run's model comes from (`init_from`), and everything a resume takes from a checkpoint.

init_from='scratch'  a new model of the config's shape, randomly initialised.
init_from='resume'   out_dir's newest checkpoint ('auto': that, or scratch when there is none).
init_from='gpt2*'    OpenAI's GPT-2 weights (fastgpt.pretrained).

A resume, in the order train.py runs it:
1. the model's shape: the checkpoint's `model_args` win over the config for SHAPE_FIELDS (nanoGPT's
   rule, also for GPT-2's shape), each field taken is logged, and the run's config adopts them so
   its batches, logs and saved config agree with the weights (`resolve`, `adopt_shape`);
2. the weights, checked name by name and shape by shape (`build_model`);
3. the optimizer and scaler states, the data streams' positions and each rank's RNG
   (`restore_training_state`), so the losses continue exactly as if the run had not stopped.
Only what cannot be reconciled is refused: a dataset with more token ids than the weights'
vocabulary, and (unless allow_data_change) token files other than the ones the checkpoint was
trained on. What a checkpoint holds is written in fastgpt/checkpoint.py.
"""

from __future__ import annotations

import dataclasses
import pathlib

import torch

from fastgpt import checkpoint as ckpt_io
from fastgpt.config import TrainConfig
from fastgpt.model import GPT, NANOGPT_FIELDS, GPTConfig, padded_vocab_size
from fastgpt.ops import OpChoices
from fastgpt.ops import check_head_shapes
from fastgpt.pretrained import GPT2_MODELS, PretrainedError, load_gpt2_state

# The GPTConfig fields that the weights decide: a checkpoint's or GPT-2's values win over the config's.
# The speedrun's switches are among them (GPT-2's weights have every one off), but not zero_init_proj,
# which only a new model's first weights depend on.
SHAPE_FIELDS = ("n_layer", "n_head", "n_embd", "block_size", "bias", "vocab_size", "gelu",
                "activation", "rope", "qk_norm", "tie_embeddings", "logit_softcap")
# The GPTConfig fields TrainConfig also has, from which a new model is built. Not vocab_size, whose
# None in the config means "the dataset's, padded"; not gelu, which only a model's shape names.
CONFIG_MODEL_FIELDS = tuple(f.name for f in dataclasses.fields(GPTConfig)
                            if f.name in TrainConfig.__dataclass_fields__ and f.name != "vocab_size")
# Of those, the shape fields: the config takes them over from the model a resume or GPT-2 builds.
ADOPTED_CONFIG_FIELDS = tuple(k for k in CONFIG_MODEL_FIELDS if k in SHAPE_FIELDS)


@dataclasses.dataclass
class Init:
    model_args: GPTConfig
    weights: dict[str, torch.Tensor] | None  # None: initialise
    checkpoint: dict | None  # the training state to resume, when resuming
    source: str  # 'scratch', the checkpoint's path, or the GPT-2 name
    taken: list[str]  # 'field=value (config: value)' for each shape field taken from the source
    resumed_from: pathlib.Path | None = None  # the checkpoint a resume continues


def resolve(cfg: TrainConfig, data_vocab: int, data_identity: dict, log=lambda line: None) -> Init:
    """Read what cfg.init_from names (every rank reads the same files); log each shape field taken.
    A resume that trains checks the data against the checkpoint's (tokenfiles.data_identity)."""
    init = _resolve(cfg, data_vocab)
    if init.checkpoint is not None and not cfg.eval_only:
        check_data_identity(init.checkpoint.get("data_identity"), data_identity, init.source, cfg.allow_data_change, log)
    if init.taken:
        where = init.resumed_from.name if init.resumed_from else init.source
        log(f"took the model's shape from {where}: {', '.join(init.taken)}")
    return init


def _resolve(cfg: TrainConfig, data_vocab: int) -> Init:
    wanted = GPTConfig(vocab_size=padded_vocab_size(data_vocab, cfg.vocab_multiple),
                       **{k: getattr(cfg, k) for k in CONFIG_MODEL_FIELDS})
    newest = ckpt_io.newest_checkpoint(cfg.out_dir)
    if cfg.init_from == "resume" or (cfg.init_from == "auto" and newest):
        path = newest or ckpt_io.checkpoint_path(cfg.out_dir)
        checkpoint = ckpt_io.load_checkpoint(path, map_location="cpu")
        model_args, taken = adopt_model_args(checkpoint.get("model_args", {}), wanted, data_vocab, path)
        return Init(model_args, checkpoint["model"], checkpoint, str(path), taken, pathlib.Path(path))
    if cfg.init_from in GPT2_MODELS:
        model_args, weights, vocab = load_gpt2_state(cfg.init_from, cfg.hf_dir, cfg.block_size, cfg.dropout,
                                                     cfg.vocab_multiple)
        if vocab < data_vocab:
            raise PretrainedError(f"{cfg.init_from} has a vocabulary of {vocab} ids, but dataset {cfg.dataset!r} has "
                                  f"{data_vocab}; finetune it on GPT-2 BPE data (python -m fastgpt.prepare shakespeare)")
        return Init(model_args, weights, None, cfg.init_from, _differences(model_args, wanted))
    return Init(wanted, None, None, "scratch", [])


def check_data_identity(saved, current: dict, path, allow_change: bool, log=lambda line: None) -> None:
    """Refuse, naming the first split that differs and how, a resume on other token files than
    the checkpoint's; with allow_change, log it and go on. A checkpoint without the record (older
    fastgpt, nanoGPT) resumes as before."""
    if not isinstance(saved, dict) or not saved:
        return
    for split, now in current.items():
        was = saved.get(split)
        if not isinstance(was, dict) or was == now:
            continue
        if was.get("bytes") != now["bytes"]:
            change = f"{was.get('bytes')} bytes then, {now['bytes']} now"
        else:
            change = f"same size, other content (sha256 {str(was.get('sha256'))[:12]}... then, {now['sha256'][:12]}... now)"
        if allow_change:
            log(f"{split} data changed since {path} was saved ({change}); continuing (allow_data_change=True)")
            continue
        raise ckpt_io.CheckpointError(
            f"{path} was trained on another {split} split: {change}; resume on the data it was trained on, set "
            "--allow_data_change=True to continue on these, or start a new run in another --out_dir"
        )


def adopt_model_args(saved: dict, wanted: GPTConfig, data_vocab: int, path) -> tuple[GPTConfig, list[str]]:
    """The model a resume builds: the checkpoint's shape with the config's dropout, and 'field=saved
    (config: wanted)' for each field taken. A field of nanoGPT's that the checkpoint lacks keeps the
    config's value; any other means its default, which model_args leave out (GPTConfig.to_model_args),
    and which every nanoGPT model has (the exact GELU, learned positions, a tied head, ...)."""
    if not isinstance(saved, dict):
        raise ckpt_io.CheckpointError(f"{path}: its 'model_args' entry is not a dict of GPTConfig fields")
    defaults = {k: v if k in NANOGPT_FIELDS else getattr(GPTConfig, k) for k, v in dataclasses.asdict(wanted).items()}
    shape = {k: saved.get(k, defaults[k]) for k in SHAPE_FIELDS}
    try:
        config = dataclasses.replace(wanted, **shape)
    except (TypeError, ValueError) as e:
        raise ckpt_io.CheckpointError(f"{path}: its model_args do not describe a GPT ({e})") from e
    if config.vocab_size < data_vocab:
        raise ckpt_io.CheckpointError(
            f"{path} has a vocabulary of {config.vocab_size} ids, but the dataset's has {data_vocab}; resume on the "
            "dataset it was trained on, or start a new run in another --out_dir"
        )
    return config, _differences(config, wanted)


def _differences(model_args: GPTConfig, wanted: GPTConfig) -> list[str]:
    return [f"{k}={getattr(model_args, k)!r} (config: {getattr(wanted, k)!r})"
            for k in SHAPE_FIELDS if getattr(model_args, k) != getattr(wanted, k)]


def adopt_shape(cfg: TrainConfig, model_args: GPTConfig) -> TrainConfig:
    """cfg with the model's shape, so the batches, the logs and the saved config all agree with it."""
    return dataclasses.replace(cfg, **{k: getattr(model_args, k) for k in ADOPTED_CONFIG_FIELDS})


def build_model(init: Init, kernels: OpChoices, batch_size: int, block_size: int, tokens_per_iter: int,
                log=lambda line: None) -> GPT:
    """The model `init` describes, on the CPU, with the chosen kernels, after checking that they
    take its head at batch x block rows. Loaded weights are dropped from `init` (and from its
    checkpoint) once in the model, so a large model's CPU copy is freed early."""
    check_head_shapes(kernels.choices, batch_size * block_size, init.model_args.n_embd, init.model_args.vocab_size)
    if init.weights is None:
        model = GPT(init.model_args, kernels.ops)
    else:
        with torch.device("meta"):  # no random initialisation: every weight comes from the file
            model = GPT(init.model_args, kernels.ops)
        ckpt_io.load_model_state(model, init.weights, init.source, assign=True)
        init.weights = None
        if init.checkpoint is not None:
            init.checkpoint.pop("model", None)
    log(f"model: {model.num_params() / 1e6:.2f}M parameters, {init.model_args}; tokens per iteration {tokens_per_iter:,}")
    return model


def restore_training_state(init: Init, optimizer: torch.optim.Optimizer, scaler, streams: dict, dist_info,
                           seed: int, log=lambda line: None) -> tuple[int, float]:
    """(iter_num, best_val_loss) to continue from: a resume loads the optimizer, scaler, data
    positions and RNG from the checkpoint, and then lets it go (the optimizer holds its state
    now); a new run starts at 0 with each rank's own dropout stream."""
    if init.checkpoint is None:
        torch.manual_seed(seed + dist_info.rank)  # dropout masks differ across ranks
        return 0, float("inf")
    iter_num, best_val_loss = ckpt_io.restore_training_state(init.checkpoint, optimizer, scaler, streams,
                                                             init.resumed_from, dist_info)
    init.checkpoint = None
    log(f"resumed from {init.resumed_from} at iteration {iter_num}")
    return iter_num, best_val_loss
