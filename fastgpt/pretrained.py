"""OpenAI's GPT-2 weights in and out, in the Hugging Face layout, from local files only.

    init_from = "gpt2" | "gpt2-medium" | "gpt2-large" | "gpt2-xl"    (nanoGPT's names)

A Hugging Face model folder holds config.json and model.safetensors (or pytorch_model.bin). It is
found at `hf_dir` when given, else in the local Hugging Face cache (HF_HUB_CACHE, else
HF_HOME/hub, else ~/.cache/huggingface/hub) under the model's repository names. Nothing is
downloaded: fetching is a command the error message gives, for a machine with a network.

The layouts differ in three ways, all handled here: GPT-2's Conv1D stores each projection as
(in, out), the transpose of nn.Linear's weight; its activation is the tanh GELU ('gelu_new'); and
its 50257-token vocabulary is padded here to a multiple of 64, with zero rows that generation masks
(GPT.generate's vocab_limit). safetensors files load without pickle; .bin files with
torch.load(weights_only=True). Either way no code in the file runs.

Going out (fastgpt.export), the speedrun's relu2 and untied head are written as transformers'
activation 'relu2' and tie_word_embeddings=False; a model with rope, qk_norm or a logit softcap is
refused, as GPT2LMHeadModel computes none of them.
"""

from __future__ import annotations

import json
import os
import pathlib

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from fastgpt.checkpoint import CheckpointError, load_model_state, torch_load_plain
from fastgpt.errors import FastgptError
from fastgpt.model import GPT, GPTConfig, padded_vocab_size

# nanoGPT's names -> the Hub repositories that hold them (the short name, then its newer home).
GPT2_MODELS = {
    "gpt2": ("gpt2", "openai-community/gpt2"),
    "gpt2-medium": ("gpt2-medium", "openai-community/gpt2-medium"),
    "gpt2-large": ("gpt2-large", "openai-community/gpt2-large"),
    "gpt2-xl": ("gpt2-xl", "openai-community/gpt2-xl"),
}
CONFIG_NAME = "config.json"
SAFETENSORS_NAME = "model.safetensors"
BIN_NAME = "pytorch_model.bin"
# Hugging Face's activation names -> torch's GELU `approximate`.
ACTIVATIONS = {"gelu_new": "tanh", "gelu_pytorch_tanh": "tanh", "gelu": "none"}
# Parameters stored by GPT-2's Conv1D, (in, out): transposed into and out of nn.Linear.
CONV1D_SUFFIXES = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
# Buffers some GPT-2 files carry (the causal mask and its fill value): not weights.
BUFFER_SUFFIXES = (".attn.bias", ".attn.masked_bias")
PREFIX = "transformer."
# GPTConfig switches GPT2LMHeadModel has no counterpart for; relu2 ('relu2' in transformers' ACT2FN)
# and an untied head (tie_word_embeddings=False) it does compute.
NOT_IN_HF_GPT2 = ("rope", "qk_norm", "logit_softcap")
EOT_ID = 50256  # GPT-2's <|endoftext|>, its only special token


class PretrainedError(FastgptError):
    """Pretrained weights are missing, unreadable or not GPT-2's; one line for the user."""


def hub_cache_dir() -> pathlib.Path:
    """Where huggingface_hub keeps downloads, by its own precedence."""
    if os.environ.get("HF_HUB_CACHE"):
        return pathlib.Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return pathlib.Path(os.environ["HF_HOME"]).expanduser() / "hub"
    xdg = os.environ.get("XDG_CACHE_HOME")
    return pathlib.Path(xdg).expanduser() / "huggingface" / "hub" if xdg else pathlib.Path("~/.cache/huggingface/hub").expanduser()


def _snapshot(repo_dir: pathlib.Path) -> pathlib.Path | None:
    """The snapshot refs/main points at, else the newest one with a config.json."""
    ref = repo_dir / "refs" / "main"
    if ref.is_file():
        snap = repo_dir / "snapshots" / ref.read_text().strip()
        if (snap / CONFIG_NAME).is_file():
            return snap
    snaps = [p for p in (repo_dir / "snapshots").glob("*") if (p / CONFIG_NAME).is_file()]
    return max(snaps, key=lambda p: p.stat().st_mtime) if snaps else None


def find_model_dir(name: str, hf_dir: str | None) -> pathlib.Path:
    """The folder holding `name`'s config.json and weights: `hf_dir`, else the Hub cache."""
    if hf_dir:
        folder = pathlib.Path(hf_dir).expanduser()
        if not (folder / CONFIG_NAME).is_file():
            raise PretrainedError(f"hf_dir={hf_dir!r} holds no {CONFIG_NAME}; point it at a Hugging Face model folder "
                                  f"(config.json and {SAFETENSORS_NAME} or {BIN_NAME})")
        return folder
    looked, cache = [], hub_cache_dir()
    for repo in GPT2_MODELS[name]:
        repo_dir = cache / ("models--" + repo.replace("/", "--"))
        looked.append(str(repo_dir))
        if snap := _snapshot(repo_dir):
            return snap
    raise PretrainedError(
        f"no {name} weights here (looked in {', '.join(looked)}; nothing is downloaded at run time); on a machine "
        f"with a network run `huggingface-cli download {GPT2_MODELS[name][1]} {CONFIG_NAME} {SAFETENSORS_NAME}` and "
        "copy its cache folder here (or set HF_HUB_CACHE), or pass --hf_dir=FOLDER"
    )


def read_hf_config(folder: pathlib.Path) -> dict:
    path = folder / CONFIG_NAME
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise PretrainedError(f"{path} is not a readable JSON config ({e})") from e
    if not isinstance(config, dict) or config.get("model_type") != "gpt2":
        kind = config.get("model_type") if isinstance(config, dict) else None
        raise PretrainedError(f"{path} describes model_type={kind!r}, not 'gpt2'; fastgpt loads GPT-2 checkpoints only")
    activation = config.get("activation_function", "gelu_new")
    if activation not in ACTIVATIONS:
        raise PretrainedError(f"{path}: activation_function={activation!r}; fastgpt's GPT runs "
                              f"{', '.join(ACTIVATIONS)}")
    for key in ("n_layer", "n_head", "n_embd", "n_positions", "vocab_size"):
        if not isinstance(config.get(key), int) or config[key] < 1:
            raise PretrainedError(f"{path}: {key}={config.get(key)!r} must be a positive integer")
    return config


def read_hf_weights(folder: pathlib.Path) -> dict[str, torch.Tensor]:
    """The state dict of model.safetensors (preferred: no pickle at all) or pytorch_model.bin."""
    path = folder / SAFETENSORS_NAME
    if path.is_file():
        try:
            return load_file(path)
        except (SafetensorError, OSError, ValueError) as e:
            raise PretrainedError(f"cannot read {path}: {e}; it may be truncated, fetch it again") from e
    path = folder / BIN_NAME
    if path.is_file():
        try:
            state = torch_load_plain(path)
        except CheckpointError as e:
            raise PretrainedError(str(e)) from e
        if not (isinstance(state, dict) and all(isinstance(v, torch.Tensor) for v in state.values())):
            raise PretrainedError(f"{path} is not a state dict of tensors")
        return state
    raise PretrainedError(f"{folder} holds no weights: expected {SAFETENSORS_NAME} or {BIN_NAME}")


def from_hf_state(hf_state: dict[str, torch.Tensor], config: GPTConfig, path) -> dict[str, torch.Tensor]:
    """Hugging Face GPT-2 names and layout -> fastgpt's (nanoGPT's), the vocabulary padded with
    zero rows to config.vocab_size and the position table cropped to config.block_size."""
    state = {}
    for key, value in hf_state.items():
        if key.endswith(BUFFER_SUFFIXES) or key == "lm_head.weight":  # lm_head is tied to wte
            continue
        key = key if key.startswith(PREFIX) else PREFIX + key  # GPT2Model's files lack the prefix
        state[key] = value.t().contiguous() if key.endswith(CONV1D_SUFFIXES) else value
    wte, wpe = state.get(PREFIX + "wte.weight"), state.get(PREFIX + "wpe.weight")
    if wte is None or wpe is None:
        raise PretrainedError(f"{path} lacks wte.weight or wpe.weight: not a GPT-2 state dict")
    state[PREFIX + "wte.weight"] = torch.cat([wte, wte.new_zeros(config.vocab_size - wte.shape[0], wte.shape[1])])
    state[PREFIX + "wpe.weight"] = wpe[: config.block_size]
    state["lm_head.weight"] = state[PREFIX + "wte.weight"]
    return state


def load_gpt2_state(name: str, hf_dir: str | None = None, block_size: int | None = None, dropout: float = 0.0,
                    vocab_multiple: int = 64) -> tuple[GPTConfig, dict[str, torch.Tensor], int]:
    """(the model's GPTConfig, its state dict in fastgpt's layout, the real vocabulary size) of
    GPT-2 `name`, from local files. The files decide n_layer, n_head, n_embd and bias; block_size
    may crop the context; dropout is the caller's."""
    folder = find_model_dir(name, hf_dir)
    hf = read_hf_config(folder)
    if block_size is not None and block_size > hf["n_positions"]:
        raise PretrainedError(f"block_size={block_size} exceeds {name}'s context of {hf['n_positions']}; "
                              f"use block_size <= {hf['n_positions']}")
    hf_state = read_hf_weights(folder)
    config = GPTConfig(
        block_size=block_size or hf["n_positions"], vocab_size=padded_vocab_size(hf["vocab_size"], vocab_multiple),
        n_layer=hf["n_layer"], n_head=hf["n_head"], n_embd=hf["n_embd"], dropout=dropout,
        bias=any(k.endswith("attn.c_attn.bias") for k in hf_state),
        gelu=ACTIVATIONS[hf.get("activation_function", "gelu_new")],
    )
    return config, from_hf_state(hf_state, config, folder), hf["vocab_size"]


def load_gpt2(name: str, hf_dir: str | None = None, **kwargs) -> tuple[GPT, int]:
    """GPT-2 `name` as a fastgpt GPT with its weights, and its real vocabulary size."""
    config, state, vocab_size = load_gpt2_state(name, hf_dir, **kwargs)
    with torch.device("meta"):  # no random initialisation: every weight comes from the file
        model = GPT(config)
    try:
        load_model_state(model, state, name, assign=True)
    except CheckpointError as e:
        raise PretrainedError(str(e)) from e
    return model, vocab_size


def check_hf_expressible(config: GPTConfig) -> None:
    """PretrainedError, one line naming the switches, when GPT2LMHeadModel cannot compute `config`'s model."""
    used = [f"{k}={getattr(config, k)!r}" for k in NOT_IN_HF_GPT2 if getattr(config, k) != getattr(GPTConfig, k)]
    if used:
        raise PretrainedError(f"the model uses {', '.join(used)}, which Hugging Face's GPT-2 (GPT2LMHeadModel) cannot "
                              "compute; only models with " + ", ".join(f"{k}={getattr(GPTConfig, k)!r}" for k in NOT_IN_HF_GPT2)
                              + " export to its format")


def to_hf_state(model: GPT, vocab_size: int) -> dict[str, torch.Tensor]:
    """fastgpt's state -> GPT2LMHeadModel's names and layout, unpadded to `vocab_size` rows. A
    model without biases gets zero biases, which compute the same thing."""
    check_hf_expressible(model.config)
    state = {}
    for key, value in model.state_dict().items():
        if key == "lm_head.weight" and model.config.tie_embeddings:
            continue  # tied: transformers rebuilds it from wte
        value = value.detach().float().cpu()
        state[key] = value.t().contiguous() if key.endswith(CONV1D_SUFFIXES) else value.contiguous()
    for key in (PREFIX + "wte.weight", "lm_head.weight"):
        if key in state:
            state[key] = state[key][:vocab_size].contiguous()
    if not model.config.bias:
        for key, value in list(state.items()):
            if key.endswith(".weight") and not key.endswith(("wte.weight", "wpe.weight", "lm_head.weight")):
                width = value.shape[1] if key.endswith(CONV1D_SUFFIXES) else value.shape[0]
                state[key[: -len("weight")] + "bias"] = torch.zeros(width)
    return state


def hf_config(model: GPT, vocab_size: int) -> dict:
    """config.json for GPT2LMHeadModel describing `model`."""
    cfg = model.config
    check_hf_expressible(cfg)
    activation = "relu2" if cfg.activation == "relu2" else "gelu_new" if cfg.gelu == "tanh" else "gelu"
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "n_layer": cfg.n_layer,
        "n_head": cfg.n_head,
        "n_embd": cfg.n_embd,
        "n_positions": cfg.block_size,
        "n_ctx": cfg.block_size,
        "vocab_size": vocab_size,
        "activation_function": activation,
        "layer_norm_epsilon": 1e-5,
        "resid_pdrop": 0.0,
        "embd_pdrop": 0.0,
        "attn_pdrop": 0.0,
        "tie_word_embeddings": cfg.tie_embeddings,
        "torch_dtype": "float32",
        **({"bos_token_id": EOT_ID, "eos_token_id": EOT_ID} if vocab_size > EOT_ID else {}),
    }
