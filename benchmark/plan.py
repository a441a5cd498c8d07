"""Plan a run or a sweep before running it: jobs, fan-out groups, activation volume, FLOPs,
memory and wall time. Offline and in seconds: no weights and no data are loaded.

    python -m benchmark.plan +experiment=gemma2_9b_full                      # on this machine
    python -m benchmark.plan +experiment=gemma2_9b_full device=cuda --tflops 989   # for a GPU
    python -m benchmark.plan -m sae=jumprelu,topk sparsity=l0_20,l0_40 --json plan.json

It takes the same overrides as `python -m benchmark.run` and composes the config as the run
would (Hydra's compose API on conf/): `-m`/`--multirun`, or a preset whose `hydra.mode` is
MULTIRUN, expands `hydra.sweeper.params` and the command line's comma sweeps into jobs with the
basic sweeper's own cartesian product (`BasicSweeper.split_arguments`: a key given on the
command line replaces the preset's sweep of it), then composes every job and runs the run's
up-front checks on it (`benchmark.validate.check_run`, the recipe's keys). A bad override ends
as in the run: one `error: ...` line on stderr, exit status 2 (benchmark/cli_errors.py). Jobs
whose folder holds a complete result.json are counted as done (the run skips them unless
rerun=true); activation caches already in cache_dir are not harvested again.

What it prints (and writes as JSON with --json PATH):
- jobs, fan-out groups and SAEs per group: `benchmark.identity.group_key`, cut as the
  configured fan-out launcher cuts them (`split_sites`, `max_saes`; benchmark/fanout.py), the
  jobs one process (`fanout`) or one submitit task (`slurm_fanout`) trains in lockstep;
- activation volume per (layer, site): tokens x d_in x bytes of the model's dtype (cache shards
  hold rows in the model's dtype: float32 on CPU, bfloat16 for `dtype: auto` on CUDA) for the
  training set (data.n_train_tokens when cached; train.n_tokens when streamed, i.e. what a
  cache of the whole run would hold) and the held-out activation set (eval.n_activation_tokens),
  and the disk a cache of all of it needs (SI units: 1 GB = 1e9 B, 1 TB = 1e12 B);
- FLOPs. The model, per position, through its first n blocks (Kaplan et al. 2020, forward):
      F(n) = 2 n P_block + 2 n ctx d_attn,    full pass: F(n_layers) + 2 d_model d_vocab (logits)
  with P_block = attention (Q and O: d_model x d_attn each; K and V: d_model x n_kv_heads x
  d_head each) + MLP (3 or 2 x d_model x d_mlp, gated or not); norms and biases left out.
  Positions run = tokens x ctx / (ctx - 1) (each window's BOS is run but not counted).
  - harvest: F(L + 1) per position of each activation set not yet cached; sites of one layer
    share a pass within a group; streaming runs it over train.n_tokens for every group;
  - LM set (data.n_eval_tokens), per group (a single job is a group of one), as
    benchmark.evaluate.evaluate_group runs it: the prefix F(L) up to the lowest hooked block
    once, then from block L (full - F(L) each) the clean pass (with eval.kl_div, or while the
    clean loss is not cached), a zero-ablation pass per (layer, site) not cached, and each
    SAE's spliced pass; the clean and zero-ablation losses count as not cached before the run.
  SAE training, per SAE: 6 x d_in x d_sae x 2 x tokens, the six dense products of a step (2
  forward, 4 backward) at 2 FLOPs per multiply-add: a bound for a dense step (TopK and JumpReLU
  take a sparse path that does less; Gated does ~11 products of that size, ~1.8x this). The
  held-out activation metrics: 2 x d_in x d_sae x 2 per token (encode, decode).
- memory per job and per fan-out group. Device: model weights (parameters x dtype bytes) +
  per SAE its parameters x 4 B x 4 (fp32 weights, gradients, Adam's two moments) + one step's
  tensors (4 x batch x d_sae x 4 B: pre-activations, codes and their gradients), or in the
  evaluation phase the SAEs' weights + the logits (eval.batch_size x ctx x d_vocab x dtype
  bytes, twice with eval.kl_div, + two fp32 chunks of 256 x d_vocab). A group keeps every
  member's weights and optimiser state but steps them one after another (train_group), so
  one step's tensors count once; the SAEs that fit one process in 90% of the device are the
  fan-out launchers' `max_saes`. Host: ~1.5 GB for Python and torch, the model's weights as
  they load, the cache reader's buffer (256 MB) or the streamed shuffle buffers
  (data.stream_buffer_tokens x d_in x dtype bytes per site: their rows live on the CPU), and
  on a CPU the device's share too.
- wall time on this machine: SAE steps timed with the real trainer (`train_sae`: one warm-up
  step, then the median of ~TIMED_SECONDS of steps) on synthetic activations at the jobs'
  shapes, one timing per architecture (other d_in and widths scaled linearly by d_in x d_sae);
  when a step would take more than STEP_SECONDS, a smaller width (>= 32 k, >= 2,048) and batch
  (>= 256) are timed and scaled (said in the output; conservative for sparse steps, whose
  decoder cost does not grow with the width). Model FLOPs run at a square matmul's FLOP/s
  measured here in the model's dtype (the median of ~0.4 s of them) x MODEL_EFFICIENCY, or at
  --tflops x that efficiency; the LM set's passes take LM_EVAL_FACTOR times longer
  (log-softmax over the vocabulary, KL, splices). A device the config names but this machine
  lacks (device=cuda here) is not timed: --tflops is needed, and SAE steps run at the dense
  bound at --sae-tflops (default: --tflops x PRECISION_RATIO[train.precision], 0.068 for
  fp32 without TF32) x SAE_EFFICIENCY. Fixed costs: STARTUP_SECONDS per process, the bundled
  model's conversion once per cache_dir (CONVERT_SECONDS), JOB_SECONDS per job,
  TOKENIZE_SECONDS per 1M tokens windowed. Printed for jobs one at a time and for fan-out
  groups, summed over one device, and the longest single job or group (the wall time with a
  device for each).
- recommendations: cache or stream (stream when a cache would exceed --disk-budget, by default
  50% of the free disk at cache_dir), the fan-out grouping and the launcher that does it,
  `max_saes` when a group does not fit the device, and the time-out slots of a SLURM job.

Composing is Hydra's own cost, ~0.1 s per job on an idle core (gemma2_9b_full's 135 jobs:
~12 s; ~30 s under this machine's load); the timings add ~1.5 s per architecture.

Validation: estimate vs measured wall time of the whole `python -m benchmark.run` command, two
small sweeps on the bundled model, fresh results_dir and cache_dir (the model's conversion and
every harvest included; B reuses A's cache_dir, so its model is converted but its layer-6 sites
are harvested). This 2-core CPU is shared with other agents' jobs (load 1-7 during the runs), so
every figure is noisy by tens of percent. Under that contention torch's default 2 threads stall
per op (a full pass of the LM set: 2.2 s with 1 thread, 9.6 s with 2), so plan and run both ran
with OMP_NUM_THREADS=1 (the plan times whatever thread setting it runs under).
  A: `+experiment=smoke` (4 SAEs 576 -> 256, 8k tokens each, one fan-out group, layer 2)
  B: `-m +experiment=smoke site=mlp,attention layer.index=6 train.width=2048
      train.n_tokens=40960 data.n_train_tokens=20480 eval.n_activation_tokens=8192 sae=topk,gated
      sparsity=l0_20 hydra.launcher.group=false` (4 jobs one at a time, 2 sites harvested)
  | run                                          | load    | estimate | measured | est/meas |
  | A, before calibration                        | 2.4     | 60 s     | 40.6 s   | 1.48     |
  | B, calibrated on A's stages, then planned    | 2.6     | 120 s    | 108.7 s  | 1.10     |
  | A, a later revision                          | 1.9-2.9 | 61 s     | 51.7 s   | 1.17     |
  | B, a later revision                          | 2.9-5.1 | 142 s    | 181.2 s  | 0.78     |
  | A, a later revision, again                   | 6.1-6.8 | 66 s     | 89.1 s   | 0.74     |
  | B, a later revision, again                   | 6.8     | 207 s    | 205.1 s  | 1.01     |
  | A, this code                                 | 1.1     | 44 s     | 39.5 s   | 1.11     |
  | B, this code                                 | 1.0     | 101 s    | 95.5 s   | 1.06     |
Calibrated on A's stage_seconds (result.json): STARTUP_SECONDS (8 s: imports and the sweep's
composition before the first job), CONVERT_SECONDS (15 s), JOB_SECONDS (0.5 s), and from
separate timings of the same passes MODEL_EFFICIENCY (cpu: a truncated forward ran at 0.89
of the matmul's rate, a full pass at 0.92) and LM_EVAL_FACTOR (cpu: the group's LM-set
evaluation took 1.6-1.8x its FLOP time). By stage, B with this code (result.json's
stage_seconds, measured vs planned): harvest 37 s vs 34 s, training 26 s vs 27 s, evaluation
24 s vs 27 s; A: setup (conversion, boot) 16.5 s vs 15 s + part of 8 s, evaluation 14 s vs
16 s. Under load the plan follows the machine's speed through its matmul and step timings,
but the load can change after them (B of the later revision: harvest 76 s measured vs 38 s
planned, the load having risen from 2.9 to 5.1), and fixed costs do not follow it (A again:
setup 37 s vs 23 s). One early run with 2 threads (load ~5, constants before calibration)
estimated 2.1 min against 2.3 min measured, but its parts were off (training 57 s vs 38 s,
evaluation 17 s vs 68 s): the stalls are per op, not per FLOP.
Not validated here: anything on a GPU (MODEL_EFFICIENCY["cuda"], LM_EVAL_FACTOR["cuda"],
PRECISION_RATIO, SAE_EFFICIENCY are stated, not measured), hub data sources (reading the stream is
not counted) and the harvest of a streamed run.

Must not load a model, read data or train: it reads the config tree, looks at results_dir and
cache_dir for finished runs and caches, and times synthetic SAE steps and a matmul.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import statistics
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NoReturn

from omegaconf import DictConfig, OmegaConf, open_dict

from benchmark import cli_errors, identity
from benchmark.compose import CONF_DIR
from benchmark.errors import ConfigError
from benchmark.fanout import cut_groups
from benchmark.validate import check_run, dictionary_size, evaluate_only, site_width

# ---- stated assumptions (calibrated where the docstring's validation says) ----

# Model forward FLOP/s reached, as a fraction of a square matmul's on the same device and
# dtype. CPU: calibrated on the validation sweeps (SmolLM2's hooked truncated forward, batch
# 32 x 128). CUDA: not measured (no GPU here); a typical eager-PyTorch value at >= 8k tokens
# per pass.
MODEL_EFFICIENCY = {"cpu": 0.85, "cuda": 0.4}
# The LM set's passes take longer than their FLOPs say: the log-softmax over the vocabulary
# (CE, KL), the splices, and one extra chunked pass per member. CPU: measured 1.6-1.8x on the
# smoke group (SmolLM2, vocabulary 49k, d_model 576); CUDA: not measured.
LM_EVAL_FACTOR = {"cpu": 1.7, "cuda": 1.2}
# SAE steps on a device this machine lacks, by train.precision: an H100/H200's dense peak in
# fp32 (no TF32: 67 TFLOP/s), TF32 (495) and bf16 (989) over its bf16 peak ...
FP32_RATIO = 0.068
PRECISION_RATIO = {"fp32": FP32_RATIO, "tf32": 0.5, "bf16": 1.0}
# ... and a step reaches about this fraction of that in its six dense products.
SAE_EFFICIENCY = 0.5
STARTUP_SECONDS = 8.0  # one process: imports and composition (~5 s here), the model boot
CONVERT_SECONDS = 15.0  # the bundled GGUF dequantised once per cache_dir (benchmark.models)
JOB_SECONDS = 0.5  # per job: its config and folder, the SAE and the record written
TOKENIZE_SECONDS = 2.5  # per 1M tokens windowed (measured: ~400k tokens/s, bundled corpus)
HOST_BASE_BYTES = 1.5e9  # Python + torch + transformers
READER_BUFFER_BYTES = 256 * 2**20  # the cached store's shuffle buffer (buffer_mb)
SAE_STATE_COPIES = 4  # fp32 weights, gradients, Adam's exp_avg and exp_avg_sq
SAE_STEP_TENSORS = 4  # batch x d_sae fp32 tensors alive in a step
STEP_SECONDS = 0.5  # time SAE steps of at most about this long (else a smaller shape, scaled)
TIMED_SECONDS = 1.5  # per architecture, after the warm-up step
MIN_WIDTH, MIN_BATCH = 2048, 256
DEFAULT_DEVICE_MEMORY = 80e9  # a CUDA device this machine lacks (an 80 GB H100); --device-memory

# Shapes conf/model/*.yaml does not hold (it has n_layers, d_model, n_heads, d_head), from each
# model's published config.json. A key of the same name in the model config wins.
KNOWN_SHAPES: dict[str, dict[str, Any]] = {
    "google/gemma-2-9b": dict(
        d_mlp=14336, d_vocab=256000, n_kv_heads=8, gated_mlp=True, tied_embeddings=True
    ),
    "google/gemma-2-2b": dict(
        d_mlp=9216, d_vocab=256000, n_kv_heads=4, gated_mlp=True, tied_embeddings=True
    ),
    "HuggingFaceTB/SmolLM2-135M-Instruct": dict(
        d_mlp=1536, d_vocab=49152, n_kv_heads=3, gated_mlp=True, tied_embeddings=True
    ),
    "openai-community/gpt2": dict(
        d_mlp=3072, d_vocab=50257, n_kv_heads=12, gated_mlp=False, tied_embeddings=True
    ),
    "EleutherAI/pythia-70m": dict(
        d_mlp=2048, d_vocab=50304, n_kv_heads=8, gated_mlp=False, tied_embeddings=False
    ),
}
SHAPE_KEYS = ("d_mlp", "d_vocab", "n_kv_heads", "gated_mlp", "tied_embeddings")

# ---- the model ----


@dataclass(frozen=True)
class ModelShape:
    name: str
    n_layers: int
    d_model: int
    n_heads: int
    d_head: int
    n_kv_heads: int
    d_mlp: int
    d_vocab: int
    gated_mlp: bool = True
    tied_embeddings: bool = True
    assumed: tuple[str, ...] = ()  # "key=value" for each value not in the config
    source: str = ""  # where the assumed values come from

    @classmethod
    def from_config(cls, model: DictConfig) -> ModelShape:
        known = KNOWN_SHAPES.get(str(model.get("architecture")), {})
        guess = {
            "d_mlp": 4 * int(model.d_model),
            "d_vocab": 50_000,
            "n_kv_heads": int(model.n_heads),
            "gated_mlp": False,
            "tied_embeddings": True,
        }
        values, assumed = {}, []
        for key in SHAPE_KEYS:
            if model.get(key) is not None:
                values[key] = model.get(key)
                continue
            values[key] = known.get(key, guess[key])
            assumed.append(f"{key}={values[key]}" + ("" if key in known else " (a guess)"))
        return cls(
            name=str(model.name),
            n_layers=int(model.n_layers),
            d_model=int(model.d_model),
            n_heads=int(model.n_heads),
            d_head=int(model.d_head),
            n_kv_heads=int(values["n_kv_heads"]),
            d_mlp=int(values["d_mlp"]),
            d_vocab=int(values["d_vocab"]),
            gated_mlp=bool(values["gated_mlp"]),
            tied_embeddings=bool(values["tied_embeddings"]),
            assumed=tuple(assumed),
            source=f"{model.get('architecture')}'s config.json" if known else "guesses",
        )

    @property
    def d_attn(self) -> int:
        return self.n_heads * self.d_head

    @property
    def block_params(self) -> int:
        attn = 2 * self.d_model * self.d_attn + 2 * self.d_model * self.n_kv_heads * self.d_head
        return attn + (3 if self.gated_mlp else 2) * self.d_model * self.d_mlp

    @property
    def non_embedding_params(self) -> int:
        return self.n_layers * self.block_params

    @property
    def params(self) -> int:
        embed = self.d_vocab * self.d_model
        return self.non_embedding_params + embed * (1 if self.tied_embeddings else 2)

    def flops(self, blocks: int, ctx: int, logits: bool = False) -> float:
        """FLOPs per position of a forward pass through `blocks` blocks (and the logits)."""
        f = 2.0 * blocks * self.block_params + 2.0 * blocks * ctx * self.d_attn
        return f + (2.0 * self.d_model * self.d_vocab if logits else 0.0)

    def full(self, ctx: int) -> float:
        return self.flops(self.n_layers, ctx, logits=True)


def resolve(device: str, dtype: str) -> tuple[Any, Any]:
    """(torch device, torch dtype) as benchmark.models.resolve_device / resolve_dtype give
    them (`auto`: cuda if present; bfloat16 on cuda, else float32), without importing the
    model stack (transformer_lens takes seconds to import)."""
    import torch

    try:
        dev = torch.device(
            ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
        )
    except RuntimeError as e:
        raise ConfigError(
            f"device={device!r} is not a torch device; use auto, cpu, cuda, cuda:N"
        ) from e
    if dtype == "auto":
        return dev, torch.bfloat16 if dev.type == "cuda" else torch.float32
    return dev, getattr(torch, dtype)  # checked by validate.check_root (MODEL_DTYPES)


# ---- the sweep ----


@dataclass
class Job:
    overrides: list[str]
    sae: str  # the sae choice (a file in conf/sae)
    sparsity: str
    site: str
    layer: int
    d_in: int
    d_sae: int | None  # None: evaluate-only (train=none), the size is the file's
    batch_size: int
    train_tokens: int  # train.n_tokens (0: evaluate-only)
    target_l0: float | None
    stream: bool
    group: str  # benchmark.identity.group_key
    run_dir: str
    done: bool  # run_dir holds a complete result.json: benchmark.run skips it
    cfg: DictConfig = field(repr=False)


def _is_multirun(mode: Any) -> bool:
    return str(mode).rsplit(".", 1)[-1] == "MULTIRUN"


def expand(overrides: Sequence[str], multirun: bool) -> tuple[bool, list[list[str]], DictConfig]:
    """(multirun?, each job's overrides, the sweep's config), as `python -m benchmark.run`
    launches them. Call inside `initialize_config_dir`.

    Hydra's multirun composes the sweep's config without the sweep overrides and reads
    `hydra.mode` and `hydra.sweeper.params` from it; the basic sweeper then takes the
    cartesian product of those params followed by the task overrides (the non-`hydra`
    overrides: the same key replaces the preset's sweep); each job is composed from the
    `hydra` overrides plus its own list.
    """
    from hydra import compose
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import ConfigCompositionException

    parser = OverridesParser.create()
    parsed = parser.parse_overrides(list(overrides))
    plain = [str(o.input_line) for o in parsed if not o.is_sweep_override()]
    master = compose("config", overrides=plain, return_hydra_config=True)
    if not (multirun or _is_multirun(master.hydra.get("mode"))):
        return False, [list(overrides)], master  # a sweep fails in compose, as in the run
    for o in parsed:
        if o.is_hydra_override() and o.is_sweep_override():
            raise ConfigCompositionException(
                f"Sweeping over Hydra's configuration is not supported : '{o.input_line}'"
            )
    hydra_overrides = [str(o.input_line) for o in parsed if o.is_hydra_override()]
    task = [str(o.input_line) for o in parsed if not o.is_hydra_override()]
    params = master.hydra.sweeper.get("params") or {}
    params_conf = [f"{k}={v}" for k, v in params.items()] + task
    batches = BasicSweeper.split_arguments(parser.parse_overrides(params_conf), None)
    return True, [hydra_overrides + job for job in batches[0]], master


@dataclass
class Sweep:
    multirun: bool
    jobs: list[Job]
    launcher: str  # the hydra/launcher choice
    grouped: bool  # the launcher runs fan-out groups (benchmark/fanout.py)
    in_process: bool  # one process runs every job (basic, fanout); else a process per task
    max_saes: int | None = None  # the fan-out launcher's cap on a group
    split_sites: bool = False  # the fan-out launcher's one-site-per-group
    timeout_min: float | None = None  # the launcher's time limit per task (slurm)
    max_num_timeout: int = 0  # requeues after a time-out (slurm)


def compose_jobs(overrides: Sequence[str], multirun: bool = False) -> Sweep:
    """Every job of the command, composed and checked as the run checks it up front."""
    from hydra import compose, initialize_config_dir

    from benchmark.train import TrainConfig

    jobs = []
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        is_multi, job_overrides, master = expand(overrides, multirun)
        launcher = str(master.hydra.runtime.choices.get("hydra/launcher") or "basic")
        lc = master.hydra.launcher
        # benchmark.fanout: the fan-out launchers (fanout in-process; slurm_fanout and
        # slurm_local_fanout, one submitit task per group) group a multirun's jobs, cut by
        # split_sites and max_saes; a single run is a group of one; basic, local and slurm
        # never group. basic and fanout run every job in this one process.
        fanout_capable = "max_saes" in lc or "split_sites" in lc
        grouped = is_multi and fanout_capable and bool(lc.get("group", True))
        target = str(lc.get("_target_", "")).rsplit(".", 1)[-1]
        in_process = target in ("BasicLauncher", "FanoutLauncher")
        timeout = lc.get("timeout_min")
        max_saes = lc.get("max_saes") if fanout_capable else None
        for ov in job_overrides:
            cfg = compose("config", overrides=ov, return_hydra_config=True)
            sae = str(cfg.hydra.runtime.choices.get("sae") or "")
            run_dir = _run_dir(cfg, is_multi)
            with open_dict(cfg):
                del cfg["hydra"]
            check_run(cfg)
            sae = sae or str(cfg.sae._target_).rsplit(".", 1)[-1]
            d_in = site_width(cfg)
            d_sae: int | None = None
            batch = tokens = 0
            if not evaluate_only(cfg):
                tc = TrainConfig.from_dict(OmegaConf.to_container(cfg.train, resolve=True))  # type: ignore[arg-type]
                d_sae, batch, tokens = dictionary_size(cfg, d_in), tc.batch_size, tc.n_tokens
            jobs.append(
                Job(
                    overrides=list(ov), sae=sae, sparsity=identity.sparsity_label(cfg),
                    site=str(cfg.site.name), layer=int(cfg.layer.index), d_in=d_in, d_sae=d_sae,
                    batch_size=batch, train_tokens=tokens,
                    target_l0=cfg.sparsity.get("target_l0"), stream=bool(cfg.data.get("stream")),
                    group=identity.group_key(cfg), run_dir=str(run_dir),
                    done=_complete(run_dir) and not cfg.get("rerun", False), cfg=cfg,
                )
            )  # fmt: skip
    return Sweep(
        multirun=is_multi, jobs=jobs, launcher=launcher, grouped=grouped, in_process=in_process,
        max_saes=int(max_saes) if max_saes else None,
        split_sites=bool(lc.get("split_sites", False)) if fanout_capable else False,
        timeout_min=float(timeout) if timeout else None,
        max_num_timeout=int(lc.get("max_num_timeout") or 0),
    )  # fmt: skip


def _run_dir(cfg: DictConfig, multirun: bool) -> Path:
    """The job's folder as Hydra names it (hydra.sweep.dir/subdir or hydra.run.dir)."""
    from hydra.core.hydra_config import HydraConfig

    holder = HydraConfig.instance()
    before = holder.cfg
    holder.set_config(cfg)  # for ${hydra:runtime.choices.sae} in the folder's name
    try:
        h = cfg.hydra
        return Path(str(h.sweep.dir), str(h.sweep.subdir)) if multirun else Path(str(h.run.dir))
    finally:
        holder.cfg = before


def _complete(run_dir: Path) -> bool:
    try:
        return json.loads((run_dir / "result.json").read_text()).get("status") == "complete"
    except (OSError, ValueError, AttributeError):
        return False


def groups_of(
    jobs: Sequence[Job], grouped: bool = True, max_saes: int | None = None,
    split_sites: bool = False,
) -> list[list[Job]]:  # fmt: skip
    """Fan-out groups in launch order, cut as the launchers cut them
    (`benchmark.fanout.cut_groups`; grouped=False: every job alone)."""
    if not grouped:
        return [[j] for j in jobs]
    parts = cut_groups(jobs, lambda j: j.group, lambda j: j.site, max_saes=max_saes,
                       split_sites=split_sites)  # fmt: skip
    return [part for _, part in parts]


# ---- activations ----


@dataclass
class Activations:
    """One (layer, site)'s activation sets: training and held-out."""

    layer: int
    site: str
    d_in: int
    train_tokens: int  # rows a cache of the training set holds (streamed: train.n_tokens)
    eval_tokens: int  # eval.n_activation_tokens
    bytes_per_value: int
    stream: bool
    train_cached: bool
    eval_cached: bool
    norm_cached: bool  # streamed: its norm_scale is in cache_dir

    @property
    def train_bytes(self) -> float:
        return float(self.train_tokens) * self.d_in * self.bytes_per_value

    @property
    def eval_bytes(self) -> float:
        return float(self.eval_tokens) * self.d_in * self.bytes_per_value


def cached(cfg: DictConfig, split: str, n_tokens: int, dtype_name: str, marker: str) -> bool:
    """A complete cache of that (layer, site, data, split, size) in cache_dir: its folder's
    readable prefix (benchmark.activations cache_key) holds `marker` (manifest.json, or
    norm.json for a stream). The hash after the prefix (the data config's details) is not
    checked: a cache of the same data name, context and size counts."""
    prefix = (
        f"{cfg.model.name}_L{int(cfg.layer.index)}_{cfg.site.name}_{cfg.data.name}-{split}"
        f"_T{int(cfg.data.context_length)}_N{n_tokens}_{dtype_name}_"
    )
    root = Path(str(cfg.cache_dir)) / "activations"
    return any((d / marker).is_file() for d in root.glob(glob_escape(prefix) + "*"))


def glob_escape(text: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", text)


def activation_sets(jobs: Sequence[Job], nbytes: int, dtype_name: str) -> list[Activations]:
    """The distinct activation sets the jobs read, in order of first use."""
    out: dict[tuple, Activations] = {}
    for j in jobs:
        cfg = j.cfg
        train = (
            0 if j.d_sae is None else (j.train_tokens if j.stream else int(cfg.data.n_train_tokens))
        )
        n_eval = int(cfg.eval.n_activation_tokens)
        key = set_key(j)
        if key in out:
            continue
        n_norm = int(cfg.data.get("stream_norm_tokens") or 100_000)
        out[key] = Activations(
            layer=j.layer, site=j.site, d_in=j.d_in, train_tokens=train, eval_tokens=n_eval,
            bytes_per_value=nbytes, stream=j.stream,
            train_cached=train == 0 or (not j.stream and cached(cfg, "train", train, dtype_name, "manifest.json")),
            eval_cached=cached(cfg, "eval", n_eval, dtype_name, "manifest.json"),
            norm_cached=j.stream and cached(cfg, "train-stream", n_norm, dtype_name, "norm.json"),
        )  # fmt: skip
    return list(out.values())


def set_key(j: Job) -> tuple:
    cfg = j.cfg
    train = j.train_tokens if j.stream else int(cfg.data.n_train_tokens)
    return (j.layer, j.site, train, int(cfg.eval.n_activation_tokens), j.stream,
            str(cfg.data.name), int(cfg.data.context_length))  # fmt: skip


def free_disk(path: Path) -> float:
    """Free bytes on the filesystem holding `path` (or its nearest existing parent)."""
    path = path.absolute()
    while not path.exists() and path.parent != path:
        path = path.parent
    return float(shutil.disk_usage(path).free)


# ---- FLOPs ----


@dataclass
class ModelWork:
    """Model FLOPs (and tokens windowed) of one unit of the run: a fan-out group or one job."""

    jobs: list[Job] = field(default_factory=list)  # the unit's jobs still to run
    harvest: float = 0.0  # the truncated forward passes: harvest and stream
    lm_eval: float = 0.0  # the LM set: prefix, clean, spliced, zero ablation
    tokens_windowed: float = 0.0  # tokens the tokenizer turns into windows


def model_work(
    units: Sequence[Sequence[Job]], sets: Sequence[Activations], model: ModelShape
) -> list[ModelWork]:
    """Per unit (a fan-out group, or one job alone), in launch order, as the run runs a
    group: one truncated pass per split for all of the unit's sites not yet cached (a stream:
    over train.n_tokens, in every unit), and the LM set as benchmark.evaluate.evaluate_group
    runs it. Caches written by one unit serve the later ones; each zero-ablation loss and
    (without KL) the clean loss are computed once (and counted as not cached before)."""
    out = []
    have_train = {_short(s) for s in sets if s.train_cached}
    have_eval = {_short(s) for s in sets if s.eval_cached}
    have_norm = {_short(s) for s in sets if s.norm_cached}
    zero_done: set[tuple] = set()
    clean_done = False
    for unit in units:
        live = [j for j in unit if not j.done]
        w = ModelWork(jobs=live)
        out.append(w)
        if not live:
            continue
        cfg, layer = live[0].cfg, live[0].layer
        ctx = int(cfg.data.context_length)
        pos = ctx / (ctx - 1)  # positions run per token counted (each window's BOS)
        trunc = model.flops(layer + 1, ctx)
        keys = {set_key(j)[:5]: j for j in live}
        train_keys = [k for k, j in keys.items() if j.d_sae is not None]
        if any(k not in have_eval for k in keys):
            n_eval = int(cfg.eval.n_activation_tokens)
            w.harvest += trunc * n_eval * pos
            w.tokens_windowed += n_eval
            have_eval |= set(keys)
        if live[0].stream and train_keys:
            w.harvest += trunc * live[0].train_tokens * pos
            w.tokens_windowed += live[0].train_tokens
            n_norm = int(cfg.data.get("stream_norm_tokens") or 100_000)
            for k in train_keys:
                if k not in have_norm:  # one norm estimate per site
                    w.harvest += trunc * n_norm * pos
                    have_norm.add(k)
        elif any(k not in have_train for k in train_keys):
            n_train = int(cfg.data.n_train_tokens)
            w.harvest += trunc * n_train * pos
            w.tokens_windowed += n_train
            have_train |= set(train_keys)
        # The LM set (benchmark.evaluate.evaluate_group): per batch the prefix up to the
        # lowest hooked block once, then from there the clean pass (with KL, or while the
        # clean loss is not cached), one zero-ablation pass per hook not cached, and each
        # SAE's spliced pass.
        lm = int(cfg.data.n_eval_tokens) * pos
        start = min(j.layer for j in live)
        prefix, full = model.flops(start, ctx), model.full(ctx)
        kl = bool(cfg.eval.get("kl_div", True))
        zeros = {(j.layer, j.site) for j in live} - zero_done
        zero_done |= zeros
        clean = 1 if kl or not clean_done else 0
        clean_done = True
        w.lm_eval += lm * (prefix + (full - prefix) * (len(live) + clean + len(zeros)))
        w.tokens_windowed += int(cfg.data.get("eval_pool_tokens") or cfg.data.n_eval_tokens)
    return out


def _short(s: Activations) -> tuple:
    return (s.layer, s.site, s.train_tokens, s.eval_tokens, s.stream)


def sae_flops(j: Job) -> float:
    """6 x d_in x d_sae x 2 x tokens: the dense-step bound of one SAE's training."""
    return 12.0 * j.d_in * (j.d_sae or 0) * j.train_tokens


# ---- device throughput and SAE timing ----


def sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_flops(device: Any, dtype: Any, seconds: float = 0.4) -> float:
    """FLOP/s of a square matmul on `device` in `dtype`: the median of ~`seconds` of them."""
    import torch

    n = 8192 if device.type == "cuda" else (1024 if dtype == torch.float32 else 256)
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    a @ b
    sync(device)
    times: list[float] = []
    while sum(times) < seconds or len(times) < 3:
        t0 = time.perf_counter()
        a @ b
        sync(device)
        times.append(time.perf_counter() - t0)
    return 2.0 * n**3 / statistics.median(times)


@dataclass
class SAETiming:
    sae: str
    d_in: int
    d_sae: int
    batch: int
    timed_width: int
    timed_batch: int
    steps: int
    seconds_per_token: float  # at the timed shape
    params_per_latent: float  # the SAE's parameters / (d_in x d_sae) at the timed shape

    @property
    def scaled(self) -> bool:
        return (self.timed_width, self.timed_batch) != (self.d_sae, self.batch)

    def per_token(self, d_in: int, d_sae: int) -> float:
        """Seconds per training token at (d_in, d_sae), scaled by d_in x d_sae."""
        return self.seconds_per_token * (d_in * d_sae) / (self.d_in * self.timed_width)


def time_sae(job: Job, device: Any, fp32_flops: float) -> SAETiming:
    """Seconds per training token of job's SAE on `device`: the real trainer on synthetic
    activations (E||x||^2 = 1) at the job's shapes, one warm-up step then ~TIMED_SECONDS of
    steps, or at a smaller width and batch when a step would take over STEP_SECONDS."""
    import torch

    from benchmark.saes import build_sae
    from benchmark.train import Sparsity, TrainConfig, train_sae

    assert job.d_sae is not None
    cfg, d_in, d_sae, batch = job.cfg, job.d_in, job.d_sae, job.batch_size
    k = float(job.target_l0 or 64)
    budget = STEP_SECONDS * fp32_flops / 12.0  # batch x d_in x d_sae of a STEP_SECONDS step
    width = d_sae
    if batch * d_in * width > budget:
        width = min(d_sae, max(MIN_WIDTH, int(32 * k), int(budget / (batch * d_in))))
    timed_batch = batch
    if timed_batch * d_in * width > budget:
        timed_batch = min(batch, max(MIN_BATCH, int(budget / (d_in * width))))
    est = 12.0 * timed_batch * d_in * width / fp32_flops
    steps = int(min(20, max(2, round(TIMED_SECONDS / max(est, 1e-6)))))
    tc = TrainConfig.from_dict(OmegaConf.to_container(cfg.train, resolve=True))  # type: ignore[arg-type]
    tc.n_tokens, tc.batch_size = timed_batch * (1 + steps), timed_batch
    tc.log_every, tc.checkpoint_every = 10**9, 0
    torch.manual_seed(0)
    x = torch.randn(timed_batch, d_in, device=device) / math.sqrt(d_in)
    sae = build_sae(cfg.sae, d_in, width).to(device)
    sae.set_density(x, k)  # a trained code density (penalised architectures start dense)
    marks: list[float] = []

    def batches(skip: int) -> Iterator[Any]:  # the trainer takes a batch right before a step
        while True:
            sync(device)
            marks.append(time.perf_counter())
            yield x

    sparsity = Sparsity(str(cfg.sparsity.mode), cfg.sparsity.get("target_l0"))
    train_sae(sae, batches, tc, sparsity, progress=False)
    sync(device)
    marks.append(time.perf_counter())
    step_seconds = statistics.median(b - a for a, b in zip(marks[1:-1], marks[2:], strict=True))
    n_params = sum(p.numel() for p in sae.parameters())
    return SAETiming(
        sae=job.sae, d_in=d_in, d_sae=d_sae, batch=batch, timed_width=width,
        timed_batch=timed_batch, steps=steps, seconds_per_token=step_seconds / timed_batch,
        params_per_latent=n_params / (d_in * width),
    )  # fmt: skip


def _available(device: Any) -> bool:
    import torch

    if device.type == "cpu":
        return True
    if device.type == "cuda":
        return bool(torch.cuda.is_available())
    try:
        torch.empty(1, device=device)
        return True
    except Exception:  # noqa: BLE001
        return False


def _device_memory(device: Any, here: bool, given: float | None) -> float:
    import torch

    if given is not None:
        return given
    if device.type == "cuda" and here:
        return float(torch.cuda.get_device_properties(device).total_memory)
    if device.type == "cpu":
        return float(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    return DEFAULT_DEVICE_MEMORY


def _converted(cfg: DictConfig) -> bool:
    """False only for the bundled model with no converted copy under cache_dir/models."""
    if cfg.model.get("source") != "bundled":
        return True
    folder = Path(str(cfg.cache_dir)) / "models"
    return any((d / "checksums.json").is_file() for d in folder.glob("*") if d.is_dir())


# ---- the plan ----


@dataclass
class Options:
    multirun: bool = False
    json: str | None = None
    tflops: float | None = None
    sae_tflops: float | None = None
    efficiency: float | None = None
    disk_budget: float | None = None
    device_memory: float | None = None
    timing: bool = True


def build_plan(overrides: Sequence[str], opts: Options | None = None) -> dict[str, Any]:
    """Everything the plan prints, as plain data (the --json file)."""
    import torch

    opts = opts or Options()
    t_start = time.perf_counter()
    sweep = compose_jobs(overrides, opts.multirun)
    jobs = sweep.jobs
    todo = [j for j in jobs if not j.done]
    cfg0 = jobs[0].cfg
    device, dtype = resolve(str(cfg0.device), str(cfg0.model.dtype))
    dtype_name = str(dtype).removeprefix("torch.")
    nbytes = torch.empty(0, dtype=dtype).element_size()
    model = ModelShape.from_config(cfg0.model)
    # Fan-out groups as the configured fan-out launcher cuts them (split_sites, max_saes); for
    # another launcher, as hydra/launcher=fanout (or slurm_fanout) would by default.
    groups = groups_of(jobs, True, sweep.max_saes, sweep.split_sites)

    # Activations and disk.
    sets = activation_sets(jobs, nbytes, dtype_name)
    cache_dir = Path(str(cfg0.cache_dir))
    free = free_disk(cache_dir)
    budget = opts.disk_budget if opts.disk_budget is not None else 0.5 * free
    cache_need = sum(s.train_bytes + s.eval_bytes for s in sets)

    # FLOPs: independent jobs and fan-out groups.
    alone, fan = model_work(groups_of(jobs, False), sets, model), model_work(groups, sets, model)
    flops_of = {k: {p: sum(getattr(w, p) for w in ws) for p in ("harvest", "lm_eval")}
                for k, ws in (("independent", alone), ("fanout", fan))}  # fmt: skip
    n_act = int(cfg0.eval.n_activation_tokens)
    f_sae = {Path(j.run_dir).name: sae_flops(j) for j in todo if j.d_sae}
    f_sae_eval = sum(4.0 * j.d_in * (j.d_sae or 0) * n_act for j in todo)

    # Throughput and SAE timings.
    here = _available(device)
    eff = opts.efficiency if opts.efficiency is not None else MODEL_EFFICIENCY.get(device.type, 0.4)
    notes: list[str] = []
    model_rate, rate_note = float("nan"), ""
    measured = {}
    if opts.tflops is not None:
        model_rate = opts.tflops * 1e12 * eff
        rate_note = f"--tflops {opts.tflops:g} x efficiency {eff:g}"
    elif here:
        measured[dtype_name] = matmul_flops(device, dtype)
        model_rate = measured[dtype_name] * eff
        threads = f", {torch.get_num_threads()} threads" if device.type == "cpu" else ""
        rate_note = (
            f"a {dtype_name} matmul's {si(measured[dtype_name], 'FLOP/s')} measured on "
            f"{device.type}{threads} x efficiency {eff:g}; LM-set passes x {LM_EVAL_FACTOR.get(device.type, 1.2)}"
        )
    else:
        rate_note = f"{device} is not on this machine: pass --tflops (its {dtype_name} TFLOP/s)"
    timings: dict[str, SAETiming] = {}
    if here and opts.timing:
        if "float32" not in measured:
            measured["float32"] = matmul_flops(device, torch.float32)
        for name in dict.fromkeys(j.sae for j in todo if j.d_sae):
            mine = [j for j in todo if j.sae == name and j.d_sae]
            d_in = max({j.d_in for j in mine}, key=[j.d_in for j in mine].count)
            mine = sorted((j for j in mine if j.d_in == d_in), key=lambda j: j.target_l0 or 0)
            try:
                timings[name] = time_sae(mine[len(mine) // 2], device, measured["float32"])
            except ConfigError:
                raise
            except Exception as e:  # noqa: BLE001  (the dense bound below stands in)
                notes.append(f"SAE {name} could not be timed ({type(e).__name__}: {e})")
    # SAE steps not timed: the dense bound at the rate of train.precision x SAE_EFFICIENCY.
    precision = str(cfg0.train.get("precision") or "fp32")
    ratio = PRECISION_RATIO.get(precision, FP32_RATIO)
    if opts.sae_tflops is not None:
        sae_tflops, how = opts.sae_tflops, "--sae-tflops"
    elif opts.tflops is not None:
        sae_tflops, how = opts.tflops * ratio, f"--tflops x {ratio:g}: train.precision={precision}"
    elif "float32" in measured:
        sae_tflops, how = measured["float32"] / 1e12, "the fp32 matmul measured here"
    elif here:
        measured["float32"] = matmul_flops(device, torch.float32)
        sae_tflops, how = measured["float32"] / 1e12, "the fp32 matmul measured here"
    else:
        sae_tflops, how = float("nan"), "unknown: pass --tflops or --sae-tflops"
    sae_rate = sae_tflops * 1e12 * SAE_EFFICIENCY
    untimed = sorted({j.sae for j in todo if j.d_sae and j.sae not in timings})
    if untimed:
        where = "" if here else f" ({device} is not on this machine)"
        notes.append(
            f"SAE steps of {', '.join(untimed)} not timed{where}: the dense bound (12 d_in "
            f"d_sae FLOPs per token) at {sae_tflops:.3g} TFLOP/s ({how}) x efficiency "
            f"{SAE_EFFICIENCY:g}"
        )

    def sae_seconds(j: Job, tokens: float) -> float:
        if j.d_sae is None:
            return 0.0
        t = timings.get(j.sae)
        if t is not None:
            return t.per_token(j.d_in, j.d_sae) * tokens
        return 12.0 * j.d_in * j.d_sae * tokens / sae_rate

    # Memory.
    weights = float(model.params) * nbytes
    # The spliced pass's logits in the model's dtype (and the clean pass's, with KL) and two
    # fp32 log-probability chunks of LOGPROB_CHUNK = 256 rows (benchmark.evaluate).
    kl_passes = 2 if cfg0.eval.get("kl_div", True) else 1
    rows = float(cfg0.eval.batch_size) * int(cfg0.data.context_length)
    logits = rows * model.d_vocab * nbytes * kl_passes + 2 * 256 * model.d_vocab * 4

    def sae_state(j: Job) -> float:
        t = timings.get(j.sae)
        per = t.params_per_latent if t else 2.0  # W_enc and W_dec
        return per * j.d_in * (j.d_sae or 0) * 4 * SAE_STATE_COPIES

    def step_tensors(j: Job) -> float:
        return float(SAE_STEP_TENSORS) * j.batch_size * (j.d_sae or 0) * 4

    def buffers(members: Sequence[Job]) -> float:
        """Host memory of the streamed shuffle buffers: one per site (rows on the CPU)."""
        sites = {j.site: j for j in members if j.stream and j.d_sae}
        rows = int(cfg0.data.get("stream_buffer_tokens") or 262_144)
        return float(sum(rows * j.d_in * nbytes for j in sites.values()))

    def device_peak(members: Sequence[Job]) -> float:
        state = sum(sae_state(j) for j in members)
        step = max((step_tensors(j) for j in members), default=0.0)
        train_phase = weights + state + step
        eval_phase = weights + state / SAE_STATE_COPIES + logits
        return max(train_phase, eval_phase)

    def host_peak(members: Sequence[Job]) -> float:
        reader = 0.0 if all(j.stream for j in members) else READER_BUFFER_BYTES
        on_host = device_peak(members) if device.type == "cpu" else 0.0
        return HOST_BASE_BYTES + weights + reader + buffers(members) + on_host

    capacity = _device_memory(device, here, opts.device_memory)
    job_peak = max(device_peak([j]) for j in jobs)
    group_peak = max(device_peak(m) for m in groups)
    per_sae = max(sae_state(j) for j in jobs)
    # SAEs one process holds in 90% of the device: weights and one step's tensors, the rest
    # for SAE states (the fan-out launchers' max_saes).
    room = 0.9 * capacity - weights - max(step_tensors(j) for j in jobs)
    fit = int(room // per_sae) if per_sae > 0 and room > 0 else 0

    # Wall time: per unit (a job alone, or a fan-out group), then summed.
    converted = _converted(cfg0)
    startup = STARTUP_SECONDS + (0.0 if converted else CONVERT_SECONDS)
    in_process = sweep.in_process
    lm_factor = LM_EVAL_FACTOR.get(device.type, 1.2)
    names = (
        "start-up (imports, model boot" + ("" if converted else ", conversion") + ")",
        "harvest / stream (model forward)",
        "data windows (tokenizer)",
        "SAE training",
        "held-out activation metrics (SAE forward)",
        "LM-set evaluation (model forward)",
        "per-job overhead",
    )

    def unit_seconds(w: ModelWork) -> list[float]:
        """The unit's seconds by part (start-up: only when it is a process of its own)."""
        if not w.jobs:
            return [0.0] * len(names)
        return [
            0.0 if in_process else startup,
            w.harvest / model_rate,
            w.tokens_windowed * TOKENIZE_SECONDS / 1e6,
            sum(sae_seconds(j, j.train_tokens) for j in w.jobs),
            sum(sae_seconds(j, n_act) for j in w.jobs) / 3,  # forward only: ~1/3 of a step
            w.lm_eval * lm_factor / model_rate,
            JOB_SECONDS * len(w.jobs),
        ]

    parts: dict[str, tuple[float, float]] = {}
    nan = float("nan")
    wall = {"independent": nan, "fanout": nan}
    longest = {"independent": nan, "fanout": nan}
    if math.isfinite(model_rate) and (math.isfinite(sae_rate) or not untimed):
        per = {
            "independent": [unit_seconds(w) for w in alone],
            "fanout": [unit_seconds(w) for w in fan],
        }
        once = startup if in_process and todo else 0.0
        cols = {k: [sum(u[i] for u in v) for i in range(len(names))] for k, v in per.items()}
        for k in cols:
            cols[k][0] += once
            wall[k] = sum(cols[k])
            longest[k] = max((sum(u) for u in per[k]), default=0.0) + once
        parts = {n: (cols["independent"][i], cols["fanout"][i]) for i, n in enumerate(names)}
    as_configured = wall["fanout" if sweep.grouped else "independent"]
    longest_configured = longest["fanout" if sweep.grouped else "independent"]

    # Recommendations.
    recs = []
    if cache_need > budget:
        where = "--disk-budget" if opts.disk_budget else f"50% of {si(free)} free at {cache_dir}"
        recs.append(
            f"stream (data.stream=true): a cache would need {si(cache_need)}, over the disk "
            f"budget of {si(budget)} ({where})"
            + ("" if all(j.stream for j in jobs) else "; the config caches now")
        )
    else:
        recs.append(
            f"cache (data.stream=false): {si(cache_need)} fits the disk budget of {si(budget)}"
            + ("; the config streams now, so every group runs the model over train.n_tokens"
               if any(j.stream for j in jobs) else "")
        )  # fmt: skip
    if len(groups) < len(jobs):
        sizes = ", ".join(str(n) for n in sorted({len(m) for m in groups}))
        fan_launcher = "fanout" if in_process else "slurm_fanout"
        line = (
            f"fan-out: {len(groups)} group(s) of {sizes} SAEs: one model load, one harvest "
            "(or stream) pass per group for all its sites, lockstep training, a shared "
            "evaluation prefix"
        )
        if math.isfinite(wall["independent"]) and wall["fanout"] < wall["independent"]:
            line += f" ({duration(wall['independent'])} -> {duration(wall['fanout'])})"
        if sweep.grouped:
            line += f"; the configured launcher ({sweep.launcher}) does this"
        elif in_process:
            line += (
                f"; the configured launcher ({sweep.launcher}) runs the jobs one by one: "
                f"hydra/launcher={fan_launcher} groups them"
            )
        else:
            line += (
                f"; the configured launcher ({sweep.launcher}) runs every job in a process of "
                "its own, each harvesting (or streaming) and evaluating alone: "
                f"hydra/launcher={fan_launcher} groups them"
            )
        if group_peak > 0.9 * capacity:
            line += (
                f". A group needs up to {si(group_peak)} of device memory, over 90% of "
                f"{si(capacity)}: "
                + (
                    f"hydra.launcher.max_saes={fit} (at most {fit} SAEs per process fit)"
                    if fit
                    else "not even one SAE fits beside the model's weights"
                )
            )
        recs.append(line)
    if job_peak > 0.9 * capacity:
        recs.append(
            f"one job alone needs {si(job_peak)} of device memory, over 90% of "
            f"{si(capacity)}: a bigger device or a smaller eval.batch_size"
        )
    if sweep.timeout_min and longest_configured > 60 * sweep.timeout_min:
        slots = math.ceil(longest_configured / (60 * sweep.timeout_min))
        allowed = 1 + sweep.max_num_timeout
        line = (
            f"the longest {'group' if sweep.grouped else 'job'} needs "
            f"{duration(longest_configured)}: {slots} slots of the launcher's "
            f"timeout_min={sweep.timeout_min:g}"
        )
        if slots > allowed:
            line += (
                f", more than the {allowed} that max_num_timeout={sweep.max_num_timeout} "
                "allows: raise them, or re-launch the same command when the jobs stop "
                "(finished jobs are skipped, the others resume)"
            )
        else:
            line += f" (requeued up to max_num_timeout={sweep.max_num_timeout} times)"
        if not cfg0.train.get("checkpoint_every"):
            line += "; set train.checkpoint_every so that a requeued job resumes"
        recs.append(line)
    keys = {j.group for j in jobs}
    n_done = sum(j.done for j in jobs)
    if n_done:
        recs.append(f"{n_done} job(s) already complete in results_dir: the run skips them")

    return {
        "command": list(overrides),
        "multirun": sweep.multirun,
        "launcher": sweep.launcher,
        "grouped": sweep.grouped,
        "device": str(device),
        "model": asdict(model)
        | {
            "dtype": dtype_name,
            "bytes_per_value": nbytes,
            "params": model.params,
            "non_embedding_params": model.non_embedding_params,
            "block_params": model.block_params,
        },  # fmt: skip
        "n_jobs": len(jobs),
        "n_done": n_done,
        "jobs": [
            {k: v for k, v in asdict(j).items() if k != "cfg"} | {"group": j.group[:8]}
            for j in jobs
        ],
        "groups": [
            {
                "group": m[0].group[:8] + (f"-{i}" if len(groups) > len(keys) else ""),
                "layer": m[0].layer,
                "sites": sorted({j.site for j in m}),
                "saes": sorted({j.sae for j in m}),
                "n_saes": len(m),
                "device_peak_bytes": device_peak(m),
            }
            for i, m in enumerate(groups)
        ],  # fmt: skip
        "activations": [
            asdict(s) | {"train_bytes": s.train_bytes, "eval_bytes": s.eval_bytes} for s in sets
        ],
        "cache_bytes": cache_need,
        "free_disk_bytes": free,
        "disk_budget_bytes": budget,
        "flops": {
            "full_forward_per_position": model.full(int(cfg0.data.context_length)),
            "harvest_independent": flops_of["independent"]["harvest"],
            "harvest_fanout": flops_of["fanout"]["harvest"],
            "lm_eval_independent": flops_of["independent"]["lm_eval"],
            "lm_eval_fanout": flops_of["fanout"]["lm_eval"],
            "sae_training_per_sae": f_sae,
            "sae_training_total": sum(f_sae.values()),
            "sae_activation_metrics": f_sae_eval,
        },
        "memory": {
            "model_weights_bytes": weights,
            "sae_state_bytes_max": per_sae,
            "sae_step_bytes_max": max(step_tensors(j) for j in jobs),
            "stream_buffers_bytes_max": max(buffers(m) for m in groups),
            "eval_logits_bytes": logits,
            "device_peak_job_bytes": job_peak,
            "device_peak_group_bytes": group_peak,
            "host_peak_job_bytes": max(host_peak([j]) for j in jobs),
            "host_peak_group_bytes": max(host_peak(m) for m in groups),
            "device_capacity_bytes": capacity,
            "saes_per_process_fit": fit,
        },
        "throughput": {
            "model_flops_per_s": model_rate,
            "note": rate_note,
            "efficiency": eff,
            "matmul_flops_per_s": measured,
            "sae_timings": [asdict(t) | {"scaled": t.scaled} for t in timings.values()],
        },
        "time_seconds": {k: {"independent": a, "fanout": b} for k, (a, b) in parts.items()},
        "wall_seconds_independent": wall["independent"],
        "wall_seconds_fanout": wall["fanout"],
        "wall_seconds_as_configured": as_configured,
        "longest_unit_seconds_independent": longest["independent"],
        "longest_unit_seconds_fanout": longest["fanout"],
        "longest_unit_seconds_as_configured": longest_configured,
        "launcher_timeout_min": sweep.timeout_min,
        "model_converted": converted,
        "notes": notes,
        "recommendations": recs,
        "plan_seconds": time.perf_counter() - t_start,
    }


# ---- printing ----


def si(x: float, unit: str = "B") -> str:
    """123 MB, 4.56 TB, 7.8 PFLOP: SI prefixes; bytes stop at TB (a disk is sized in TB)."""
    if not math.isfinite(x):
        return "n/a"
    prefixes = [("E", 1e18), ("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)]
    for prefix, scale in prefixes[2:] if unit == "B" else prefixes:
        if abs(x) >= scale:
            v = x / scale
            return f"{v:,.0f} {prefix}{unit}" if v >= 1000 else f"{v:.3g} {prefix}{unit}"
    return f"{x:.3g} {unit}"


def duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "n/a"
    for unit, size in (("years", 365.25 * 86400), ("days", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:,.3g} {unit}"
    return f"{seconds:.2g} s"


def parse_size(text: str, flag: str) -> float:
    """'500GB', '2T', '1.5TB', '1e12' -> bytes (SI)."""
    m = re.fullmatch(r"\s*([0-9.]+(?:[eE][+-]?[0-9]+)?)\s*([kKMGTP]?)B?\s*", text)
    if not m:
        raise ConfigError(f"{flag}={text}: not a size; e.g. 500GB, 2TB, 1e12")
    scale = {"": 1.0, "k": 1e3, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15}[m[2]]
    return float(m[1]) * scale


def render(plan: dict[str, Any]) -> str:
    import pandas as pd

    m, out = plan["model"], []
    cmd = " ".join(plan["command"]) or "(defaults)"
    mode = "multirun" if plan["multirun"] else "single run"
    grouping = "fan-out groups" if plan["grouped"] else "one job at a time"
    out.append(
        f"Plan: {cmd}  [{mode}; launcher {plan['launcher']}: {grouping}; device {plan['device']}]"
    )
    out.append(
        f"Model {m['name']}: {m['n_layers']} layers, d_model {m['d_model']}, d_mlp {m['d_mlp']}, "
        f"{m['n_heads']} heads x {m['d_head']} ({m['n_kv_heads']} KV), vocab {m['d_vocab']:,}; "
        f"{m['params'] / 1e9:.3g}B parameters ({m['non_embedding_params'] / 1e9:.3g}B "
        f"non-embedding); {m['dtype']}"
    )
    if m["assumed"]:
        out.append(f"  assumed (not in conf/model; {m['source']}): " + ", ".join(m["assumed"]))

    groups = pd.DataFrame(plan["groups"])
    out += ["", f"## Jobs: {plan['n_jobs']} ({plan['n_done']} complete already), "
            f"{len(groups)} fan-out group(s) by benchmark.identity.group_key"]  # fmt: skip
    groups["sites"] = groups["sites"].map(", ".join)
    groups["saes"] = groups["saes"].map(", ".join)
    groups["device peak"] = groups.pop("device_peak_bytes").map(si)
    groups = groups.rename(columns={"n_saes": "SAEs"})
    if len(groups) > 12:  # one row per kind of group
        groups = (
            groups.groupby(["layer", "sites", "SAEs", "device peak"], sort=False)
            .size()
            .reset_index(name="groups")
        )
    out.append(groups.to_markdown(index=False))

    a = pd.DataFrame(plan["activations"])
    out += ["", f"## Activations: tokens x d_in x {m['bytes_per_value']} B ({m['dtype']})"]
    table = pd.DataFrame({
        "layer": a["layer"], "site": a["site"], "d_in": a["d_in"],
        "train tokens": a["train_tokens"].map("{:,}".format),
        "train volume": a["train_bytes"].map(si),
        "train set": [("stream" if s else "cache") + (", cached" if c and not s else "")
                      for s, c in zip(a["stream"], a["train_cached"], strict=True)],
        "held-out tokens": a["eval_tokens"].map("{:,}".format),
        "held-out volume": a["eval_bytes"].map(si),
        "held-out cached": a["eval_cached"].map({True: "yes", False: "no"}),
    })  # fmt: skip
    out.append(table.to_markdown(index=False))
    out.append(
        f"Disk for a cache of all of it: {si(plan['cache_bytes'])} (free at cache_dir: "
        f"{si(plan['free_disk_bytes'])}; budget {si(plan['disk_budget_bytes'])})"
    )

    f = plan["flops"]
    out += ["", "## Compute, FLOPs (model: F(n) = 2 n P_block + 2 n ctx d_attn per position, "
            "+ 2 d_model d_vocab for logits)"]  # fmt: skip
    rows = [
        ("harvest / stream: truncated forward F(L+1)", f["harvest_independent"], f["harvest_fanout"]),
        ("LM set: prefix, clean, spliced, zero ablation", f["lm_eval_independent"], f["lm_eval_fanout"]),
        ("SAE training, all SAEs: 12 d_in d_sae per token", f["sae_training_total"], f["sae_training_total"]),
        ("SAE on the held-out set: 4 d_in d_sae per token", f["sae_activation_metrics"], f["sae_activation_metrics"]),
    ]  # fmt: skip
    comp = pd.DataFrame(
        [(k, si(a, "FLOP"), si(b, "FLOP")) for k, a, b in rows],
        columns=["", "jobs one at a time", "fan-out groups"],
    )
    out.append(comp.to_markdown(index=False))
    per_sae = list(f["sae_training_per_sae"].values())
    if per_sae:
        lo, hi = min(per_sae), max(per_sae)
        span = si(lo, "FLOP") if lo == hi else f"{si(lo, 'FLOP')} to {si(hi, 'FLOP')}"
        out.append(f"Per SAE: {span} (6 x d_in x d_sae x 2 x tokens: a bound for a dense step)")

    mem = plan["memory"]
    out += ["", "## Memory (estimates)"]
    memrows = [
        ("model weights", mem["model_weights_bytes"]),
        ("one SAE: weights + gradients + Adam, fp32 x 4 (largest)", mem["sae_state_bytes_max"]),
        ("one SAE step's tensors: 4 x batch x d_sae fp32 (largest)", mem["sae_step_bytes_max"]),
        ("stream shuffle buffers of a group, host (rows x d_in x dtype per site)", mem["stream_buffers_bytes_max"]),
        ("evaluation logits: eval.batch_size x ctx x d_vocab x dtype (x 2 with KL)", mem["eval_logits_bytes"]),
        ("device peak, one job", mem["device_peak_job_bytes"]),
        ("device peak, one fan-out group", mem["device_peak_group_bytes"]),
        ("host peak, one job", mem["host_peak_job_bytes"]),
        ("host peak, one fan-out group", mem["host_peak_group_bytes"]),
        (f"memory of {plan['device']}", mem["device_capacity_bytes"]),
    ]  # fmt: skip
    out.append(
        pd.DataFrame([(k, si(v)) for k, v in memrows], columns=["", "bytes"]).to_markdown(
            index=False
        )
    )
    out.append(f"SAEs that fit one process (90% of the device): {mem['saes_per_process_fit']}")

    th = plan["throughput"]
    out += [
        "",
        f"## Wall time (model forward at {si(th['model_flops_per_s'], 'FLOP/s')}: {th['note']})",
    ]
    for t in th["sae_timings"]:
        rate = 1.0 / (t["seconds_per_token"] * t["d_sae"] / t["timed_width"])
        how = (
            f"timed at width {t['timed_width']:,}, batch {t['timed_batch']:,}, "
            f"scaled linearly in d_sae"
            if t["scaled"]
            else "timed at this shape"
        )
        out.append(
            f"- SAE {t['sae']} {t['d_in']} -> {t['d_sae']:,}, batch {t['batch']:,}: "
            f"{rate:,.0f} tokens/s ({how}; {t['steps']} steps after one warm-up)"
        )
    out += [f"- {n}" for n in plan["notes"]]
    if plan["time_seconds"]:
        rows2 = [(k, duration(v["independent"]), duration(v["fanout"]))
                 for k, v in plan["time_seconds"].items()]  # fmt: skip
        rows2.append(
            (
                "total",
                duration(plan["wall_seconds_independent"]),
                duration(plan["wall_seconds_fanout"]),
            )
        )
        out.append(
            pd.DataFrame(rows2, columns=["", "jobs one at a time", "fan-out groups"]).to_markdown(
                index=False
            )
        )
        out.append(
            f"As configured: {duration(plan['wall_seconds_as_configured'])} on one device, one "
            f"after another; the longest single {'group' if plan['grouped'] else 'job'} "
            f"{duration(plan['longest_unit_seconds_as_configured'])} (the wall time with a "
            "device per job or group)"
        )
    out += ["", "## Recommendations"] + [f"- {r}" for r in plan["recommendations"]]
    out.append(f"(planned in {plan['plan_seconds']:.1f} s)")
    return "\n".join(out)


# ---- command line ----


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line and status 2, as for a bad override
        cli_errors.fail(message)


def parse_args(argv: Sequence[str]) -> tuple[list[str], Options]:
    p = _Parser(
        prog="python -m benchmark.plan",
        description="Plan a run or a sweep; takes the overrides of python -m benchmark.run.",
    )
    p.add_argument("-m", "--multirun", action="store_true", help="a sweep (as the run's -m)")
    p.add_argument("--json", metavar="PATH", help="also write the plan as JSON")
    p.add_argument("--tflops", type=float, help="the device's matmul TFLOP/s in the model's "
                   "dtype, instead of measuring it here (x the efficiency)")  # fmt: skip
    p.add_argument("--sae-tflops", type=float, help="TFLOP/s of SAE steps that cannot be "
                   "timed here (default: --tflops x the train.precision ratio, "
                   f"{PRECISION_RATIO})")  # fmt: skip
    p.add_argument("--efficiency", type=float, help="model forward FLOP/s over the matmul's "
                   f"(default: {MODEL_EFFICIENCY})")  # fmt: skip
    p.add_argument("--disk-budget", metavar="SIZE", help="disk a cache may use, e.g. 2TB "
                   "(default: 50%% of the free space at cache_dir)")  # fmt: skip
    p.add_argument("--device-memory", metavar="SIZE", help="the device's memory (default: "
                   "this machine's; 80GB for a CUDA device it lacks)")  # fmt: skip
    p.add_argument("--no-timing", action="store_true", help="skip the SAE step timings")
    p.add_argument("overrides", nargs="*", help="Hydra overrides, as for benchmark.run")
    a = p.parse_intermixed_args(list(argv))
    opts = Options(
        multirun=a.multirun, json=a.json, tflops=a.tflops, sae_tflops=a.sae_tflops,
        efficiency=a.efficiency,
        disk_budget=parse_size(a.disk_budget, "--disk-budget") if a.disk_budget else None,
        device_memory=parse_size(a.device_memory, "--device-memory") if a.device_memory else None,
        timing=not a.no_timing,
    )  # fmt: skip
    return list(a.overrides), opts


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    return obj


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m benchmark.plan [-m] [flags] [overrides]`: print the plan (exit 0), or one
    `error: ...` line on stderr and exit 2 for a user error (HYDRA_FULL_ERROR=1: traceback)."""
    try:
        overrides, opts = parse_args(sys.argv[1:] if argv is None else argv)
        plan = build_plan(overrides, opts)
        if opts.json:
            Path(opts.json).write_text(json.dumps(_jsonable(plan), indent=1) + "\n")
        print(render(plan), flush=True)
    except BrokenPipeError:  # `| head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except ConfigError as e:
        if cli_errors.debug():
            raise
        cli_errors.fail(str(e))
    except Exception as e:
        message = None if cli_errors.debug() else cli_errors.describe(e)
        if message is None:
            raise
        cli_errors.fail(message)
    return 0


if __name__ == "__main__":
    sys.exit(main())
