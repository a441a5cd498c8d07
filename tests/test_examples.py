"""`python -m benchmark.examples`: top-activating contexts on the held-out split, JSON and HTML.

A tiny run folder (a TopK SAE saved with save_sae, the composed config, a minimal result.json)
on the real bundled model, ~600 held-out tokens. The HTML is checked here with the standard
library's html.parser; tests/test_examples_html.py owns its escaping and tests/test_browser.py
opens a page in headless Chromium (Debian's chromium, not a Playwright browser download).
"""

from __future__ import annotations

import json
from html.parser import HTMLParser

import pytest
import torch
from omegaconf import OmegaConf

from benchmark import data
from benchmark.examples import Scan, choose_latents, hook_layer, main
from benchmark.saes import build_sae, load_sae, sae_node, save_sae
from benchmark.specs import DataSpec
from tests.conftest import MODEL_CACHE
from tests.helpers import compose_config

D_SAE, N_TOKENS, LATENTS = 64, 600, [0, 5, 17]
HOOK = "blocks.6.hook_resid_post"


@pytest.fixture
def run_dir(tmp_path):
    cfg = compose_config(["sae=topk", "sparsity=l0_10", f"cache_dir={MODEL_CACHE}"])
    torch.manual_seed(0)
    sae = build_sae(cfg.sae, 576, D_SAE)
    run = tmp_path / "run"
    save_sae(sae, run, sae_node(cfg.sae, 576, D_SAE))
    OmegaConf.save(cfg, run / "config.yaml", resolve=True)
    result = {"run_id": "run", "status": "complete", "hook": HOOK, "model": "smollm2_135m",
              "layer": 6, "d_in": 576, "d_sae": D_SAE}  # fmt: skip
    (run / "result.json").write_text(json.dumps(result))
    return run


class _Page(HTMLParser):
    """Every tag with its attributes, and the token spans' text and data-act values."""

    def __init__(self):
        super().__init__()
        self.tags, self.tokens, self.acts, self._in_tok = [], [], [], False

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.append((tag, a))
        self._in_tok = tag == "span" and "tok" in (a.get("class") or "").split()
        if self._in_tok:
            self.acts.append(float(a["data-act"]))
            self.tokens.append("")

    def handle_endtag(self, tag):
        self._in_tok = False

    def handle_data(self, text):
        if self._in_tok:
            self.tokens[-1] += text


@pytest.mark.integration
def test_examples_json_values_are_the_sae_code_and_html_is_self_contained(run_dir, bundled_model):
    out = run_dir / "ex"
    args = [str(run_dir), "--latents", ",".join(map(str, LATENTS)), "--n-tokens", str(N_TOKENS),
            "--n-examples", "4", "--device", "cpu", "--out", str(out)]  # fmt: skip
    assert main(args) == 0
    doc = json.loads((out / "examples.json").read_text())
    assert [lat["latent"] for lat in doc["latents"]] == LATENTS
    assert doc["hook"] == HOOK and doc["n_tokens"] >= N_TOKENS and doc["split"] == "eval"

    # Recompute f = sae(x).f on the same held-out windows, in one forward pass.
    cfg = OmegaConf.load(run_dir / "config.yaml")
    tok = bundled_model.tokenizer
    windows = data.token_windows(DataSpec.of(cfg.data), tok, "eval", N_TOKENS, allow_fewer=True)
    got = {}
    bundled_model.run_with_hooks(windows, fwd_hooks=[(HOOK, lambda a, hook: got.update(x=a))],
                                 stop_at_layer=7, return_type=None)  # fmt: skip
    with torch.no_grad():
        x = got["x"].float()  # (n_windows, T, d_in)
        codes = load_sae(run_dir).eval()(x.reshape(-1, x.shape[-1])).f.reshape(*x.shape[:2], -1)

    n_spans = 0
    for lat in doc["latents"]:
        values = [ex["activation"] for ex in lat["examples"]]
        assert values == sorted(values, reverse=True) and len(values) == 4 and values[-1] > 0
        assert lat["max_activation"] == values[0] and 0 < lat["frequency"] < 1
        for ex in lat["examples"]:
            w, lo = ex["window"], ex["start"]
            ids = windows[w, lo : lo + len(ex["token_ids"])].tolist()
            assert ex["token_ids"] == ids and ex["tokens"] == [tok.decode([i]) for i in ids]
            f = codes[w, lo : lo + len(ids), lat["latent"]]
            special = ~data.non_special_mask(torch.tensor(ids), tok)
            torch.testing.assert_close(torch.tensor(ex["activations"]), f.masked_fill(special, 0),
                                       rtol=1e-4, atol=1e-5)  # fmt: skip
            assert ex["activations"][ex["focus"]] == ex["activation"]
            assert ex["position"] == lo + ex["focus"]
            n_spans += len(ids)

    page = _Page()
    page.feed((out / "examples.html").read_text(encoding="utf-8"))
    names = [t for t, _ in page.tags]
    assert "style" in names and not {"script", "link", "img", "iframe"} & set(names)
    assert not any(k in ("src", "href") or str(v).startswith("http") for _, a in page.tags
                   for k, v in a.items())  # fmt: skip
    assert len(page.tokens) == n_spans
    want = [t.replace("\n", "\u21b5") for lat in doc["latents"] for ex in lat["examples"]
            for t in ex["tokens"]]  # fmt: skip
    assert page.tokens == want
    flat = [a for lat in doc["latents"] for ex in lat["examples"] for a in ex["activations"]]
    assert page.acts == pytest.approx(flat, rel=1e-5, abs=1e-6)


def test_choose_latents_top_random_and_list():
    # 3 windows of 4 positions; latent 2 fires 3 times, latent 0 twice, latent 3 once.
    rows, cols = torch.tensor([0, 1, 5, 2, 6, 9]), torch.tensor([2, 2, 2, 0, 0, 3])
    s = Scan(torch.zeros(3, 4, dtype=torch.long), rows, cols, torch.ones(6), n_tokens=12, d_sae=5)
    assert choose_latents(s, None, 2, None, 0) == [2, 0]
    picked = choose_latents(s, None, None, 2, seed=1)
    assert len(picked) == 2 and set(picked) <= {0, 2, 3}  # only latents that fired
    assert picked == choose_latents(s, None, None, 2, seed=1)
    assert choose_latents(s, [4, 1], None, None, 0) == [4, 1]
    with pytest.raises(ValueError, match="not in"):
        choose_latents(s, [5], None, None, 0)
    assert s.latent(2).tolist() == [1, 1, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0]
    assert hook_layer(HOOK) == 6
