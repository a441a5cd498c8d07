"""`build_plan`: the steps of a plan in order (compose the sweep, activation sets and disk,
model FLOPs, rates, memory, wall time, recommendations) and the plain data they make (what
`render` prints and --json writes)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from benchmark.plan.advice import recommendations
from benchmark.plan.basis import Basis, Options
from benchmark.plan.costs import Disk, ModelWork, model_work, sae_flops
from benchmark.plan.jobs import compose_jobs, groups_of
from benchmark.plan.memory import Fit, Memory, device_memory
from benchmark.plan.throughput import Throughput, throughput
from benchmark.plan.walltime import WallTime, wall_time


def build_plan(overrides: Sequence[str], opts: Options | None = None) -> dict[str, Any]:
    """Everything the plan prints, as plain data (the --json file)."""
    opts = opts or Options()
    t_start = time.perf_counter()
    b = Basis.of(compose_jobs(overrides, opts.multirun))
    disk = Disk.of(b, opts)
    # FLOPs: independent jobs and fan-out groups.
    work = {
        "independent": model_work(groups_of(b.jobs, False), disk.sets, b.model),
        "fanout": model_work(b.groups, disk.sets, b.model),
    }
    th = throughput(b, opts)
    mem = Memory.of(b, th.timings)
    fit = Fit.of(mem, b, device_memory(b.device, th.here, opts.device_memory))
    wall = wall_time(b, work, th)
    recs = recommendations(b, disk, wall, fit, opts)
    plan = {"command": list(overrides)} | sweep_data(b, mem) | disk_data(disk)
    plan |= {
        "flops": flops_data(b, work),
        "memory": memory_data(b, mem, fit),
        "throughput": throughput_data(th),
    }
    plan |= wall_data(wall) | {
        "launcher_timeout_min": b.sweep.timeout_min,
        "model_converted": wall.converted,
        "notes": th.notes,
        "recommendations": recs,
        "plan_seconds": time.perf_counter() - t_start,
    }
    return plan


def sweep_data(b: Basis, mem: Memory) -> dict[str, Any]:
    """The launcher, the model, the jobs and the fan-out groups."""
    model, groups = b.model, b.groups
    keys = {j.group for j in b.jobs}
    return {
        "multirun": b.sweep.multirun,
        "launcher": b.sweep.launcher,
        "grouped": b.sweep.grouped,
        "device": str(b.device),
        "model": asdict(model)
        | {
            "dtype": b.dtype_name,
            "bytes_per_value": b.nbytes,
            "params": model.params,
            "non_embedding_params": model.non_embedding_params,
            "block_params": model.block_params,
        },  # fmt: skip
        "n_jobs": len(b.jobs),
        "n_done": sum(j.done for j in b.jobs),
        "jobs": [
            {k: v for k, v in asdict(j).items() if k != "cfg"} | {"group": j.group[:8]}
            for j in b.jobs
        ],
        "groups": [
            {
                "group": m[0].group[:8] + (f"-{i}" if len(groups) > len(keys) else ""),
                "layer": m[0].layer,
                "sites": sorted({j.site for j in m}),
                "saes": sorted({j.sae for j in m}),
                "n_saes": len(m),
                "device_peak_bytes": mem.device_peak(m),
            }
            for i, m in enumerate(groups)
        ],  # fmt: skip
    }


def disk_data(disk: Disk) -> dict[str, Any]:
    return {
        "activations": [
            asdict(s) | {"train_bytes": s.train_bytes, "eval_bytes": s.eval_bytes}
            for s in disk.sets
        ],
        "cache_bytes": disk.need,
        "free_disk_bytes": disk.free,
        "disk_budget_bytes": disk.budget,
    }


def flops_data(b: Basis, work: dict[str, list[ModelWork]]) -> dict[str, Any]:
    flops_of = {k: {p: sum(getattr(w, p) for w in ws) for p in ("harvest", "lm_eval")}
                for k, ws in work.items()}  # fmt: skip
    n_act = int(b.cfg0.eval.n_activation_tokens)
    todo = b.todo
    f_sae = {Path(j.run_dir).name: sae_flops(j) for j in todo if j.d_sae}
    return {
        "full_forward_per_position": b.model.full(int(b.cfg0.data.context_length)),
        "harvest_independent": flops_of["independent"]["harvest"],
        "harvest_fanout": flops_of["fanout"]["harvest"],
        "lm_eval_independent": flops_of["independent"]["lm_eval"],
        "lm_eval_fanout": flops_of["fanout"]["lm_eval"],
        "sae_training_per_sae": f_sae,
        "sae_training_total": sum(f_sae.values()),
        "sae_activation_metrics": sum(4.0 * j.d_in * (j.d_sae or 0) * n_act for j in todo),
    }


def memory_data(b: Basis, mem: Memory, fit: Fit) -> dict[str, Any]:
    jobs, groups = b.jobs, b.groups
    return {
        "model_weights_bytes": mem.weights,
        "sae_state_bytes_max": fit.per_sae,
        "sae_step_bytes_max": fit.max_step,
        "stream_buffers_bytes_max": max(mem.buffers(m) for m in groups),
        "eval_logits_bytes": mem.logits,
        "device_peak_job_bytes": fit.job_peak,
        "device_peak_group_bytes": fit.group_peak,
        "host_peak_job_bytes": max(mem.host_peak([j]) for j in jobs),
        "host_peak_group_bytes": max(mem.host_peak(m) for m in groups),
        "device_capacity_bytes": fit.capacity,
        "saes_per_process_fit": fit.fit,
    }


def throughput_data(th: Throughput) -> dict[str, Any]:
    return {
        "model_flops_per_s": th.model_rate,
        "note": th.note,
        "efficiency": th.efficiency,
        "matmul_flops_per_s": th.measured,
        "sae_timings": [asdict(t) | {"scaled": t.scaled} for t in th.timings.values()],
    }


def wall_data(wall: WallTime) -> dict[str, Any]:
    return {
        "time_seconds": {k: {"independent": a, "fanout": b} for k, (a, b) in wall.parts.items()},
        "wall_seconds_independent": wall.wall["independent"],
        "wall_seconds_fanout": wall.wall["fanout"],
        "wall_seconds_as_configured": wall.as_configured,
        "longest_unit_seconds_independent": wall.longest["independent"],
        "longest_unit_seconds_fanout": wall.longest["fanout"],
        "longest_unit_seconds_as_configured": wall.longest_configured,
    }
