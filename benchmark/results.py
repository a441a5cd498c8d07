"""One flat result.json per run, written atomically, with full provenance.

Owns: the result record (`ResultRecord`, a typed object written as one flat JSON level with the
metrics at the top), its provenance fields (git commit, time, package versions, device) and its
on-disk form. A finished run's folder holds result.json, sae.safetensors + sae_config.yaml
(normalisation folded in), firing_frequency.npy (on the held-out activation set),
lm_windows.npy (each LM window's clean and spliced CE sums and scored positions:
`benchmark.evaluate.WINDOW_COLUMNS`), history.csv (the training trajectory) and config.yaml (the
resolved config).
Must not know how metrics are computed; it stores what it is given.
"""

from __future__ import annotations

import json
import math
import os
import platform
import subprocess
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from benchmark.fileio import write_json_atomic

RESULT = "result.json"
PACKAGES = (
    "jumprelu-bench", "torch", "transformer-lens", "transformers", "hydra-core", "omegaconf",
    "numpy", "pandas", "safetensors", "gguf",
)  # fmt: skip
REPO = Path(__file__).resolve().parents[1]


def git_commit() -> tuple[str, bool]:
    """(commit, dirty) of the code checkout; ("unknown", False) outside a git checkout."""
    try:
        run = lambda *a: subprocess.run(  # noqa: E731
            ["git", *a], cwd=REPO, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        return run("rev-parse", "HEAD"), bool(run("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return "unknown", False


def package_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda:{device.index or 0} ({torch.cuda.get_device_name(device)})"
    return (
        f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"{torch.get_num_threads()} torch threads)"
    )


def provenance(device: torch.device) -> dict[str, Any]:
    commit, dirty = git_commit()
    return {
        "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "git_commit": commit,
        "git_dirty": dirty,
        "package_versions": package_versions(),
        "device": describe_device(device),
    }


@dataclass
class ResultRecord:
    """What one run wrote. `to_json()` flattens `metrics` into the top level (SAEBench-style)."""

    run_id: str  # the folder name (readable, ends in config_hash[:8])
    config_hash: str  # identity of the config (benchmark.identity): what a table cell is keyed by
    curve_hash: str  # the config without sparsity value and seed: one curve in the report
    status: str  # complete | failed
    experiment: str
    model: str
    layer: int
    layer_name: str
    site: str
    hook: str
    sae: str  # the conf/sae choice
    sparsity: str  # the conf/sparsity choice
    sparsity_mode: str  # target_l0 | coefficient
    target_l0: float | None
    sparsity_coefficient: float | None  # the fixed lambda in coefficient mode
    coefficient: float | None  # the final lambda (calibrated in target_l0 mode)
    seed: int
    d_in: int
    d_sae: int
    norm_scale: float
    activation_cache: str
    activation_source: str  # cache | stream
    eval_activation_cache: str  # the held-out activation set's cache key
    metrics_version: str
    metric_definitions: dict[str, str]
    metrics: dict[str, float | None]  # flattened into the top level on disk
    dead_window_tokens: int | None  # the trainer's window for train_frac_dead (and AuxK)
    train_l0: float | None  # None (and the other train_* fields 0/None): evaluate-only
    train_tokens: int
    train_seconds: float
    train_tokens_per_s: float | None
    peak_memory_mb: float | None
    wall_seconds: float
    resumed_from_step: int  # 0 unless the run resumed from a checkpoint
    choices: dict[str, Any]
    config: dict[str, Any]
    run_dir: str
    history_file: str | None = "history.csv"
    trained_in_group: str | None = None  # fan-out group key, when trained beside other SAEs
    # wall seconds of the run's (or its group's) stages: setup, harvest, train, evaluate
    stage_seconds: dict[str, float] | None = None
    sae_source: dict[str, Any] | None = None  # where a released/foreign SAE's weights came from
    # data.max_norm_multiple: the limits in raw units and the rows left out (None: off)
    norm_filter: dict[str, Any] | None = None
    # the trainer's loss-spike watch (benchmark.train.SPIKE_JUMP): the largest batch-FVU jump
    # over its running average after the lr warm-up, and the first step over the limit
    train_max_fvu_jump: float | None = None
    train_spike_step: int | None = None
    error: str | None = None
    provenance: dict[str, Any] = field(default_factory=dict)  # flattened too

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        return {**d.pop("provenance"), **{k: v for k, v in d.items() if k != "metrics"},
                **self.metrics}  # fmt: skip


def _jsonable(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None  # JSON has no NaN; null reads back as NaN in the report
    if isinstance(v, dict):
        return {k: _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    return v


def read_result(run_dir: str | Path) -> dict[str, Any] | None:
    path = Path(run_dir) / RESULT
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def write_result(run_dir: str | Path, record: dict[str, Any] | ResultRecord) -> Path:
    """Write result.json atomically. An existing *complete* record is never overwritten: it is
    kept as result.<its time>.json and the new record names it under "replaces" (`rerun=true`:
    only a rerun gets this far in a folder with a complete record, benchmark.runchecks.check_folder).
    A failed record is replaced. Callers hold the run folder's lock (benchmark.runfolder.claim)."""
    if isinstance(record, ResultRecord):
        record = record.to_json()
    path = Path(run_dir) / RESULT
    old = read_result(run_dir)
    if path.exists() and old is not None and old.get("status") == "complete":
        stamp = old.get("time") or datetime.now(timezone.utc).isoformat()
        kept = path.with_name(f"result.{stamp.replace(':', '')}.json")
        os.replace(path, kept)
        record = {**record, "replaces": kept.name}
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_json_atomic(path, _jsonable(record))
