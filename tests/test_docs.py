"""The documentation site builds as written: ``mkdocs build --strict`` passes offline (no broken
link, reference or docstring), every op folder has its page, and every page is in the navigation."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
CONFIG = (ROOT / "mkdocs.yml").read_text()
# op folders (not _register.py etc.); gated_fusion's page is named for its registered op
OPS = sorted(p.name for p in (ROOT / "mmkernels" / "ops").iterdir() if p.is_dir() and not p.name.startswith("_")
             and (p / "__init__.py").is_file())
PAGE = {"gated_fusion": "fusion_projections"}


def _page(op: str) -> Path:
    return DOCS / "ops" / f"{PAGE.get(op, op)}.md"


def _pages():
    """Every Markdown page of the site (``docs/_ext`` holds code, excluded from the site)."""
    return sorted(p.relative_to(DOCS).as_posix() for p in DOCS.rglob("*.md") if "_ext" not in p.parts)


def test_mkdocs_build_strict(tmp_path):
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1")
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"mkdocs build --strict failed:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
    site = tmp_path / "site"
    for page in _pages():
        html = site / (page[:-len(".md")] + "/index.html" if page != "index.md" else "index.html")
        assert html.is_file(), f"{page} was not built ({html})"
    for op in OPS:
        html = (site / "ops" / PAGE.get(op, op) / "index.html").read_text()
        # the page carries the op's generated API reference (a mkdocstrings block rendered)
        assert f'id="mmkernels.ops.{op}.' in html, f"the page of {op} has no API reference of mmkernels.ops.{op}"


@pytest.mark.parametrize("op", OPS)
def test_every_op_has_a_page_with_its_api(op):
    page = _page(op)
    assert page.is_file(), f"op folder mmkernels/ops/{op} has no page {page.relative_to(ROOT)}"
    assert re.search(rf"^::: mmkernels\.ops\.{op}\.\w+", page.read_text(), flags=re.M), \
        f"{page.relative_to(ROOT)} has no '::: mmkernels.ops.{op}.<name>' block"


def test_nav_lists_every_page():
    nav = set(re.findall(r"^\s*-\s*(?:[^:\n]+:\s*)?([\w/.-]+\.md)\s*$", CONFIG, flags=re.M))
    pages = set(_pages())
    assert pages - nav == set(), f"pages missing from mkdocs.yml's nav: {sorted(pages - nav)}"
    assert nav - pages == set(), f"nav entries without a page: {sorted(nav - pages)}"


def test_pages_have_no_commit_hashes():
    """Pages are for readers: no commit hashes in prose (measured history lives in benchmarks/RESULTS.md)."""
    for page in _pages():
        prose = re.sub(r"^```.*?^```", "", (DOCS / page).read_text(), flags=re.S | re.M)
        assert not re.findall(r"\b(?=[0-9a-f]*[a-f])(?=[0-9a-f]*\d)[0-9a-f]{7,40}\b", prose), page
