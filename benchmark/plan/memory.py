"""Memory estimates per job and per fan-out group, on the device and on the host, and how many
SAEs one process fits (docs/paper_scale.md)."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from benchmark.plan.assumptions import (
    DEFAULT_DEVICE_MEMORY,
    HOST_BASE_BYTES,
    READER_BUFFER_BYTES,
    SAE_STATE_COPIES,
    SAE_STEP_TENSORS,
)
from benchmark.plan.basis import Basis
from benchmark.plan.jobs import Job
from benchmark.plan.timing import SAETiming

LOGPROB_CHUNK = 256  # rows of a fp32 log-probability chunk (benchmark.evaluate)
STREAM_BUFFER_TOKENS = 262_144  # data.stream_buffer_tokens when unset


@dataclass
class Memory:
    """Bytes of the parts of a job or group (the formulas of docs/paper_scale.md)."""

    weights: float  # the model's parameters x dtype bytes
    logits: float  # the evaluation's logits and log-probability chunks
    nbytes: int  # bytes per value of the model's dtype
    buffer_rows: int  # data.stream_buffer_tokens
    on_cpu: bool  # the device is the host
    timings: Mapping[str, SAETiming]  # parameters per latent, where an SAE was timed

    @classmethod
    def of(cls, b: Basis, timings: Mapping[str, SAETiming]) -> Memory:
        cfg0, nbytes, d_vocab = b.cfg0, b.nbytes, b.model.d_vocab
        # The spliced pass's logits in the model's dtype (and the clean pass's, with KL) and
        # two fp32 log-probability chunks of LOGPROB_CHUNK rows (benchmark.evaluate).
        kl_passes = 2 if cfg0.eval.get("kl_div", True) else 1
        rows = float(cfg0.eval.batch_size) * int(cfg0.data.context_length)
        return cls(
            weights=float(b.model.params) * nbytes,
            logits=rows * d_vocab * nbytes * kl_passes + 2 * LOGPROB_CHUNK * d_vocab * 4,
            nbytes=nbytes,
            buffer_rows=int(cfg0.data.get("stream_buffer_tokens") or STREAM_BUFFER_TOKENS),
            on_cpu=b.device.type == "cpu",
            timings=timings,
        )

    def sae_state(self, j: Job) -> float:
        """One SAE's fp32 weights, gradients and Adam's two moments."""
        t = self.timings.get(j.sae)
        per = t.params_per_latent if t else 2.0  # W_enc and W_dec
        return per * j.d_in * (j.d_sae or 0) * 4 * SAE_STATE_COPIES

    def step_tensors(self, j: Job) -> float:
        """One step's batch x d_sae fp32 tensors."""
        return float(SAE_STEP_TENSORS) * j.batch_size * (j.d_sae or 0) * 4

    def buffers(self, members: Sequence[Job]) -> float:
        """Host memory of the streamed shuffle buffers: one per site (rows on the CPU)."""
        sites = {j.site: j for j in members if j.stream and j.d_sae}
        return float(sum(self.buffer_rows * j.d_in * self.nbytes for j in sites.values()))

    def device_peak(self, members: Sequence[Job]) -> float:
        """The larger of the training phase (states, one step's tensors at a time) and the
        evaluation phase (weights only, and the logits)."""
        state = sum(self.sae_state(j) for j in members)
        step = max((self.step_tensors(j) for j in members), default=0.0)
        train_phase = self.weights + state + step
        eval_phase = self.weights + state / SAE_STATE_COPIES + self.logits
        return max(train_phase, eval_phase)

    def host_peak(self, members: Sequence[Job]) -> float:
        reader = 0.0 if all(j.stream for j in members) else READER_BUFFER_BYTES
        on_host = self.device_peak(members) if self.on_cpu else 0.0
        return HOST_BASE_BYTES + self.weights + reader + self.buffers(members) + on_host


def device_memory(device: Any, here: bool, given: float | None) -> float:
    """The device's bytes: `given` (--device-memory), this machine's, or an 80 GB card."""
    import torch

    if given is not None:
        return given
    if device.type == "cuda" and here:
        return float(torch.cuda.get_device_properties(device).total_memory)
    if device.type == "cpu":
        return float(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    return DEFAULT_DEVICE_MEMORY


@dataclass
class Fit:
    """The peaks of the sweep's jobs and groups against the device's memory."""

    capacity: float
    job_peak: float
    group_peak: float
    per_sae: float  # the largest SAE state
    max_step: float  # the largest step's tensors
    fit: int  # SAEs one process holds in 90% of the device (the launchers' max_saes)

    @classmethod
    def of(cls, mem: Memory, b: Basis, capacity: float) -> Fit:
        per_sae = max(mem.sae_state(j) for j in b.jobs)
        max_step = max(mem.step_tensors(j) for j in b.jobs)
        # SAEs one process holds in 90% of the device: weights and one step's tensors, the
        # rest for SAE states.
        room = 0.9 * capacity - mem.weights - max_step
        return cls(
            capacity=capacity,
            job_peak=max(mem.device_peak([j]) for j in b.jobs),
            group_peak=max(mem.device_peak(m) for m in b.groups),
            per_sae=per_sae,
            max_step=max_step,
            fit=int(room // per_sae) if per_sae > 0 and room > 0 else 0,
        )
