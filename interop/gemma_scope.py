"""Gemma Scope's released JumpReLU SAEs (Lieberum et al. 2024, arXiv 2408.05147): read and write.

Format: one `params.npz` with W_enc (d_in, d_sae), W_dec (d_sae, d_in), b_enc (d_sae),
b_dec (d_in), threshold (d_sae), float32, in raw activation units of the hooked site. Gemma
Scope's own tutorial encodes the input *without* subtracting b_dec:

    pre = x W_enc + b_enc        f = ReLU(pre) * 1[pre > threshold]        x_hat = f W_dec + b_dec

The suite's JumpReLUSAE computes pre = (x - b_dec) W_enc + b_enc', so b_enc' = b_enc + b_dec W_enc
(`foreign.fold_input_bias`); W_enc, W_dec, b_dec are copied and theta = max(threshold, 0)
(equal to the ReLU-and-mask above). Writing inverts the fold. On the hub the residual-stream
SAEs of Gemma 2 9B are `hf://google/gemma-scope-9b-pt-res/layer_<L>/width_<W>/average_l0_<N>/
params.npz`; layer L reads `blocks.<L>.hook_resid_post`. The maps are data: `LAYOUT` (reading,
a `foreign.Layout`) and `THRESHOLDS` (the suite classes written, with their threshold).
"""

from __future__ import annotations

import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from baselines.batchtopk import BatchTopKSAE
from baselines.jumprelu import JumpReLUSAE
from interop.foreign import (
    Layout,
    assign,
    check_sizes,
    clamped_threshold,
    folded,
    fresh,
    local_files,
    map_tensors,
    reading,
    record_source,
    unfold_input_bias,
)

PARAMS = "params.npz"
KEYS = ("W_enc", "W_dec", "b_enc", "b_dec", "threshold")
# params.npz -> the suite's JumpReLUSAE (threshold_param="direct"), exact (module docstring).
LAYOUT = Layout("jumprelu", {
    "W_enc": "W_enc", "W_dec": "W_dec", "b_dec": "b_dec", "b_enc": folded("b_enc"),
    "raw_threshold": clamped_threshold("threshold"),
})  # fmt: skip
# The suite classes the format holds -> their per-latent threshold; the first class the SAE is
# an instance of is used (BatchTopK infers as a JumpReLU with one shared threshold).
THRESHOLDS: tuple[tuple[type[JumpReLUSAE | BatchTopKSAE], Callable[[Any], Tensor]], ...] = (
    (BatchTopKSAE, lambda sae: sae.threshold.clamp_min(0.0).expand(sae.d_sae)),
    (JumpReLUSAE, lambda sae: sae.threshold),
)


def load_gemma_scope(
    path: str | None = None, d_in: int | None = None, d_sae: int | None = None
) -> JumpReLUSAE:
    """The Gemma Scope SAE at `path` (params.npz, its folder, or hf://...) as a JumpReLUSAE.

    d_in, d_sae: sizes the caller expects (checked against the file); without a path, the sizes
    of a fresh JumpReLUSAE (what conf/sae/gemma_scope.yaml builds with no path given).
    """
    if path is None:
        return fresh("gemma_scope", "jumprelu", d_in, d_sae)  # type: ignore[return-value]
    (file,) = local_files(path, [PARAMS])
    with reading(file, "Gemma Scope params.npz"):
        found = _checked_shapes(file)
        check_sizes("Gemma Scope", d_in, d_sae, found)
        with np.load(file, allow_pickle=False) as npz:  # arrays only, never pickled objects
            p = {k: torch.from_numpy(np.asarray(npz[k], dtype=np.float32)) for k in KEYS}
    sae = assign(JumpReLUSAE(*found, threshold_param="direct"), map_tensors(LAYOUT, p))
    source = {"format": "gemma_scope", "path": str(path), "file": str(file)}
    return record_source(sae.eval(), {**source, "d_in": found[0], "d_sae": found[1]})  # type: ignore[return-value]


def _checked_shapes(file: Path) -> tuple[int, int]:
    """(d_in, d_sae) from the arrays' .npy headers, before any array is read: every key present,
    the five shapes consistent, and each member's stored size at least its declared data (a
    header declaring more than the file holds is refused instead of allocated)."""
    shapes = {}
    with zipfile.ZipFile(file) as zf:
        members = {name.removesuffix(".npy"): zf.getinfo(name) for name in zf.namelist()}
        if missing := [k for k in KEYS if k not in members]:
            raise ValueError(f"not a Gemma Scope params.npz (no {', '.join(missing)})")
        for key in KEYS:
            with zf.open(members[key]) as fh:
                major, _ = np.lib.format.read_magic(fh)
                read_header = np.lib.format.read_array_header_1_0 if major == 1 else (
                    np.lib.format.read_array_header_2_0)  # fmt: skip
                shape, _, dtype = read_header(fh)
                need = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
            if dtype.hasobject or need > members[key].file_size:
                raise ValueError(f"{key}: declares {shape} {dtype}, which the file does not hold")
            shapes[key] = tuple(int(n) for n in shape)
    if len(shapes["W_enc"]) != 2:
        raise ValueError(f"W_enc has shape {shapes['W_enc']}, expected (d_in, d_sae)")
    d_in, d_sae = shapes["W_enc"]
    want = {"W_enc": (d_in, d_sae), "W_dec": (d_sae, d_in), "b_enc": (d_sae,),
            "b_dec": (d_in,), "threshold": (d_sae,)}  # fmt: skip
    if bad := [k for k in KEYS if shapes[k] != want[k]]:
        raise ValueError(f"{bad[0]} has shape {shapes[bad[0]]}, expected {want[bad[0]]}")
    return d_in, d_sae


@torch.no_grad()
def write_gemma_scope(sae: JumpReLUSAE | BatchTopKSAE, file: str | Path) -> Path:
    """Write a suite JumpReLU (or BatchTopK, whose inference is a JumpReLU with one threshold)
    as a Gemma Scope params.npz that reproduces its outputs with Gemma Scope's formula."""
    of = next((of for cls, of in THRESHOLDS if isinstance(sae, cls)), None)
    if of is None:
        raise TypeError(f"Gemma Scope's format holds JumpReLU SAEs, not {type(sae).__name__}")
    threshold = of(sae)
    W_enc, b_dec = sae.W_enc.detach().float().cpu(), sae.b_dec.detach().float().cpu()
    arrays: dict[str, torch.Tensor] = {
        "W_enc": W_enc,
        "W_dec": sae.W_dec.detach().float().cpu(),
        "b_enc": unfold_input_bias(W_enc, sae.b_enc.detach().float().cpu(), b_dec),
        "b_dec": b_dec,
        "threshold": threshold.detach().float().cpu(),
    }
    file = Path(file)
    file.parent.mkdir(parents=True, exist_ok=True)
    with open(file, "wb") as fh:  # a file object: np.savez would append .npz to other names
        np.savez(fh, **{k: v.contiguous().numpy() for k, v in arrays.items()})  # type: ignore[arg-type]
    return file
