"""HTML views of an `Attribution`: the notebook display (``_repr_html_``) and a standalone report.

Per query: its text, then the top proponents and opponents with their scores drawn as bars and
the training text with the words it shares with the query highlighted. Every piece of text is
HTML-escaped. Plain HTML and inline CSS, no script, so the page renders anywhere (notebooks,
browsers, e-mail) and can be checked with an HTML parser.
"""

from __future__ import annotations

import html
import re
from typing import TYPE_CHECKING, Any, Optional, Sequence

if TYPE_CHECKING:  # pragma: no cover
    from .results import Attribution

__all__ = ["attribution_html", "report_page"]

_WORD = re.compile(r"[\w']+", re.UNICODE)
_STYLE = """
.stride-attr{font-family:system-ui,-apple-system,Segoe UI,sans-serif;font-size:13px;max-width:1100px}
.stride-attr h3{font-size:14px;margin:14px 0 4px}
.stride-attr div.query{background:#f4f6fa;padding:6px 8px;border-radius:4px;white-space:pre-wrap}
.stride-attr table{border-collapse:collapse;width:100%;margin:4px 0 10px}
.stride-attr td,.stride-attr th{border-bottom:1px solid #e3e6ec;padding:3px 6px;text-align:left;vertical-align:top}
.stride-attr td:last-child{overflow-wrap:anywhere}
.stride-attr td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
.stride-attr .track{width:120px}
.stride-attr .bar{height:10px;border-radius:2px}
.stride-attr .pro{background:#2f7d4f}.stride-attr .opp{background:#b3403a}
.stride-attr mark{background:#ffe58a;padding:0}
.stride-attr .note{color:#666}
"""


def _words(text: Optional[str]) -> set[str]:
    return {w.lower() for w in _WORD.findall(text or "") if len(w) >= 3}


def _highlight(text: str, shared: set[str], limit: int) -> str:
    """``text`` (cut to ``limit`` characters) HTML-escaped, with the words in ``shared`` marked."""
    cut = text if len(text) <= limit else text[: limit - 3] + "..."
    out, last = [], 0
    for match in _WORD.finditer(cut):
        out.append(html.escape(cut[last:match.start()]))
        word = match.group(0)
        escaped = html.escape(word)
        out.append(f"<mark>{escaped}</mark>" if word.lower() in shared else escaped)
        last = match.end()
    out.append(html.escape(cut[last:]))
    return "".join(out)


def _rows(attr: "Attribution", q: int, k: int, opponents: bool, query_words: set[str], limit: int) -> list[str]:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # an all-zero query is reported on the page itself
        table = attr.top_k(k, row=q, opponents=opponents)
    if table.empty:
        return []
    peak = max(abs(float(v)) for v in table["score"]) or 1.0
    cls = "opp" if opponents else "pro"
    rows = []
    for rec in table.itertuples():
        width = max(1.0, 100.0 * abs(float(rec.score)) / peak)
        text = attr.train_texts[rec.train_index] if attr.train_texts is not None else ""
        ratio = getattr(rec, "noise_ratio", None)
        quiet = ratio is not None and not ratio > 1.0
        note = " <span class='note' title='at or below the query&#39;s noise floor'>(noise level)</span>" \
            if quiet else ""
        fade = " style='opacity:0.55'" if quiet else ""
        rows.append(
            f"<tr class='{cls}-row'{fade}><td class='num'>{rec.rank}</td>"
            f"<td>{html.escape(str(rec.train_id))}</td><td class='num'>{float(rec.score):+.4g}{note}</td>"
            f"<td><div class='track'><div class='bar {cls}' style='width:{width:.0f}%'></div></div></td>"
            f"<td>{_highlight(text, query_words, limit)}</td></tr>")
    return rows


def attribution_html(attr: "Attribution", k: int = 5, queries: Optional[Sequence[int]] = None,
                     max_queries: int = 20, text_limit: int = 300) -> str:
    """An HTML fragment (a ``<div class='stride-attr'>`` with its own style) showing, for each
    query row in ``queries`` (default: the first ``max_queries``), the top ``k`` proponents and
    opponents. Scores are in the attribution's units (``provenance['metric']``)."""
    from .results import ALL_ZERO, NON_FINITE

    rows = list(range(attr.n_queries)) if queries is None else [attr._position(q) for q in queries]
    shown = rows[:max_queries] if queries is None else rows
    status = attr.row_status()
    prov = attr.provenance
    parts = [f"<div class='stride-attr'><style>{_STYLE}</style>",
             f"<p><b>Attribution</b>: {attr.n_queries} queries x {attr.n_train} training documents; method "
             f"{html.escape(str(prov.get('method', '?')))}, metric {html.escape(str(prov.get('metric', '?')))}"
             f"{', sparse scores' if attr.is_sparse else ''}. Positive score: the document lowers the query's loss "
             "(a proponent); bars are relative to the query's largest score"
             + ("; rows marked (noise level) are within what the query's shuffled measurements produce "
                "(attr.noise_floor)" if attr.noise_floor is not None else "") + ".</p>"]
    head = "<tr><th>#</th><th>train id</th><th>score</th><th></th><th>text (words shared with the query marked)</th></tr>"
    for q in shown:
        qtext = attr.query_texts[q] if attr.query_texts is not None else ""
        words = _words(qtext)
        parts.append(f"<section class='query' data-query-id='{html.escape(str(attr.query_ids[q]))}'>"
                     f"<h3>query {html.escape(str(attr.query_ids[q]))}</h3>"
                     f"<div class='query'>{html.escape(qtext)}</div>")
        if status[q] == NON_FINITE:
            parts.append("<p class='note'>non-finite scores: this query's attribution is invalid</p></section>")
            continue
        if status[q] == ALL_ZERO:
            parts.append("<p class='note'>no non-zero score (no signal)</p></section>")
            continue
        for opponents, title in ((False, "top proponents"), (True, "top opponents")):
            body = _rows(attr, q, k, opponents, words, text_limit)
            parts.append(f"<p><b>{title}</b></p>" + (f"<table>{head}{''.join(body)}</table>" if body else
                                                     "<p class='note'>none</p>"))
        parts.append("</section>")
    if len(shown) < len(rows):
        parts.append(f"<p class='note'>... {len(rows) - len(shown)} more queries (attr.to_html(path) writes them "
                     "all)</p>")
    parts.append("</div>")
    return "".join(parts)


def report_page(attr: "Attribution", k: int = 10, title: str = "STRIDE attribution report") -> str:
    """A standalone HTML page with every query (`attribution_html`) and the provenance."""
    prov_rows = "".join(f"<tr><td>{html.escape(str(key))}</td><td>{html.escape(_short(value))}</td></tr>"
                        for key, value in attr.provenance.items())
    return ("<!DOCTYPE html><html><head><meta charset='utf-8'>"
            f"<title>{html.escape(title)}</title></head><body>"
            f"<h1 style='font-family:system-ui,sans-serif'>{html.escape(title)}</h1>"
            + attribution_html(attr, k=k, queries=range(attr.n_queries))
            + "<h2 style='font-family:system-ui,sans-serif'>Provenance</h2>"
            f"<table class='provenance' style='font-family:monospace;font-size:12px'>{prov_rows}</table>"
            "</body></html>")


def _short(value: Any, limit: int = 200) -> str:
    text = repr(value) if not isinstance(value, str) else value
    return text if len(text) <= limit else text[: limit - 3] + "..."
