"""Training configuration: one dataclass, config files of plain assignments, `--key=value` overrides.

Field names and defaults follow nanoGPT's train.py (GPT-2 124M on OpenWebText), so a nanoGPT
config file or command line works unchanged. A config file is executed in its own namespace (never
in ours) and every name it assigns must be a field; overrides are parsed as Python literals and
must match the field's type. Every mistake is one line naming the field and what would be right.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import math
import pathlib
import types
import typing
from dataclasses import dataclass, field

from fastgpt.tokenfiles import DEFAULT_DATA_ROOT
from fastgpt.errors import FastgptError
from fastgpt.ops import KERNEL_CHOICES, OP_CHOICES, OP_FIELDS
from fastgpt.model import MLP_ACTIVATIONS
from fastgpt.optim import LR_SCHEDULES, OPTIMIZERS, MuonSettings, get_lr, wsd_decay_start
from fastgpt.pretrained import GPT2_MODELS
from fastgpt.hardware import DTYPES


class ConfigError(FastgptError):
    """A config file, override or value is wrong; the message is one line for the user."""


def _doc(text: str, choices: tuple = ()) -> dict:
    return {"help": text, "choices": choices}


@dataclass
class TrainConfig:
    # --- I/O
    out_dir: str = field(default="out", metadata=_doc("folder for ckpt.pt; created on demand"))
    eval_interval: int = field(default=2000, metadata=_doc("iterations between evaluations (and checkpoints)"))
    log_interval: int = field(default=1, metadata=_doc("iterations between log lines; each one syncs with the device"))
    eval_iters: int = field(default=200, metadata=_doc("batches per split that estimate_loss averages"))
    eval_only: bool = field(default=False, metadata=_doc("evaluate once and exit"))
    target_loss: float = field(
        default=0.0,
        metadata=_doc("time to a target: the first evaluation whose val loss is at or below it is logged, with its "
                      "iteration, tokens and training seconds (evaluation excluded), as a 'target_reached' event in "
                      "metrics.jsonl; 0 turns it off (speedrun recipes measure this way, as modded-nanogpt does)"),
    )
    stop_at_target: bool = field(
        default=True, metadata=_doc("end the run (saving, as at any evaluation) once target_loss is reached")
    )
    always_save_checkpoint: bool = field(
        default=True, metadata=_doc("save at every evaluation, not only when val loss improves")
    )
    allow_data_change: bool = field(
        default=False,
        metadata=_doc("resume even when train.bin or val.bin differ from the data the checkpoint was trained on "
                      "(its size and sha256, kept in the checkpoint); for data changed on purpose"),
    )
    init_from: str = field(
        default="scratch",
        metadata=_doc(
            "'scratch' for a new model, 'resume' to continue out_dir's newest checkpoint (its shape overrides the "
            "config's), 'auto' to resume when there is one and start from scratch when not (torchrun --max-restarts, "
            "requeued jobs), or OpenAI's 'gpt2', 'gpt2-medium', 'gpt2-large', 'gpt2-xl' from local files (hf_dir); a "
            "checkpoint or GPT-2 decides the shape and the speedrun switches below (GPT-2: all off), naming each taken",
            ("scratch", "resume", "auto", *GPT2_MODELS),
        ),
    )
    hf_dir: typing.Optional[str] = field(
        default=None,
        metadata=_doc("init_from='gpt2*': a Hugging Face model folder (config.json + model.safetensors or "
                      "pytorch_model.bin); None: the local Hugging Face cache (HF_HUB_CACHE, HF_HOME)"),
    )
    keep_checkpoints: int = field(
        default=2, metadata=_doc("checkpoints kept on disk: ckpt.pt is the newest; with 2+, also ckpt-ITER.pt each")
    )
    async_save: bool = field(
        default=True,
        metadata=_doc("write checkpoints on a background thread: a save stalls training only while the weights and "
                      "optimizer state are copied to host memory, which holds that copy (their size) until the file is "
                      "written; False: training waits while the file is written and fsynced"),
    )
    on_nonfinite_loss: str = field(
        default="stop",
        metadata=_doc(
            "a NaN/inf loss: 'stop' names the iteration and exits without saving (checked at log steps and "
            "saves, no extra sync); 'skip' drops that step's update (a CPU-GPU sync per step)",
            ("stop", "skip"),
        ),
    )
    # --- experiment tracking (nanoGPT's names; needs the wandb package when on)
    wandb_log: bool = field(default=False, metadata=_doc("log metrics to Weights & Biases"))
    wandb_project: str = field(default="fastgpt", metadata=_doc("W&B project name"))
    wandb_run_name: str = field(default="gpt2", metadata=_doc("W&B run name"))
    # --- data
    dataset: str = field(default="openwebtext", metadata=_doc("folder under data_root holding train.bin/val.bin"))
    data_root: str = field(default=str(DEFAULT_DATA_ROOT), metadata=_doc("parent folder of datasets (nanoGPT: data/)"))
    gradient_accumulation_steps: int = field(
        default=5 * 8, metadata=_doc("micro-batches per optimizer step; loss is scaled by 1/k")
    )
    batch_size: int = field(default=12, metadata=_doc("sequences per micro-batch"))
    block_size: int = field(default=1024, metadata=_doc("context length in tokens"))
    # --- model
    n_layer: int = field(default=12, metadata=_doc("transformer blocks"))
    n_head: int = field(default=12, metadata=_doc("attention heads; must divide n_embd"))
    n_embd: int = field(default=768, metadata=_doc("embedding width"))
    dropout: float = field(default=0.0, metadata=_doc("dropout probability; 0 for pretraining, 0.1+ for small finetunes"))
    bias: bool = field(default=False, metadata=_doc("biases in Linear and LayerNorm (GPT-2 had them; without is a bit better and faster)"))
    vocab_size: typing.Optional[int] = field(
        default=None, metadata=_doc("None: the dataset's vocabulary (meta.pkl, else GPT-2's 50257)")
    )
    vocab_multiple: int = field(
        default=64, metadata=_doc("pad the embedding table to a multiple of this (50257 -> 50304); 1 for no padding")
    )
    # Switches from the modded-nanogpt speedrun, each off by default (GPT-2's and nanoGPT's math). They
    # describe the weights, so a resume takes them from its checkpoint and init_from='gpt2*' from GPT-2
    # (all off): the log names each one taken over the config's. zero_init_proj is the exception: it only
    # shapes a new model's first weights.
    activation: str = field(
        default="gelu",
        metadata=_doc("the MLP's nonlinearity: 'gelu' (GPT-2's) or 'relu2', relu(x)^2 (So et al. 2021, Primer; "
                      "modded-nanogpt)", MLP_ACTIVATIONS),
    )
    rope: bool = field(
        default=False,
        metadata=_doc("rotary position embeddings on q and k (Su et al. 2021, RoFormer; base 10000; modded-nanogpt) "
                      "instead of the learned position table wpe, which the model then has not; needs an even "
                      "n_embd / n_head"),
    )
    qk_norm: bool = field(
        default=False,
        metadata=_doc("scale q and k to unit RMS per head before attention (an RMSNorm without weights), which "
                      "bounds the attention logits (Dehghani et al. 2023; modded-nanogpt)"),
    )
    tie_embeddings: bool = field(
        default=True,
        metadata=_doc("one matrix embeds tokens and scores them, as in GPT-2 (Press & Wolf 2017); False: lm_head "
                      "has its own weight (modded-nanogpt)"),
    )
    zero_init_proj: bool = field(
        default=False,
        metadata=_doc("start the attention and MLP output projections (c_proj), and an untied lm_head, at zero "
                      "(modded-nanogpt) instead of GPT-2's N(0, 0.02/sqrt(2 n_layer)); only a new model's: weights from a "
                      "checkpoint or GPT-2 are used as they are"),
    )
    logit_softcap: float = field(
        default=0.0,
        metadata=_doc("> 0: logits -> cap * tanh(logits / cap), so |logit| < cap, in training and sampling "
                      "(Gemma 2; modded-nanogpt uses 15-30); the head then forms the full logits, as no fused "
                      "head + loss kernel applies the cap (head_loss_kernel='fp8' is refused); 0: off"),
    )
    # --- optimizer: AdamW (nanoGPT's); optimizer='muon' gives the blocks' matrices to Muon
    optimizer: str = field(
        default="adamw",
        metadata=_doc(
            "'adamw' for every parameter; 'muon' (modded-nanogpt's): torch.optim.Muon (Keller Jordan 2024) for the "
            "attention and MLP weight matrices inside the blocks, AdamW for embeddings, LM head, norms and biases",
            OPTIMIZERS,
        ),
    )
    learning_rate: float = field(default=6e-4, metadata=_doc("peak learning rate (AdamW's)"))
    max_iters: int = field(default=600000, metadata=_doc("optimizer steps in total"))
    weight_decay: float = field(default=1e-1, metadata=_doc("decoupled weight decay on matrices and embeddings only"))
    beta1: float = field(default=0.9, metadata=_doc("AdamW beta1"))
    beta2: float = field(default=0.95, metadata=_doc("AdamW beta2"))
    grad_clip: float = field(default=1.0, metadata=_doc("clip the global gradient norm to this; 0 disables"))
    muon_lr: float = field(
        default=0.02,
        metadata=_doc("optimizer='muon': Muon's peak rate (modded-nanogpt's and Keller Jordan's 0.02); the schedule "
                      "scales it by the same factor as learning_rate"),
    )
    muon_momentum: float = field(
        default=0.95, metadata=_doc("optimizer='muon': Muon's Nesterov momentum (modded-nanogpt's and torch's 0.95)")
    )
    muon_weight_decay: float = field(
        default=0.0,
        metadata=_doc("optimizer='muon': decoupled weight decay on Muon's matrices, p *= 1 - lr*wd at Muon's lr "
                      "(0 as in modded-nanogpt's 2024 Muon records; torch's default is 0.1); weight_decay stays AdamW's"),
    )
    # --- learning-rate schedule
    decay_lr: bool = field(default=True, metadata=_doc("warmup then decay (lr_schedule); False keeps learning_rate"))
    lr_schedule: str = field(
        default="cosine",
        metadata=_doc(
            "'cosine' (nanoGPT's): after the warmup, a cosine down to min_lr at lr_decay_iters; 'wsd' "
            "(warmup-stable-decay, Hägele et al. 2024): learning_rate until the last decay_fraction of "
            "lr_decay_iters, then linear down to min_lr at lr_decay_iters",
            LR_SCHEDULES,
        ),
    )
    decay_fraction: float = field(
        default=0.2,
        metadata=_doc("lr_schedule='wsd': the share of lr_decay_iters spent decaying (Hägele et al. find 20% matches a "
                      "cosine)"),
    )
    warmup_iters: int = field(default=2000, metadata=_doc("linear warmup steps"))
    lr_decay_iters: int = field(
        default=600000, metadata=_doc("step where the schedule reaches min_lr (~max_iters, per Chinchilla)")
    )
    min_lr: float = field(default=6e-5, metadata=_doc("floor of the schedule (~learning_rate/10, per Chinchilla)"))
    # --- system
    backend: str = field(default="nccl", metadata=_doc("DDP backend on CUDA (gloo is used on CPU)", ("nccl", "gloo")))
    ddp_timeout: int = field(
        default=600, metadata=_doc("seconds a DDP collective may wait before the job fails, so a lost rank never hangs the rest")
    )
    device: str = field(default="auto", metadata=_doc("'auto' (cuda > mps > cpu), or 'cpu', 'cuda', 'cuda:1', 'mps'"))
    dtype: str = field(
        default="auto",
        metadata=_doc(
            "autocast dtype; 'auto' = bfloat16 where the device runs it natively, else float16 (+GradScaler) on CUDA, else float32",
            ("auto", *DTYPES),
        ),
    )
    compile: typing.Union[bool, str] = field(
        default="auto",
        metadata=_doc(
            "torch.compile the model; 'auto' = on CUDA only (on a CPU, inductor's compile takes longer than "
            "it saves in a short run; bench/README.md has the figures)"
        ),
    )
    # --- profiling: `--profile` records a few training steps with torch.profiler, writes the traces
    # to out_dir/profile/, prints where the time went and exits without saving a checkpoint
    profile: bool = field(
        default=False, metadata=_doc("profile wait+warmup+active training steps, report, exit; --profile alone means True")
    )
    profile_wait: int = field(
        default=1, metadata=_doc("steps run before the profiler starts: the first one holds one-time costs (compile, allocation)")
    )
    profile_warmup: int = field(default=1, metadata=_doc("steps traced but discarded: the profiler's start-up skews them"))
    profile_active: int = field(default=3, metadata=_doc("steps recorded into the traces and the summary"))
    seed: int = field(default=1337, metadata=_doc("base random seed (model init and batches)"))
    kernels: str = field(
        default="auto",
        metadata=_doc(
            "hot-path implementation of every op left unset below: 'auto' = an op's Triton kernel only on a GPU class "
            "where a committed measurement (fastgpt/kernel_measurements.json) shows it speeding up the whole training "
            "step, torch (and torch.compile's Inductor) everywhere else; 'triton' or 'torch' for all",
            KERNEL_CHOICES,
        ),
    )
    layer_norm_kernel: typing.Optional[str] = field(
        default=None,
        metadata=_doc("LayerNorm and the block's fused residual add + LayerNorm; None: as `kernels`",
                      (None, *OP_CHOICES["layer_norm"])),
    )
    head_loss_kernel: typing.Optional[str] = field(
        default=None,
        metadata=_doc(
            "the LM head and its cross-entropy: 'triton' chunks it over rows so the (tokens x vocab) logits never "
            "exist; 'fp8' (opt-in) runs the head's matmuls in fp8 with per-tensor scales (CUDA compute capability "
            "8.9+, e.g. H100; shapes multiples of 16); None: as `kernels`",
            (None, *OP_CHOICES["head_loss"]),
        ),
    )
    optimizer_kernel: typing.Optional[str] = field(
        default=None,
        metadata=_doc("AdamW (with optimizer='muon', the AdamW part): 'triton' is one launch over every parameter, "
                      "'torch' is torch's fused AdamW; None: as `kernels`",
                      (None, *OP_CHOICES["optimizer"])),
    )

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ConfigError naming the first field whose value is out of range."""
        for f in dataclasses.fields(self):
            choices = f.metadata.get("choices", ())
            value = getattr(self, f.name)
            if choices and value not in choices:
                raise ConfigError(f"{f.name}={value!r} is not allowed; choose one of {', '.join(map(repr, choices))}")
        positive = ("eval_interval", "log_interval", "eval_iters", "gradient_accumulation_steps", "batch_size",
                    "block_size", "n_layer", "n_head", "n_embd", "vocab_multiple", "ddp_timeout", "profile_active",
                    "keep_checkpoints")
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)} must be a positive integer")
        nonneg = ("max_iters", "warmup_iters", "lr_decay_iters", "weight_decay", "grad_clip", "learning_rate", "min_lr",
                  "profile_wait", "profile_warmup", "target_loss", "logit_softcap", "muon_lr", "muon_weight_decay")
        for name in nonneg:
            if getattr(self, name) < 0:
                raise ConfigError(f"{name}={getattr(self, name)} must be >= 0")
        for name in ("out_dir", "dataset", "data_root"):
            if not getattr(self, name):
                raise ConfigError(f"{name}='' must name a folder, e.g. {name}={FIELDS[name].default!r}")
        for name, tp in _HINTS.items():
            # 1e999 parses as inf, and inf passes every range check below; a config file can also compute a NaN.
            if tp is float and not math.isfinite(getattr(self, name)):
                raise ConfigError(f"{name}={getattr(self, name)} must be a finite number")
        if self.profile and self.eval_only:
            raise ConfigError("profile=True profiles training steps; it cannot go with eval_only=True")
        if isinstance(self.compile, str) and self.compile != "auto":
            raise ConfigError(f"compile={self.compile!r} is not allowed; choose True, False or 'auto'")
        if self.vocab_size is not None and self.vocab_size < 1:
            raise ConfigError(f"vocab_size={self.vocab_size} must be a positive integer or None")
        if self.n_embd % self.n_head:
            raise ConfigError(f"n_embd={self.n_embd} must be divisible by n_head={self.n_head}")
        if self.rope and (self.n_embd // self.n_head) % 2:
            raise ConfigError(f"rope=True rotates channel pairs: the head size n_embd / n_head = "
                              f"{self.n_embd // self.n_head} must be even")
        if self.logit_softcap and self.head_loss_kernel == "fp8":
            raise ConfigError(f"head_loss_kernel='fp8' cannot apply logit_softcap={self.logit_softcap}; use "
                              "head_loss_kernel='torch' or logit_softcap=0")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout={self.dropout} must be in [0, 1)")
        for name in ("beta1", "beta2", "muon_momentum"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"{name}={getattr(self, name)} must be in [0, 1)")
        if not 0.0 < self.decay_fraction <= 1.0:
            raise ConfigError(f"decay_fraction={self.decay_fraction} must be in (0, 1]")
        if self.optimizer == "muon" and self.learning_rate <= 0:
            raise ConfigError(f"learning_rate={self.learning_rate} must be > 0 with optimizer='muon': Muon's rate is "
                              "muon_lr times the schedule's fraction of learning_rate")
        if self.decay_lr and self.min_lr > self.learning_rate:  # nanoGPT's finetune config leaves min_lr above a constant rate
            raise ConfigError(f"min_lr={self.min_lr} must not exceed learning_rate={self.learning_rate}")
        if self.decay_lr and self.warmup_iters > self.lr_decay_iters:
            raise ConfigError(
                f"warmup_iters={self.warmup_iters} must not exceed lr_decay_iters={self.lr_decay_iters}"
            )
        decay_start = wsd_decay_start(self.lr_decay_iters, self.decay_fraction)
        if self.decay_lr and self.lr_schedule == "wsd" and self.warmup_iters > decay_start:
            raise ConfigError(
                f"warmup_iters={self.warmup_iters} must end before lr_schedule='wsd' starts its decay at iteration "
                f"{decay_start:g} (lr_decay_iters={self.lr_decay_iters} x (1 - decay_fraction={self.decay_fraction}))"
            )

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @property
    def tokens_per_iter(self) -> int:
        """Tokens one optimizer step trains on, over all ranks."""
        return self.gradient_accumulation_steps * self.batch_size * self.block_size

    def lr_at(self, it: int) -> float:
        """The learning rate of iteration `it`: optim.get_lr's schedule, or learning_rate without decay_lr."""
        if not self.decay_lr:
            return self.learning_rate
        return get_lr(it, self.learning_rate, self.warmup_iters, self.lr_decay_iters, self.min_lr, self.lr_schedule,
                      self.decay_fraction)

    def muon_settings(self) -> MuonSettings | None:
        """Muon's hyperparameters for optim.make_optimizer; None with optimizer='adamw'."""
        if self.optimizer != "muon":
            return None
        return MuonSettings(self.muon_lr, self.muon_momentum, self.muon_weight_decay)

    def kernel_overrides(self) -> dict[str, str | None]:
        """op -> its own kernel choice (None: as `kernels`), for fastgpt.ops.choose_ops."""
        return {op: getattr(self, name) for op, name in OP_FIELDS.items()}


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
_HINTS = typing.get_type_hints(TrainConfig)


def _type_name(tp) -> str:
    if typing.get_origin(tp) is typing.Union:
        return " or ".join("None" if a is type(None) else a.__name__ for a in typing.get_args(tp))
    return tp.__name__


def check_type(name: str, value):
    """Return `value` converted to field `name`'s type, or raise ConfigError naming both types."""
    if name not in FIELDS:
        close = difflib.get_close_matches(name, FIELDS, n=3, cutoff=0.6)
        hint = f"; did you mean {', '.join(close)}?" if close else "; see --help for the fields"
        raise ConfigError(f"unknown config key {name!r}{hint}")
    tp = _HINTS[name]
    allowed = typing.get_args(tp) if typing.get_origin(tp) is typing.Union else (tp,)
    for t in allowed:
        if t is type(None) and value is None:
            return None
        # bool is an int subclass in Python: accept it only where a bool is expected.
        if t is bool and isinstance(value, bool):
            return value
        if t is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if t is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if t is str and isinstance(value, str):
            return value
    raise ConfigError(f"{name} must be {_type_name(tp)}, got {type(value).__name__} {value!r}")


def parse_override(arg: str) -> tuple[str, object]:
    """`--key=value` -> (key, value); value is a Python literal, or a bare string for str fields."""
    if not arg.startswith("--") or "=" not in arg:
        raise ConfigError(f"cannot read {arg!r}: overrides look like --key=value")
    key, text = arg[2:].split("=", 1)
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        value = text  # a bare word such as --device=cpu
    if key in FIELDS and _HINTS[key] is str and not isinstance(value, str):
        value = text  # --wandb_run_name=124 stays a string
    return key, check_type(key, value)


def read_config_file(path: str | pathlib.Path) -> dict:
    """Execute a config file in a fresh namespace and return the fields it assigns."""
    path = pathlib.Path(path)
    if not path.is_file():
        if "=" in path.name:  # `key=value` without the dashes lands here as a file name
            raise ConfigError(f"config file {str(path)!r} not found; an override needs two dashes: --{path.name}")
        raise ConfigError(f"config file {str(path)!r} not found; pass a file such as configs/shakespeare_char.py")
    namespace: dict = {}
    try:
        source = path.read_text(encoding="utf-8")
        exec(compile(source, str(path), "exec"), namespace)  # the user's own file, in its own namespace
    except Exception as e:
        raise ConfigError(
            f"{path}: {type(e).__name__}: {e}; a config file holds plain Python assignments such as n_layer = 4"
        ) from e
    values = {}
    for name, value in namespace.items():
        if name.startswith("_") or isinstance(value, types.ModuleType):
            continue  # __builtins__, and `import math` that a config may use for arithmetic
        try:
            values[name] = check_type(name, value)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from e
    return values


def load_config(config_path: str | None, overrides: list[str], base: dict | None = None) -> TrainConfig:
    """Defaults, then `base`, then the config file, then `--key=value` overrides, in that order."""
    values = dict(base or {})
    if config_path is not None:
        values.update(read_config_file(config_path))
    for arg in overrides:
        key, value = parse_override(arg)
        values[key] = value
    return TrainConfig(**values)


def help_text() -> str:
    """One line per field: name, type, default and why it exists; for --help."""
    lines = []
    for f in dataclasses.fields(TrainConfig):
        choices = f.metadata.get("choices", ())
        extra = f" (one of {', '.join(map(str, choices))})" if choices else ""
        lines.append(f"  --{f.name}={f.default!r}  [{_type_name(_HINTS[f.name])}] {f.metadata['help']}{extra}")
    return "\n".join(lines)
