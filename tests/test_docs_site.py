"""The documentation site builds with warnings as errors, and has the pages it promises.

`mkdocs build --strict` (config: mkdocs.yml) fails on a broken link or anchor, a docstring griffe
cannot parse (a documented parameter that does not exist, an unannotated one without a type, ...),
a page or tutorial notebook missing from `nav`, and a `nav` entry without a page. Needs the
`docs` extra (mkdocs-material, mkdocstrings[python], mkdocs-jupyter); skipped without mkdocs.
About 10 s on one core: notebooks are rendered as committed, never executed here
(tests/test_tutorials.py runs them).
"""

from __future__ import annotations

import html
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "tutorials").glob("*.ipynb"))


def _text(page: Path) -> str:
    """A built page's visible text (tags dropped, entities decoded, whitespace collapsed)."""
    raw = page.read_text(encoding="utf-8")
    raw = re.sub(r"<(script|style)\b.*?</\1>", " ", raw, flags=re.S)
    return " ".join(html.unescape(re.sub(r"<[^>]+>", " ", raw)).split())


def _first_heading(notebook: Path) -> str:
    nb = json.loads(notebook.read_text(encoding="utf-8"))
    for cell in nb["cells"]:
        if cell["cell_type"] == "markdown":
            for line in "".join(cell["source"]).splitlines():
                if line.startswith("# "):
                    return line[2:].strip()
    return ""


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    pytest.importorskip("mkdocs", reason="the docs extra is not installed (pip install -e '.[docs]')")
    out = tmp_path_factory.mktemp("docs") / "site"
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1")  # mkdocs-material's end-of-life banner
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out), "-f", str(ROOT / "mkdocs.yml")],
        cwd=out.parent, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, f"mkdocs build --strict failed ({proc.returncode}):\n{proc.stderr}\n{proc.stdout}"
    return out


def test_api_reference_documents_stride(site):
    page = site / "reference" / "stride" / "index.html"
    assert page.is_file()
    raw = page.read_text(encoding="utf-8")
    for name in ("Stride", "Stride.fit", "Stride.attribute", "Stride.measure", "Stride.save", "Stride.load"):
        assert f'id="stride_nnsight.stride.{name}"' in raw, name
    assert "train_texts" in _text(page)  # fit's parameters are rendered from its docstring
    args = site / "reference" / "arguments" / "index.html"
    assert 'id="stride_nnsight.arguments.StrideArguments"' in args.read_text(encoding="utf-8")


def test_choosing_settings_page(site):
    page = site / "choosing_settings" / "index.html"
    assert page.is_file()
    text = _text(page)
    assert "Choosing settings" in text
    for setting in ("n_subsets", "subsets_per_example", "rank", "layer", "placement", "fit_passes",
                    "sampling", "lambda_fraction", "max_length", "activation_cache"):
        assert setting in text, setting


def test_home_page(site):
    text = _text(site / "index.html")
    assert "make demo" in text and "make test" in text


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_tutorial_rendered(site, notebook):
    page = site / "tutorials" / notebook.stem / "index.html"
    assert page.is_file(), f"{notebook.name} has no page: is it listed under Tutorials in mkdocs.yml's nav?"
    raw = page.read_text(encoding="utf-8")
    assert "jupyter-wrapper" in raw  # rendered by mkdocs-jupyter, not copied as a file
    heading = _first_heading(notebook)
    if heading:
        assert " ".join(heading.replace("`", "").replace("*", "").split()) in _text(page)


def test_only_notebooks_from_tutorials(site):
    """make_notebooks.py (and any other non-notebook file in tutorials/) is not part of the site."""
    built = {p.name for p in (site / "tutorials").iterdir()}
    assert built == {p.stem for p in NOTEBOOKS}
