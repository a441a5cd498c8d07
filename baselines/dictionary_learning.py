"""dictionary_learning's saved dictionaries (saprmarks/dictionary_learning): read only.

Layout, from its public code (dictionary.py, trainers/, training.py at commit 60ec6bf, 2025-08):
a trainer folder with `ae.pt` (`torch.save` of the dictionary's state dict, biases and
thresholds already scaled back to raw activation units when training normalised them) and
`config.json` = {"trainer": {"dict_class", "activation_dim", "dict_size", "k" (TopK classes),
"layer", "lm_name", "submodule_name", ...}, "buffer": {...}}. nn.Linear weights are stored
(out, in), so encoder.weight is (d_sae, d_in) and decoder.weight (d_in, d_sae).

    dict_class            its forward                                          suite class
    AutoEncoder           f = ReLU(encoder(x - bias)), x_hat = decoder(f) + bias    ReLUSAE
    GatedAutoEncoder      x_enc = encoder(x - decoder_bias); f = 1[x_enc + gate_bias > 0]
                          * ReLU(exp(r_mag) x_enc + mag_bias); + decoder_bias       GatedSAE
    JumpReluAutoEncoder   pre = x W_enc + b_enc (b_dec not subtracted: its
                          apply_b_dec_to_input defaults to False, not saved);
                          f = ReLU(pre * 1[pre > threshold]); f W_dec + b_dec       JumpReLUSAE
    AutoEncoderTopK       f = TopK_k(ReLU(encoder(x - b_dec))); decoder(f) + b_dec   TopKSAE
    BatchTopKSAE          inference: f = ReLU(pre) * 1[ReLU(pre) > threshold]      BatchTopKSAE

Every map is exact (JumpReLU: b_dec folded into b_enc, theta = max(threshold, 0)). The
dictionary's own forward is reproduced as is: `from_pretrained`'s optional decoder
normalisation of AutoEncoder (which rescales f, not x_hat) is not applied. Other classes
(AutoEncoderNew, MatryoshkaBatchTopKSAE, crosscoders) are refused with the supported list.
"""

from __future__ import annotations

import json
from typing import Any

from torch import Tensor

from baselines.base import SparseAutoencoder
from baselines.foreign import (
    assign,
    build,
    check_sizes,
    fold_input_bias,
    fresh,
    jumprelu_threshold,
    load_plain,
    local_files,
    reading,
    record_source,
)

AE, CONFIG = "ae.pt", "config.json"
SUITE_NAME = {
    "AutoEncoder": "relu",
    "GatedAutoEncoder": "gated",
    "JumpReluAutoEncoder": "jumprelu",
    "AutoEncoderTopK": "topk",
    "BatchTopKSAE": "batchtopk",
}


def load_dictionary_learning(
    path: str | None = None,
    d_in: int | None = None,
    d_sae: int | None = None,
    architecture: str | None = None,
    k: int | None = None,
) -> SparseAutoencoder:
    """The dictionary saved at `path` (a trainer folder, its ae.pt, or hf://owner/repo/folder).

    d_in, d_sae: sizes the caller expects, checked. architecture (the suite's name): when set,
    must be the file's. Without a path: a fresh suite SAE of `architecture` (default jumprelu).
    """
    if path is None:
        return fresh("dictionary_learning", architecture, d_in, d_sae, k)
    ae_file, cfg_file = local_files(path, [AE, CONFIG])
    with reading(cfg_file, "dictionary_learning config.json"):
        trainer = json.loads(cfg_file.read_text()).get("trainer", {})
        dict_class = trainer.get("dict_class")
        if dict_class not in SUITE_NAME:
            raise ValueError(f"dict_class={dict_class!r}; supported: {', '.join(SUITE_NAME)}")
        arch = SUITE_NAME[dict_class]
        if architecture is not None and architecture != arch:
            raise ValueError(f"{dict_class} is {arch}, but sae.architecture={architecture}")
    with reading(ae_file, "dictionary_learning ae.pt"):
        # Tensors and plain containers only: a pickled object (code) is refused, never run.
        state = load_plain(ae_file)
        state = state.get("ae", state)  # a mid-training backup nests the state dict under "ae"
        w = {name: t.float() for name, t in state.items() if name != "k"}
        tensors = _suite_tensors(arch, w)
        found = (tensors["W_enc"].shape[0], tensors["W_enc"].shape[1])
        check_sizes("dictionary_learning", d_in, d_sae, found)
        k_file = trainer.get("k", int(state["k"]) if "k" in state else None)
        sae = assign(build(arch, *found, k=k_file), tensors)
    source = {
        "format": "dictionary_learning", "path": str(path), "folder": str(cfg_file.parent),
        "dict_class": dict_class, "d_in": found[0], "d_sae": found[1],
        "layer": trainer.get("layer"), "lm_name": trainer.get("lm_name"),
        "submodule_name": trainer.get("submodule_name"),
    }  # fmt: skip
    return record_source(sae.eval(), source)


def _suite_tensors(arch: str, w: dict[str, Tensor]) -> dict[str, Tensor]:
    """The dictionary's state dict -> the suite's parameter names (see the module docstring)."""
    if arch == "jumprelu":
        return {
            "W_enc": w["W_enc"], "W_dec": w["W_dec"], "b_dec": w["b_dec"],
            "b_enc": fold_input_bias(w["W_enc"], w["b_enc"], w["b_dec"]),
            "raw_threshold": jumprelu_threshold(w["threshold"]),
        }  # fmt: skip
    W_enc, W_dec = w["encoder.weight"].t(), w["decoder.weight"].t()  # (d_in, d_sae), (d_sae, d_in)
    if arch == "relu":
        return {"W_enc": W_enc, "W_dec": W_dec, "b_enc": w["encoder.bias"], "b_dec": w["bias"]}
    if arch == "gated":
        return {
            "W_enc": W_enc, "W_dec": W_dec, "b_dec": w["decoder_bias"],
            "b_gate": w["gate_bias"], "b_mag": w["mag_bias"], "r_mag": w["r_mag"],
        }  # fmt: skip
    out: dict[str, Any] = {"W_enc": W_enc, "W_dec": W_dec, "b_enc": w["encoder.bias"]}
    out["b_dec"] = w["b_dec"]
    if arch == "batchtopk":
        out["threshold"] = w["threshold"].reshape(())
    return out
