"""Plan a run or a sweep before running it: jobs, fan-out groups, activation volume, FLOPs,
memory and wall time. Offline and in seconds: no weights and no data are loaded.

    python -m benchmark.plan +experiment=gemma2_9b_full                      # on this machine
    python -m benchmark.plan +experiment=gemma2_9b_full device=cuda --tflops 989   # for a GPU
    python -m benchmark.plan -m sae=jumprelu,topk sparsity=l0_20,l0_40 --json plan.json

It takes the same overrides as `python -m benchmark.run`, composes every job as the run would
(Hydra's compose API and basic sweeper on conf/) and runs the run's up-front checks: a bad
override ends as in the run, one `error: ...` line on stderr and exit status 2. Jobs whose
folder holds a complete result.json count as done; activation caches already in cache_dir are
not harvested again. It prints (and writes as JSON with --json PATH) the jobs and fan-out
groups, the activation volume per (layer, site), FLOPs, memory per job and per group, the wall
time (SAE steps and a matmul timed here, or --tflops for a device this machine lacks) and
recommendations (cache or stream, the fan-out launcher and `max_saes`, SLURM time-out slots).
It must not load a model, read data or train.

What it counts, the formulas, the stated constants and the validation against measured runs:
docs/paper_scale.md. The parts: `jobs` (the sweep, run folders, fan-out groups), `model` (the
model's shape and forward FLOPs), `costs` (activation sets, disk, model work, SAE FLOPs),
`memory`, `timing` (matmul rate, SAE steps), `throughput` (the rates planned with), `walltime`,
`advice` (recommendations), `build` (`build_plan`), `render` (the text) and `cli` (`main`).
"""

from benchmark.plan.assumptions import (
    CONVERT_SECONDS,
    DEFAULT_DEVICE_MEMORY,
    FP32_RATIO,
    HOST_BASE_BYTES,
    JOB_SECONDS,
    LM_EVAL_FACTOR,
    MIN_BATCH,
    MIN_WIDTH,
    MODEL_EFFICIENCY,
    PRECISION_RATIO,
    READER_BUFFER_BYTES,
    SAE_EFFICIENCY,
    SAE_STATE_COPIES,
    SAE_STEP_TENSORS,
    STARTUP_SECONDS,
    STEP_SECONDS,
    TIMED_SECONDS,
    TOKENIZE_SECONDS,
)
from benchmark.plan.basis import Basis, Options
from benchmark.plan.build import build_plan
from benchmark.plan.cli import jsonable, main, parse_args, parse_size
from benchmark.plan.costs import (
    Activations,
    Disk,
    ModelWork,
    activation_sets,
    cached,
    free_disk,
    glob_escape,
    model_work,
    sae_flops,
    set_key,
)
from benchmark.plan.jobs import Job, Sweep, compose_jobs, expand, groups_of
from benchmark.plan.memory import Fit, Memory, device_memory
from benchmark.plan.model import KNOWN_SHAPES, SHAPE_KEYS, ModelShape, resolve
from benchmark.plan.render import duration, render, si
from benchmark.plan.throughput import Throughput, throughput
from benchmark.plan.timing import SAETiming, available, matmul_flops, sync, time_sae
from benchmark.plan.walltime import WallTime, wall_time

_jsonable = jsonable  # the name tests/test_plan.py and older callers use

__all__ = [
    "CONVERT_SECONDS", "DEFAULT_DEVICE_MEMORY", "FP32_RATIO", "HOST_BASE_BYTES", "JOB_SECONDS",
    "KNOWN_SHAPES", "LM_EVAL_FACTOR", "MIN_BATCH", "MIN_WIDTH", "MODEL_EFFICIENCY",
    "PRECISION_RATIO", "READER_BUFFER_BYTES", "SAE_EFFICIENCY", "SAE_STATE_COPIES",
    "SAE_STEP_TENSORS", "SHAPE_KEYS", "STARTUP_SECONDS", "STEP_SECONDS", "TIMED_SECONDS",
    "TOKENIZE_SECONDS", "Activations", "Basis", "Disk", "Fit", "Job", "Memory", "ModelShape",
    "ModelWork", "Options", "SAETiming", "Sweep", "Throughput", "WallTime", "activation_sets",
    "available", "build_plan", "cached", "compose_jobs", "device_memory", "duration", "expand",
    "free_disk", "glob_escape", "groups_of", "jsonable", "main", "matmul_flops", "model_work",
    "parse_args", "parse_size", "render", "resolve", "sae_flops", "set_key", "si", "sync",
    "throughput", "time_sae", "wall_time",
]  # fmt: skip
