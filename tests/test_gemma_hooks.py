"""The site hooks read what docs/method.md says they read (issue 13: "Gemma 2 checked offline").

For every conf/site entry, the hook that `benchmark.models.hook_name` returns is captured the
way the harvester captures it (`run_with_hooks`) and compared with the Hugging Face model the
bridge wraps, run on its own (a second, unwrapped copy) with plain torch hooks:
- residual: the block's output (`output_hidden_states[layer + 1]`; the last entry of that tuple
  is after the final norm, so the last layer is compared with the decoder layer's output);
- MLP: resid_post - resid_mid, i.e. after Gemma 2's post-feed-forward RMSNorm;
- attention: the per-head z before o_proj: flattened to (B, T, n_heads * d_head), o_proj and
  then Gemma 2's post-attention norm of it give resid_mid - resid_pre.
A second check splices `act + delta` at each hook (as the delta-LM-loss evaluation splices the
reconstruction) and expects the logits of the same edit made at that point of the HF model; a
fixed offset, not zeros or a scale, because an RMSNorm maps zeros to zeros and ignores scale, so
only an offset tells the two sides of a norm apart.

The Gemma 2 model is tiny and random (seeded), saved with save_pretrained and booted through
the suite's own `local` source with every socket refused: a few seconds on CPU, offline.
The same checks run on the bundled SmolLM2 (Llama layout: no post-norms).
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from torch import Tensor, nn

from benchmark import models
from benchmark.models import hook_name, load_model
from benchmark.specs import ModelSpec, SiteSpec
from tests.conftest import MODEL_CACHE
from tests.helpers import CONF

SITES = {p.stem: SiteSpec.of(OmegaConf.load(p)) for p in sorted((CONF / "site").glob("*.yaml"))}
TINY = {"n_layers": 3, "d_model": 64, "n_heads": 4, "d_head": 16}
# What hook_name must return inside blocks.L for each site (docs/method.md's TransformerLens names).
SITE_HOOKS = {"residual": "hook_resid_post", "mlp": "hook_mlp_out", "attention": "attn.hook_z"}
TOL = {"atol": 1e-5, "rtol": 1e-5}  # fp32, same weights, same ops


@dataclass(frozen=True)
class Layout:
    """Where a family's decoder layer keeps the pieces the references need."""

    resid_mid_into: str  # the layer's submodule whose input is resid_mid (the pre-MLP norm)
    mlp_out: str  # the submodule whose output is added to the residual after resid_mid
    attn_post_norm: str | None  # norm applied to o_proj's output before the add, if any


GEMMA2 = Layout(
    "pre_feedforward_layernorm", "post_feedforward_layernorm", "post_attention_layernorm"
)
LLAMA = Layout("post_attention_layernorm", "mlp", None)


def test_every_site_is_checked():
    assert set(SITES) == set(CHECKS), "a new conf/site entry needs a check here"


def refuse_network(*args, **kwargs):
    raise AssertionError(f"network access attempted: {args}")


@pytest.fixture(scope="module")
def tiny_gemma(tmp_path_factory):
    """(bridge, unwrapped HF copy, model config): a 3-layer random Gemma 2 through the
    suite's `local` source, booted with the network refused."""
    from tokenizers import Tokenizer, pre_tokenizers
    from tokenizers.models import WordLevel
    from transformers import Gemma2Config, Gemma2ForCausalLM, PreTrainedTokenizerFast

    path = tmp_path_factory.mktemp("tiny_gemma2")
    hf_cfg = Gemma2Config(
        vocab_size=64,
        hidden_size=TINY["d_model"],
        intermediate_size=96,
        num_hidden_layers=TINY["n_layers"],
        num_attention_heads=TINY["n_heads"],
        num_key_value_heads=2,  # grouped-query attention, as in Gemma 2
        head_dim=TINY["d_head"],
        query_pre_attn_scalar=TINY["d_head"],
        sliding_window=4,  # shorter than the test sequences: the local layers really slide
        max_position_embeddings=64,
        initializer_range=0.1,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
    )
    with torch.random.fork_rng():  # seeded weights without touching the global RNG
        torch.manual_seed(0)
        reference = Gemma2ForCausalLM(hf_cfg).eval()
        with torch.no_grad():  # norms start at weight 0 (scale 1 + 0): make them matter
            for name, p in reference.named_parameters():
                if "norm" in name:
                    p.normal_(0.0, 0.5)
    reference.save_pretrained(path)
    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3}
    vocab.update({f"w{i}": i for i in range(4, hf_cfg.vocab_size)})
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
        unk_token="<unk>",
    ).save_pretrained(path)  # fmt: skip

    # The real Gemma 2 entry (architecture, BOS choice), pointed at the tiny directory.
    model_cfg = ModelSpec.of(
        OmegaConf.merge(
            OmegaConf.load(CONF / "model" / "gemma2_2b.yaml"),
            {"name": "tiny_gemma2", "source": "local", "path": str(path), "dtype": "float32"},
            {**TINY, "layers": {"early": 0, "middle": 1, "late": 2}},
        )
    )
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(socket.socket, "connect", refuse_network)
        mp.setattr(socket, "create_connection", refuse_network)
        bridge = load_model(model_cfg, torch.device("cpu"), path / "cache")
    return bridge, reference, model_cfg


def references(hf_model: nn.Module, layout: Layout, tokens: Tensor, layers) -> dict:
    """Per layer, from the unwrapped HF model: pre, mid, post, z (o_proj's input), raw_mlp
    (the MLP module's own output) and hidden (output_hidden_states)."""
    blocks = hf_model.model.layers
    refs: dict[int, dict[str, Tensor]] = {i: {} for i in layers}

    def keep(i, key, from_input):
        def hook(module, args, output=None):
            value = args[0] if from_input else output
            refs[i][key] = (value[0] if isinstance(value, tuple) else value).detach().clone()

        return hook

    handles = []
    for i in layers:
        b = blocks[i]
        handles += [
            b.register_forward_pre_hook(keep(i, "pre", True)),
            b.register_forward_hook(keep(i, "post", False)),
            getattr(b, layout.resid_mid_into).register_forward_pre_hook(keep(i, "mid", True)),
            b.mlp.register_forward_hook(keep(i, "raw_mlp", False)),
            b.self_attn.o_proj.register_forward_pre_hook(keep(i, "z", True)),
        ]
    try:
        with torch.no_grad():
            hidden = hf_model(tokens, output_hidden_states=True).hidden_states
    finally:
        for h in handles:
            h.remove()
    for i in layers:
        refs[i]["hidden"] = hidden[i + 1]
    return refs


def check_residual(got, ref, hf_block, layout, layer, n_layers, tol):
    torch.testing.assert_close(got, ref["post"], **tol)
    if layer < n_layers - 1:  # HF's last hidden state is after the final norm
        torch.testing.assert_close(got, ref["hidden"], **tol)


def check_mlp(got, ref, hf_block, layout, layer, n_layers, tol):
    torch.testing.assert_close(got, ref["post"] - ref["mid"], **tol)
    if layout.mlp_out != "mlp":  # a post-MLP norm: the raw MLP output is a different tensor
        assert not torch.allclose(got, ref["raw_mlp"], atol=1e-3)


def check_attention(got, ref, hf_block, layout, layer, n_layers, tol):
    b, t = got.shape[:2]
    z = got.reshape(b, t, -1)  # (B, T, n_heads, d_head) -> (B, T, n_heads * d_head)
    torch.testing.assert_close(z, ref["z"], **tol)
    with torch.no_grad():
        out = hf_block.self_attn.o_proj(z)
        if layout.attn_post_norm:
            out = getattr(hf_block, layout.attn_post_norm)(out)
    torch.testing.assert_close(out, ref["mid"] - ref["pre"], **tol)


CHECKS = {"residual": check_residual, "mlp": check_mlp, "attention": check_attention}


def check_site_hooks(bridge, hf_model, model_cfg, layout, tokens, layers, expect_hooks, tol=TOL):
    """Capture every site at `layers` as the harvester does and check each against the HF
    references; `expect_hooks` maps site name -> the hook (inside blocks.L) it must resolve to."""
    names = {
        (site, i): hook_name(model_cfg, i, SITES[site], bridge) for site in SITES for i in layers
    }
    for (site, i), name in names.items():
        assert name == f"blocks.{i}.{expect_hooks[site]}"
    got: dict[str, Tensor] = {}

    def capture(name):  # keyed by the name asked for: an alias's HookPoint has its own name
        def hook(act, hook):
            got[name] = act.detach().clone()

        return hook

    with torch.no_grad():
        bridge.run_with_hooks(tokens, fwd_hooks=[(n, capture(n)) for n in set(names.values())])
    refs = references(hf_model, layout, tokens, layers)
    n_layers = int(model_cfg.n_layers)
    for (site, i), name in sorted(names.items()):
        block = hf_model.model.layers[i]
        CHECKS[site](got[name], refs[i], block, layout, i, n_layers, tol)


def check_splices(bridge, hf_model, model_cfg, layout, tokens, layer, tol=TOL):
    """`act + delta` spliced at each site hook gives the logits of the same edit made on the HF
    model at the tensor docs/method.md names for that site."""
    block = hf_model.model.layers[layer]
    with torch.no_grad():
        clean = hf_model(tokens).logits
        torch.testing.assert_close(bridge(tokens), clean, **tol)
    gen = torch.Generator().manual_seed(1)
    for site, site_cfg in SITES.items():
        name = hook_name(model_cfg, layer, site_cfg, bridge)
        # attn.hook_z is (B, T, n_heads, d_head); the others (B, T, d_model)
        width = (
            [model_cfg.n_heads, model_cfg.d_head] if site == "attention" else [model_cfg.d_model]
        )
        delta = torch.randn(*tokens.shape, *width, generator=gen)

        def add_to_output(module, args, output, d=delta):
            if isinstance(output, tuple):
                return (output[0] + d.reshape(output[0].shape), *output[1:])
            return output + d.reshape(output.shape)

        def add_to_input(module, args, d=delta):
            return (args[0] + d.reshape(args[0].shape), *args[1:])

        if site == "residual":
            handle = block.register_forward_hook(add_to_output)
        elif site == "mlp":
            handle = getattr(block, layout.mlp_out).register_forward_hook(add_to_output)
        else:
            handle = block.self_attn.o_proj.register_forward_pre_hook(add_to_input)
        try:
            with torch.no_grad():
                want = hf_model(tokens).logits
        finally:
            handle.remove()
        with torch.no_grad():
            spliced = bridge.run_with_hooks(
                tokens, fwd_hooks=[(name, lambda act, hook, d=delta: act + d)]
            )
        assert not torch.allclose(want, clean, atol=1e-3), site  # the edit matters
        torch.testing.assert_close(spliced, want, **tol, msg=site)


# ---- tiny Gemma 2 (offline, seconds) ----


def gemma_tokens(bridge) -> Tensor:
    tokens = torch.randint(
        4, 64, (2, 9), generator=torch.Generator().manual_seed(2)
    )  # longer than the sliding window (4)
    tokens[:, 0] = bridge.tokenizer.bos_token_id
    return tokens


def test_gemma2_site_hooks_read_the_paper_tensors(tiny_gemma):
    bridge, reference, model_cfg = tiny_gemma
    layers = range(TINY["n_layers"])
    check_site_hooks(bridge, reference, model_cfg, GEMMA2, gemma_tokens(bridge), layers, SITE_HOOKS)


def test_gemma2_mlp_hook_is_after_the_post_feedforward_norm(tiny_gemma):
    """TransformerLens aliases blocks.L.hook_mlp_out to the post-feed-forward norm's output for
    Gemma 2 (not mlp.hook_out, the MLP's own output before that norm)."""
    bridge, _, _ = tiny_gemma
    for i in range(TINY["n_layers"]):
        assert (
            bridge.hook_dict[f"blocks.{i}.hook_mlp_out"]
            is bridge.hook_dict[f"blocks.{i}.ln2_post.hook_out"]
        )
        assert (
            bridge.hook_dict[f"blocks.{i}.hook_mlp_out"]
            is not bridge.hook_dict[f"blocks.{i}.mlp.hook_out"]
        )


def test_gemma2_splices_at_the_paper_tensors(tiny_gemma):
    bridge, reference, model_cfg = tiny_gemma
    check_splices(bridge, reference, model_cfg, GEMMA2, gemma_tokens(bridge), layer=1)


# ---- bundled SmolLM2 (Llama layout) ----


@pytest.fixture(scope="module")
def smollm2_reference(bundled_model):
    """An unwrapped HF copy of the bundled model (the bridge's own copy has bridge modules
    inside it), from the converted folder that the bundled_model fixture leaves."""
    from transformers import AutoModelForCausalLM

    path = Path(MODEL_CACHE) / "models" / models.bundled_gguf().stem
    return AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, local_files_only=True
    ).eval()


SMOL_TOKENS = torch.tensor(
    [[0, 504, 3458, 282, 4649, 314, 260, 1345], [0, 1530, 2, 77, 9, 4000, 11, 12]]
)
# Its residual stream reaches ~2e4 at BOS, so resid_mid - resid_pre (the attention check) is a
# difference of large numbers: the bridge's and HF's op orders differ by up to ~1e-3 there.
SMOL_TOL = {"atol": 2e-3, "rtol": 1e-4}


@pytest.mark.integration
def test_smollm2_site_hooks_read_the_paper_tensors(bundled_model, smollm2_reference, compose):
    cfg = compose([])
    layers = sorted({*dict(cfg.model.layers).values(), 0, int(cfg.model.n_layers) - 1})
    check_site_hooks(
        bundled_model,
        smollm2_reference,
        cfg.model,
        LLAMA,
        SMOL_TOKENS,
        layers,
        SITE_HOOKS,
        SMOL_TOL,
    )


@pytest.mark.slow  # ~5-20 s: eight forward passes of the 135M model
@pytest.mark.integration
def test_smollm2_splices_at_the_paper_tensors(bundled_model, smollm2_reference, compose):
    cfg = compose([])
    check_splices(
        bundled_model,
        smollm2_reference,
        cfg.model,
        LLAMA,
        SMOL_TOKENS,
        cfg.model.layers.middle,
        SMOL_TOL,
    )
