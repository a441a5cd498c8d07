"""Loading: every ``result.json`` under a folder -> one tidy runs DataFrame + a problems DataFrame.

Owns the result records as read back from disk, the run identity rules and the tidy frame's
columns. Must not know torch, Hydra or any runner module: a results folder copied from a
cluster is read with pandas alone (``benchmark.metrics`` is pure Python).

Identity, stated once:
- A run is a folder holding ``result.json``, found anywhere below the root; ``run_dir`` is where
  it was found, not the path recorded in it. A folder with ``.hydra/`` and no ``result.json``
  in or below it is a missing run. Failed, malformed, incomplete runs are problems, not fatal.
- A run *is* its ``config_hash`` (``run_id``, the folder name, repeats across experiments).
  The same ``config_hash`` twice: the newest ``time`` is kept, the other is a "duplicate of".
- A curve is its ``curve_hash`` (the config without the swept sparsity value and the seed); a
  point on it is ``point``: the ``target_l0`` in target_l0 mode, the fixed
  ``sparsity_coefficient`` in coefficient mode. ``curve`` is the hash's first 8 characters.
- Old records without the hashes are kept with a fallback (identity: the folder; curve: the
  experiment, model, site, layer, sae, d_sae and sparsity mode) and listed as "old_schema".
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from benchmark.metrics import METRICS

DISPLAY_KEYS = ("model", "site", "layer", "sae", "d_sae")  # what a curve is labelled with
REQUIRED_KEYS = ("model", "site", "layer", "sae", "seed", "l0")
TOKEN_COLUMNS = ("n_activation_tokens", "n_lm_tokens")
_CHOICES = (
    *("model", "layer", "layer_name", "site", "sae", "d_in", "d_sae", "sparsity"),
    *("sparsity_mode", "target_l0", "sparsity_coefficient", "coefficient", "seed"),
)
_COSTS = ("dead_window_tokens", "train_tokens", "train_seconds", "train_tokens_per_s")
_LEFT_OUT = ("max_norm_multiple", "n_left_out", "n_train_left_out")  # data.max_norm_multiple
NUMERIC_COLUMNS = (
    *("layer", "d_in", "d_sae", "target_l0", "sparsity_coefficient", "coefficient", "seed"),
    *METRICS,
    *TOKEN_COLUMNS,
    *_COSTS,
    *_LEFT_OUT,
    "peak_memory_mb",
)
SCHEMA_COLUMNS = (
    *("config_hash", "curve_hash", "curve", "point", "run_id", "experiment", "status", "error"),
    *("time", "git_commit", "git_dirty", "device", "metrics_version", "run_dir", "history_file"),
    *_CHOICES,
    *METRICS,
    *TOKEN_COLUMNS,
    *_COSTS,
    *_LEFT_OUT,
    "peak_memory_mb",
)
PROBLEM_COLUMNS = ("run_dir", "status", "reason")
ORDER = {  # paper order first, anything else after it alphabetically
    "site": ("residual", "mlp", "attention"),
    "sae": ("jumprelu", "gated", "topk", "batchtopk", "matryoshka_batchtopk", "relu"),
}


def load_results(root: str | Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(runs, problems): one row per usable run, one row per run that cannot be used."""
    root = Path(root)
    rows, problems = [], []
    for path in sorted(root.rglob("result.json")):
        row, status, reason = read_record(path)
        if row is None or reason:
            problems.append({"run_dir": str(path.parent), "status": status, "reason": reason})
        if row is not None:
            rows.append(row)
    for hydra in sorted(root.rglob(".hydra")):
        if hydra.is_dir() and next(hydra.parent.rglob("result.json"), None) is None:
            reason = "no result.json (job crashed or still running)"
            problems.append({"run_dir": str(hydra.parent), "status": "missing", "reason": reason})
    runs = tidy(rows)
    runs, duplicates = keep_newest(runs, ["config_hash"], "duplicate of {kept}")
    conflict = "same curve, point and seed as {kept} but another config_hash; re-run"
    runs, conflicts = keep_newest(runs, ["curve_hash", "point", "seed"], conflict)
    problems += duplicates + conflicts + off_target(runs) + spiked(runs)
    return runs, pd.DataFrame(problems, columns=list(PROBLEM_COLUMNS))


OFF_TARGET_TOLERANCE = 0.10  # relative


def off_target(runs: pd.DataFrame) -> list[dict]:
    """Target-L0 runs whose held-out L0 is more than 10% from their target: the calibration
    failed, most often because training diverged or collapsed (a diverged run's FVU and dead
    fraction say which). The run stays a measured point at its own L0, so the curves and claims
    use it; listed, not dropped, so that a reader sees why a curve or an interval looks odd."""
    if runs.empty or "target_l0" not in runs:
        return []
    gap = runs["l0"] / runs["target_l0"] - 1
    bad = runs[runs["target_l0"].notna() & (gap.abs() > OFF_TARGET_TOLERANCE)]
    return warnings(bad, lambda r: (
        f"off target: l0 {r.l0:.1f} vs target_l0 {r.target_l0:g} "
        f"({100 * (r.l0 / r.target_l0 - 1):+.1f}%; {_state(r)}): calibration failed, training "
        "may have diverged"))  # fmt: skip


def spiked(runs: pd.DataFrame) -> list[dict]:
    """Runs whose trainer flagged a loss spike (benchmark.train.SPIKE_JUMP: one batch's FVU
    over 10x the running average after the lr warm-up): the optimiser threw the SAE off its
    solution, most often followed by dead latents. Listed, not dropped."""
    if runs.empty or "train_spike_step" not in runs:
        return []
    bad = runs[pd.to_numeric(runs["train_spike_step"], errors="coerce").notna()]
    return warnings(bad, lambda r: (
        f"loss spike at step {int(r.train_spike_step)} (batch FVU {r.train_max_fvu_jump:.0f}x "
        f"its running average; l0 {r.l0:.1f}, {_state(r)}): training diverged"))  # fmt: skip


def warnings(bad: pd.DataFrame, reason: Callable[[Any], str]) -> list[dict]:
    """problems.csv rows (status "warning") for the runs in ``bad``, each with its reason."""
    return [{"run_dir": r.run_dir, "status": "warning", "reason": reason(r)}
            for r in bad.itertuples()]  # fmt: skip


def _state(r: Any) -> str:
    return f"fvu {r.fvu:.3f}, frac_dead {r.frac_dead:.3f}"


def read_record(path: Path) -> tuple[dict | None, str, str]:
    """(flat scalar fields or None when unusable, status, reason: empty when all is well)."""
    try:
        record = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        return None, "malformed", f"unreadable result.json: {err}"
    if not isinstance(record, dict):
        return None, "malformed", "result.json is not a JSON object"
    status = record.get("status")
    if status == "failed":
        return None, "failed", str(record.get("error") or "failed, no error message")
    if status != "complete":
        return None, str(status), f"unknown status {status!r}"
    missing = [key for key in REQUIRED_KEYS if record.get(key) is None]
    if missing:
        return None, "incomplete", "missing " + ", ".join(missing)
    row = {key: value for key, value in record.items() if not isinstance(value, (dict, list))}
    row["run_dir"] = str(path.parent)
    # what data.max_norm_multiple left out (massive activations): the multiple and the
    # held-out / training rows excluded; absent (NaN) when the run used every token
    norm = record.get("norm_filter")
    norm = norm if isinstance(norm, dict) else {}
    row["max_norm_multiple"] = norm.get("max_norm_multiple")
    row["n_left_out"] = norm.get("held_out_excluded")
    row["n_train_left_out"] = norm.get("train_excluded")
    config = record.get("config")
    row["config_flat"] = json.dumps(flatten(config) if isinstance(config, dict) else {},
                                    sort_keys=True, default=str)  # fmt: skip
    if row.get("config_hash") and row.get("curve_hash"):
        return row, "complete", ""
    return _with_fallback_identity(row), "old_schema", "old schema (no config_hash); re-run"


def flatten(config: dict, prefix: str = "") -> dict[str, object]:
    """A nested config as {dotted key: value} (lists as JSON text): how the figures name the
    variants of one architecture (the keys where two curves' configs differ)."""
    out: dict[str, object] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out |= flatten(value, f"{name}.")
        else:
            out[name] = json.dumps(value) if isinstance(value, list) else value
    return out


def _with_fallback_identity(row: dict) -> dict:
    """An old record's stand-in hashes: never merged with another run, curve per experiment."""
    curve = [row.get(k) for k in ("experiment", *DISPLAY_KEYS)] + [_sparsity_mode(row)]
    return row | {"config_hash": _hash(row["run_dir"]), "curve_hash": _hash(curve)}


def _hash(value: object) -> str:
    return hashlib.sha256(json.dumps(value, default=str).encode()).hexdigest()[:16]


def _sparsity_mode(row: dict) -> str:
    if isinstance(row.get("sparsity_mode"), str):
        return row["sparsity_mode"]
    return "target_l0" if pd.notna(row.get("target_l0")) else "coefficient"


def tidy(rows: list[dict]) -> pd.DataFrame:
    """The schema's columns first (NaN where a run lacks one), numbers as numbers, the point."""
    frame = pd.DataFrame(rows)
    extra = [column for column in frame.columns if column not in SCHEMA_COLUMNS]
    frame = frame.reindex(columns=[*SCHEMA_COLUMNS, *extra])
    for column in NUMERIC_COLUMNS:
        frame[column] = pd.to_numeric(frame[column], errors="coerce")
    if frame.empty:
        return frame
    frame["sparsity_mode"] = [_sparsity_mode(row) for row in frame.to_dict("records")]
    coefficient_mode = frame["sparsity_mode"] == "coefficient"
    fixed = frame["sparsity_coefficient"].fillna(frame["coefficient"])  # old records: final = fixed
    frame["point"] = frame["target_l0"].where(~coefficient_mode, fixed)
    frame["curve"] = frame["curve_hash"].str[:8]
    # a curve's training budget (tokens): one per curve (train.n_tokens is in its hash), so
    # curves of several budgets are compared budget by budget (table 1's best, the claims)
    frame["budget"] = frame.groupby("curve_hash", dropna=False)["train_tokens"].transform("max")
    return frame


def keep_newest(
    runs: pd.DataFrame, keys: list[str], reason: str
) -> tuple[pd.DataFrame, list[dict]]:
    """Of the runs sharing ``keys``, the newest by ``time``; the others as problems."""
    if runs.empty:
        return runs, []
    time = pd.to_datetime(runs["time"], utc=True, errors="coerce", format="ISO8601")
    newest_first = runs.assign(_time=time).sort_values(
        ["_time", "run_dir"], ascending=[False, True], na_position="last", kind="stable"
    )
    dropped = newest_first.duplicated(keys)
    kept = newest_first.groupby(keys, dropna=False)["run_dir"].transform("first")
    problems = [
        {"run_dir": run_dir, "status": "duplicate", "reason": reason.format(kept=kept_dir)}
        for run_dir, kept_dir in zip(newest_first["run_dir"][dropped], kept[dropped])
    ]
    runs = newest_first[~dropped].drop(columns="_time").sort_values("run_dir", kind="stable")
    return runs.reset_index(drop=True), problems


def sort_rows(frame: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """Sorted by ``keys``, sites and architectures in the paper's order."""
    return frame.sort_values(keys, key=_order_key, kind="stable").reset_index(drop=True)


def _order_key(column: pd.Series) -> pd.Series:
    order = ORDER.get(str(column.name))
    if order is None:
        return column
    return column.map(lambda v: f"{order.index(v) if v in order else len(order)}{v}")


def checked_columns(frame: pd.DataFrame, path: str | Path, required: Sequence[str],
                    optional: Sequence[str], tool: str) -> pd.DataFrame:  # fmt: skip
    """`frame` read from a tool's CSV at `path`: ValueError naming the file when a required
    column is missing; each missing optional column added as "" (in place, returned)."""
    missing = [c for c in required if c not in frame]
    if missing:
        raise ValueError(f"{path}: no column {', '.join(missing)} (not a {tool} CSV?)")
    for column in optional:
        if column not in frame:
            frame[column] = ""
    return frame
