"""The documentation holds together: the README stays a newcomer's page (short, every docs page
linked from it) and no relative link in the README, docs/ or a reference folder's README points
at a file that is not there."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = [
    README,
    *sorted((ROOT / "docs").glob("*.md")),
    *sorted((ROOT / "results").glob("reference/*/README.md")),
]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def relative_links(text: str) -> list[str]:
    """Markdown link targets that are paths in this repository (not URLs or in-page anchors)."""
    targets = [m.group(1).split("#", 1)[0] for m in LINK.finditer(text)]
    return [t for t in targets if t and "://" not in t and not t.startswith("mailto:")]


def test_relative_links_finds_paths_only():
    text = "see [a](docs/a.md#x), [b](https://x.org/y.md), [c](#anchor) and ![fig](r/f.png)"
    assert relative_links(text) == ["docs/a.md", "r/f.png"]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(page: Path):
    missing = [t for t in relative_links(page.read_text()) if not (page.parent / t).exists()]
    assert not missing, f"{page.relative_to(ROOT)} links to missing files: {missing}"


def test_readme_is_short_and_links_every_docs_page():
    text = README.read_text()
    n_lines = len(text.splitlines())
    assert n_lines <= 250, f"README.md has {n_lines} lines; move detail to docs/"
    linked = {Path(t).name for t in relative_links(text) if t.startswith("docs/")}
    pages = {p.name for p in (ROOT / "docs").glob("*.md")}
    assert pages <= linked, f"docs pages not linked from the README: {sorted(pages - linked)}"
