"""examples.html in a real browser: headless Chromium driven by Selenium (marker `browser`).

Owns what a person opening the page sees and what the page does: every latent section and
context displayed, tokens shaded by activation (computed styles and the pixels of a screenshot),
corpus tokens that are markup shown as text and never run, the Content-Security-Policy stopping a
payload that slipped past the escaping, and no network request at all. The page is rendered from
the hand-built document of tests/test_examples_html.py (no model), so the module runs in seconds.

Needs selenium (the dev extra) and Debian's `chromium` + `chromium-driver` (`apt-get install
chromium chromium-driver`; .ci/run installs them when it can); skipped with the reason otherwise.
The system chromedriver is used explicitly: Selenium Manager would need the network.
"""

from __future__ import annotations

import html
import json
import re
import shutil
import struct
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np
import pytest
from matplotlib import image as mpimg

from benchmark.examples import CSP, render_html
from tests.test_examples_html import PAYLOADS, RUN, payload_doc, shown

pytestmark = pytest.mark.browser

WIDTH, HEIGHT = 1200, 900  # the viewport, and so the screenshot, in CSS pixels at scale 1
ORANGE = (255, 110, 0)  # the shading colour of benchmark.examples.render_html
NETWORK_SCHEMES = {"http", "https", "ws", "wss", "ftp"}


@pytest.fixture(scope="module")
def driver(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """One headless Chromium for the module, its viewport WIDTH x HEIGHT, DevTools network
    events logged (performance log)."""
    pytest.importorskip("selenium", reason="selenium is not installed (pip install -e '.[dev]')")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    chromedriver = shutil.which("chromedriver")
    if not chromium or not chromedriver:
        pytest.skip("no headless browser: apt-get install chromium chromium-driver "
                    f"(chromium: {chromium}, chromedriver: {chromedriver})")  # fmt: skip
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    profile = tmp_path_factory.mktemp("chromium-profile")
    for arg in ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                f"--window-size={WIDTH},{HEIGHT}", f"--user-data-dir={profile}",
                "--no-first-run", "--disable-extensions", "--disable-background-networking",
                "--disable-component-update", "--disable-sync"]:  # fmt: skip
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"performance": "ALL"})
    drv = webdriver.Chrome(service=Service(chromedriver), options=options)
    try:
        # --window-size includes the window's frame; fix the viewport itself.
        drv.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                            {"width": WIDTH, "height": HEIGHT, "deviceScaleFactor": 1,
                             "mobile": False})  # fmt: skip
        yield drv
    finally:
        drv.quit()


class _Counter(BaseHTTPRequestHandler):
    hits: list[str]

    def do_GET(self) -> None:  # noqa: N802 (the http.server name)
        self.hits.append(self.path)
        self.send_response(404)
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def loopback() -> Iterator[tuple[str, list[str]]]:
    """A server on 127.0.0.1 that records the path of every request: (base URL, paths)."""
    hits: list[str] = []
    handler = type("Counter", (_Counter,), {"hits": hits})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", hits
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def network_events(drv: Any) -> list[dict[str, Any]]:
    """The DevTools Network.* events logged since the last call (reading drains the log)."""
    events = []
    for entry in drv.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message["method"].startswith("Network."):
            events.append(message)
    return events


def requested(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e["params"] for e in events if e["method"] == "Network.requestWillBeSent"]


def open_page(drv: Any, path: Path, page: str) -> tuple[str, list[dict[str, Any]]]:
    """Write `page` to `path`, load it (returns after the load event), and return its file://
    URL and the network events of that load."""
    path.write_text(page, encoding="utf-8")
    network_events(drv)  # drop what came before (the browser's start page)
    drv.get(path.as_uri())
    return path.as_uri(), network_events(drv)


def rgba(css: str) -> tuple[int, int, int, float]:
    """A computed colour, 'rgb(r, g, b)' or 'rgba(r, g, b, a)', as (r, g, b, alpha)."""
    m = re.fullmatch(r"rgba?\((\d+), (\d+), (\d+)(?:, ([\d.]+))?\)", css)
    assert m, css
    return int(m[1]), int(m[2]), int(m[3]), float(m[4] if m[4] is not None else 1)


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) from a PNG's signature and IHDR chunk."""
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR", head
    width, height = struct.unpack(">II", head[16:24])
    return width, height


def test_examples_page_in_chromium(driver: Any, loopback: tuple[str, list[str]],
                                   tmp_path: Path) -> None:  # fmt: skip
    from selenium.webdriver.common.by import By

    base, hits = loopback
    bait = f'<img src="{base}/token.png">'  # a token that would fetch from loopback as markup
    doc = payload_doc((bait,))
    url, events = open_page(driver, tmp_path / "examples.html", render_html(doc))
    assert driver.title == f"Top examples: {RUN}"

    # Every latent section and every context is on the page and has a size.
    sections = driver.find_elements(By.TAG_NAME, "section")
    assert [s.get_attribute("id") for s in sections] == ["latent-3", "latent-11"]
    for section, lat in zip(sections, doc["latents"]):
        assert section.is_displayed() and section.size["width"] > 0 < section.size["height"]
        contexts = section.find_elements(By.CLASS_NAME, "ex")
        assert len(contexts) == len(lat["examples"])
        for ctx in contexts:
            assert ctx.is_displayed() and ctx.size["width"] > 0 < ctx.size["height"]

    # Each token span shows the raw token, shaded orange with alpha = activation / the latent's max.
    # (One script call for all spans: a WebDriver round trip per property is slow.)
    spans = driver.execute_script(
        "return [...document.querySelectorAll('span.tok')].map(s => "
        "[s.textContent, getComputedStyle(s).backgroundColor])"
    )
    want = [(shown(tok), act / lat["max_activation"])
            for lat in doc["latents"] for ex in lat["examples"]
            for tok, act in zip(ex["tokens"], ex["activations"])]  # fmt: skip
    assert len(spans) == len(want)
    for (text, background), (want_text, alpha) in zip(spans, want):
        *rgb, a = rgba(background)
        assert text == want_text and tuple(rgb) == ORANGE
        assert a == pytest.approx(alpha, abs=0.01), text
    assert rgba(spans[0][1])[3] == 0  # " The", activation 0: not shaded
    focus = driver.find_element(By.CSS_SELECTOR, "#latent-3 span.focus")  # the latent's max
    assert focus.is_displayed() and focus.size["width"] > 0 < focus.size["height"]
    assert rgba(focus.value_of_css_property("background-color")) == (*ORANGE, 1.0)

    # Markup in the corpus is text on the page, never elements, and nothing of it ran.
    body = driver.find_element(By.TAG_NAME, "body").text
    for payload in [*PAYLOADS, bait]:
        assert payload in body
    for tag in ("script", "img", "b"):
        assert driver.find_elements(By.TAG_NAME, tag) == [], tag
    assert driver.execute_script("return typeof window.pwned") == "undefined"

    # No request but the page itself: none to the loopback bait, none to any network scheme.
    sent = requested(events)
    assert [r["request"]["url"] for r in sent if r.get("documentURL") == url] == [url]
    assert not [r["request"]["url"] for r in sent
                if urlsplit(r["request"]["url"]).scheme in NETWORK_SCHEMES]  # fmt: skip
    assert hits == []

    # What a person sees: a PNG of the viewport, not blank, with fully shaded tokens in it.
    shot = tmp_path / "examples.png"
    assert driver.save_screenshot(str(shot))
    assert png_size(shot) == (WIDTH, HEIGHT)
    pixels = np.round(mpimg.imread(shot)[..., :3] * 255).astype(int)  # (HEIGHT, WIDTH, 3)
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 1
    assert (np.abs(pixels - np.array(ORANGE)).max(axis=-1) <= 2).sum() > 50  # the focus token


def test_csp_stops_a_payload_that_slipped_past_the_escaping(driver: Any,
                                                            loopback: tuple[str, list[str]],
                                                            tmp_path: Path) -> None:  # fmt: skip
    """Markup pasted raw into the page (as a bug in the escaping would) neither runs nor loads.
    The control, the same page without the policy, shows that it would have: the script runs
    and the loopback server sees the image request."""
    base, hits = loopback
    slipped = f'<img src="{base}/slipped.png"><script>window.slipped = 1</script>'
    page = render_html(payload_doc()).replace("</body>", slipped + "</body>")
    meta = f'<meta http-equiv="Content-Security-Policy" content="{html.escape(CSP)}">'
    assert page.count(meta) == 1

    url, events = open_page(driver, tmp_path / "slipped.html", page)
    assert driver.execute_script("return typeof window.slipped") == "undefined"
    assert hits == []
    blocked = {e["params"]["requestId"]: e["params"].get("blockedReason") for e in events
               if e["method"] == "Network.loadingFailed"}  # fmt: skip
    for r in requested(events):
        if r["request"]["url"] != url:  # anything else the page asked for was refused
            assert blocked.get(r["requestId"]) == "csp", r["request"]["url"]

    open_page(driver, tmp_path / "control.html", page.replace(meta, ""))
    assert driver.execute_script("return typeof window.slipped") == "number"
    assert hits == ["/slipped.png"]
