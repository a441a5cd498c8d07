"""benchmark.interp and benchmark.interp_llm: the explain / simulate / score pipeline.

Pure parts against hand values (bands, sampling, spans, binning, Pearson, the endpoint's answer
parser); the cache (a hit calls no model, a damaged or foreign entry is recomputed, never used);
an OpenAI-compatible endpoint served from a thread; the CLI's one-line errors; and the whole
pipeline on the bundled model on 2 latents of a small SAE.
"""

from __future__ import annotations

import json
import math
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pandas as pd
import pytest
import torch

from benchmark import interp_llm
from benchmark.interp import (
    band,
    discretise,
    main,
    pearson,
    random_spans,
    sample_latents,  # fmt: skip
    span,
    top_spans,
)
from tests.conftest import MODEL_CACHE
from tests.helpers import random_sae_run

HOOK = "blocks.6.hook_resid_post"


def test_bands_are_decades_of_firing_frequency():
    assert band(3e-5) == "1e-5..1e-4"
    assert band(1e-4) == "1e-4..1e-3"
    assert band(0.05) == "1e-2..1e-1"
    assert band(0.5) == "1e-1..1" and band(1.0) == "1e-1..1"
    assert band(2e-6) == "<1e-5"


def test_stratified_sampling_takes_each_band_in_turn_and_is_seeded():
    freq = torch.zeros(40)
    freq[:20] = 3e-5  # 20 latents in the rare band
    freq[20:22] = 0.3  # 2 in the frequent band
    freq[22:30] = 0.003  # 8 in the middle band; 30..39 never fired
    picked = sample_latents(freq, 6, "stratified", seed=1)
    assert len(picked) == 6 and len(set(picked)) == 6 and max(picked) < 30
    by_band = pd.Series([band(float(freq[i])) for i in picked]).value_counts()
    assert by_band["1e-1..1"] == 2 and by_band["1e-3..1e-2"] == 2 and by_band["1e-5..1e-4"] == 2
    assert picked == sample_latents(freq, 6, "stratified", seed=1)
    assert picked != sample_latents(freq, 6, "stratified", seed=2)
    uniform = sample_latents(freq, 30, "uniform", seed=0)
    assert uniform == list(range(30))  # asking for all of them gives every latent that fired


def test_spans_stay_in_the_window_skip_the_bos_and_do_not_overlap():
    assert span(50, 128, 32) == (26, 58)  # 3/4 of the span before the position
    assert span(3, 128, 32) == (1, 33)  # never position 0 (the BOS)
    assert span(127, 128, 32) == (96, 128)
    acts = torch.zeros(2 * 16)
    acts[5], acts[6], acts[16 + 10] = 3.0, 2.0, 1.0  # window 0: t=5, 6; window 1: t=10
    assert top_spans(acts, 16, 8, 5) == [(0, 1, 9), (1, 4, 12)]  # t=6 overlaps t=5's span
    g = torch.Generator().manual_seed(0)
    for w, lo, hi in random_spans(3, 16, 8, 20, g):
        assert 0 <= w < 3 and 1 <= lo and hi - lo == 8 and hi <= 16


def test_discretise_and_pearson_against_hand_values():
    bins = discretise(torch.tensor([0.0, 0.5, 1.04, 2.0, 5.0]), 2.0)
    assert bins.tolist() == [0, 2, 5, 10, 10]  # round(10 a / max), clipped at 10
    assert discretise(torch.ones(3), 0.0).tolist() == [0, 0, 0]
    # x = (1, 2, 3), y = (1, 3, 2): r = cov / (sx sy) = 0.5 / (1 * 1) = 0.5
    assert pearson([1, 2, 3], [1, 3, 2]) == pytest.approx(0.5, abs=1e-12)
    assert pearson([1, None, 2, 3], [1, 9, 3, 2]) == pytest.approx(0.5, abs=1e-12)
    assert math.isnan(pearson([1, 1, 1], [1, 2, 3]))  # a constant simulation: undefined
    assert math.isnan(pearson([None, 1], [0, 1]))


def test_endpoint_answers_are_parsed_by_index_and_clipped():
    text = "0\t3\n1: 12\n 2 , 0.5\nnoise\n2\t9\n7\t4"
    assert interp_llm.parse_numbered(text, 4) == [3.0, 10.0, 0.5, None]


def test_explanations_are_cleaned_and_tokens_shown_on_one_line():
    assert interp_llm.clean_explanation("This feature detects city names.\nMore") == "city names"
    assert interp_llm.clean_explanation("  \n") == "nothing in particular"
    assert interp_llm.excerpt(["a", "\n", "cat"], [0, 3, 10]) == "a[[\\n]](3)[[cat]](10)"


def test_sources_parse_and_bad_ones_name_the_option():
    assert interp_llm.parse_source("--explainer", "bundled").kind == "bundled"
    assert interp_llm.parse_source("--x", "hf:org/m").identity == "hf:org/m"
    s = interp_llm.parse_source("--x", "http://127.0.0.1:8/v1/#m")
    assert (s.kind, s.name, s.model) == ("http", "http://127.0.0.1:8/v1", "m")
    with pytest.raises(ValueError, match=r"^--simulator='gpt4': expected bundled"):
        interp_llm.parse_source("--simulator", "gpt4")


def test_cache_hit_calls_nothing_and_a_damaged_entry_is_recomputed(tmp_path):
    cache, calls = interp_llm.Cache(tmp_path), []

    def compute():
        calls.append(1)
        return "numbers"

    request = {"kind": "explain", "prompt": "p"}
    assert cache.get(request, interp_llm.is_text, compute) == "numbers"
    assert cache.get(request, interp_llm.is_text, compute) == "numbers" and len(calls) == 1
    (entry,) = tmp_path.rglob("*.json")
    assert entry.name == interp_llm.Cache.key(request) + ".json"
    for damage in ("{not json", json.dumps({"request": request, "response": 7}),
                   json.dumps({"request": {"kind": "other"}, "response": "planted"})):  # fmt: skip
        entry.write_text(damage)
        assert cache.get(request, interp_llm.is_text, compute) == "numbers"
    assert len(calls) == 4 and cache.hits == 1
    assert interp_llm.is_simulation([[0.5, None, 3]]) and not interp_llm.is_simulation([["1"]])
    assert not interp_llm.is_simulation([[True]])


class _Server(BaseHTTPRequestHandler):
    def do_GET(self):  # /models
        self._reply({"data": []})

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        prompt = body["messages"][0]["content"]
        self.server.prompts.append(prompt)
        if "numbered tokens" in prompt:
            n = prompt.split("\n\n")[-1].count("\n") + 1
            text = "\n".join(f"{i}\t{10 if i % 2 else 0}" for i in range(n))
        else:
            text = "This feature detects odd tokens."
        self._reply({"choices": [{"message": {"content": text}}]})

    def _reply(self, doc):
        data = json.dumps(doc).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def endpoint():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Server)
    server.prompts = []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()


def test_an_openai_compatible_endpoint_explains_and_simulates(endpoint):
    source = interp_llm.parse_source("--x", f"http://127.0.0.1:{endpoint.server_port}/v1#toy")
    interp_llm.check_source("--x", source)
    lm = interp_llm.load_lm(source, MODEL_CACHE, torch.device("cpu"))
    assert lm.explain("which tokens?") == "odd tokens"
    assert lm.simulate("odd tokens", [["a", "b", "c"]]) == [[0.0, 10.0, 0.0]]
    assert "0\ta\n1\tb\n2\tc" in endpoint.prompts[-1]


def test_an_endpoint_that_does_not_answer_is_one_line_before_any_model(run_dir, capsys):
    code = main([str(run_dir.parent), "--explainer", "http://127.0.0.1:9/v1#m"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: --explainer=http://127.0.0.1:9/v1: no ")
    assert err.count("\n") == 1


@pytest.mark.parametrize(("args", "message"), [
    (["--latents", "0"], "error: --latents='0': expected an integer >= 1"),
    (["--sampling", "best"], "error: --sampling='best': expected one of stratified, uniform"),
    (["--simulator", "gpt"], "error: --simulator='gpt': expected bundled"),
])  # fmt: skip
def test_bad_arguments_are_one_line_and_status_2(run_dir, capsys, args, message):
    code = main([str(run_dir.parent), *args])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith(message) and err.count("\n") == 1


@pytest.fixture
def run_dir(tmp_path):
    return random_sae_run(tmp_path, HOOK)


@pytest.mark.integration
def test_the_pipeline_on_the_bundled_model_scores_two_latents_then_reads_its_cache(
        run_dir, tmp_path, bundled_model, monkeypatch):  # fmt: skip
    monkeypatch.setattr("benchmark.models.load_model", lambda *a, **k: bundled_model)
    out = tmp_path / "out"
    args = [str(run_dir.parent), "--latents", "2", "--n-top", "2", "--n-random", "1",
            "--context", "12", "--n-tokens", "2000", "--device", "cpu", "--out", str(out),
            "--cache-dir", str(MODEL_CACHE)]  # fmt: skip
    assert main(args) == 0
    frame = pd.read_csv(out / "interp.csv")
    assert list(frame.columns[:8]) == ["run_id", "sae", "target_l0", "l0", "seed", "model",
                                       "hook", "latent"]  # fmt: skip
    assert len(frame) == 2 and frame["latent"].between(0, 63).all()
    assert frame["explanation"].str.len().gt(0).all()
    assert (frame["explainer"] == "bundled:SmolLM2-135M-Instruct.Q4_1").all()
    defined = frame["score"].dropna()
    assert defined.between(-1, 1).all()
    assert frame["n_scored"].isin([12, 24, 36]).all()  # up to 2 top + 1 random, 12 tokens each
    first = json.loads((out / "interp.json").read_text())
    assert first["cache"]["misses"] == 4 and first["cache"]["hits"] == 0
    assert main(args) == 0  # the same settings again: every answer from the cache
    second = json.loads((out / "interp.json").read_text())
    assert second["cache"] == {"hits": 4, "misses": 0}
    again = pd.read_csv(out / "interp.csv")
    pd.testing.assert_frame_equal(frame, again)


@pytest.mark.integration
def test_the_shared_prefix_simulation_equals_one_whole_pass_per_context():
    lm = interp_llm.load_lm(interp_llm.Source("bundled", ""), MODEL_CACHE, torch.device("cpu"))
    contexts = [["The", " cat", " sat"], [" on", "\n", " a mat"]]
    fast, full = lm.simulate("cats", contexts), lm.simulate_full("cats", contexts)
    assert [len(c) for c in fast] == [3, 3]
    for a, b in zip(fast, full):
        assert a == pytest.approx(b, abs=1e-4)
        assert all(0.0 <= v <= 9.0 for v in a)
    ids, reads = lm.simulation_ids("cats", contexts[0])
    assert [ids[r] for r in reads] == lm.tok.encode("\t", add_special_tokens=False) * 3
