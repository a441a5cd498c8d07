"""The rates the wall time is planned at: the model's forward FLOP/s (measured here, or from
--tflops) and each architecture's SAE step (timed here, or the dense bound at a stated rate)."""

from __future__ import annotations

from dataclasses import dataclass, field

from benchmark.errors import ConfigError
from benchmark.plan.assumptions import (
    FP32_RATIO,
    LM_EVAL_FACTOR,
    MODEL_EFFICIENCY,
    PRECISION_RATIO,
    SAE_EFFICIENCY,
)
from benchmark.plan.basis import Basis, Options
from benchmark.plan.jobs import Job
from benchmark.plan.render import si
from benchmark.plan.timing import SAETiming, available, matmul_flops, time_sae


@dataclass
class Throughput:
    here: bool  # the device is on this machine
    efficiency: float  # model forward FLOP/s over the matmul's
    model_rate: float  # model forward FLOP/s (nan: unknown)
    note: str  # where model_rate comes from
    measured: dict[str, float] = field(default_factory=dict)  # matmul FLOP/s by dtype name
    timings: dict[str, SAETiming] = field(default_factory=dict)  # by architecture
    notes: list[str] = field(default_factory=list)
    sae_rate: float = float("nan")  # FLOP/s of the SAE steps not timed
    untimed: list[str] = field(default_factory=list)  # architectures not timed

    def sae_seconds(self, j: Job, tokens: float) -> float:
        """Seconds of `tokens` of j's SAE: its architecture's timing, else the dense bound."""
        if j.d_sae is None:
            return 0.0
        t = self.timings.get(j.sae)
        if t is not None:
            return t.per_token(j.d_in, j.d_sae) * tokens
        return 12.0 * j.d_in * j.d_sae * tokens / self.sae_rate


def throughput(b: Basis, opts: Options) -> Throughput:
    """Measure (in this order) the model dtype's matmul, the fp32 matmul and each
    architecture's SAE step, where the device is here and no flag replaces them."""
    here = available(b.device)
    eff = (
        opts.efficiency if opts.efficiency is not None else MODEL_EFFICIENCY.get(b.device.type, 0.4)
    )
    th = Throughput(here=here, efficiency=eff, model_rate=float("nan"), note="")
    set_model_rate(th, b, opts)
    if here and opts.timing:
        time_saes(th, b)
    set_sae_rate(th, b, opts)
    return th


def set_model_rate(th: Throughput, b: Basis, opts: Options) -> None:
    import torch

    device, dtype_name, eff = b.device, b.dtype_name, th.efficiency
    if opts.tflops is not None:
        th.model_rate = opts.tflops * 1e12 * eff
        th.note = f"--tflops {opts.tflops:g} x efficiency {eff:g}"
    elif th.here:
        th.measured[dtype_name] = matmul_flops(device, b.dtype)
        th.model_rate = th.measured[dtype_name] * eff
        threads = f", {torch.get_num_threads()} threads" if device.type == "cpu" else ""
        th.note = (
            f"a {dtype_name} matmul's {si(th.measured[dtype_name], 'FLOP/s')} measured on "
            f"{device.type}{threads} x efficiency {eff:g}; LM-set passes x {LM_EVAL_FACTOR.get(device.type, 1.2)}"
        )
    else:
        th.note = f"{device} is not on this machine: pass --tflops (its {dtype_name} TFLOP/s)"


def time_saes(th: Throughput, b: Basis) -> None:
    """One timing per architecture: its median-L0 job at its most common d_in."""
    import torch

    if "float32" not in th.measured:
        th.measured["float32"] = matmul_flops(b.device, torch.float32)
    todo = b.todo
    for name in dict.fromkeys(j.sae for j in todo if j.d_sae):
        mine = [j for j in todo if j.sae == name and j.d_sae]
        d_in = max({j.d_in for j in mine}, key=[j.d_in for j in mine].count)
        mine = sorted((j for j in mine if j.d_in == d_in), key=lambda j: j.target_l0 or 0)
        try:
            th.timings[name] = time_sae(mine[len(mine) // 2], b.device, th.measured["float32"])
        except ConfigError:
            raise
        except Exception as e:  # noqa: BLE001  (the dense bound below stands in)
            th.notes.append(f"SAE {name} could not be timed ({type(e).__name__}: {e})")


def set_sae_rate(th: Throughput, b: Basis, opts: Options) -> None:
    """SAE steps not timed: the dense bound at the rate of train.precision x SAE_EFFICIENCY."""
    import torch

    precision = str(b.cfg0.train.get("precision") or "fp32")
    ratio = PRECISION_RATIO.get(precision, FP32_RATIO)
    if opts.sae_tflops is not None:
        sae_tflops, how = opts.sae_tflops, "--sae-tflops"
    elif opts.tflops is not None:
        sae_tflops, how = opts.tflops * ratio, f"--tflops x {ratio:g}: train.precision={precision}"
    elif "float32" in th.measured:
        sae_tflops, how = th.measured["float32"] / 1e12, "the fp32 matmul measured here"
    elif th.here:
        th.measured["float32"] = matmul_flops(b.device, torch.float32)
        sae_tflops, how = th.measured["float32"] / 1e12, "the fp32 matmul measured here"
    else:
        sae_tflops, how = float("nan"), "unknown: pass --tflops or --sae-tflops"
    th.sae_rate = sae_tflops * 1e12 * SAE_EFFICIENCY
    th.untimed = sorted({j.sae for j in b.todo if j.d_sae and j.sae not in th.timings})
    if th.untimed:
        where = "" if th.here else f" ({b.device} is not on this machine)"
        th.notes.append(
            f"SAE steps of {', '.join(th.untimed)} not timed{where}: the dense bound (12 d_in "
            f"d_sae FLOPs per token) at {sae_tflops:.3g} TFLOP/s ({how}) x efficiency "
            f"{SAE_EFFICIENCY:g}"
        )
