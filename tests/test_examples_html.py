"""`benchmark.examples.render_html` on a hand-built document: corpus text is shown, never parsed.

Owns the escaping contract of examples.html (every value from the data is escaped, attributes
included) and its Content-Security-Policy meta tag, checked with the standard library's
html.parser; no model, no browser. `payload_doc` is also the page that tests/test_browser.py opens
in headless Chromium.
"""

from __future__ import annotations

from html.parser import HTMLParser
from typing import Any

from benchmark.examples import CSP, render_html

# Tokens a corpus could hold that are markup if pasted into a page unescaped.
PAYLOADS = [
    "<script>window.pwned=1</script>",
    "<img src=x onerror=alert(1)>",
    "</span>",
    '"><b>',
    "&amp;",
]
RUN = 'run"><script>window.pwned=2</script>'
HOOK = "blocks.6.hook_resid_post<b>"


def payload_doc(extra_tokens: tuple[str, ...] = ()) -> dict[str, Any]:
    """Two latents, three contexts, as benchmark.examples.latent_examples writes them. Latent 3's
    first context holds every payload and a newline; its maximum (the focus) is 2.5, the other
    tokens of a context are 0 except one at half the maximum. `extra_tokens` are appended to that
    first context with activation 0."""

    def example(tokens: list[str], focus: int, value: float, half: int | None = None) -> dict:
        acts = [0.0] * len(tokens)
        acts[focus] = value
        if half is not None:
            acts[half] = value / 2
        return {"window": 0, "position": 20 + focus, "activation": value, "start": 20,
                "focus": focus, "token_ids": list(range(len(tokens))), "tokens": tokens,
                "activations": acts}  # fmt: skip

    first = [" The", *PAYLOADS, "\n", " cat", " sat", *extra_tokens]
    return {
        "run": RUN, "run_dir": f"/tmp/{RUN}", "hook": HOOK, "model": "smollm2_135m",
        "split": "eval", "context_length": 64, "n_windows": 1, "n_tokens": 600, "d_sae": 64,
        "latents": [
            {"latent": 3, "frequency": 0.0125, "max_activation": 2.5, "examples": [
                example(first, focus=first.index(" cat"), value=2.5, half=1),
                example([" a", " dog", " ran"], focus=1, value=1.25),
            ]},
            {"latent": 11, "frequency": 0.002, "max_activation": 0.75, "examples": [
                example([" x", " &lt;", " y"], focus=2, value=0.75),
            ]},
        ],
    }  # fmt: skip


def shown(token: str) -> str:
    """A token's text as the page shows it: a newline is drawn as an arrow."""
    return token.replace("\n", "\u21b5")


class Page(HTMLParser):
    """Every start tag with its attributes, all text, and each token span's text."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.text: list[str] = []
        self.tokens: list[str] = []
        self._in_tok = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        self.tags.append((tag, a))
        self._in_tok = tag == "span" and "tok" in (a.get("class") or "").split()
        if self._in_tok:
            self.tokens.append("")

    def handle_endtag(self, tag: str) -> None:
        self._in_tok = False

    def handle_data(self, data: str) -> None:
        self.text.append(data)
        if self._in_tok:
            self.tokens[-1] += data


def parse(page: str) -> Page:
    parser = Page()
    parser.feed(page)
    parser.close()
    return parser


def test_payload_tokens_are_text_not_markup() -> None:
    doc = payload_doc()
    page = parse(render_html(doc))
    names = [tag for tag, _ in page.tags]
    assert not {"script", "img", "b", "link", "iframe"} & set(names)
    assert not any(k.startswith("on") or k in ("src", "href") for _, a in page.tags for k in a)
    want = [shown(t) for lat in doc["latents"] for ex in lat["examples"] for t in ex["tokens"]]
    assert page.tokens == want  # the visible text of each span is the raw token
    assert "<script>window.pwned=1</script>" in page.tokens and "&amp;" in page.tokens
    assert "\u21b5" in page.tokens  # the newline, drawn as the arrow
    text = "".join(page.text)
    assert f"run {RUN}; hook {HOOK}; 600 held-out tokens scanned" in text
    assert f"Top examples: {RUN}" in text  # the <title>
    sections = [a.get("id") for tag, a in page.tags if tag == "section"]
    assert sections == ["latent-3", "latent-11"]


def test_values_in_attributes_are_escaped() -> None:
    # A latent id is an int in a real document; a string one must still stay inside its id="".
    doc = payload_doc()
    doc["latents"][0]["latent"] = '3" onmouseover="window.pwned=3'
    page = parse(render_html(doc))
    assert not any(k.startswith("on") for _, a in page.tags for k in a)
    ids = [a.get("id") for tag, a in page.tags if tag == "section"]
    assert ids == ['latent-3" onmouseover="window.pwned=3', "latent-11"]


def test_page_carries_a_content_security_policy_that_forbids_script_and_loads() -> None:
    page = parse(render_html(payload_doc()))
    csp = [a for tag, a in page.tags if tag == "meta" and a.get("http-equiv")]
    assert csp == [{"http-equiv": "Content-Security-Policy", "content": CSP}]
    directives = dict(d.strip().split(" ", 1) for d in CSP.split(";"))
    assert directives["default-src"] == "'none'"  # no script, image, font, frame, connect
    assert directives["style-src"] == "'unsafe-inline'"  # the inline <style> and style=""
    # A meta CSP applies only to what follows it: it comes before the <title> and <style>.
    names = [tag for tag, _ in page.tags]
    assert names[:5] == ["html", "head", "meta", "meta", "title"]
