"""One flat result.json per run, written atomically, with full provenance.

Owns: the result record's provenance fields (git commit, time, package versions, device) and
its on-disk form. A finished run's folder holds result.json, sae.safetensors + sae_config.yaml
(normalisation folded in), firing_frequency.npy and config.yaml (the resolved config).
Must not know how metrics are computed; it stores what it is given.
"""

from __future__ import annotations

import json
import math
import os
import platform
import subprocess
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


def write_result(run_dir: str | Path, record: dict[str, Any]) -> Path:
    """Write result.json atomically. An existing one is never overwritten silently: it is kept
    as result.<its time>.json and the new record names it under "replaces"."""
    path = Path(run_dir) / RESULT
    old = read_result(run_dir)
    if path.exists():
        stamp = (old or {}).get("time") or datetime.now(timezone.utc).isoformat()
        kept = path.with_name(f"result.{stamp.replace(':', '')}.json")
        os.replace(path, kept)
        record = {**record, "replaces": kept.name}
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_json_atomic(path, _jsonable(record))
