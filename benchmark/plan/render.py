"""The plan as text: a header, then one Markdown section per part (jobs, activations, FLOPs,
memory, wall time, recommendations), with SI sizes and readable durations."""

from __future__ import annotations

import math
from typing import Any


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


def render(plan: dict[str, Any]) -> str:
    """The plan (build_plan's dict) as the text `python -m benchmark.plan` prints."""
    out = header(plan)
    out += jobs_section(plan)
    out += activations_section(plan)
    out += flops_section(plan)
    out += memory_section(plan)
    out += wall_time_section(plan)
    out += ["", "## Recommendations"] + [f"- {r}" for r in plan["recommendations"]]
    out.append(f"(planned in {plan['plan_seconds']:.1f} s)")
    return "\n".join(out)


def header(plan: dict[str, Any]) -> list[str]:
    m = plan["model"]
    cmd = " ".join(plan["command"]) or "(defaults)"
    mode = "multirun" if plan["multirun"] else "single run"
    grouping = "fan-out groups" if plan["grouped"] else "one job at a time"
    out = [
        f"Plan: {cmd}  [{mode}; launcher {plan['launcher']}: {grouping}; device {plan['device']}]",
        f"Model {m['name']}: {m['n_layers']} layers, d_model {m['d_model']}, d_mlp {m['d_mlp']}, "
        f"{m['n_heads']} heads x {m['d_head']} ({m['n_kv_heads']} KV), vocab {m['d_vocab']:,}; "
        f"{m['params'] / 1e9:.3g}B parameters ({m['non_embedding_params'] / 1e9:.3g}B "
        f"non-embedding); {m['dtype']}",
    ]
    if m["assumed"]:
        out.append(f"  assumed (not in conf/model; {m['source']}): " + ", ".join(m["assumed"]))
    return out


def jobs_section(plan: dict[str, Any]) -> list[str]:
    import pandas as pd

    groups = pd.DataFrame(plan["groups"])
    out = ["", f"## Jobs: {plan['n_jobs']} ({plan['n_done']} complete already), "
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
    return out


def activations_section(plan: dict[str, Any]) -> list[str]:
    import pandas as pd

    m = plan["model"]
    a = pd.DataFrame(plan["activations"])
    out = ["", f"## Activations: tokens x d_in x {m['bytes_per_value']} B ({m['dtype']})"]
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
    return out


def flops_section(plan: dict[str, Any]) -> list[str]:
    import pandas as pd

    f = plan["flops"]
    out = ["", "## Compute, FLOPs (model: F(n) = 2 n P_block + 2 n ctx d_attn per position, "
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
    return out


def memory_section(plan: dict[str, Any]) -> list[str]:
    import pandas as pd

    mem = plan["memory"]
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
    table = pd.DataFrame([(k, si(v)) for k, v in memrows], columns=["", "bytes"])
    return [
        "",
        "## Memory (estimates)",
        table.to_markdown(index=False),
        f"SAEs that fit one process (90% of the device): {mem['saes_per_process_fit']}",
    ]


def wall_time_section(plan: dict[str, Any]) -> list[str]:
    th = plan["throughput"]
    out = [
        "",
        f"## Wall time (model forward at {si(th['model_flops_per_s'], 'FLOP/s')}: {th['note']})",
    ]
    out += [sae_timing_line(t) for t in th["sae_timings"]]
    out += [f"- {n}" for n in plan["notes"]]
    if plan["time_seconds"]:
        out += wall_time_table(plan)
    return out


def sae_timing_line(t: dict[str, Any]) -> str:
    rate = 1.0 / (t["seconds_per_token"] * t["d_sae"] / t["timed_width"])
    how = (
        f"timed at width {t['timed_width']:,}, batch {t['timed_batch']:,}, scaled linearly in d_sae"
        if t["scaled"]
        else "timed at this shape"
    )
    return (
        f"- SAE {t['sae']} {t['d_in']} -> {t['d_sae']:,}, batch {t['batch']:,}: "
        f"{rate:,.0f} tokens/s ({how}; {t['steps']} steps after one warm-up)"
    )


def wall_time_table(plan: dict[str, Any]) -> list[str]:
    import pandas as pd

    rows = [(k, duration(v["independent"]), duration(v["fanout"]))
            for k, v in plan["time_seconds"].items()]  # fmt: skip
    rows.append(
        (
            "total",
            duration(plan["wall_seconds_independent"]),
            duration(plan["wall_seconds_fanout"]),
        )
    )
    table = pd.DataFrame(rows, columns=["", "jobs one at a time", "fan-out groups"])
    return [
        table.to_markdown(index=False),
        f"As configured: {duration(plan['wall_seconds_as_configured'])} on one device, one "
        f"after another; the longest single {'group' if plan['grouped'] else 'job'} "
        f"{duration(plan['longest_unit_seconds_as_configured'])} (the wall time with a "
        "device per job or group)",
    ]
