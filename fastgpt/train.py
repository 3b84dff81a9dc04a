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
also as ckpt-ITER.pt), written by a background thread while training goes on; the run's record in
out_dir/run.json, every log line and evaluation in out_dir/metrics.jsonl, and a picture of the
losses in out_dir/loss.png at the end. SIGTERM or
Ctrl-C finishes the step, saves a checkpoint and exits 0; init_from='auto' resumes from it.
"""

from __future__ import annotations

import contextlib
import pathlib
import sys
from dataclasses import dataclass

import torch

from fastgpt import checkpoint as ckpt_io
from fastgpt import distributed, init_from, outdir
from fastgpt.cli import DEBUG_FLAG, DEBUG_HELP, run_command
from fastgpt.config import ConfigError, TrainConfig, help_text, load_config
from fastgpt.corpora import ensure_dataset
from fastgpt.data import Prefetcher, open_streams
from fastgpt.hardware import (autocast, compiles, configure_backends, describe_peak, grad_scaler, host_summary,
                              peak_flops, resolve_device, resolve_dtype)
from fastgpt.metrics import Reporter, ThroughputMeter, Tracker, elapsed_before
from fastgpt.ops import choose_ops, compile_model
from fastgpt.optim import clip_and_step, make_optimizer, set_lr
from fastgpt.profiling import StepProfiler
from fastgpt.stopping import LossWatch, StopSignal, StopVote
from fastgpt.tokenfiles import data_identity
from fastgpt.tokenizer import dataset_vocab_size

# The default recipe ships in the repository's configs/; from an installed copy without it, the
# same relative path is looked up in the working directory.
DEFAULT_CONFIG_NAME = pathlib.Path("configs") / "shakespeare_char.py"
DEFAULT_CONFIG = pathlib.Path(__file__).resolve().parent.parent / DEFAULT_CONFIG_NAME
USAGE = f"usage: python -m fastgpt.train [CONFIG.py] [--profile] [{DEBUG_FLAG}] [--key=value ...]"


def parse_args(argv: list[str]) -> tuple[str | None, list[str]]:
    if any(a in ("-h", "--help") for a in argv):
        print(f"{USAGE}\n\nWith no CONFIG, runs {DEFAULT_CONFIG_NAME}. --profile: a few training steps under torch.profiler")
        print("(profile_wait/_warmup/_active), traces in out_dir/profile/, a summary of where the time went, no checkpoint.")
        print(f"{DEBUG_FLAG}: {DEBUG_HELP}.")
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
def estimate_loss(model: torch.nn.Module, streams: dict[str, Prefetcher], eval_iters: int, ctx, dist_info) -> dict[str, float]:
    """Mean loss over eval_iters batches of each split per rank, averaged over ranks, in eval mode
    (no dropout). The evaluation streams are not the training one, which they never move."""
    model.eval()
    out = {}
    for split, stream in (("train", streams["train_eval"]), ("val", streams["val_eval"])):
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
    dtype, op_choices = resolve_dtype(cfg.dtype, device), choose_ops(cfg.kernels, device, cfg.kernel_overrides())
    configure_backends(device)
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    ctx = autocast(device, dtype)
    tracker = Tracker(cfg.wandb_log and dist_info.is_master, cfg.wandb_project, cfg.wandb_run_name, cfg.to_dict())
    if dist_info.is_master:
        # Before the data and the model, so a bad or busy out_dir fails in seconds; under torchrun,
        # rank 0 exiting with the error ends the other ranks, as any start-up error does.
        cleanup.callback(outdir.prepare(cfg.out_dir).release)
    record = outdir.run_record(cfg.to_dict(), device, dist_info.world_size, host_summary())
    log_setup(log, record, dtype, op_choices.ops.name)

    # ---------------------------------------------------------------- data, and where the model comes from
    data_dir = pathlib.Path(cfg.data_root) / cfg.dataset
    # Rank 0 prepares the data and hashes it once if no prepare did (cached beside it), then the others read.
    distributed.rank_zero_first(dist_info, lambda: (ensure_dataset(cfg.dataset, data_dir), data_identity(data_dir)))
    identity = data_identity(data_dir)
    vocab_size = cfg.vocab_size or dataset_vocab_size(data_dir)
    init = init_from.resolve(cfg, vocab_size, identity, log)  # a new model, a checkpoint or GPT-2: its shape wins
    cfg = init_from.adopt_shape(cfg, init.model_args)
    streams = open_streams(data_dir, vocab_size, cfg.batch_size, cfg.block_size, cfg.seed, dist_info, device)
    cleanup.callback(lambda: [stream.close() for stream in streams.values()])

    # ---------------------------------------------------------------- model, optimizer, resume
    model = init_from.build_model(init, op_choices, cfg.batch_size, cfg.block_size, cfg.tokens_per_iter, log).to(device)
    optimizer = make_optimizer(model, cfg.weight_decay, cfg.learning_rate, (cfg.beta1, cfg.beta2), device.type, op_choices.optimizer,
                               muon=cfg.muon_settings())
    scaler = grad_scaler(device, dtype)
    iter_num, best_val_loss = init_from.restore_training_state(init, optimizer, scaler, streams, dist_info, cfg.seed, log)
    first_iter, resumed_from = iter_num, init.resumed_from
    if dist_info.is_master and not (cfg.eval_only or cfg.profile):  # only a run that trains writes to out_dir
        outdir.claim(cfg.out_dir, record, resumed_from is None, model.num_params(non_embedding=False), log)
    watch = LossWatch(device, enabled=cfg.on_nonfinite_loss == "stop")
    state = ckpt_io.TrainingState(model, optimizer, scaler, streams, init.model_args.to_model_args(), cfg.to_dict(), record,
                                  identity)
    saver = cleanup.enter_context(ckpt_io.Saver(cfg.out_dir, cfg.keep_checkpoints, state, dist_info, watch, log, resumed_from,
                                                enabled=not cfg.profile, background=cfg.async_save))  # every exit waits for its write

    # ---------------------------------------------------------------- compile, DDP
    raw_model = model  # checkpoints hold the uncompiled, unwrapped module's state dict
    if compiles(cfg.compile, device):
        log("compiling the model (the first step takes longer)")
        model = compile_model(model)
    model = distributed.wrap(model, dist_info, device)
    log(describe_peak(device, dtype, peak := peak_flops(device, dtype)))
    flops_per_iter = raw_model.flops_per_token() * cfg.tokens_per_iter / dist_info.world_size  # per device

    # ---------------------------------------------------------------- the loop
    report = cleanup.enter_context(Reporter(log, tracker, cfg, dist_info.is_master and not cfg.profile, iter_num, record))
    meter = ThroughputMeter(cfg.tokens_per_iter, flops_per_iter, peak, cfg.max_iters, cfg.eval_interval, device)
    meter.begin(iter_num, *(elapsed_before(report.metrics.path, iter_num) if resumed_from else ()))  # a resume continues the clocks
    prof = cleanup.enter_context(StepProfiler(cfg, device, dist_info.rank, cfg.max_iters - iter_num))
    stop_vote, losses, lr = StopVote(cleanup.enter_context(StopSignal(log)), dist_info.enabled, device), {}, cfg.learning_rate
    while True:
        if evaluation_due(iter_num, cfg) and not (resumed_from and iter_num == first_iter):  # evaluated before the save
            with meter.paused():  # keep evaluation out of the timings
                losses = estimate_loss(model, streams, cfg.eval_iters, ctx, dist_info)
                report.evaluation(iter_num, losses, meter, lr, best_val_loss)
                if losses["val"] < best_val_loss or cfg.always_save_checkpoint:
                    best_val_loss = min(best_val_loss, losses["val"])
                    if iter_num > 0:
                        saver.save(iter_num, best_val_loss)  # a collective: every rank calls it
        if iter_num >= cfg.max_iters or cfg.eval_only or prof.done or report.stop:  # report.stop: target_loss reached
            break
        set_lr(optimizer, lr := cfg.lr_at(iter_num))  # warmup + decay (optim.get_lr), or learning_rate without decay_lr
        loss = train_step(model, optimizer, scaler, streams["train"], ctx, micro_steps, cfg, dist_info, watch, prof, meter,
                          iter_num, log)
        iter_num += 1
        if stop_vote():  # a collective under DDP: every rank stops at the same iteration
            saver.save(iter_num, best_val_loss)
            log(stop_vote.message(iter_num))
            break
        if iter_num % cfg.log_interval == 0 or iter_num == cfg.max_iters:
            watch.check(dist_info.enabled, saver.last_good)
            # CPU-GPU sync (waits for the step); under DDP also a collective, for the mean over ranks.
            last_loss = distributed.mean_over_ranks(loss.item() * micro_steps, dist_info, device)
            report.step(meter.tick(iter_num, last_loss, lr))
        prof.step()
    stop_vote.close()
    saver.wait()  # the last checkpoint on disk, and said so, before the summary
    report.finish(prof.report() if cfg.profile else meter.summary(iter_num, best_val_loss), plot=not cfg.eval_only)
    return TrainResult(iter_num, losses, best_val_loss, report.history, raw_model)


def train_step(model, optimizer, scaler, batches, ctx, micro_steps: int, cfg: TrainConfig, dist_info, watch: LossWatch,
               prof: StepProfiler, meter: ThroughputMeter, iter_num: int, log) -> torch.Tensor:
    """One optimizer step: forward and backward over micro_steps micro-batches (the gradients add
    up), then clip and step. Returns the last micro-batch's loss / micro_steps, left on the device."""
    for micro_step in range(micro_steps):
        with distributed.grad_sync(model, micro_step == micro_steps - 1, dist_info):
            with prof.region("data"), meter.data():
                x, y = next(batches)
            with prof.region("forward"), ctx:
                _, loss = model(x, y)
                loss = loss / micro_steps  # the mean over micro-batches (DDP averages over ranks)
            watch.update(loss, iter_num + 1)  # no sync: the flag stays on the device
            with prof.region("backward"):
                scaler.scale(loss).backward()
    with prof.region("optimizer"):
        if not clip_and_step(model, optimizer, scaler, cfg.grad_clip, cfg.on_nonfinite_loss == "skip"):
            log(f"iter {iter_num + 1}: gradient norm NaN or inf, step skipped (on_nonfinite_loss='skip')")
    return loss


def evaluation_due(iter_num: int, cfg: TrainConfig) -> bool:
    """At every eval_interval-th iteration and at the last, as nanoGPT does; never while profiling."""
    return (iter_num % cfg.eval_interval == 0 or iter_num == cfg.max_iters) and not cfg.profile


def log_setup(log, record: dict, dtype: torch.dtype, ops_name: str) -> None:
    log(f"host: {record['host']}")
    if warning := distributed.restart_warning():
        log(warning)
    log(f"config: {record['config']}")
    log(f"device {record['device']}, autocast {str(dtype).removeprefix('torch.')}, {ops_name} kernels, "
        f"{record['world_size']} rank(s)")


def _run(argv: list[str]) -> None:
    config_path, overrides = parse_args(argv)
    train(load_config(config_path, overrides))


def main(argv: list[str] | None = None) -> int:
    try:
        return run_command(_run, argv)
    finally:
        distributed.teardown()  # on every exit path, so no rank is left waiting on this one


if __name__ == "__main__":
    sys.exit(main())
