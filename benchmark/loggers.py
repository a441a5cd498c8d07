"""Experiment trackers. `logger=none` (default) or `logger=wandb`.

Owns: sending the resolved config, the training rows and the final metrics to a tracker.
Must not know the trainer's internals or the data; the runner calls start / log / finish.
"""

from __future__ import annotations

from typing import Any


class NullLogger:
    """Logs nothing: the result JSON and the progress bar carry everything."""

    def start(self, config: dict[str, Any], run_name: str, run_dir: str) -> None:
        pass

    def log(self, row: dict[str, float], step: int) -> None:
        pass

    def finish(self, metrics: dict[str, Any]) -> None:
        pass


class WandbLogger(NullLogger):
    """Weights & Biases. With mode="offline" (or WANDB_MODE=offline) it needs no network; the
    run is written under <run_dir>/wandb and can be uploaded later with `wandb sync`."""

    def __init__(
        self,
        project: str = "jumprelu-bench",
        entity: str | None = None,
        mode: str = "online",
        tags: list[str] | None = None,
    ) -> None:
        if mode not in ("online", "offline", "disabled"):
            raise ValueError(f"logger.mode must be online, offline or disabled, got {mode!r}")
        self.project, self.entity, self.mode, self.tags = project, entity, mode, list(tags or [])
        self.run: Any = None

    def start(self, config: dict[str, Any], run_name: str, run_dir: str) -> None:
        import wandb

        self.run = wandb.init(
            project=self.project,
            entity=self.entity,
            mode=self.mode,  # type: ignore[arg-type]
            name=run_name,
            dir=run_dir,
            config=config,
            tags=self.tags,
            reinit="finish_previous",
        )

    def log(self, row: dict[str, float], step: int) -> None:
        if self.run is not None:
            self.run.log({f"train/{k}": v for k, v in row.items()}, step=step)

    def finish(self, metrics: dict[str, Any]) -> None:
        if self.run is not None:
            self.run.summary.update({f"eval/{k}": v for k, v in metrics.items()})
            self.run.finish()
            self.run = None
