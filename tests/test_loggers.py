"""logger=wandb works with no network in offline mode; logger=none accepts the same calls."""

from __future__ import annotations

import pytest

from benchmark.loggers import NullLogger, WandbLogger


def test_null_logger_accepts_the_calls():
    log = NullLogger()
    log.start({"a": 1}, "run", "/tmp")
    log.log({"loss": 1.0}, 1)
    log.finish({"fvu": 0.1})


def test_wandb_offline_writes_a_local_run(tmp_path, monkeypatch):
    # wandb is a hard dependency (pyproject.toml): this test must run, never skip.
    import wandb  # noqa: F401

    monkeypatch.setenv("WANDB_SILENT", "true")
    log = WandbLogger(project="test", mode="offline")
    log.start({"sae": {"_target_": "x"}, "seed": 0}, "run-1", str(tmp_path))
    log.log({"loss": 1.5, "l0": 40.0}, step=10)
    log.finish({"fvu": 0.2, "delta_lm_loss": 0.1})
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and any(runs[0].glob("*.wandb"))


def test_wandb_rejects_unknown_mode():
    with pytest.raises(ValueError, match="logger.mode"):
        WandbLogger(mode="cloud")
