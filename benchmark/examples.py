"""Top-activating examples of an SAE's latents on the held-out split, as JSON and one HTML page.

    python -m benchmark.examples RUN_DIR --latents 0,5,17
    python -m benchmark.examples RUN_DIR --top 20              # the 20 most frequent latents
    python -m benchmark.examples RUN_DIR --random 20 --seed 0  # 20 random latents that fired

Reads the run's config.yaml (model, data, cache_dir), result.json (the hook) and SAE; scans the
first --n-tokens non-special tokens of the evaluation split (`data.token_windows(..., "eval")`:
windows of data.context_length, BOS first, the split training never reads) with one truncated
forward pass per batch (stopped after the hooked layer); f = sae(x).f at every position,
BOS/EOS/pad excluded (set to 0: the suite never scores them). For each latent it keeps the
--n-examples positions of largest activation, each with its context (--before / --after tokens)
and that latent's activation on every context token. Writes OUT/examples.json and
OUT/examples.html (self-contained: inline CSS, no script, no network, and a Content-Security-Policy
that forbids both; every token and name escaped, shown as text; tokens shaded by activation
relative to the latent's largest; hover shows the value). OUT defaults to RUN_DIR/examples.
docs/examples_page.md describes the page and how it is tested.

Knows the run folder, the model loader, the data windows and the SAE's forward; nothing else.
"""

from __future__ import annotations

import argparse
import errno
import html
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from benchmark import cli_errors, data, models
from benchmark.evaluate import hook_layer
from benchmark.fileio import atomic_write, write_json_atomic
from benchmark.saes import load_sae
from benchmark.specs import SourceSpec


@dataclass
class Scan:
    """The sparse code of every scanned position: position p is (window p // T, token p % T)."""

    tokens: Tensor  # (n_windows, T) token ids
    rows: Tensor  # (nnz,) flat position of each nonzero activation
    cols: Tensor  # (nnz,) its latent
    vals: Tensor  # (nnz,) its value, f = sae(x).f
    n_tokens: int  # non-special positions scanned
    d_sae: int

    def latent(self, i: int) -> Tensor:
        """(n_windows * T,) activations of latent i at every position."""
        dense = torch.zeros(self.tokens.numel())
        hit = self.cols == i
        dense[self.rows[hit]] = self.vals[hit]
        return dense

    def frequency(self) -> Tensor:
        """(d_sae,) share of the scanned non-special positions where each latent fires."""
        return torch.bincount(self.cols, minlength=self.d_sae).double() / max(1, self.n_tokens)


@torch.inference_mode()
def hook_activations(lm: Any, tokens: Tensor, hook: str, batch_size: int = 8) -> Tensor:
    """(n_windows, T, d_in) float32 activations at `hook` for every window (the model run
    only up to the hooked layer); hook_z is flattened over heads."""
    captured: dict[str, Tensor] = {}

    def capture(act: Tensor, hook: Any = None) -> None:
        captured["x"] = act.reshape(*act.shape[:2], -1)  # (B, T, d_in)

    device, out = next(iter(lm.parameters())).device, []
    for start in range(0, len(tokens), batch_size):
        lm.run_with_hooks(tokens[start : start + batch_size].to(device),
                          fwd_hooks=[(hook, capture)], stop_at_layer=hook_layer(hook) + 1,
                          return_type=None)  # fmt: skip
        out.append(captured["x"].float().cpu())
    return torch.cat(out)


@torch.inference_mode()
def scan_activations(x: Tensor, sae: Any, tokens: Tensor, tokenizer: Any,
                     batch_size: int = 8) -> Scan:  # fmt: skip
    """The SAE on activations `x` (n_windows, T, d_in) of `tokens`; keeps the nonzero codes.
    BOS/EOS/pad positions are set to 0 (the suite never scores them)."""
    device = next(sae.parameters()).device
    mask = data.non_special_mask(tokens, tokenizer)  # (N, T)
    T, rows, cols, vals = tokens.shape[1], [], [], []
    for start in range(0, len(tokens), batch_size):
        xb = x[start : start + batch_size].to(device)  # the SAE reads rows, as in training
        f = sae(xb.reshape(-1, xb.shape[-1])).f.reshape(*xb.shape[:2], -1).cpu()
        f = f * mask[start : start + batch_size, :, None]
        b, t, latent = torch.nonzero(f > 0, as_tuple=True)
        rows.append((start + b) * T + t)
        cols.append(latent)
        vals.append(f[b, t, latent])
    return Scan(tokens, torch.cat(rows), torch.cat(cols), torch.cat(vals).float(),
                int(mask.sum()), sae.d_sae)  # fmt: skip


def scan(lm: Any, sae: Any, tokens: Tensor, hook: str, batch_size: int = 8) -> Scan:
    """Run the model to `hook` and the SAE on every window; keep the nonzero activations."""
    x = hook_activations(lm, tokens, hook, batch_size)
    return scan_activations(x, sae, tokens, lm.tokenizer, batch_size)


def choose_latents(s: Scan, latents: Sequence[int] | None, top: int | None,
                   random: int | None, seed: int) -> list[int]:  # fmt: skip
    """The latents asked for: a list, the `top` most frequent, or `random` of those that fired."""
    if latents:
        bad = [i for i in latents if not 0 <= i < s.d_sae]
        if bad:
            raise ValueError(f"--latents {bad}: not in [0, d_sae={s.d_sae})")
        return list(latents)
    freq = s.frequency()
    if top:
        return freq.argsort(descending=True, stable=True)[:top].tolist()
    alive = torch.nonzero(freq > 0).flatten()
    pick = torch.randperm(len(alive), generator=torch.Generator().manual_seed(seed))
    return sorted(alive[pick[: random or 0]].tolist())


def latent_examples(s: Scan, i: int, tokenizer: Any, k: int, before: int, after: int) -> dict:
    """One latent's record: frequency, largest activation, its top-k contexts."""
    acts, T = s.latent(i), s.tokens.shape[1]
    n_fired = int((acts > 0).sum())
    values, positions = acts.topk(min(k, n_fired))  # largest first
    examples = []
    for value, pos in zip(values, positions):
        w, t = divmod(int(pos), T)
        lo, hi = max(0, t - before), min(T, t + after + 1)
        ids = s.tokens[w, lo:hi].tolist()
        examples.append({
            "window": w, "position": t, "activation": float(value), "start": lo, "focus": t - lo,
            "token_ids": ids, "tokens": [tokenizer.decode([j]) for j in ids],
            "activations": acts[w * T + lo : w * T + hi].tolist(),
        })  # fmt: skip
    return {
        "latent": i, "frequency": n_fired / max(1, s.n_tokens),
        "max_activation": float(acts.max()) if n_fired else 0.0, "examples": examples,
    }  # fmt: skip


CSS = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; }
h2 { font-size: 1.05em; margin: 1.6em 0 .3em; }
.meta { color: #666; font-size: .9em; }
.ex { font-family: ui-monospace, monospace; font-size: .9em; margin: .25em 0;
      white-space: pre-wrap; line-height: 1.7; }
.val { display: inline-block; width: 5em; color: #666; }
.tok { border-radius: 2px; padding: 1px 0; }
.focus { outline: 1px solid #c00; }
"""


# The page may load nothing and run nothing, whatever a corpus token smuggles in: no script,
# image, font, frame, form target or base URL; only the inline <style> and style attributes.
CSP = "default-src 'none'; style-src 'unsafe-inline'; base-uri 'none'; form-action 'none'"


def _e(value: Any) -> str:
    """Any value from the data, as text safe in element content and in quoted attributes."""
    return html.escape(str(value), quote=True)


def render_html(doc: dict) -> str:
    """One self-contained page: every latent, every example, tokens shaded by activation.

    Every value that comes from the data (run name, hook, counts, latent ids, tokens) is escaped,
    attributes included, so a token such as `<script>` is shown as text, never parsed as markup.
    """
    e = _e
    parts = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        f'<meta http-equiv="Content-Security-Policy" content="{e(CSP)}">',
        f"<title>Top examples: {e(doc['run'])}</title><style>{CSS}</style></head><body>",
        f"<h1>Top-activating examples</h1><p class=\"meta\">run {e(doc['run'])}; hook "
        f"{e(doc['hook'])}; {e(doc['n_tokens'])} held-out tokens scanned</p>",
    ]  # fmt: skip
    for lat in doc["latents"]:
        parts.append(f'<section id="latent-{e(lat["latent"])}"><h2>Latent {e(lat["latent"])}</h2>'
                     f'<p class="meta">frequency {lat["frequency"]:.5f}; max activation '
                     f'{lat["max_activation"]:.4g}</p>')  # fmt: skip
        top = lat["max_activation"] or 1.0
        for ex in lat["examples"]:
            spans = []
            for j, (tok, act) in enumerate(zip(ex["tokens"], ex["activations"])):
                alpha = max(0.0, min(1.0, act / top))
                cls = "tok focus" if j == ex["focus"] else "tok"
                text = e(str(tok).replace("\n", "\u21b5"))
                spans.append(f'<span class="{cls}" data-act="{act:.6g}" title="{act:.4g}" '
                             f'style="background: rgba(255,110,0,{alpha:.3f})">{text}</span>')  # fmt: skip
            parts.append(f'<div class="ex"><span class="val">{ex["activation"]:.3f}</span>'
                         f'{"".join(spans)}</div>')  # fmt: skip
        parts.append("</section>")
    parts.append("</body></html>")
    return "\n".join(parts)


def examples(run_dir: str | Path, *, latents: Sequence[int] | None = None, top: int | None = None,
             random: int | None = None, seed: int = 0, n_examples: int = 10,
             n_tokens: int = 20_000, before: int = 12, after: int = 4, batch_size: int = 8,
             device: str = "auto", out: str | Path | None = None) -> dict:  # fmt: skip
    """Scan, choose, write OUT/examples.json and OUT/examples.html; returns the JSON document.

    Everything that can be checked without the model is checked before it loads (seconds, not
    the model's load and the scan): config.yaml (required: a YAML mapping naming the model,
    layer, site and data), result.json (optional: a run killed during its evaluation has
    none, and the hook then comes from config.yaml; one that exists must parse), the device,
    the SAE (benchmark.saes.load_sae: a ValueError / OSError naming the file), --latents
    against its d_sae, and that OUT can be written. Errors name the file: ValueError, or an
    OSError with its filename."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(errno.ENOENT, "no such folder (give a run's folder)", str(run_dir))
    cfg = cli_errors.read_yaml_mapping(run_dir / "config.yaml")
    missing = [k for k in ("model", "layer", "site", "data", "cache_dir") if k not in cfg]
    if missing:
        raise ValueError(f"{run_dir / 'config.yaml'}: no {', '.join(missing)} (not a run's "
                         "config.yaml?)")  # fmt: skip
    result_file = run_dir / "result.json"
    result = cli_errors.read_json_file(result_file) if result_file.exists() else {}
    if not isinstance(result, dict):
        raise ValueError(f"{result_file}: expected a JSON object")
    source = SourceSpec.of(cfg)
    hook = result.get("hook") or models.hook_name(source.model, source.layer, source.site)
    dev = models.resolve_device(device, "--device")
    sae = load_sae(run_dir, dev).eval()
    if latents:
        bad = [i for i in latents if not 0 <= i < sae.d_sae]
        if bad:
            raise ValueError(f"--latents {bad}: not in [0, d_sae={sae.d_sae})")
    folder = Path(out) if out else run_dir / "examples"
    why = cli_errors.unwritable(folder)
    if why is not None:
        where = "--out" if out else f"{run_dir}: the default output folder"
        raise ValueError(f"{where} {folder} cannot be written ({why}); give a writable --out")
    lm = models.load_model(source.model, dev, source.cache_dir)
    tokens = data.token_windows(source.data, lm.tokenizer, "eval", n_tokens, allow_fewer=True)
    s = scan(lm, sae, tokens, hook, batch_size)
    chosen = choose_latents(s, latents, top, random, seed)
    doc = {
        "run": run_dir.name, "run_dir": str(run_dir), "hook": hook, "model": source.model.name,
        "split": "eval", "context_length": tokens.shape[1], "n_windows": len(tokens),
        "n_tokens": s.n_tokens, "d_sae": sae.d_sae,
        "latents": [latent_examples(s, i, lm.tokenizer, n_examples, before, after) for i in chosen],
    }  # fmt: skip
    folder.mkdir(parents=True, exist_ok=True)
    write_json_atomic(folder / "examples.json", doc)
    page = render_html(doc)
    atomic_write(folder / "examples.html", lambda p: Path(p).write_text(page, encoding="utf-8"))
    return doc


def main(argv: Sequence[str] | None = None) -> int:
    """The CLI. A user error is one `error: ...` line on stderr and exit status 2, found before
    the model loads (`examples`): a bad --latents, a missing or unparsable config.yaml or
    result.json, a device this machine lacks, an SAE file its loader cannot read, an output
    folder that cannot be written; any OSError names its file. Ctrl-C: one line, status 130;
    HYDRA_FULL_ERROR=1: tracebacks instead."""
    p = argparse.ArgumentParser(prog="python -m benchmark.examples", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("run_dir", type=Path)
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--latents", help="comma-separated latent indices, e.g. 0,5,17")
    which.add_argument("--top", type=int, help="the N most frequent latents")
    which.add_argument("--random", type=int, help="N random latents among those that fired")
    p.add_argument("--seed", type=int, default=0, help="for --random")
    p.add_argument("--n-examples", type=int, default=10, help="contexts per latent")
    p.add_argument("--n-tokens", type=int, default=20_000, help="held-out tokens to scan")
    p.add_argument("--before", type=int, default=12, help="context tokens before the maximum")
    p.add_argument("--after", type=int, default=4, help="context tokens after the maximum")
    p.add_argument("--batch-size", type=int, default=8, help="windows per forward pass")
    p.add_argument("--device", default="auto")
    p.add_argument("--out", type=Path, help="output folder (default RUN_DIR/examples)")
    a = p.parse_args(argv)
    try:
        latents = [int(x) for x in a.latents.split(",")] if a.latents else None
    except ValueError:
        return cli_errors.error(f"--latents={a.latents!r}: expected comma-separated latent "
                                "indices, e.g. 0,5,17")  # fmt: skip
    with cli_errors.on_interrupt("interrupted: nothing was written; re-run the same command"):
        try:
            doc = examples(a.run_dir, latents=latents, top=a.top, random=a.random, seed=a.seed,
                           n_examples=a.n_examples, n_tokens=a.n_tokens, before=a.before,
                           after=a.after, batch_size=a.batch_size, device=a.device, out=a.out)  # fmt: skip
        except (OSError, ValueError) as e:
            return cli_errors.user_error(e)
    out = a.out or a.run_dir / "examples"
    print(f"{len(doc['latents'])} latents, {doc['n_tokens']} tokens: {out}/examples.html")
    return 0


if __name__ == "__main__":
    sys.exit(main())
