"""Train a GPT on one process (CPU, CUDA or MPS) or many (DDP under torchrun).

    python -m fastgpt.train                                   # configs/shakespeare_char.py
    python -m fastgpt.train configs/shakespeare_char.py --max_iters=500 --device=cpu
    python -m fastgpt.train configs/shakespeare_char.py --init_from=resume
    torchrun --max-restarts=3 --nproc_per_node=8 -m fastgpt.train configs/owt.py --init_from=auto
    python -m fastgpt.train configs/shakespeare_char.py --profile     # a few steps under torch.profiler
    torchrun --standalone --nproc_per_node=8 -m fastgpt.train configs/owt.py
    python -m fastgpt.train --help                            # every field, its default and why

A config file holds plain assignments of TrainConfig fields (nanoGPT's names); `--key=value`
overrides it. Checkpoints land in out_dir/ckpt.pt at each evaluation (the keep_checkpoints newest
also as ckpt-ITER.pt), the run's record in out_dir/run.json, every log line and evaluation in
out_dir/metrics.jsonl, and a picture of the losses in out_dir/loss.png at the end. SIGTERM or
Ctrl-C finishes the step, saves a checkpoint and exits 0; init_from='auto' resumes from it.
"""

from __future__ import annotations

import contextlib
import math
import pathlib
import sys
import time
from dataclasses import dataclass

import torch

from fastgpt import checkpoint as ckpt_io
from fastgpt import distributed
from fastgpt.config import ConfigError, TrainConfig, help_text, load_config
from fastgpt.corpora import ensure_dataset
from fastgpt.data import DataError, Prefetcher, open_tokens, run_streams
from fastgpt.metrics import MetricsLog, ThroughputMeter, describe_peak, elapsed_before, host_summary, peak_flops
from fastgpt.ops import KernelChoiceError, check_head_shapes, choose_ops, tag_compile_caches
from fastgpt.optim import clip_and_step, get_lr, make_optimizer, set_lr
from fastgpt.plot import save_plot
from fastgpt.pretrained import PretrainedError
from fastgpt.profiling import StepProfiler
from fastgpt.rundir import RunDirError, begin_run, check_free_space, check_writable, run_record
from fastgpt.runtime import (RuntimeConfigError, autocast, compiles, configure_backends, grad_scaler, resolve_device,
                             resolve_dtype)
from fastgpt.start import adopt_shape, build_model, resolve_start
from fastgpt.start import describe as describe_start
from fastgpt.stopping import LossWatch, NonFiniteLossError, StopSignal, StopVote
from fastgpt.tokenizer import dataset_vocab_size
from fastgpt.tracking import RunReport, Tracker

# The default recipe ships in the repository's configs/; from an installed copy without it, the
# same relative path is looked up in the working directory.
DEFAULT_CONFIG_NAME = pathlib.Path("configs") / "shakespeare_char.py"
DEFAULT_CONFIG = pathlib.Path(__file__).resolve().parent.parent / DEFAULT_CONFIG_NAME
USAGE = "usage: python -m fastgpt.train [CONFIG.py] [--profile] [--debug] [--key=value ...]"
# Errors a user can fix from the message alone: printed as one line, exit status 2 (--debug: the traceback).
USER_ERRORS = (ConfigError, DataError, ckpt_io.CheckpointError, RuntimeConfigError, KernelChoiceError, RunDirError,
               PretrainedError, distributed.LaunchError, FileNotFoundError)
# A run that diverged: one line, and a status a scheduler can tell from a crash.
DIVERGED_EXIT = 3


def parse_args(argv: list[str]) -> tuple[str | None, list[str]]:
    if any(a in ("-h", "--help") for a in argv):
        print(f"{USAGE}\n\nWith no CONFIG, runs {DEFAULT_CONFIG_NAME}. --profile: a few training steps under torch.profiler")
        print("(profile_wait/_warmup/_active), traces in out_dir/profile/, a summary of where the time went, no checkpoint.")
        print("--debug: show the traceback behind an error message.")
        print("Fields (--key=value; a config file assigns the same names). The defaults shown are nanoGPT's")
        print(f"GPT-2 124M recipe; a config file, including the default one, overrides them:\n{help_text()}")
        raise SystemExit(0)
    argv = ["--profile=True" if a == "--profile" else a for a in argv]
    paths = [a for a in argv if not a.startswith("--")]
    if len(paths) > 1:
        raise ConfigError(f"expected at most one config file, got {paths}; {USAGE}")
    overrides = [a for a in argv if a.startswith("--")]
    if paths:
        return paths[0], overrides
    return str(DEFAULT_CONFIG if DEFAULT_CONFIG.is_file() else DEFAULT_CONFIG_NAME), overrides


@torch.no_grad()
def estimate_loss(model: torch.nn.Module, batches: dict[str, Prefetcher], eval_iters: int, ctx, dist_info) -> dict[str, float]:
    """Mean loss over eval_iters batches of each split per rank, averaged over ranks, in eval
    mode (no dropout)."""
    model.eval()
    out = {}
    for split, stream in batches.items():
        losses = torch.zeros(eval_iters)
        for i in range(eval_iters):
            x, y = next(stream)
            with ctx:
                _, loss = model(x, y)
            losses[i] = loss.item()  # CPU-GPU sync, once per eval batch
        out[split] = distributed.mean_over_ranks(losses.mean().item(), dist_info, x.device)
    model.train()
    return out


@dataclass
class TrainResult:
    iter_num: int  # optimizer steps taken, in all
    losses: dict[str, float]  # the last evaluation's mean loss per split ({} if none ran)
    best_val_loss: float
    history: dict[str, list]  # 'train': (iter, loss) at log steps; 'eval': (iter, train, val)
    model: torch.nn.Module  # the uncompiled, unwrapped model


def train(cfg: TrainConfig) -> TrainResult:
    """Run the training loop. Background threads stop on return and on error; the process group
    (if any) is main()'s to release."""
    with contextlib.ExitStack() as cleanup:
        return _train(cfg, cleanup)


def _train(cfg: TrainConfig, cleanup: contextlib.ExitStack) -> TrainResult:
    # ---------------------------------------------------------------- runtime
    dist_info, device = distributed.setup(resolve_device(cfg.device), cfg.backend, cfg.ddp_timeout)
    log = print if dist_info.is_master else (lambda *args, **kwargs: None)
    micro_steps = distributed.micro_steps_per_rank(cfg.gradient_accumulation_steps, dist_info)
    dtype = resolve_dtype(cfg.dtype, device)
    op_choices = choose_ops(cfg.kernels, device, cfg.kernel_overrides())
    configure_backends(device)
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    ctx = autocast(device, dtype)
    tracker = Tracker(cfg.wandb_log and dist_info.is_master, cfg.wandb_project, cfg.wandb_run_name, cfg.to_dict())
    if dist_info.is_master:  # before the data and the model, so an unwritable out_dir fails in seconds
        check_writable(cfg.out_dir)
        ckpt_io.remove_stale_temporaries(cfg.out_dir)  # from a save that a kill cut short
    host = host_summary()
    log(f"host: {host}")
    if warning := distributed.restart_warning():
        log(warning)
    log(f"config: {cfg.to_dict()}")
    log(f"device {device}, autocast {str(dtype).removeprefix('torch.')}, {op_choices.ops.name} kernels, "
        f"{dist_info.world_size} rank(s)")

    # ---------------------------------------------------------------- data
    data_dir = pathlib.Path(cfg.data_root) / cfg.dataset
    distributed.rank_zero_first(dist_info, lambda: ensure_dataset(cfg.dataset, data_dir))
    vocab_size = cfg.vocab_size or dataset_vocab_size(data_dir)
    start = resolve_start(cfg, vocab_size)  # a new model, a checkpoint or GPT-2: its shape wins
    if taken := describe_start(start):
        log(taken)
    cfg = adopt_shape(cfg, start.model_args)
    tokens_per_iter = cfg.gradient_accumulation_steps * cfg.batch_size * cfg.block_size  # over all ranks
    splits = {s: open_tokens(data_dir / f"{s}.bin", vocab_size, cfg.block_size) for s in ("train", "val")}
    streams = run_streams(splits, cfg.batch_size, cfg.block_size, cfg.seed, dist_info.rank, dist_info.world_size, device)
    for stream in streams.values():
        cleanup.callback(stream.close)
    train_batches, eval_batches = streams["train"], {"train": streams["train_eval"], "val": streams["val_eval"]}

    # ---------------------------------------------------------------- model
    model_args, checkpoint = start.model_args, start.checkpoint
    check_head_shapes(op_choices.choices, cfg.batch_size * cfg.block_size, model_args.n_embd, model_args.vocab_size)
    resumed_from = pathlib.Path(start.source) if checkpoint is not None else None
    model = build_model(start, op_choices.ops).to(device)
    log(f"model: {model.num_params() / 1e6:.2f}M parameters, {model_args}; tokens per iteration {tokens_per_iter:,}")
    if dist_info.is_master:
        check_free_space(cfg.out_dir, model.num_params(non_embedding=False))

    # ---------------------------------------------------------------- optimizer
    optimizer = make_optimizer(model, cfg.weight_decay, cfg.learning_rate, (cfg.beta1, cfg.beta2), device.type, op_choices.optimizer)
    scaler = grad_scaler(device, dtype)
    iter_num, best_val_loss = 0, math.inf
    if resumed_from:
        iter_num, best_val_loss = ckpt_io.restore_training_state(checkpoint, optimizer, scaler, streams, resumed_from,
                                                                 dist_info)
        log(f"resumed from {resumed_from} at iteration {iter_num}")
    else:
        torch.manual_seed(cfg.seed + dist_info.rank)  # dropout masks differ across ranks
    start = checkpoint = None  # the optimizer state now lives in the optimizer
    run_info = run_record(cfg.to_dict(), device, dist_info.world_size, host)
    if dist_info.is_master and not (cfg.eval_only or cfg.profile):  # only a run that trains writes to out_dir
        for path, moved in begin_run(cfg.out_dir, run_info, fresh=resumed_from is None):
            log(f"kept the previous run's {path.name} as {moved}")

    # ---------------------------------------------------------------- compile, DDP
    raw_model = model  # checkpoints hold the uncompiled, unwrapped module's state dict
    if compiles(cfg.compile, device):
        log("compiling the model (the first step takes longer)")
        # torch's compile caches know our custom ops by name only: key the graphs by the kernels'
        # code too, or an upgrade reuses a graph built on the old ops. Process-wide, hence here.
        tag_compile_caches()
        model = torch.compile(model)
    model = distributed.wrap(model, dist_info, device)
    peak = peak_flops(device, dtype)
    log(describe_peak(device, dtype, peak))
    flops_per_iter = raw_model.flops_per_token() * tokens_per_iter / dist_info.world_size  # per device

    watch = LossWatch(device) if cfg.on_nonfinite_loss == "stop" else None

    def check_finite() -> None:  # before a NaN-poisoned state is saved or trained on
        if watch:
            watch.check(dist_info.enabled, saver.last_good)

    saver = ckpt_io.Saver(cfg.out_dir, cfg.keep_checkpoints, raw_model, optimizer, scaler, model_args.to_dict(),
                          cfg.to_dict(), streams, run_info, dist_info, before_save=check_finite, last_good=resumed_from)

    def save() -> None:  # a collective: every rank calls it
        if path := saver.save(iter_num, best_val_loss):
            log(f"saved checkpoint to {path}")

    # ---------------------------------------------------------------- the loop
    start_iter, losses, lr = iter_num, {}, cfg.learning_rate
    metrics = cleanup.enter_context(contextlib.closing(MetricsLog(cfg.out_dir, dist_info.is_master and not cfg.profile)))
    metrics.write({"kind": "start", "iter": iter_num, "time": time.time(), "run": run_info})
    report = RunReport(log, metrics, tracker)
    meter = ThroughputMeter(tokens_per_iter, flops_per_iter, peak, cfg.max_iters, cfg.eval_interval, device)
    meter.start(iter_num, elapsed_before(metrics.path, iter_num) if start_iter else 0.0)  # a resume continues the clock
    prof = cleanup.enter_context(StepProfiler(cfg, device, dist_info.rank, cfg.max_iters - iter_num))
    stop = cleanup.enter_context(StopSignal(log))
    stop_vote = StopVote(stop, dist_info.enabled, device)
    while True:
        evaluate = (iter_num % cfg.eval_interval == 0 or iter_num == cfg.max_iters) and not cfg.profile
        if evaluate and not (iter_num == start_iter and start_iter > 0):  # a resumed step was evaluated before saving
            meter.pause()  # keep evaluation out of the timings
            losses = estimate_loss(model, eval_batches, cfg.eval_iters, ctx, dist_info)
            report.evaluation(iter_num, losses, meter.elapsed(), lr)
            if losses["val"] < best_val_loss or cfg.always_save_checkpoint:
                best_val_loss = min(best_val_loss, losses["val"])
                if iter_num > 0:
                    save()
            meter.resume()
        if iter_num >= cfg.max_iters or cfg.eval_only or prof.done:
            break

        lr = get_lr(iter_num, cfg.learning_rate, cfg.warmup_iters, cfg.lr_decay_iters, cfg.min_lr) if cfg.decay_lr else cfg.learning_rate
        set_lr(optimizer, lr)
        for micro_step in range(micro_steps):
            # DDP all-reduces gradients only on the last micro-step; no_sync covers the forward
            # too, which is where DDP decides whether the coming backward synchronises.
            last = micro_step == micro_steps - 1
            with contextlib.nullcontext() if last or not dist_info.enabled else model.no_sync():
                with prof.region("data"), meter.data():
                    x, y = next(train_batches)
                with prof.region("forward"), ctx:
                    _, loss = model(x, y)
                    loss = loss / micro_steps  # the mean over micro-batches (DDP averages over ranks)
                if watch:
                    watch.update(loss, iter_num + 1)  # no sync: the flag stays on the device
                with prof.region("backward"):
                    scaler.scale(loss).backward()
        with prof.region("optimizer"):
            if not clip_and_step(model, optimizer, scaler, cfg.grad_clip, cfg.on_nonfinite_loss == "skip"):
                log(f"iter {iter_num + 1}: gradient norm NaN or inf, step skipped (on_nonfinite_loss='skip')")
        iter_num += 1
        if stop_vote():  # a collective under DDP: every rank stops at the same iteration
            if not cfg.profile:
                save()
            log(f"stopped by {stop.received or 'a signal to another rank'} at iteration {iter_num}; resume with "
                "--init_from=resume (or 'auto')")
            break

        if iter_num % cfg.log_interval == 0 or iter_num == cfg.max_iters:
            check_finite()
            # CPU-GPU sync (waits for the step); under DDP also a collective, for the mean over ranks.
            last_loss = distributed.mean_over_ranks(loss.item() * micro_steps, dist_info, device)
            report.step(meter.tick(iter_num, last_loss, lr))
        prof.step()
    stop_vote.close()
    tracker.close()  # on an exception, wandb's own exit hook closes the run and marks it failed
    log(prof.report() if cfg.profile else meter.summary(iter_num, best_val_loss))
    if dist_info.is_master and not (cfg.profile or cfg.eval_only):
        log(save_plot(metrics.path, pathlib.Path(cfg.out_dir) / "loss.png"))
    return TrainResult(iter_num, losses, best_val_loss, report.history, raw_model)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    debug = "--debug" in argv
    try:
        config_path, overrides = parse_args([a for a in argv if a != "--debug"])
        cfg = load_config(config_path, overrides)
        train(cfg)
    except (*USER_ERRORS, NonFiniteLossError) as e:
        if debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return DIVERGED_EXIT if isinstance(e, NonFiniteLossError) else 2
    finally:
        distributed.teardown()  # on every exit path, so no rank is left waiting on this one
    return 0


if __name__ == "__main__":
    sys.exit(main())
