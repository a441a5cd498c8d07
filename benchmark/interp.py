"""Automated interpretability as the paper ran it: explain a latent, simulate it, score it.

    python -m benchmark.interp RESULTS_DIR [--latents 16] [--sampling stratified|uniform]
                               [--explainer bundled|hf:NAME|URL#MODEL] [--simulator ...]
                               [--n-top 5] [--n-random 5] [--context 32] [--n-tokens 50000]
                               [--seed 0] [--out DIR] [--cache-dir DIR] [--device D]

Per complete run under RESULTS_DIR (or one run's folder), the method of Bills et al. (2023),
which the JumpReLU paper's automated study uses (the models are `benchmark.interp_llm`'s):
1. Scan: the first --n-tokens non-special tokens of the run's held-out split (the windows
   `benchmark.examples` scans, the split training never reads), f = sae(x).f at every position;
   the activations at a hook are computed once and shared by every run at that hook.
2. Sample latents among those that fired: `stratified` (default) takes the same number from each
   firing-frequency band (decades: 1e-5..1e-4, ..., 1e-1..1) as far as a band has latents, the
   rest from the others; `uniform` draws among all of them. Seeded (--seed).
3. Contexts: the latent's top-activating positions, each with a --context token span around it
   (3/4 before, never the BOS, spans of one window never overlapping), ranked by activation:
   ranks 0, 2, 4, ... (--n-top of them) go to the explainer, ranks 1, 3, 5, ... to scoring, so
   both see the same range of strengths; scoring adds --n-random random spans of the split.
   True activations are discretised to 0-10 against the latent's largest activation on the scan
   (round(10 a / max), as Bills et al.).
4. Explain, simulate (all at once), score: the Pearson correlation between simulated and true
   (binned) activations over every token of the scoring contexts; NaN when either is constant.

Writes OUT/interp.csv (one row per latent: run_id, sae, target_l0, l0, seed, model, hook,
latent, frequency, band, explanation, score, n_scored, explainer, simulator), OUT/interp.md
(`benchmark.report.interp`), OUT/interp.json (settings, cache hits, wall time) and OUT/cache/
(every prompt and response by content hash: a re-run calls no model). OUT defaults to
RESULTS_DIR/interp. `python -m benchmark.report RESULTS_DIR` adds the summary and its figure.

Knows the run folders, the model loader, the data windows and the SAE's forward (through
`benchmark.examples.scan`); the explainer and simulator are `benchmark.interp_llm`'s.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch import Tensor

from benchmark import cli_errors, data, interp_llm, models
from benchmark.examples import Scan, hook_activations, scan_activations
from benchmark.fileio import write_json_atomic
from benchmark.probe import Run, complete_runs, one_int
from benchmark.saes import load_sae
from benchmark.specs import DataSpec

SAMPLING = ("stratified", "uniform")
BAND_EDGES = (1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0)  # decades of firing frequency
CSV_COLUMNS = ("run_id", "sae", "target_l0", "l0", "seed", "model", "hook", "latent",
               "frequency", "band", "explanation", "score", "n_scored", "explainer",
               "simulator")  # fmt: skip


# ---- pure parts: bands, sampling, spans, binning, the score ----


def band(frequency: float) -> str:
    """The decade a firing frequency falls in, e.g. '1e-4..1e-3' (below 1e-5: '<1e-5')."""
    for lo, hi in zip(BAND_EDGES, BAND_EDGES[1:]):
        if lo <= frequency < hi or (hi == 1.0 and frequency == 1.0):
            return f"{lo:.0e}..{hi:.0e}".replace("e-0", "e-").replace("e+00", "")
    return f"<{BAND_EDGES[0]:.0e}".replace("e-0", "e-")


def sample_latents(freq: Tensor, n: int, sampling: str, seed: int) -> list[int]:
    """Up to n latents among those with freq > 0 (module docstring, step 2), sorted."""
    alive = torch.nonzero(freq > 0).flatten().tolist()
    g = torch.Generator().manual_seed(seed)
    if sampling == "uniform" or len(alive) <= n:
        pick = torch.randperm(len(alive), generator=g)[:n].tolist()
        return sorted(alive[i] for i in pick)
    bands: dict[str, list[int]] = {}
    for i in alive:
        bands.setdefault(band(float(freq[i])), []).append(i)
    pools = [[members[j] for j in torch.randperm(len(members), generator=g).tolist()]
             for _, members in sorted(bands.items())]  # fmt: skip
    chosen: list[int] = []
    while len(chosen) < n:  # round-robin over the bands that still have latents
        for pool in pools:
            if pool and len(chosen) < n:
                chosen.append(pool.pop())
    return sorted(chosen)


def span(t: int, T: int, length: int) -> tuple[int, int]:
    """[lo, hi) of `length` tokens around position t of a window of T (3/4 before, never
    position 0, the BOS), shifted to stay inside the window."""
    length = min(length, T - 1)
    lo = max(1, t - (3 * length) // 4)
    lo = min(lo, T - length)
    return lo, lo + length


def top_spans(acts: Tensor, T: int, length: int, n: int) -> list[tuple[int, int, int]]:
    """Up to n (window, lo, hi) spans around the largest activations, largest first; spans of
    one window never overlap."""
    order = torch.argsort(acts, descending=True, stable=True)
    chosen: list[tuple[int, int, int]] = []
    for pos in order[: int((acts > 0).sum())].tolist():
        w, t = divmod(pos, T)
        lo, hi = span(t, T, length)
        if all(w != cw or hi <= clo or lo >= chi for cw, clo, chi in chosen):
            chosen.append((w, lo, hi))
            if len(chosen) == n:
                break
    return chosen


def random_spans(n_windows: int, T: int, length: int, n: int,
                 g: torch.Generator) -> list[tuple[int, int, int]]:  # fmt: skip
    length = min(length, T - 1)
    out = []
    for _ in range(n):
        w = int(torch.randint(n_windows, (1,), generator=g))
        lo = 1 + int(torch.randint(T - length, (1,), generator=g))
        out.append((w, lo, lo + length))
    return out


def discretise(acts: Tensor, max_act: float) -> Tensor:
    """round(10 a / max), clipped to 0..10 (int64); all zeros when max <= 0."""
    if max_act <= 0:
        return torch.zeros_like(acts, dtype=torch.int64)
    return torch.round(10 * acts.double() / max_act).clamp(0, 10).to(torch.int64)


def pearson(x: Sequence[float | None], y: Sequence[float]) -> float:
    """Pearson's r over the pairs where x is given; NaN with fewer than 2 or a constant side."""
    pairs = [(float(a), float(b)) for a, b in zip(x, y) if a is not None]
    if len(pairs) < 2:
        return math.nan
    t = torch.tensor(pairs, dtype=torch.float64)
    d = t - t.mean(0)
    den = math.sqrt(float((d[:, 0] ** 2).sum()) * float((d[:, 1] ** 2).sum()))
    return float((d[:, 0] * d[:, 1]).sum()) / den if den > 0 else math.nan


# ---- one latent ----


@dataclass
class Settings:
    n_latents: int = 16
    sampling: str = "stratified"
    n_top: int = 5
    n_random: int = 5
    context: int = 32
    n_tokens: int = 50_000
    seed: int = 0


def score_latent(s: Scan, latent: int, tokenizer: Any, explainer: Any, simulator: Any,
                 cache: interp_llm.Cache, st: Settings) -> dict:  # fmt: skip
    """Explain, simulate and score one latent (module docstring, steps 3-4)."""
    acts, (n_windows, T) = s.latent(latent), s.tokens.shape
    max_act = float(acts.max())
    top = top_spans(acts, T, st.context, 2 * st.n_top)
    g = torch.Generator().manual_seed(st.seed * 1_000_003 + latent)
    scoring = top[1::2] + random_spans(n_windows, T, st.context, st.n_random, g)

    def view(w: int, lo: int, hi: int) -> tuple[list[str], list[int]]:
        ids = s.tokens[w, lo:hi].tolist()
        bins = discretise(acts[w * T + lo : w * T + hi], max_act).tolist()
        return [tokenizer.decode([i]) for i in ids], bins

    shown = [view(*sp) for sp in top[0::2]]
    prompt = interp_llm.explain_prompt(shown)
    explanation = cache.get({"kind": "explain", "model": explainer.identity, "prompt": prompt,
                             "version": interp_llm.PROMPT_VERSION}, interp_llm.is_text,
                            lambda: explainer.explain(prompt))  # fmt: skip
    scored = [view(*sp) for sp in scoring]
    contexts = [tokens for tokens, _ in scored]
    simulated = cache.get({"kind": "simulate", "model": simulator.identity,
                           "explanation": explanation, "contexts": contexts,
                           "version": interp_llm.PROMPT_VERSION}, interp_llm.is_simulation,
                          lambda: simulator.simulate(explanation, contexts))  # fmt: skip
    sim = [v for context in simulated for v in context]
    true = [b for _, bins in scored for b in bins]
    if len(sim) != len(true):  # a simulator that answered for other tokens: nothing to score
        sim = [None] * len(true)
    freq = int((acts > 0).sum()) / max(1, s.n_tokens)
    return {"latent": latent, "frequency": freq, "band": band(freq), "explanation": explanation,
            "score": pearson(sim, true), "n_scored": sum(v is not None for v in sim)}  # fmt: skip


# ---- runs ----


def check_options(st: Settings) -> None:
    if st.sampling not in SAMPLING:
        raise ValueError(f"--sampling={st.sampling!r}: expected one of {', '.join(SAMPLING)}")
    for option, value, low in (("--latents", st.n_latents, 1), ("--n-top", st.n_top, 1),
                               ("--n-random", st.n_random, 0), ("--context", st.context, 4),
                               ("--n-tokens", st.n_tokens, 1)):  # fmt: skip
        if value < low:
            raise ValueError(f"{option}={value}: expected an integer >= {low}")


def interp(results_dir: str | Path, settings: Settings | None = None, *,
           explainer: str = "bundled", simulator: str = "bundled", out: str | Path | None = None,
           cache_dir: str | None = None, device: str = "auto", batch_size: int = 8,
           log: Any = print) -> pd.DataFrame:  # fmt: skip
    """Score every complete run under `results_dir` (module docstring); the frame written to
    OUT/interp.csv. Options, runs, SAEs, sources and OUT are checked before any model loads:
    ValueError, or an OSError naming its file."""
    start, st = time.perf_counter(), settings or Settings()
    check_options(st)
    sources = {o: interp_llm.parse_source(o, v)
               for o, v in (("--explainer", explainer), ("--simulator", simulator))}  # fmt: skip
    root, runs = complete_runs(results_dir, cache_dir)
    out_dir = Path(out) if out else root / "interp"
    why = cli_errors.unwritable(out_dir)
    if why is not None:
        raise ValueError(f"--out={out_dir}: cannot be written ({why}); give a writable --out")
    for option, source in sources.items():
        interp_llm.check_source(option, source)
    dev = models.resolve_device(device, "--device")
    cache = interp_llm.Cache(out_dir / "cache")
    lms = {o: interp_llm.load_lm(s, Path(runs[0].cache_dir), dev) for o, s in sources.items()}
    rows: list[dict] = []
    loaded: dict[str, Any] = {}  # the activation model of the runs being scored (one at a time)
    held_out: dict[str, tuple[Tensor, Tensor]] = {}  # (tokens, activations) of one hook and split
    for run in sorted(runs, key=lambda r: (_model_key(r), r.hook, str(r.folder))):
        key = _model_key(run)
        if key not in loaded:
            loaded.clear()
            loaded[key] = models.load_model(run.model, dev, run.cache_dir)
        rows += score_run(run, loaded[key], lms["--explainer"], lms["--simulator"], cache, st,
                          dev, batch_size, log, held_out)  # fmt: skip
    frame = pd.DataFrame(rows, columns=[*CSV_COLUMNS])
    write_outputs(frame, out_dir, root, st, sources, cache, len(runs), dev, start)
    return frame


def _model_key(run: Run) -> str:
    return f"{run.model!r}|{run.cache_dir}"


def score_run(run: Run, lm: Any, explainer: Any, simulator: Any, cache: interp_llm.Cache,
              st: Settings, dev: torch.device, batch_size: int, log: Any,
              held_out: dict[str, tuple[Tensor, Tensor]]) -> list[dict]:  # fmt: skip
    """The rows of one run (`lm` its activation model): scan its held-out split, sample, score
    each latent. The split's activations at the hook are computed once and kept in
    `held_out` for the next run at the same hook and data (runs come sorted by hook)."""
    t0, r = time.perf_counter(), run.record
    cfg = cli_errors.read_yaml_mapping(run.folder / "config.yaml")
    spec = DataSpec.of(cfg.data)
    key = f"{run.hook}\n{spec!r}\n{sorted(spec.identity.items())!r}"
    if key not in held_out:
        held_out.clear()
        tokens = data.token_windows(spec, lm.tokenizer, "eval", st.n_tokens, allow_fewer=True)
        held_out[key] = (tokens, hook_activations(lm, tokens, run.hook, batch_size))
    tokens, x = held_out[key]
    sae = load_sae(run.folder, dev).eval()
    s = scan_activations(x, sae, tokens, lm.tokenizer, batch_size)
    latents = sample_latents(s.frequency(), st.n_latents, st.sampling, st.seed)
    base = {"run_id": r["run_id"], "sae": r["sae"], "target_l0": r["target_l0"], "l0": r["l0"],
            "seed": r["seed"], "model": r["model"], "hook": run.hook,
            "explainer": explainer.identity, "simulator": simulator.identity}  # fmt: skip
    rows = [{**base, **score_latent(s, i, lm.tokenizer, explainer, simulator, cache, st)}
            for i in latents]  # fmt: skip
    scores = pd.Series([row["score"] for row in rows], dtype=float)
    log(f"[interp] {r['run_id']}: {len(rows)} latents, mean score {scores.mean():.3f} "
        f"({int(scores.isna().sum())} undefined) in {time.perf_counter() - t0:.0f} s")  # fmt: skip
    return rows


def write_outputs(frame: pd.DataFrame, out_dir: Path, root: Path, st: Settings,
                  sources: dict, cache: interp_llm.Cache, n_runs: int, dev: torch.device,
                  start: float) -> None:  # fmt: skip
    from benchmark.report.interp import interp_markdown

    out_dir.mkdir(parents=True, exist_ok=True)
    frame.to_csv(out_dir / "interp.csv", index=False)
    (out_dir / "interp.md").write_text(interp_markdown(frame))
    write_json_atomic(out_dir / "interp.json", {
        "eval": "automated_interpretability", "source": "Bills et al. 2023, Language models can "
        "explain neurons in language models (explain, simulate all at once, correlation score)",
        "results_dir": str(root), "settings": vars(st), "band_edges": list(BAND_EDGES),
        "explainer": sources["--explainer"].identity, "simulator": sources["--simulator"].identity,
        "prompt_version": interp_llm.PROMPT_VERSION, "n_runs": n_runs,
        "cache": {"hits": cache.hits, "misses": cache.misses}, "device": str(dev),
        "wall_seconds": time.perf_counter() - start, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    })  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    """The CLI. A user error is one `error: ...` line on stderr and exit status 2, found before
    a model loads; Ctrl-C: one line, status 130; HYDRA_FULL_ERROR=1: tracebacks instead."""
    p = argparse.ArgumentParser(prog="python -m benchmark.interp", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("results_dir", type=Path, help="a folder of runs (or one run's folder)")
    p.add_argument("--latents", default="16", help="latents scored per SAE")
    p.add_argument("--sampling", default="stratified", help="stratified or uniform")
    p.add_argument("--n-top", default="5", help="top contexts shown to the explainer")
    p.add_argument("--n-random", default="5", help="random contexts added to scoring")
    p.add_argument("--context", default="32", help="tokens per context")
    p.add_argument("--n-tokens", default="50000", help="held-out tokens scanned per run")
    p.add_argument("--seed", default="0", help="latent sampling and random contexts")
    p.add_argument("--explainer", default="bundled", help="bundled, hf:NAME or URL#MODEL")
    p.add_argument("--simulator", default="bundled", help="bundled, hf:NAME or URL#MODEL")
    p.add_argument("--out", type=Path, help="output folder (default RESULTS_DIR/interp)")
    p.add_argument("--cache-dir", help="the model cache (default: each run's cache_dir)")
    p.add_argument("--batch-size", default="8", help="windows per forward pass of the scan")
    p.add_argument("--device", default="auto")
    a = p.parse_args(argv)
    with cli_errors.on_interrupt("interrupted: the cache keeps what was computed; re-run the "
                                 "same command"):  # fmt: skip
        try:
            st = Settings(one_int("--latents", a.latents, 1), a.sampling,
                          one_int("--n-top", a.n_top, 1), one_int("--n-random", a.n_random, 0),
                          one_int("--context", a.context, 4), one_int("--n-tokens", a.n_tokens, 1),
                          one_int("--seed", a.seed, 0))  # fmt: skip
            frame = interp(a.results_dir, st, explainer=a.explainer, simulator=a.simulator,
                           out=a.out, cache_dir=a.cache_dir, device=a.device,
                           batch_size=one_int("--batch-size", a.batch_size, 1))  # fmt: skip
        except (OSError, ValueError) as e:
            return cli_errors.user_error(e)
    out = a.out or a.results_dir / "interp"
    print(f"{len(frame)} latents scored: {out}/interp.csv, {out}/interp.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
