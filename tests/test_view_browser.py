"""The HTML views (stride_nnsight/view.py) opened in a real headless browser (Chromium).

The report (``attr.to_html(path)``) and the notebook fragment (``attr._repr_html_()`` in a minimal
page) are loaded by Chromium; the DOM it built is read back (``--dump-dom``) and checked with
html.parser: every query's text, its top proponents / opponents in score order with their scores,
texts and bars, the rows at noise level. A measuring script in the fragment's page reads the
computed layout (bar widths in pixels, colours, overflow), and a screenshot of the report is checked.

Needs ``chromium``, ``chromium-browser`` or ``google-chrome`` on PATH: skipped without one, unless
``STRIDE_REQUIRE_BROWSER=1`` (CI), which makes a missing browser a failure.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import subprocess
import tempfile
import zlib
from html.parser import HTMLParser
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from stride_nnsight import Attribution

BROWSERS = ("chromium", "chromium-browser", "google-chrome")
INSTALL = ("install Chromium, e.g. `apt-get install chromium` (Debian/Ubuntu; `chromium-browser` on older Ubuntu), "
           "or put chromium / chromium-browser / google-chrome on PATH")
WIDTH, HEIGHT = 1200, 1600
TIMEOUT_S = 60
TEXT_LIMIT = 300  # view.attribution_html's default text_limit

QUERY_TEXTS = ["The capital of Veldoria is Quarnith", "Rivers <flow> & \"lakes\" freeze in winter", "nothing here"]
TRAIN_TEXTS = [
    "Veldoria's capital: Quarnith <script>alert(1)</script>",
    "rivers and lakes freeze in the winter",
    "the capital city of a small country",
    "unrelated words about cooking",
    "Quarnith hosts a market every winter",
    "a long token: " + "x" * 400,  # longer than TEXT_LIMIT and unbreakable: must wrap, not widen the page
    "lakes & <b>rivers</b>",
    "cats sat on mats",
]
SCORES = np.array([
    [0.50, -0.20, 0.31, 0.00, 0.12, -0.05, 0.00, 0.07],
    [-0.30, 0.42, 0.00, 0.09, 0.25, 0.16, -0.11, 0.00],
    [0.00] * 8,  # no signal
], dtype=np.float32)
NOISE_FLOOR = [0.15, 0.2, 0.0]


def _attr(sparse: bool) -> Attribution:
    return Attribution(scores=sp.csr_matrix(SCORES) if sparse else torch.from_numpy(SCORES),
                       query_ids=["q<1>", 2, "q3"], train_ids=[f"doc-{j}" for j in range(SCORES.shape[1])],
                       query_texts=list(QUERY_TEXTS), train_texts=list(TRAIN_TEXTS),
                       provenance={"method": "STRIDE", "metric": "negative_completion_loss",
                                   "noise_floor": list(NOISE_FLOOR)})


def _expected(q: int, k: int, opponents: bool) -> list[int]:
    """Columns of the top ``k`` proponents (opponents) of row ``q``, strongest first (no ties in SCORES)."""
    row = SCORES[q].astype(np.float64) * (-1 if opponents else 1)
    order = [int(j) for j in np.argsort(-row, kind="stable") if row[j] > 0]
    return order[:k]


def _shown(text: str) -> str:
    return text if len(text) <= TEXT_LIMIT else text[: TEXT_LIMIT - 3] + "..."


# ---------------------------------------------------------------- browser


def _browser() -> str:
    """The browser's path; skip (or fail when ``STRIDE_REQUIRE_BROWSER=1``) when there is none."""
    for name in BROWSERS:
        path = shutil.which(name)
        if path:
            return path
    message = f"no headless browser found (looked for {', '.join(BROWSERS)} on PATH): {INSTALL}"
    if os.environ.get("STRIDE_REQUIRE_BROWSER") == "1":
        pytest.fail(message + " (STRIDE_REQUIRE_BROWSER=1 makes a missing browser a failure)", pytrace=False)
    pytest.skip(message)


def _chromium(workdir: Path, page: Path, *args: str) -> str:
    """Run the browser headless on ``page`` with a fresh profile; its stdout."""
    browser = _browser()
    profile = tempfile.mkdtemp(prefix="profile-", dir=workdir)
    command = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               "--disable-extensions", "--disable-dev-shm-usage", "--hide-scrollbars", "--force-device-scale-factor=1",
               f"--window-size={WIDTH},{HEIGHT}", f"--user-data-dir={profile}", *args, page.as_uri()]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT_S,
                              stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{browser} did not finish within {TIMEOUT_S} s: {' '.join(command)}")
    if done.returncode != 0:
        pytest.fail(f"{browser} exited with {done.returncode}: {' '.join(command)}\n{done.stderr[-3000:]}")
    return done.stdout


class Rendered:
    """Pages written once per module and rendered lazily, so that a missing browser skips (or fails)
    inside the test that needs it."""

    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.cache: dict[str, Any] = {}

    def _once(self, key: str, make):
        if key not in self.cache:
            self.cache[key] = make()
        return self.cache[key]

    @property
    def report_source(self) -> str:
        return self._once("report_source", lambda: _attr(sparse=True).to_html(self.workdir / "report.html", k=3))

    def report_dom(self) -> str:
        """The report's DOM as the browser built it; the same run takes the screenshot (recent
        Chromium does both in one run; `report_png` runs again where it did not)."""
        def make():
            self.report_source  # noqa: B018 (writes the file)
            return _chromium(self.workdir, self.workdir / "report.html", "--dump-dom",
                             f"--screenshot={self.workdir / 'report.png'}")
        return self._once("report_dom", make)

    def report_png(self) -> bytes:
        def make():
            shot = self.workdir / "report.png"
            self.report_dom()
            if not shot.is_file():
                _chromium(self.workdir, self.workdir / "report.html", f"--screenshot={shot}")
            assert shot.is_file(), f"the browser wrote no screenshot at {shot}"
            return shot.read_bytes()
        return self._once("report_png", make)

    @property
    def fragment_source(self) -> str:
        return self._once("fragment_source", lambda: _attr(sparse=False)._repr_html_())

    def fragment_dom(self) -> str:
        def make():
            page = self.workdir / "fragment.html"
            page.write_text("<!DOCTYPE html><html><head><meta charset='utf-8'><title>notebook cell</title></head>"
                            f"<body>{self.fragment_source}<pre id='measured'></pre>{MEASURE}</body></html>",
                            encoding="utf-8")
            return _chromium(self.workdir, page, "--dump-dom")
        return self._once("fragment_dom", make)


# Runs in the fragment's page after it is laid out; writes what the browser computed into #measured.
MEASURE = """<script>
const style = (el) => getComputedStyle(el);
const rows = [...document.querySelectorAll("tr.pro-row, tr.opp-row")].map((tr) => {
  const bar = tr.querySelector("div.bar"), track = bar.parentElement;
  return {query: tr.closest("section").dataset.queryId, kind: tr.className, id: tr.cells[1].textContent,
          bar: bar.getBoundingClientRect().width, track: track.getBoundingClientRect().width,
          barHeight: bar.getBoundingClientRect().height, color: style(bar).backgroundColor,
          opacity: style(tr).opacity, cellRight: tr.cells[4].getBoundingClientRect().right};
});
document.getElementById("measured").textContent = JSON.stringify({
  rows,
  sections: [...document.querySelectorAll("section")].map((s) => ({
    id: s.dataset.queryId, background: style(s).backgroundColor,
    queryBackground: style(s.querySelector("div.query")).backgroundColor})),
  marks: [...document.querySelectorAll("mark")].map((m) => style(m).backgroundColor),
  scrollWidth: document.documentElement.scrollWidth, innerWidth: window.innerWidth,
});
</script>"""


@pytest.fixture(scope="module")
def rendered(tmp_path_factory) -> Rendered:
    return Rendered(tmp_path_factory.mktemp("browser"))


# ---------------------------------------------------------------- reading the DOM

VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}


class Node:
    def __init__(self, tag: str, attrs: dict[str, Optional[str]], parent: Optional["Node"]):
        self.tag, self.attrs, self.parent, self.children = tag, attrs, parent, []

    @property
    def classes(self) -> list[str]:
        return (self.attrs.get("class") or "").split()

    def text(self) -> str:
        return "".join(c if isinstance(c, str) else c.text() for c in self.children)

    def all(self, tag: Optional[str] = None, cls: Optional[str] = None) -> list["Node"]:
        found = []
        for child in self.children:
            if isinstance(child, Node):
                if (tag is None or child.tag == tag) and (cls is None or cls in child.classes):
                    found.append(child)
                found.extend(child.all(tag, cls))
        return found

    def one(self, tag: Optional[str] = None, cls: Optional[str] = None) -> "Node":
        found = self.all(tag, cls)
        assert len(found) == 1, f"expected one <{tag} class={cls}>, found {len(found)}"
        return found[0]


class Tree(HTMLParser):
    """A DOM tree from html.parser; ``problems`` lists end tags that do not close the open element."""

    def __init__(self, page: str):
        super().__init__(convert_charrefs=True)
        self.root = self.current = Node("#document", {}, None)
        self.problems: list[str] = []
        self.feed(page)
        self.close()

    def handle_starttag(self, tag, attrs):
        node = Node(tag, dict(attrs), self.current)
        self.current.children.append(node)
        if tag not in VOID:
            self.current = node

    def handle_startendtag(self, tag, attrs):
        self.current.children.append(Node(tag, dict(attrs), self.current))

    def handle_endtag(self, tag):
        if tag in VOID:
            return
        if self.current.tag != tag:
            self.problems.append(f"</{tag}> closes <{self.current.tag}>")
            node = self.current
            while node is not None and node.tag != tag:
                node = node.parent
            if node is None:
                return
            self.current = node
        self.current = self.current.parent

    def handle_data(self, data):
        self.current.children.append(data)


def _outline(root: Node) -> list[tuple]:
    """The structure that matters, in document order: sections, tables, rows, bars, marks, notes
    (``tbody``, which the browser inserts, left out)."""
    out = []

    def walk(node: Node, depth: int) -> None:
        for child in node.children:
            if not isinstance(child, Node):
                continue
            if child.tag == "tbody":
                walk(child, depth)
                continue
            if child.tag in ("section", "table", "tr", "td", "mark", "h3") or \
                    set(child.classes) & {"bar", "query", "note"}:
                out.append((depth, child.tag, tuple(child.classes), child.attrs.get("data-query-id"),
                            child.text() if child.tag in ("td", "mark", "h3") else None))
            walk(child, depth + 1)

    walk(root, 0)
    return out


def _check_rendered_rows(root: Node, attr: Attribution, k: int) -> None:
    """Every query's section, text and top-``k`` rows (ids, scores, texts, bars, noise marks) in score order."""
    sections = root.all("section")
    assert [s.attrs.get("data-query-id") for s in sections] == [str(i) for i in attr.query_ids]
    for q, section in enumerate(sections):
        assert section.one("h3").text() == f"query {attr.query_ids[q]}"
        assert section.one("div", "query").text() == QUERY_TEXTS[q]  # escaped in the source, plain text here
        tables = section.all("table")
        if not SCORES[q].any():
            assert tables == [] and "no non-zero score (no signal)" in section.text()
            continue
        assert len(tables) == 2, f"query {q}: a proponent and an opponent table"
        query_words = set(re.findall(r"[\w']+", QUERY_TEXTS[q].lower()))
        for table, opponents in zip(tables, (False, True)):
            kind = "opp" if opponents else "pro"
            rows = [tr for tr in table.all("tr") if tr.classes]
            assert all(tr.classes == [f"{kind}-row"] for tr in rows)
            expected = _expected(q, k, opponents)
            assert [tr.all("td")[1].text() for tr in rows] == [attr.train_ids[j] for j in expected]  # score order
            peak = max(abs(float(SCORES[q, j])) for j in expected)
            for rank, (tr, j) in enumerate(zip(rows, expected), start=1):
                cells = tr.all("td")
                score = float(SCORES[q, j])
                assert cells[0].text() == str(rank)
                assert cells[2].text().startswith(f"{score:+.4g}")
                bar = tr.one("div", "bar")
                assert bar.classes == ["bar", kind]
                assert bar.attrs["style"].replace(" ", "") == f"width:{max(1.0, 100 * abs(score) / peak):.0f}%"
                assert cells[4].text() == _shown(TRAIN_TEXTS[j])  # the whole (cut) text, marks included
                assert all(m.text().lower() in query_words for m in cells[4].all("mark"))  # only shared words
                quiet = not abs(score) > NOISE_FLOOR[q]
                assert ("(noise level)" in cells[2].text()) == quiet, (q, j, score)
                assert ("opacity" in (tr.attrs.get("style") or "")) == quiet


def _measured(dom: str) -> dict[str, Any]:
    pre = Tree(dom).root.all("pre")
    found = [p for p in pre if p.attrs.get("id") == "measured"]
    assert found and found[0].text(), "the measuring script did not run"
    return json.loads(found[0].text())


# ---------------------------------------------------------------- tests


def test_report_renders_every_query_with_its_rows_in_score_order(rendered):
    dom = rendered.report_dom()
    tree = Tree(dom)
    assert tree.problems == []
    root = tree.root
    assert root.one("title").text() == root.one("h1").text() == "STRIDE attribution report"
    assert root.all("script") == []
    _check_rendered_rows(root, _attr(sparse=True), k=3)
    assert "sparse scores" in root.one("div", "stride-attr").all("p")[0].text()
    assert "<script>alert(1)</script>" in root.text()  # training text shown as text, not run
    provenance = {tr.all("td")[0].text(): tr.all("td")[1].text() for tr in root.one("table", "provenance").all("tr")}
    assert provenance["method"] == "STRIDE" and provenance["metric"] == "negative_completion_loss"
    # the browser built exactly the structure that was written (nothing re-parented or auto-closed)
    source = Tree(rendered.report_source)
    assert source.problems == []
    assert _outline(root) == _outline(source.root)


def test_notebook_fragment_renders_bars_colours_and_layout(rendered):
    dom = rendered.fragment_dom()
    tree = Tree(dom)
    assert tree.problems == []
    _check_rendered_rows(tree.root, _attr(sparse=False), k=5)
    assert _outline(tree.root.one("div", "stride-attr")) == \
        _outline(Tree(rendered.fragment_source).root.one("div", "stride-attr"))
    m = _measured(dom)
    rows = m["rows"]
    assert len(rows) == sum(len(_expected(q, 5, o)) for q in range(3) for o in (False, True))
    for q, qid in enumerate(["q<1>", "2"]):
        for opponents, kind in ((False, "pro-row"), (True, "opp-row")):
            drawn = [r for r in rows if r["query"] == qid and r["kind"] == kind]
            expected = _expected(q, 5, opponents)
            assert [r["id"] for r in drawn] == [f"doc-{j}" for j in expected]
            peak = max(abs(float(SCORES[q, j])) for j in expected)
            for r, j in zip(drawn, expected):
                assert r["track"] == pytest.approx(120, abs=0.5)  # the bar's track keeps its width
                fraction = max(0.01, abs(float(SCORES[q, j])) / peak)
                assert r["bar"] == pytest.approx(round(100 * fraction) / 100 * r["track"], abs=1.0)
                assert r["bar"] >= 1 and r["barHeight"] == pytest.approx(10, abs=0.5)
                assert r["color"] == ("rgb(179, 64, 58)" if opponents else "rgb(47, 125, 79)")
                quiet = not abs(float(SCORES[q, j])) > NOISE_FLOOR[q]
                assert float(r["opacity"]) == pytest.approx(0.55 if quiet else 1.0)
    # only the query text is on a grey box, not its whole section
    for s in m["sections"]:
        assert s["background"] == "rgba(0, 0, 0, 0)" and s["queryBackground"] == "rgb(244, 246, 250)"
    assert m["marks"] and set(m["marks"]) == {"rgb(255, 229, 138)"}
    # the long unbreakable training text wraps: nothing sticks out of the page
    assert m["scrollWidth"] <= m["innerWidth"] and max(r["cellRight"] for r in rows) <= m["innerWidth"]


def _png_header(png: bytes) -> tuple[int, int, int, bytes]:
    """(width, height, channels, decompressed scanlines) of an 8-bit non-interlaced PNG."""
    assert png[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    pos, idat, header = 8, [], None
    while pos < len(png):
        (length,), kind = struct.unpack(">I", png[pos:pos + 4]), png[pos + 4:pos + 8]
        data = png[pos + 8:pos + 8 + length]
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", data)
        elif kind == b"IDAT":
            idat.append(data)
        pos += 12 + length
    assert header is not None, "PNG without IHDR"
    width, height, depth, colour, _, _, interlace = header
    assert depth == 8 and interlace == 0, header
    channels = {0: 1, 2: 3, 4: 2, 6: 4}[colour]
    return width, height, channels, zlib.decompress(b"".join(idat))


def test_report_screenshot_is_a_real_picture(rendered):
    png = rendered.report_png()
    assert len(png) > 20_000, f"screenshot of only {len(png)} bytes"
    width, height, channels, raw = _png_header(png)
    assert (width, height) == (WIDTH, HEIGHT)
    assert len(raw) == height * (1 + width * channels)
    # A single flat colour filters to a handful of distinct byte values (the colour, zeros, filter
    # types); text, bars and marks give many.
    assert len(set(raw)) > 32, "the screenshot is (nearly) one flat colour"


def test_report_screenshot_shows_bars_and_marks(rendered):
    image_module = pytest.importorskip("PIL.Image")
    import io

    png = rendered.report_png()
    pixels = np.asarray(image_module.open(io.BytesIO(png)).convert("RGB")).reshape(-1, 3).astype(np.int32)
    packed, counts = np.unique((pixels[:, 0] << 16) | (pixels[:, 1] << 8) | pixels[:, 2], return_counts=True)
    assert len(packed) > 50 and counts.max() < 0.99 * len(pixels)  # not one flat colour
    colours = np.stack([packed >> 16, (packed >> 8) & 255, packed & 255], axis=1)

    def near(rgb, tolerance=6):
        """Number of pixels within ``tolerance`` of ``rgb`` in every channel."""
        return int(counts[np.abs(colours - np.array(rgb)).max(axis=1) <= tolerance].sum())

    assert near((47, 125, 79)) > 500, "no proponent bar (#2f7d4f) in the screenshot"
    assert near((179, 64, 58)) > 500, "no opponent bar (#b3403a) in the screenshot"
    assert near((255, 229, 138)) > 100, "no marked shared word (#ffe58a) in the screenshot"
