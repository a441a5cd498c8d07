"""The Hydra entry point: compose -> validate -> harvest (cached) -> train -> evaluate -> write.

    python -m benchmark.run site=mlp sae=gated sparsity=l0_40 train=cpu
    python -m benchmark.run -m sae=jumprelu,gated,topk sparsity=l0_20,l0_40,l0_80
    python -m benchmark.run -m +experiment=quickstart

Owns the order of the stages and the run folder; every `_target_` lives in conf/, not here.
A run folder that already holds a complete result.json is skipped (so an interrupted sweep,
re-launched with the same command, resumes where it stopped); `rerun=true` re-runs it and keeps
the old result beside the new. Training checkpoints (train.checkpoint_every) resume a killed
run in the same folder.
"""

from __future__ import annotations

import logging
import time
import traceback
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from benchmark import activations, data, models
from benchmark.evaluate import METRIC_DEFINITIONS, METRICS_VERSION, evaluate_sae
from benchmark.results import provenance, read_result, write_result
from benchmark.saes import build_sae, load_sae, sae_node, save_sae
from benchmark.train import Sparsity, TrainConfig, train_sae
from benchmark.validate import check_run, dictionary_size

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


def run(cfg: DictConfig, out: Path, choices: dict[str, Any]) -> dict[str, Any]:
    t_start = time.perf_counter()
    check_run(cfg)
    hook = models.hook_name(cfg.model, int(cfg.layer.index), cfg.site)
    device = models.resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    out.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, out / "config.yaml", resolve=True)
    model = LazyModel(cfg, device)

    stage("activations", out)
    store = activations.get_activation_store(model, cfg, split="train")
    d_sae = dictionary_size(cfg, store.d_in)
    node = sae_node(cfg.sae, store.d_in, d_sae)
    sae = build_sae(cfg.sae, store.d_in, d_sae).to(device)

    stage(f"train {type(sae).__name__} d_in={store.d_in} d_sae={d_sae}", out)
    train_cfg = TrainConfig.from_dict(OmegaConf.to_container(cfg.train, resolve=True))  # type: ignore[arg-type]
    sparsity = Sparsity(cfg.sparsity.mode, cfg.sparsity.get("target_l0"))
    logger = instantiate(cfg.logger)
    logger.start(OmegaConf.to_container(cfg, resolve=True), out.name, str(out))

    def batches(skip: int):
        it = store.batches(train_cfg.batch_size, seed=int(cfg.seed))
        for _ in range(skip):  # resume: the same seeded stream, fast-forwarded
            next(it)
        return it

    trained = train_sae(
        sae, batches, train_cfg, sparsity, checkpoint_path=out / "checkpoint.pt",
        log=logger.log, progress=cfg.get("progress", True),
    )  # fmt: skip
    sae.fold_scale(store.norm_scale)
    save_sae(sae, out, node)

    stage("evaluate", out)
    metrics, freq = evaluate_stage(cfg, sae, model(), hook, device)
    np.save(out / "firing_frequency.npy", freq.numpy())

    record = {
        "run_id": out.name,
        "status": "complete",
        "error": None,
        **provenance(device),
        "experiment": cfg.experiment_name,
        "model": cfg.model.name,
        "layer": int(cfg.layer.index),
        "layer_name": str(choices.get("layer") or cfg.layer.name),
        "site": cfg.site.name,
        "hook": hook,
        "sae": choices.get("sae", type(sae).__name__),
        "sparsity": choices.get("sparsity", cfg.sparsity.name),
        "sparsity_mode": sparsity.mode,
        "target_l0": sparsity.target_l0,
        "coefficient": trained.coefficient if sae.coefficient else None,
        "seed": int(cfg.seed),
        "d_in": store.d_in,
        "d_sae": d_sae,
        "norm_scale": store.norm_scale,
        "activation_cache": str(store.key),
        "activation_source": "stream" if cfg.data.get("stream") else "cache",
        "metrics_version": METRICS_VERSION,
        "metric_definitions": METRIC_DEFINITIONS,
        **metrics,
        "train_l0": trained.train_l0,
        "train_tokens": trained.tokens,
        "train_seconds": trained.seconds,
        "train_tokens_per_s": trained.tokens_per_s,
        "peak_memory_mb": trained.peak_memory_mb,
        "wall_seconds": time.perf_counter() - t_start,
        "choices": choices,
        "config": OmegaConf.to_container(cfg, resolve=True),
        "run_dir": str(out),
    }
    write_result(out, record)
    (out / "checkpoint.pt").unlink(missing_ok=True)  # the weights are saved; free the space
    logger.finish(metrics)
    log.info(
        "[%s] done in %.0fs: l0=%.1f fvu=%.4f delta_lm_loss=%.4f frac_dead=%.3f",
        out.name, record["wall_seconds"], metrics["l0"], metrics["fvu"],
        metrics["delta_lm_loss"], metrics["frac_dead"],
    )  # fmt: skip
    return record


def evaluate_stage(cfg: DictConfig, sae, lm, hook: str, device: torch.device):
    """The paper's metrics of a trained (scale-folded) SAE on the held-out split."""
    tokens = data.eval_windows(cfg, lm.tokenizer).to(device)
    mask = data.non_special_mask(tokens, lm.tokenizer)
    return evaluate_sae(
        lm, sae.eval(), tokens, mask, hook, batch_size=int(cfg.eval.batch_size),
        cache_dir=cfg.cache_dir, model_key=cfg.model.name, kl_div=bool(cfg.eval.kl_div),
    )  # fmt: skip


def reevaluate(run_dir: str | Path, device: str = "auto") -> dict[str, float]:
    """Reload a finished run's SAE and config and evaluate it again (same metrics, exactly)."""
    run_dir = Path(run_dir)
    cfg = OmegaConf.load(run_dir / "config.yaml")
    assert isinstance(cfg, DictConfig)
    dev = models.resolve_device(device)
    sae = load_sae(run_dir, dev)
    hook = models.hook_name(cfg.model, int(cfg.layer.index), cfg.site)
    lm = models.load_model(cfg.model, dev, cfg.cache_dir)
    return evaluate_stage(cfg, sae, lm, hook, dev)[0]


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    hc = HydraConfig.get()
    out = Path(hc.runtime.output_dir)
    choices = {g: hc.runtime.choices.get(g) for g in CHOICE_GROUPS}
    done = read_result(out)
    if done and done.get("status") == "complete" and not cfg.get("rerun", False):
        log.info("[%s] already complete, skipped (rerun=true to run it again)", out.name)
        return done.get("delta_lm_loss")
    try:
        return run(cfg, out, choices)["delta_lm_loss"]
    except Exception as e:
        write_result(out, {
            "run_id": out.name, "status": "failed", "error": f"{type(e).__name__}: {e}",
            "traceback": traceback.format_exc(), "choices": choices, "run_dir": str(out),
            "config": OmegaConf.to_container(cfg, resolve=False),
        })  # fmt: skip
        raise


if __name__ == "__main__":
    main()
