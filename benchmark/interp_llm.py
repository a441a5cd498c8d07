"""The explainer and the simulator of `benchmark.interp`: prompts, three model sources, and a
cache of every prompt and response by content hash.

Method (Bills et al. 2023, "Language models can explain neurons in language models", as
the method of the JumpReLU paper's automated study): the *explainer* reads a latent's
top-activating contexts, each token's activation discretised to 0-10, and writes a short
explanation; the *simulator* reads only that explanation and a held-out context, and predicts
each token's activation. "All at once" simulation: the context is written one token per line,
`token<TAB>unknown`, in one prompt, and the simulator's prediction for a token is the expected
value of its next-token distribution over the digit tokens right after that token's TAB.

Model sources (`--explainer` / `--simulator`, the same grammar):
- `bundled` (default): SmolLM2-135M-Instruct, the suite's own bundled model (its converted
  folder in the model cache, `benchmark.models.converted_bundled_model`), through transformers,
  offline. A 135M model's explanations are plumbing-level: they exercise the pipeline, they do
  not reproduce the paper's scores (docs/interp.md).
- `hf:NAME`: a Hugging Face causal LM (e.g. `hf:google/gemma-2-9b-it` on a GPU): read from the
  local HF cache, else downloaded when the hub answers (`benchmark.hub`); otherwise one error
  line at start-up.
- `http(s)://HOST/v1#MODEL`: an OpenAI-compatible server (vLLM, Ollama, llama.cpp) by URL,
  `/chat/completions` at temperature 0. Such servers seldom return the prompt's logprobs, so
  this simulator answers in text, `index<TAB>number` per token; a token it leaves out is not
  scored (`n_scored` counts those that were).

Deviation (docs/interp.md): SmolLM2's tokenizer writes "10" as two tokens, so the local
simulator's support is the single digits 0-9. The Pearson score is unchanged by the scale; only
the top value saturates at 9.

Cache: every request (kind, model identity, prompt version and its content) is hashed
(SHA-256 of canonical JSON); the request and its response are stored as JSON in
`CACHE/<hash[:2]>/<hash>.json`. A cached entry is read as data (json), its request compared with
the one asked and its response checked by type; a damaged or foreign entry is warned about and
recomputed, never used. A re-run of the same settings calls no model.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import math
import re
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from benchmark.fileio import write_json_atomic

log = logging.getLogger(__name__)

PROMPT_VERSION = 1  # part of every cache key: a changed prompt never reads an old answer
EXPLAIN_TOKENS = 24  # new tokens for an explanation (one short phrase)
SIMULATE_TOKENS = 1024  # the endpoint simulator's answer: a line per token
TIMEOUT_S = 120.0  # one endpoint request
LEAD = "This feature detects"

EXPLAIN_PROMPT = (
    "We study one feature of a language model. Below are text excerpts where it is active; "
    "each token where it fires is marked [[token]] with its strength from 1 to 10.\n\n"
    "{excerpts}\n\nIn a few words, what does this feature detect? Reply with one short phrase."
)
SIMULATE_PROMPT = (
    "A feature of a language model detects {explanation}. For each token of the text below, "
    "predict how strongly the feature fires on it, from 0 (not at all) to 9 (fully). Reply "
    "with one line per token: the token, a tab, the number."
)
SIMULATE_TEXT_PROMPT = (
    "A feature of a language model detects {explanation}. Below is a text split into numbered "
    "tokens. For each token predict how strongly the feature fires on it, from 0 (not at all) to "
    "10 (fully). Reply with one line per token, `index<TAB>number`, nothing else.\n\n{tokens}"
)


def show(token: str) -> str:
    """A token as one printable line: newline and tab written as \\n and \\t."""
    return token.replace("\n", "\\n").replace("\t", "\\t").replace("\r", "\\r")


def excerpt(tokens: Sequence[str], bins: Sequence[int]) -> str:
    """One context for the explainer: its text, each token with bin >= 1 as [[token]](bin)."""
    return "".join(f"[[{show(t)}]]({b})" if b >= 1 else show(t) for t, b in zip(tokens, bins))


def explain_prompt(contexts: Sequence[tuple[Sequence[str], Sequence[int]]]) -> str:
    body = "\n".join(f"Excerpt {i + 1}: {excerpt(t, b)}" for i, (t, b) in enumerate(contexts))
    return EXPLAIN_PROMPT.format(excerpts=body)


def clean_explanation(text: str) -> str:
    """The generated phrase: its first line, without a repeated lead-in, quotes or final dot."""
    line = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
    if line.lower().startswith(LEAD.lower()):
        line = line[len(LEAD) :].strip()
    return line.strip(" \"'`*").rstrip(".").strip() or "nothing in particular"


# ---- the cache ----


class Cache:
    """Requests and responses by content hash (module docstring); `folder=None` keeps nothing."""

    def __init__(self, folder: Path | None):
        self.folder, self.hits, self.misses = folder, 0, 0

    @staticmethod
    def key(request: dict) -> str:
        text = json.dumps(request, sort_keys=True, ensure_ascii=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()

    def get(self, request: dict, valid: Callable[[Any], bool], compute: Callable[[], Any]) -> Any:
        """The cached response to `request` when one is stored and passes `valid`, else
        `compute()`'s, stored."""
        key = self.key(request)
        path = self.folder / key[:2] / f"{key}.json" if self.folder else None
        if path is not None and path.is_file():
            try:
                entry = json.loads(path.read_text(encoding="utf-8"))
                ok = (isinstance(entry, dict) and entry.get("request") == request
                      and valid(entry.get("response")))  # fmt: skip
            except (OSError, UnicodeDecodeError, ValueError):
                ok = False
            if ok:
                self.hits += 1
                return entry["response"]
            log.warning("interp cache entry %s is damaged or not this request: recomputed", path)
        self.misses += 1
        response = compute()
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_json_atomic(path, {"request": request, "response": response})
        return response


def is_text(value: Any) -> bool:
    return isinstance(value, str)


def is_simulation(value: Any) -> bool:
    """A list of contexts, each a list of numbers (or None for a token left unscored)."""
    return isinstance(value, list) and all(
        isinstance(c, list) and all(v is None or (isinstance(v, (int, float))
                                                  and not isinstance(v, bool)) for v in c)
        for c in value)  # fmt: skip


# ---- the model sources ----


@dataclass(frozen=True)
class Source:
    """A parsed `--explainer` / `--simulator` value."""

    kind: str  # bundled | hf | http
    name: str  # the HF name, or the endpoint's base URL
    model: str = ""  # the endpoint's model name

    @property
    def identity(self) -> str:
        return {"bundled": "bundled", "hf": f"hf:{self.name}"}.get(
            self.kind, f"{self.name}#{self.model}"
        )


def parse_source(option: str, value: str) -> Source:
    """ValueError naming the option unless `value` is bundled, hf:NAME or http(s)://...#MODEL."""
    if value == "bundled":
        return Source("bundled", "")
    if value.startswith("hf:") and len(value) > 3:
        return Source("hf", value[3:])
    if re.match(r"^https?://[^\s#]+$", value.split("#")[0]):
        base, _, model = value.partition("#")
        return Source("http", base.rstrip("/"), model)
    raise ValueError(f"{option}={value!r}: expected bundled, hf:NAME (a Hugging Face causal LM) "
                     "or an OpenAI-compatible URL such as http://localhost:8000/v1#MODEL")  # fmt: skip


class LocalLM:
    """A transformers causal LM with a chat template: greedy explanations, all-at-once
    simulation from the digit distribution."""

    def __init__(self, model: Any, tokenizer: Any, identity: str):
        self.model, self.tok, self.identity = model.eval(), tokenizer, identity
        digits = [tokenizer.encode(str(d), add_special_tokens=False) for d in range(10)]
        if any(len(ids) != 1 for ids in digits):
            raise ValueError(f"{identity}: the digits 0-9 are not single tokens of its tokenizer, "
                             "which the all-at-once simulator reads; use an endpoint simulator")  # fmt: skip
        self.digits = torch.tensor([ids[0] for ids in digits])
        # transformers 5.x renamed the key/value cache argument and output `cache`; older
        # versions call both `past_key_values`.
        params = inspect.signature(model.forward).parameters
        self.cache_arg = "cache" if "cache" in params else "past_key_values"

    def _chat(self, user: str) -> list[int]:
        ids = self.tok.apply_chat_template([{"role": "user", "content": user}],
                                           add_generation_prompt=True, tokenize=True)  # fmt: skip
        return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)

    def _ids(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False)

    @torch.inference_mode()
    def explain(self, prompt: str) -> str:
        ids = self._chat(prompt) + self._ids(LEAD)
        dev = next(self.model.parameters()).device
        x = torch.tensor([ids], device=dev)
        pad = self.tok.pad_token_id if self.tok.pad_token_id is not None else self.tok.eos_token_id
        out = self.model.generate(x, attention_mask=torch.ones_like(x), do_sample=False,
                                  max_new_tokens=EXPLAIN_TOKENS, pad_token_id=pad)  # fmt: skip
        return clean_explanation(self.tok.decode(out[0, len(ids) :], skip_special_tokens=True))

    def simulation_ids(
        self, explanation: str, tokens: Sequence[str]
    ) -> tuple[list[int], list[int]]:
        """The whole prompt's ids and, per context token, the position whose next-token
        distribution is read (its TAB): the prefix, then `token<TAB>unknown` lines."""
        prefix = self._chat(SIMULATE_PROMPT.format(explanation=explanation))
        body, reads = self.body_ids(tokens)
        return prefix + body, [len(prefix) + r for r in reads]

    def body_ids(self, tokens: Sequence[str]) -> tuple[list[int], list[int]]:
        """`token<TAB>unknown` lines, tokenised piece by piece so that no piece merges with its
        neighbour, and the position of each TAB in them."""
        tab, unknown, newline = self._ids("\t"), self._ids("unknown"), self._ids("\n")
        ids: list[int] = []
        reads = []
        for token in tokens:
            ids += self._ids(show(token)) + tab
            reads.append(len(ids) - 1)
            ids += unknown + newline
        return ids, reads

    def expected_digit(self, logits: Tensor) -> list[float]:
        """sum_d d * p(d) / sum_d p(d) over the digits d = 0..9, per row of logits."""
        p = torch.softmax(logits.float().cpu(), dim=-1)[:, self.digits]  # (n_tokens, 10)
        p = p / p.sum(-1, keepdim=True).clamp_min(1e-30)
        return (p * torch.arange(10.0)).sum(-1).tolist()

    @torch.inference_mode()
    def simulate(self, explanation: str, contexts: Sequence[Sequence[str]]) -> list[list[float]]:
        """Per context, per token: the expected digit after its TAB. The prompt's prefix
        (instructions and explanation) is run once and its key/value cache reused by every
        context (cropped back after each), so a context costs only its own lines."""
        dev = next(self.model.parameters()).device
        prefix = self._chat(SIMULATE_PROMPT.format(explanation=explanation))
        first = self.model(torch.tensor([prefix], device=dev), use_cache=True)
        cache = getattr(first, self.cache_arg)
        out = []
        for tokens in contexts:
            body, reads = self.body_ids(tokens)
            logits = self.model(torch.tensor([body], device=dev), use_cache=True,
                                **{self.cache_arg: cache}).logits[0, reads]  # fmt: skip
            cache.crop(-len(body))  # back to the prefix alone
            out.append(self.expected_digit(logits))
        return out

    @torch.inference_mode()
    def simulate_full(
        self, explanation: str, contexts: Sequence[Sequence[str]]
    ) -> list[list[float]]:
        """`simulate` without the shared prefix: one whole pass per context (the test oracle)."""
        dev = next(self.model.parameters()).device
        out = []
        for tokens in contexts:
            ids, reads = self.simulation_ids(explanation, tokens)
            out.append(
                self.expected_digit(self.model(torch.tensor([ids], device=dev)).logits[0, reads])
            )
        return out


class EndpointLM:
    """An OpenAI-compatible chat endpoint at temperature 0."""

    def __init__(self, source: Source):
        self.base, self.model, self.identity = source.name, source.model, source.identity

    def _chat(self, prompt: str, max_tokens: int) -> str:
        body = {"model": self.model, "temperature": 0, "max_tokens": max_tokens,
                "messages": [{"role": "user", "content": prompt}]}  # fmt: skip
        request = urllib.request.Request(f"{self.base}/chat/completions",
                                         data=json.dumps(body).encode(), method="POST",
                                         headers={"Content-Type": "application/json"})  # fmt: skip
        with urllib.request.urlopen(request, timeout=TIMEOUT_S) as r:  # noqa: S310 (user's URL)
            reply = json.loads(r.read().decode("utf-8"))
        try:
            return str(reply["choices"][0]["message"]["content"])
        except (KeyError, IndexError, TypeError):
            raise ValueError(f"{self.base}: not an OpenAI-style chat completion") from None

    def explain(self, prompt: str) -> str:
        return clean_explanation(self._chat(prompt, EXPLAIN_TOKENS * 2))

    def simulate(self, explanation: str, contexts: Sequence[Sequence[str]]) -> list[list[Any]]:
        out = []
        for tokens in contexts:
            listing = "\n".join(f"{i}\t{show(t)}" for i, t in enumerate(tokens))
            text = self._chat(SIMULATE_TEXT_PROMPT.format(explanation=explanation,
                                                          tokens=listing), SIMULATE_TOKENS)  # fmt: skip
            out.append(parse_numbered(text, len(tokens)))
        return out


def parse_numbered(text: str, n: int) -> list[float | None]:
    """`index<TAB>number` lines -> a value per index 0..n-1 (None where none was given; the
    first value given for an index counts; numbers clipped to 0-10)."""
    values: list[float | None] = [None] * n
    for m in re.finditer(r"^\s*(\d+)\s*[\t:,=|-]\s*(\d+(?:\.\d+)?)\s*$", text, re.MULTILINE):
        i, v = int(m.group(1)), float(m.group(2))
        if i < n and values[i] is None and math.isfinite(v):
            values[i] = min(10.0, max(0.0, v))
    return values


def check_endpoint(option: str, source: Source) -> None:
    """One GET of `/models` (5 s): ValueError naming the option when nothing answers."""
    try:
        with urllib.request.urlopen(f"{source.name}/models", timeout=5.0):  # noqa: S310
            pass
    except urllib.error.HTTPError:
        return  # a server answered (some have no /models)
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise ValueError(f"{option}={source.name}: no OpenAI-compatible server answers there "
                         f"({reason})") from None  # fmt: skip


def check_hf(option: str, source: Source) -> None:
    """ValueError naming the option when the model is neither cached nor downloadable."""
    from benchmark import hub

    if hub.model_cached(source.name):
        return
    why = hub.hub_unreachable()
    if why is not None:
        raise ValueError(f"{option}=hf:{source.name}: not in the local Hugging Face cache and the "
                         f"hub cannot be reached ({why}); download it first or use bundled")  # fmt: skip


def load_lm(source: Source, cache_dir: Path, device: torch.device) -> Any:
    """The explainer / simulator of `source` (checked beforehand by `check_source`)."""
    if source.kind == "http":
        return EndpointLM(source)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if source.kind == "bundled":
        from benchmark.models import converted_bundled_model

        folder, offline = str(converted_bundled_model(cache_dir)), True
        identity = f"bundled:{Path(folder).name}"
    else:
        from benchmark import hub

        folder, offline, identity = source.name, hub.model_cached(source.name), source.identity
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=offline)
    model: Any = AutoModelForCausalLM.from_pretrained(folder, local_files_only=offline,
                                                      dtype=torch.float32)  # fmt: skip
    return LocalLM(model.to(device), tokenizer, identity)


def check_source(option: str, source: Source) -> None:
    if source.kind == "http":
        check_endpoint(option, source)
    elif source.kind == "hf":
        check_hf(option, source)
