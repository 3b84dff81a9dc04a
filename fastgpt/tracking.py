"""Optional experiment tracking with Weights & Biases (nanoGPT's `wandb_log` fields)."""

from __future__ import annotations

from fastgpt.config import ConfigError


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
