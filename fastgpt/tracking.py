"""Where a run's numbers go: rank 0's console, out_dir/metrics.jsonl, the history `train()`
returns, and optionally Weights & Biases (nanoGPT's `wandb_log` fields)."""

from __future__ import annotations

from typing import Callable

from fastgpt.config import ConfigError
from fastgpt.metrics import MetricsLog, format_log_line


class Tracker:
    """Sends metrics to W&B when `wandb_log` is on; does nothing otherwise."""

    def __init__(self, enabled: bool, project: str, run_name: str, config: dict):
        self.run = None
        if not enabled:
            return
        try:
            import wandb
        except ImportError as e:
            raise ConfigError("wandb_log=True needs the wandb package: pip install wandb, or set --wandb_log=False") from e
        self.run = wandb.init(project=project, name=run_name, config=config)

    def log(self, metrics: dict, step: int) -> None:
        if self.run is not None:
            self.run.log(metrics, step=step)

    def close(self) -> None:
        if self.run is not None:
            self.run.finish()


class RunReport:
    """One call per evaluation and per log step sends the numbers everywhere they are kept:
    the log line, metrics.jsonl, the history (iter, loss) / (iter, train, val), and W&B at
    evaluations, as nanoGPT logs it (with the last measured MFU)."""

    def __init__(self, log: Callable[[str], None], metrics: MetricsLog, tracker: Tracker):
        self.log, self.metrics, self.tracker = log, metrics, tracker
        self.history: dict[str, list] = {"train": [], "eval": []}
        self.mfu: float | None = None

    def evaluation(self, iter_num: int, losses: dict[str, float], elapsed_s: float, lr: float) -> None:
        self.log(f"step {iter_num}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}")
        self.history["eval"].append((iter_num, losses["train"], losses["val"]))
        self.metrics.write({"kind": "eval", "iter": iter_num, "train_loss": losses["train"], "val_loss": losses["val"],
                            "elapsed_s": elapsed_s})
        self.tracker.log({"iter": iter_num, "train/loss": losses["train"], "val/loss": losses["val"], "lr": lr,
                          "mfu": self.mfu}, iter_num)

    def step(self, record: dict) -> None:
        """A log step's record, as metrics.ThroughputMeter.tick makes it."""
        self.history["train"].append((record["iter"], record["loss"]))
        self.mfu = record["mfu"]
        self.log(format_log_line(record))
        self.metrics.write(record)
