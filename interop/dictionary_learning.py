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
The map is data: `DICT_CLASSES`, dict_class -> `foreign.Layout`.
"""

from __future__ import annotations

import json

from baselines.base import SparseAutoencoder
from interop.foreign import (
    Layout,
    assign,
    build,
    check_sizes,
    clamped_threshold,
    folded,
    fresh,
    load_plain,
    local_files,
    map_tensors,
    reading,
    record_source,
    scalar,
    transposed,
)

AE, CONFIG = "ae.pt", "config.json"
# nn.Linear encoder and decoder, stored (out, in).
LINEAR = {"W_enc": transposed("encoder.weight"), "W_dec": transposed("decoder.weight")}
TOPK = {**LINEAR, "b_enc": "encoder.bias", "b_dec": "b_dec"}
# dictionary_learning's dict_class -> the suite's, with the exact map of the module docstring.
DICT_CLASSES: dict[str, Layout] = {
    "AutoEncoder": Layout("relu", {**LINEAR, "b_enc": "encoder.bias", "b_dec": "bias"}),
    "GatedAutoEncoder": Layout("gated", {
        **LINEAR, "b_dec": "decoder_bias", "b_gate": "gate_bias", "b_mag": "mag_bias",
        "r_mag": "r_mag",
    }),
    "JumpReluAutoEncoder": Layout("jumprelu", {
        "W_enc": "W_enc", "W_dec": "W_dec", "b_dec": "b_dec", "b_enc": folded("b_enc"),
        "raw_threshold": clamped_threshold("threshold"),
    }),
    "AutoEncoderTopK": Layout("topk", TOPK),
    "BatchTopKSAE": Layout("batchtopk", {**TOPK, "threshold": scalar("threshold")}),
}  # fmt: skip


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
        if dict_class not in DICT_CLASSES:
            raise ValueError(f"dict_class={dict_class!r}; supported: {', '.join(DICT_CLASSES)}")
        layout = DICT_CLASSES[dict_class]
        if architecture is not None and architecture != layout.suite:
            raise ValueError(f"{dict_class} is {layout.suite}, but sae.architecture={architecture}")
    with reading(ae_file, "dictionary_learning ae.pt"):
        # Tensors and plain containers only: a pickled object (code) is refused, never run.
        state = load_plain(ae_file)
        state = state.get("ae", state)  # a mid-training backup nests the state dict under "ae"
        w = {name: t.float() for name, t in state.items() if name != "k"}
        tensors = map_tensors(layout, w)
        found = (tensors["W_enc"].shape[0], tensors["W_enc"].shape[1])
        check_sizes("dictionary_learning", d_in, d_sae, found)
        k_file = trainer.get("k", int(state["k"]) if "k" in state else None)
        sae = assign(build(layout.suite, *found, k=k_file), tensors)
    source = {
        "format": "dictionary_learning", "path": str(path), "folder": str(cfg_file.parent),
        "dict_class": dict_class, "d_in": found[0], "d_sae": found[1],
        "layer": trainer.get("layer"), "lm_name": trainer.get("lm_name"),
        "submodule_name": trainer.get("submodule_name"),
    }  # fmt: skip
    return record_source(sae.eval(), source)
