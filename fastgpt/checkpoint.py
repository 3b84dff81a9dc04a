"""Checkpoints in nanoGPT's layout, written atomically, checked against the model before loading.

A checkpoint is one `torch.save`d dict with nanoGPT's keys, so either project reads the other's:
  model          the *uncompiled* model's state dict (no `_orig_mod.` prefixes to strip)
  optimizer      the optimizer's state dict (optimizer='muon': Muon's groups, then AdamW's, and 'kind')
  model_args     GPTConfig as a dict: the shape the weights belong to
  iter_num       optimizer steps taken
  best_val_loss  lowest validation loss seen
  config         the run's TrainConfig as a plain dict
and fastgpt's additions: `format` (FORMAT_VERSION; nanoGPT's have none), `rng` (torch CPU/CUDA
generator states), `data` (the batch streams' positions) and `scaler` (the fp16 GradScaler) for
an exact resume, `run` (the run record: versions, device, git commit), and `data_identity`
({split: {"bytes", "sha256"}} of the token files trained on; tokenfiles.data_identity), which a
resume compares with the data it finds.

A run folder holds ckpt.pt, always the newest checkpoint (the file nanoGPT's tools read), and,
when more than one is kept, ckpt-ITER.pt for each of the newest `keep` checkpoints; the newest of
those is a hard link to ckpt.pt, so it takes no space of its own.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import pickle
import re
import shutil
import time

import numpy as np
import torch

from fastgpt import distributed
from fastgpt.background_save import BackgroundWriter, HostSnapshot
from fastgpt.errors import FastgptError
from fastgpt.fileio import atomic_writer, fsync_dir, write_error
from fastgpt.optim import optimizer_kind

CHECKPOINT_NAME = "ckpt.pt"
# ckpt-ITER.pt: the checkpoints kept besides the newest, numbered by iteration.
NUMBERED = re.compile(r"ckpt-(\d+)\.pt")
# The layout version this code writes and reads. Bump it when a key changes meaning, so that an
# older fastgpt refuses a newer file by name instead of misreading it.
FORMAT_VERSION = 1
# What to do when a checkpoint cannot be written (fileio.WriteError).
OUT_DIR_HINT = "free some space there or set --out_dir to a folder on another disk"
# nanoGPT saved the compiled module's state dict, whose keys carry this prefix.
COMPILED_PREFIX = "_orig_mod."
# nanoGPT without flash attention registered its causal mask as a buffer named `attn.bias`.
MASK_BUFFER_SUFFIX = ".attn.bias"


class CheckpointError(FastgptError):
    """A checkpoint is missing, unreadable or belongs to another model; one line for the user."""


def checkpoint_path(out_dir: str | os.PathLike) -> pathlib.Path:
    return pathlib.Path(out_dir) / CHECKPOINT_NAME


def save_checkpoint(path: str | os.PathLike, checkpoint: dict) -> None:
    """Write atomically: a crash mid-save leaves the previous checkpoint intact."""
    with atomic_writer(path, "wb", f"{OUT_DIR_HINT}; the previous checkpoint is intact") as f:
        torch.save(checkpoint, f)


def numbered_checkpoints(out_dir: str | os.PathLike) -> list[tuple[int, pathlib.Path]]:
    """The ckpt-ITER.pt files in `out_dir`, oldest first."""
    folder = pathlib.Path(out_dir)
    found = [(int(m.group(1)), p) for p in folder.glob("ckpt-*.pt") if (m := NUMBERED.fullmatch(p.name))]
    return sorted(found)


def write_checkpoint(out_dir: str | os.PathLike, checkpoint: dict, keep: int) -> pathlib.Path:
    """Make `checkpoint` the run's newest (ckpt.pt) and keep the `keep` newest as ckpt-ITER.pt.

    ckpt.pt is replaced first, in one rename, so at every instant it is a complete checkpoint and
    the newest one; the numbered copy and the pruning come after, and a crash between them loses
    nothing a resume needs."""
    path = checkpoint_path(out_dir)
    save_checkpoint(path, checkpoint)
    if keep > 1:
        numbered = path.with_name(f"ckpt-{checkpoint['iter_num']}.pt")
        tmp = numbered.with_name(f".{numbered.name}.link")
        tmp.unlink(missing_ok=True)
        try:
            try:
                os.link(path, tmp)
            except OSError:  # a filesystem without hard links: pay for a copy
                shutil.copyfile(path, tmp)
            os.replace(tmp, numbered)
        except OSError as e:  # ckpt.pt is complete; only its numbered copy failed
            tmp.unlink(missing_ok=True)
            raise write_error(numbered, e, f"{OUT_DIR_HINT}; {path.name} was saved") from e
        for _, old in numbered_checkpoints(out_dir)[:-keep]:
            old.unlink()
        fsync_dir(path.parent)
    return path


def newest_checkpoint(out_dir: str | os.PathLike) -> pathlib.Path | None:
    """ckpt.pt, else (if someone removed it) the highest-numbered ckpt-ITER.pt, else None."""
    path = checkpoint_path(out_dir)
    if path.is_file():
        return path
    numbered = numbered_checkpoints(out_dir)
    return numbered[-1][1] if numbered else None


def remove_stale_temporaries(out_dir: str | os.PathLike) -> list[pathlib.Path]:
    """Delete what a save killed mid-write left behind (atomic_writer's hidden .tmp files)."""
    stale = [p for p in pathlib.Path(out_dir).glob(".ckpt*.pt.*") if p.is_file()]
    for p in stale:
        p.unlink()
    return stale


def torch_load_plain(path: str | os.PathLike, map_location: str | torch.device = "cpu"):
    """torch.load of a file that must hold only tensors and plain data (weights_only), with one
    line naming what a refused pickle asked for."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}; train one first or set --out_dir to the folder holding ckpt.pt")
    try:
        # weights_only: tensors and plain data (dicts, lists, numbers, strings) only, which is all
        # a checkpoint of ours or nanoGPT's holds; anything else in the pickle could run code.
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        # torch's message is a paragraph; its one telling line names what the pickle asked for.
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        wants_global = next((line for line in lines if "GLOBAL" in line), None)  # a class or function
        if wants_global:
            raise CheckpointError(
                f"refusing to load {path}: it holds objects other than tensors and plain data, and unpickling "
                f"them could run code ({wants_global}); load only checkpoints written by fastgpt or nanoGPT"
            ) from e
        detail = next((line for line in lines if line.startswith("Unsupported")), type(e).__name__)
        raise CheckpointError(f"cannot read checkpoint {path}: not a torch checkpoint ({detail})") from e
    except Exception as e:
        raise CheckpointError(f"cannot read checkpoint {path}: {type(e).__name__}: {e}") from e


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    checkpoint = torch_load_plain(path, map_location)
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("model"), dict):
        raise CheckpointError(f"{path} is not a GPT checkpoint: expected a dict with a 'model' state dict")
    version = checkpoint.get("format", FORMAT_VERSION)  # nanoGPT's checkpoints carry none: our layout 1
    if version != FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has checkpoint format {version!r}, and this fastgpt reads format {FORMAT_VERSION}; "
            "load it with the fastgpt version that wrote it"
        )
    return checkpoint


def clean_state_dict(state_dict: dict) -> dict:
    """Accept nanoGPT's variants: strip compiled-module prefixes and drop causal-mask buffers."""
    cleaned = {}
    for key, value in state_dict.items():
        if key.startswith(COMPILED_PREFIX):
            key = key[len(COMPILED_PREFIX) :]
        if key.endswith(MASK_BUFFER_SUFFIX):
            continue
        cleaned[key] = value
    return cleaned


def load_model_state(model: torch.nn.Module, state_dict: dict, path: str | os.PathLike, assign: bool = False) -> None:
    """Load weights after checking every name and shape, naming the first mismatches. With
    `assign`, the model's parameters become the given tensors (as fp32): a model built on the meta
    device then costs no random initialisation and no second copy."""
    state_dict = clean_state_dict(state_dict)
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    wrong = [
        f"{k} {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in state_dict and state_dict[k].shape != own[k].shape
    ]
    problems = []
    if wrong:
        problems.append(f"shape mismatch in {', '.join(wrong[:3])}{' ...' if len(wrong) > 3 else ''}")
    if missing:
        problems.append(f"missing {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}")
    if unexpected:
        problems.append(f"unexpected {', '.join(unexpected[:3])}{' ...' if len(unexpected) > 3 else ''}")
    if problems:
        raise CheckpointError(f"{path} does not fit this model: {'; '.join(problems)}")
    if assign:
        state_dict = {k: v.float() if v.is_floating_point() else v for k, v in state_dict.items()}
    model.load_state_dict(state_dict, assign=assign)
    if assign:
        model.tie_weights()  # assign wraps each module's tensor in a Parameter of its own


@dataclasses.dataclass
class TrainingState:
    """The live objects a checkpoint saves; `checkpoint()` is the one place its keys are written."""

    model: torch.nn.Module  # the uncompiled, unwrapped module: keys without `_orig_mod.` or `module.`
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    streams: dict  # name -> batch stream with a state_dict()
    model_args: dict  # GPTConfig.to_model_args(): the shape the weights belong to
    config: dict  # the run's TrainConfig as plain data
    run: dict  # the run record (plain data)
    data_identity: dict = dataclasses.field(default_factory=dict)  # tokenfiles.data_identity() of the data trained on

    def checkpoint(self, iter_num: int, best_val_loss: float, rng: list[dict]) -> dict:
        """The file's contents; `rng` holds each rank's rng_state(), in rank order."""
        return {
            "format": FORMAT_VERSION,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "model_args": self.model_args,
            "iter_num": iter_num,
            "best_val_loss": best_val_loss,
            "config": self.config,
            "scaler": self.scaler.state_dict(),
            "data": {name: s.state_dict() for name, s in self.streams.items()},
            "rng": rng,
            "run": self.run,
            "data_identity": self.data_identity,
        }


class Saver:
    """Saves the training state as out_dir's newest checkpoint: a collective (every rank calls
    save, rank 0 writes and logs; every rank or none is disabled). `watch` (a stopping.LossWatch)
    refuses to save a state that a NaN or inf loss has poisoned; `last_good` is the newest
    checkpoint known complete and good: the one a resume started from until this run saves one.

    In the background (the default), save() returns once the state is copied to host memory and a
    worker thread writes the file as write_checkpoint always does; the next save, and leaving the
    Saver's `with` block, wait for that write and raise its error. Leaving on an error waits too,
    and logs a failed write rather than hiding the error that ended the run."""

    def __init__(self, out_dir, keep: int, state: TrainingState, dist_info, watch, log, last_good: pathlib.Path | None,
                 enabled: bool = True, background: bool = True):
        self.out_dir, self.keep, self.state, self.dist_info, self.watch, self.log = out_dir, keep, state, dist_info, watch, log
        self._last_good, self.enabled = last_good, enabled
        writes = enabled and background and dist_info.is_master
        self._writer = BackgroundWriter("checkpoint-writer") if writes else None
        self._snapshot = HostSnapshot()

    @property
    def last_good(self) -> pathlib.Path | None:
        """Takes in a background write once it has finished well; never waits for one."""
        if self._writer is not None and self._writer.succeeded():
            self.wait()
        return self._last_good

    def save(self, iter_num: int, best_val_loss: float) -> pathlib.Path | None:
        """The path written, or being written in the background (on rank 0; None on the others, and
        when disabled: a profiling run)."""
        if not self.enabled:
            return None
        self.wait()  # at most one write in flight, and last_good up to date for the message below
        self.watch.check(self.dist_info.enabled, self._last_good)
        rng = distributed.gather_objects(rng_state(), self.dist_info)
        if not self.dist_info.is_master:
            return None
        checkpoint = self.state.checkpoint(iter_num, best_val_loss, rng)
        if self._writer is None:
            self._last_good = write_checkpoint(self.out_dir, checkpoint, self.keep)
            self.log(f"saved checkpoint to {self._last_good}")
            return self._last_good
        start = time.perf_counter()
        snapshot, nbytes = self._snapshot(checkpoint)
        self.log(f"checkpoint: {nbytes / 1e6:,.1f} MB copied to host memory in {time.perf_counter() - start:.2f} s, "
                 "writing in the background")
        self._writer.submit(self._write, snapshot)
        return checkpoint_path(self.out_dir)

    def _write(self, checkpoint: dict) -> tuple[pathlib.Path, float]:
        """The worker thread's job: (the path written, seconds it took)."""
        start = time.perf_counter()
        return write_checkpoint(self.out_dir, checkpoint, self.keep), time.perf_counter() - start

    def wait(self) -> None:
        """Finish the background write in flight, if any: raise its error, or make it last_good."""
        if self._writer is not None and (written := self._writer.wait()) is not None:
            self._last_good, seconds = written
            self.log(f"saved checkpoint to {self._last_good} (written in the background in {seconds:.2f} s)")

    def __enter__(self) -> "Saver":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            self.wait()
        except Exception as e:
            if exc_type is None:
                raise
            self.log(f"the checkpoint being written was lost too: {e}")  # the run's own error goes on
        finally:
            if self._writer is not None:
                self._writer.close()


# Optimizer group fields that say how a step runs, not what it computes.
IMPLEMENTATION_FLAGS = ("fused", "foreach", "capturable")


def restore_training_state(
    checkpoint: dict, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, streams: dict, path, dist_info
) -> tuple[int, float]:
    """Load the optimizer, scaler, data positions and this rank's RNG from a checkpoint and
    return (iter_num, best_val_loss). nanoGPT's checkpoints lack the last three: the streams
    restart. The data positions are global, so any world size that divides the batch resumes;
    the RNG (dropout masks) continues exactly only on the world size that saved it."""
    _check_resumable(checkpoint, path)
    saved = checkpoint.get("optimizer")
    groups = saved.get("param_groups") if isinstance(saved, dict) else None
    if not (isinstance(groups, list) and all(isinstance(g, dict) for g in groups) and isinstance(saved.get("state"), dict)):
        raise CheckpointError(f"{path}: its 'optimizer' entry is not an optimizer state_dict "
                              "(a dict of 'state' and a list of 'param_groups')")
    if (saved_kind := optimizer_kind(saved)) != (kind := optimizer_kind(optimizer)):
        raise CheckpointError(f"{path} was trained with optimizer={saved_kind!r}, and this run has optimizer={kind!r}; "
                              f"resume with --optimizer={saved_kind}, or start a new run in another --out_dir")
    # How the optimizer runs is this run's choice, not the saved one's: torch's loader takes each
    # group's flags from the file, so a checkpoint of TritonAdamW (fused=None) would turn torch's
    # fused kernel off. The live flags go into the file's groups before loading, so the loader
    # also places the step counters where they will be used.
    chosen = [{k: g[k] for k in IMPLEMENTATION_FLAGS if k in g} for g in optimizer.param_groups]
    saved = {**saved, "param_groups": [{**g, **flags} for g, flags in zip(groups, chosen)] + groups[len(chosen):]}
    try:
        optimizer.load_state_dict(saved)
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path}: its optimizer state does not fit this model: {e}") from e
    if checkpoint.get("scaler"):  # absent in nanoGPT's checkpoints, empty from a disabled (bf16/fp32) scaler
        scaler.load_state_dict(checkpoint["scaler"])
    for name, state in checkpoint.get("data", {}).items():
        if name in streams:
            streams[name].load_state_dict(state)
    rng = checkpoint.get("rng")
    if isinstance(rng, dict):  # saved by a single process
        rng = [rng]
    if rng and len(rng) == dist_info.world_size:
        set_rng_state(rng[dist_info.rank])
    else:  # another world size: a fresh, still rank-distinct and reproducible dropout stream
        key = [checkpoint.get("config", {}).get("seed", 0), dist_info.rank, checkpoint["iter_num"]]
        torch.manual_seed(int(np.random.SeedSequence(key).generate_state(1)[0]))
    return checkpoint["iter_num"], float(checkpoint["best_val_loss"])


def _check_resumable(checkpoint: dict, path) -> None:
    """Refuse, naming the key, a checkpoint whose training-state entries are not what a resume reads."""
    def wrong(key: str, want: str) -> CheckpointError:
        return CheckpointError(f"{path}: its {key!r} entry is missing or not {want}; resume from a checkpoint "
                               "fastgpt or nanoGPT wrote, or start with --init_from=scratch")

    if not isinstance(checkpoint.get("iter_num"), int) or checkpoint["iter_num"] < 0:
        raise wrong("iter_num", "an iteration count")
    best = checkpoint.get("best_val_loss")  # nanoGPT saves it as a 0-d tensor
    if not (isinstance(best, (int, float)) or (isinstance(best, torch.Tensor) and best.numel() == 1)):
        raise wrong("best_val_loss", "a number")
    data = checkpoint.get("data", {})
    if not (isinstance(data, dict) and all(isinstance(v, dict) for v in data.values())):
        raise wrong("data", "a dict of batch-stream states")
    rng = checkpoint.get("rng")
    ranks = [rng] if isinstance(rng, dict) else rng
    if rng is not None and not (isinstance(ranks, list) and all(
            isinstance(r, dict) and isinstance(r.get("torch"), torch.Tensor) for r in ranks)):
        raise wrong("rng", "a list of each rank's generator states")


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        states = cuda_states_to_restore(state["cuda"], torch.cuda.device_count())
        torch.cuda.set_rng_state_all([s.cpu() for s in states])


def cuda_states_to_restore(saved: list, device_count: int) -> list:
    """The saved per-GPU generator states that this machine has GPUs for, in device order: a
    checkpoint saved where more GPUs were visible carries states for devices that are not here
    (set_rng_state_all fails on them); with fewer saved, the other GPUs keep their seeded state."""
    return list(saved[:device_count])
