"""The plan's recommendations: cache or stream, the fan-out grouping and its launcher,
`max_saes` when a group does not fit the device, and the time-out slots of a SLURM job."""

from __future__ import annotations

import math

from benchmark.plan.basis import Basis, Options
from benchmark.plan.costs import Disk
from benchmark.plan.memory import Fit
from benchmark.plan.render import duration, si
from benchmark.plan.walltime import WallTime


def recommendations(b: Basis, disk: Disk, wall: WallTime, fit: Fit, opts: Options) -> list[str]:
    recs = [cache_advice(b, disk, opts)]
    if len(b.groups) < len(b.jobs):
        recs.append(fanout_advice(b, wall, fit))
    if fit.job_peak > 0.9 * fit.capacity:
        recs.append(
            f"one job alone needs {si(fit.job_peak)} of device memory, over 90% of "
            f"{si(fit.capacity)}: a bigger device or a smaller eval.batch_size"
        )
    timeout_min = b.sweep.timeout_min
    if timeout_min and wall.longest_configured > 60 * timeout_min:
        recs.append(timeout_advice(b, wall))
    n_done = sum(j.done for j in b.jobs)
    if n_done:
        recs.append(f"{n_done} job(s) already complete in results_dir: the run skips them")
    return recs


def cache_advice(b: Basis, disk: Disk, opts: Options) -> str:
    """Stream when a cache of every activation set would exceed the disk budget."""
    need, budget = disk.need, disk.budget
    if need > budget:
        where = (
            "--disk-budget"
            if opts.disk_budget
            else f"50% of {si(disk.free)} free at {disk.cache_dir}"
        )
        return (
            f"stream (data.stream=true): a cache would need {si(need)}, over the disk "
            f"budget of {si(budget)} ({where})"
            + ("" if all(j.stream for j in b.jobs) else "; the config caches now")
        )
    return (
        f"cache (data.stream=false): {si(need)} fits the disk budget of {si(budget)}"
        + ("; the config streams now, so every group runs the model over train.n_tokens"
           if any(j.stream for j in b.jobs) else "")
    )  # fmt: skip


def fanout_advice(b: Basis, wall: WallTime, fit: Fit) -> str:
    """What grouping saves, which launcher groups, and max_saes when a group does not fit."""
    sweep, groups = b.sweep, b.groups
    sizes = ", ".join(str(n) for n in sorted({len(m) for m in groups}))
    fan_launcher = "fanout" if sweep.in_process else "slurm_fanout"
    line = (
        f"fan-out: {len(groups)} group(s) of {sizes} SAEs: one model load, one harvest "
        "(or stream) pass per group for all its sites, lockstep training, a shared "
        "evaluation prefix"
    )
    if math.isfinite(wall.wall["independent"]) and wall.wall["fanout"] < wall.wall["independent"]:
        line += f" ({duration(wall.wall['independent'])} -> {duration(wall.wall['fanout'])})"
    if sweep.grouped:
        line += f"; the configured launcher ({sweep.launcher}) does this"
    elif sweep.in_process:
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
    if fit.group_peak > 0.9 * fit.capacity:
        line += (
            f". A group needs up to {si(fit.group_peak)} of device memory, over 90% of "
            f"{si(fit.capacity)}: "
            + (
                f"hydra.launcher.max_saes={fit.fit} (at most {fit.fit} SAEs per process fit)"
                if fit.fit
                else "not even one SAE fits beside the model's weights"
            )
        )
    return line


def timeout_advice(b: Basis, wall: WallTime) -> str:
    """The launcher's time-out slots the longest unit needs, against its requeues."""
    sweep, longest = b.sweep, wall.longest_configured
    assert sweep.timeout_min
    slots = math.ceil(longest / (60 * sweep.timeout_min))
    allowed = 1 + sweep.max_num_timeout
    line = (
        f"the longest {'group' if sweep.grouped else 'job'} needs "
        f"{duration(longest)}: {slots} slots of the launcher's "
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
    if not b.cfg0.train.get("checkpoint_every"):
        line += "; set train.checkpoint_every so that a requeued job resumes"
    return line
