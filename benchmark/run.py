"""The Hydra entry point: compose -> validate -> harvest (cached) -> train -> evaluate -> write.

    python -m benchmark.run site=mlp sae=gated sparsity=l0_40 train=cpu
    python -m benchmark.run -m sae=jumprelu,gated,topk sparsity=l0_20,l0_40,l0_80
    python -m benchmark.run -m +experiment=quickstart

Owns the order of the stages and the run folder; every `_target_` lives in conf/, not here.
A run's folder is named by its config (benchmark/identity.py), single run or sweep job alike.
A folder that already holds a complete result.json of the same config is skipped (so an
interrupted sweep, re-launched with the same command, resumes where it stopped; a result from
other code is reused with a warning); `rerun=true` re-runs it and keeps the old result beside
the new. Training checkpoints (train.checkpoint_every) resume a killed run in the same folder.
Every check that needs no model or data (`plan_run`, `check_writable`) runs before the first
heavy step. A user error prints one line (`error: ...`) and exits with status 2, whether the
suite finds it (ConfigError) or Hydra does before the job (`sae=nope`, a bad override: `cli`,
benchmark/cli_errors.py); a bug keeps its traceback and status 1. HYDRA_FULL_ERROR=1 shows
every traceback.
"""

from __future__ import annotations

import logging
import os
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from baselines.base import SparseAutoencoder
from baselines.foreign import source_of, suite_node
from benchmark import activations, cli_errors, data, identity, models
from benchmark.errors import ConfigError
from benchmark.evaluate import activation_metrics, evaluate_sae
from benchmark.fileio import DiskFullError
from benchmark.hub import check_sources
from benchmark.metrics import METRICS_VERSION, definitions
from benchmark.results import ResultRecord, git_commit, provenance, read_result, write_result
from benchmark.saes import build_sae, load_sae, sae_node, save_sae
from benchmark.train import Sparsity, TrainConfig, TrainResult, train_sae, write_history
from benchmark.validate import check_run, dictionary_size, evaluate_only, site_width

log = logging.getLogger("benchmark.run")
CHOICE_GROUPS = ("model", "layer", "site", "sae", "sparsity", "data", "train", "eval")


class LazyModel:
    """Loads the model on first use, so a run whose activations are cached loads it only for
    the spliced evaluation. Jobs that share a process (the basic launcher runs a sweep in one
    process) share one loaded model per (model config, device, cache_dir)."""

    _loaded: dict[str, Any] = {}

    def __init__(self, cfg: DictConfig, device: torch.device) -> None:
        self.cfg, self.device = cfg, device
        model = OmegaConf.to_yaml(cfg.model, resolve=True)
        self.key = f"{model}|{device}|{cfg.cache_dir}"

    def __call__(self):
        if self.key not in self._loaded:
            self._loaded.clear()  # at most one model in memory
            self._loaded[self.key] = models.load_model(
                self.cfg.model, self.device, self.cfg.cache_dir
            )
        return self._loaded[self.key]


def stage(name: str, out: Path) -> None:
    """One line per stage, so a sweep's log shows which job is where and for how long."""
    log.info("[%s] %s", out.name, name)


@dataclass
class Plan:
    """Everything a run needs that can be built and checked in a second, before any model,
    data or training work: a bad value anywhere fails here, not after the harvest."""

    train: TrainConfig | None  # None: evaluate-only (train=none)
    sparsity: Sparsity | None
    sae: SparseAutoencoder
    node: DictConfig  # the resolved SAE node (saved beside the weights)
    d_in: int
    d_sae: int
    config_hash: str
    curve_hash: str


def plan_run(cfg: DictConfig) -> Plan:
    check_run(cfg)
    d_in = site_width(cfg)
    hashes = identity.config_hash(cfg), identity.curve_hash(cfg)
    if evaluate_only(cfg):  # a released or foreign SAE: sizes and sparsity come from its file
        sae = build_sae(cfg.sae, d_in, d_sae=None)
        node = OmegaConf.create(suite_node(sae))
        return Plan(None, None, sae, node, d_in, sae.d_sae, *hashes)
    train_cfg = TrainConfig.from_dict(OmegaConf.to_container(cfg.train, resolve=True))  # type: ignore[arg-type]
    sparsity = Sparsity(cfg.sparsity.mode, cfg.sparsity.get("target_l0"))
    d_sae = dictionary_size(cfg, d_in)
    # The seed is set right before the SAE is built, so its initial weights do not depend on
    # whether this run harvested (or on anything else that draws random numbers first).
    torch.manual_seed(int(cfg.seed))
    sae = build_sae(cfg.sae, d_in, d_sae)
    return Plan(train_cfg, sparsity, sae, sae_node(cfg.sae, d_in, d_sae), d_in, d_sae, *hashes)


@dataclass
class Trained:
    """What the training stage hands on (the SAE is trained and scale-folded in place)."""

    result: TrainResult | None  # None: evaluate-only
    norm_scale: float
    activation_cache: str
    logger: Any = None  # finished once the result is written


def train_stage(cfg: DictConfig, plan: Plan, model: LazyModel, out: Path) -> Trained:
    sae = plan.sae
    if plan.train is None or plan.sparsity is None:  # evaluate-only: raw activations, no scale
        save_sae(sae, out, plan.node)
        return Trained(None, 1.0, "")
    stage("activations", out)
    store = activations.get_activation_store(model, cfg, split="train")
    if store.d_in != plan.d_in:
        raise ConfigError(
            f"site={cfg.site.name}: the activations have width {store.d_in} but the model "
            f"config says {plan.d_in} (model.d_model / n_heads * d_head)"
        )
    stage(f"train {type(sae).__name__} d_in={plan.d_in} d_sae={plan.d_sae}", out)
    logger = instantiate(cfg.logger)
    logger.start(OmegaConf.to_container(cfg, resolve=True), out.name, str(out))
    batch_size = plan.train.batch_size

    def batches(skip: int):
        it = store.batches(batch_size, seed=int(cfg.seed))
        for _ in range(skip):  # resume: the same seeded stream, fast-forwarded
            next(it)
        return it

    result = train_sae(
        sae, batches, plan.train, plan.sparsity, checkpoint_path=out / "checkpoint.pt",
        log=logger.log, progress=cfg.get("progress", True),
    )  # fmt: skip
    write_history(out / "history.csv", result.history)
    sae.fold_scale(store.norm_scale)
    save_sae(sae, out, plan.node)
    return Trained(result, store.norm_scale, str(store.key), logger)


def run(cfg: DictConfig, out: Path, choices: dict[str, Any]) -> ResultRecord:
    t_start = time.perf_counter()
    plan = plan_run(cfg)
    check_sources(cfg)  # hub sources: available offline or reachable, in seconds
    device = models.resolve_device(cfg.device)
    out.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, out / "config.yaml", resolve=True)
    model = LazyModel(cfg, device)
    # The hook is checked against the loaded model's hook names on every run (a cache hit
    # too); the model is needed for the spliced evaluation anyway.
    hook = models.hook_name(cfg.model, int(cfg.layer.index), cfg.site, bridge=model())
    plan.sae.to(device)
    trained = train_stage(cfg, plan, model, out)

    stage("evaluate", out)
    eval_store, act_metrics, freq = activation_stage(cfg, plan.sae, model, device)
    np.save(out / "firing_frequency.npy", freq.numpy())
    lm_metrics = evaluate_stage(cfg, plan.sae, model(), hook, device)
    metrics = {**act_metrics, **lm_metrics}
    record = build_record(
        cfg, plan, trained, out, choices, hook, device, metrics, str(eval_store.key)
    )
    record.wall_seconds = time.perf_counter() - t_start  # the whole run, record included
    write_result(out, record)
    m = record.metrics
    log.info(
        "[%s] done in %.0fs: l0=%.1f fvu=%.4f delta_lm_loss=%.4f frac_dead=%.4f (%d held-out tokens)",
        out.name, record.wall_seconds, m["l0"], m["fvu"], m["delta_lm_loss"], m["frac_dead"],
        m["n_activation_tokens"],
    )  # fmt: skip
    _after_result(out, trained.logger, m)
    return record


def build_record(
    cfg: DictConfig, plan: Plan, trained: Trained, out: Path, choices: dict[str, Any],
    hook: str, device: torch.device, metrics: dict[str, Any], eval_activation_cache: str,
) -> ResultRecord:  # fmt: skip
    """The result record of a finished run (wall_seconds is set by the caller last)."""
    t, sp, sae = trained.result, plan.sparsity, plan.sae
    source = source_of(sae)
    if source and source.get("hook_name") not in (None, hook):
        log.warning("[%s] %s was trained at %s, evaluated at %s", out.name,
                    source.get("path"), source.get("hook_name"), hook)  # fmt: skip
    coefficient_mode = sp is not None and sp.mode == "coefficient"
    return ResultRecord(
        run_id=out.name,
        config_hash=plan.config_hash,
        curve_hash=plan.curve_hash,
        status="complete",
        experiment=cfg.experiment_name,
        model=cfg.model.name,
        layer=int(cfg.layer.index),
        layer_name=str(choices.get("layer") or cfg.layer.name),
        site=cfg.site.name,
        hook=hook,
        sae=str(choices.get("sae") or type(sae).__name__),
        sparsity=identity.sparsity_label(cfg) if sp is not None else "given",
        sparsity_mode=sp.mode if sp is not None else "given",
        target_l0=sp.target_l0 if sp is not None else None,
        sparsity_coefficient=cfg.sparsity.get("coefficient") if coefficient_mode else None,
        coefficient=t.coefficient if t is not None and sae.coefficient else None,
        seed=int(cfg.seed),
        d_in=plan.d_in,
        d_sae=plan.d_sae,
        norm_scale=trained.norm_scale,
        activation_cache=trained.activation_cache,
        activation_source="stream" if cfg.data.get("stream") else "cache",
        eval_activation_cache=eval_activation_cache,
        metrics_version=METRICS_VERSION,
        metric_definitions=definitions(),
        metrics={**metrics, "train_frac_dead": t.final_frac_dead if t is not None else None},
        dead_window_tokens=t.dead_window_tokens if t is not None else None,
        train_l0=t.train_l0 if t is not None else None,
        train_tokens=t.tokens if t is not None else 0,
        train_seconds=t.seconds if t is not None else 0.0,
        train_tokens_per_s=t.tokens_per_s if t is not None else None,
        peak_memory_mb=t.peak_memory_mb if t is not None else None,
        wall_seconds=0.0,
        resumed_from_step=t.resumed_from_step if t is not None else 0,
        choices=choices,
        config=OmegaConf.to_container(cfg, resolve=True),  # type: ignore[arg-type]
        run_dir=str(out),
        history_file="history.csv" if t is not None else None,
        sae_source=source,
        provenance=provenance(device),
    )


def _after_result(out: Path, logger: Any, metrics: dict[str, Any]) -> None:
    """Clean-up once result.json is written. Nothing here may turn a finished run into a failed
    one: a failure is logged as a warning and the complete record stays."""
    try:
        (out / "checkpoint.pt").unlink(missing_ok=True)  # the weights are saved; free the space
        if logger is not None:
            logger.finish(metrics)
    except Exception as e:  # noqa: BLE001
        log.warning("[%s] after the result was written: %s: %s", out.name, type(e).__name__, e)


def activation_stage(cfg: DictConfig, sae, model: Any, device: torch.device):
    """L0, FVU and firing frequencies on eval.n_activation_tokens held-out activations (the
    eval split's activation cache, harvested once per site and shared by every SAE)."""
    n_tokens = int(cfg.eval.n_activation_tokens)
    store = activations.get_activation_store(model, cfg, split="eval", n_tokens=n_tokens)
    batches = store.batches(
        int(cfg.eval.activation_batch_size), seed=0, epochs=1, normalise=False, shuffle=False
    )
    metrics, freq = activation_metrics(
        sae.eval(), batches, device, total=store.n_tokens, progress=cfg.get("progress", True)
    )
    return store, metrics, freq


def evaluate_stage(cfg: DictConfig, sae, lm, hook: str, device: torch.device):
    """The LM metrics of a trained (scale-folded) SAE on the LM set of the held-out split."""
    tokens = data.eval_windows(cfg, lm.tokenizer).to(device)
    mask = data.non_special_mask(tokens, lm.tokenizer)
    return evaluate_sae(
        lm, sae.eval(), tokens, mask, hook, batch_size=int(cfg.eval.batch_size),
        cache_dir=cfg.cache_dir, model_key=activations.model_key(cfg), kl_div=bool(cfg.eval.kl_div),
        progress=cfg.get("progress", True),
    )  # fmt: skip


def reevaluate(run_dir: str | Path, device: str = "auto") -> dict[str, float | None]:
    """Reload a finished run's SAE and config and evaluate it again (same metrics, exactly)."""
    run_dir = Path(run_dir)
    cfg = OmegaConf.load(run_dir / "config.yaml")
    assert isinstance(cfg, DictConfig)
    dev = models.resolve_device(device)
    sae = load_sae(run_dir, dev)
    hook = models.hook_name(cfg.model, int(cfg.layer.index), cfg.site)
    lm = models.load_model(cfg.model, dev, cfg.cache_dir)
    _, act_metrics, _ = activation_stage(cfg, sae, lm, dev)
    return {**act_metrics, **evaluate_stage(cfg, sae, lm, hook, dev)}


def check_folder(cfg: DictConfig, out: Path) -> dict[str, Any] | None:
    """The complete result already in `out` for this config, or None (run it).

    A folder holding a result or a checkpoint of a *different* config (possible only when the
    user points hydra.run.dir somewhere by hand: folder names carry the config hash) is never
    reused: ConfigError names the differing keys. A result from other code (git commit) is
    reused with a warning; `rerun=true` recomputes it.
    """
    if cfg.get("rerun", False):
        return None
    mine = identity.identity_dict(cfg)
    done = read_result(out)
    saved = OmegaConf.load(out / "config.yaml") if (out / "config.yaml").exists() else None
    theirs = identity.identity_dict(saved) if isinstance(saved, DictConfig) else None
    if theirs is not None and theirs != mine:
        diff = "; ".join(identity.diff_keys(theirs, mine)[:6])
        raise ConfigError(
            f"{out} holds a run of a different config ({diff}); use another results_dir or "
            "experiment_name, or delete that folder"
        )
    if not (done and done.get("status") == "complete"):
        return None
    commit, dirty = git_commit()
    if done.get("git_commit") != commit or done.get("git_dirty") or dirty:
        log.warning(
            "[%s] already complete, computed by code %s%s (now %s%s): reused; rerun=true "
            "recomputes it", out.name, str(done.get("git_commit"))[:10],
            "+changes" if done.get("git_dirty") else "", commit[:10], "+changes" if dirty else "",
        )  # fmt: skip
    else:
        log.info("[%s] already complete, skipped (rerun=true to run it again)", out.name)
    return done


def record_failure(out: Path, e: BaseException, choices: dict[str, Any], cfg: DictConfig) -> None:
    """A failed record with the traceback, unless a complete one is already there: a finished
    run is never turned into a failed one by something that broke after it was written."""
    done = read_result(out)
    if done and done.get("status") == "complete":
        return
    write_result(out, {
        "run_id": out.name, "status": "failed", "error": f"{type(e).__name__}: {e}",
        "traceback": traceback.format_exc(), "choices": choices, "run_dir": str(out),
        "config": OmegaConf.to_container(cfg, resolve=False),
    })  # fmt: skip


def check_writable(cfg: DictConfig) -> None:
    """results_dir and cache_dir are folders this process can create and write in; checked
    before any model, data or training work (ConfigError names the key and the path)."""
    for key in ("results_dir", "cache_dir"):
        path = Path(str(cfg[key]))
        if path.exists() and not path.is_dir():
            raise ConfigError(f"{key}={path}: is a file, not a folder")
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ConfigError(
                f"{key}={path}: cannot create this folder ({e.strerror or e})"
            ) from None
        if not os.access(path, os.W_OK | os.X_OK):
            raise ConfigError(f"{key}={path}: this folder is not writable")


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    hc = HydraConfig.get()
    out = Path(hc.runtime.output_dir)
    choices = {g: hc.runtime.choices.get(g) for g in CHOICE_GROUPS}
    try:
        check_writable(cfg)
        done = check_folder(cfg, out)
        if done is not None:
            return done.get("delta_lm_loss")
        return run(cfg, out, choices).metrics["delta_lm_loss"]
    except (ConfigError, DiskFullError) as e:  # a user error: one line, exit 2, no traceback
        if cli_errors.debug():  # HYDRA_FULL_ERROR=1: the full traceback instead
            raise
        cli_errors.fail(str(e))
    except Exception as e:
        record_failure(out, e, choices, cfg)
        raise


def cli() -> None:
    """`python -m benchmark.run [overrides]`: the Hydra app, where Hydra's own user errors (a
    bad override, an unknown option, group or key, a run folder that cannot be created) end
    like the suite's: one `error: ...` line on stderr and exit status 2 (benchmark.cli_errors).
    Bugs keep their traceback and status 1; HYDRA_FULL_ERROR=1 shows every traceback."""
    with cli_errors.one_line_errors():
        main()


if __name__ == "__main__":
    cli()
