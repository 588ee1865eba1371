"""Benchmark report verdicts respect the paired CI (benchmarks/report.py `lds_verdict`)."""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks.report import lds_verdict


def _lds(per_query):
    per_query = np.asarray(per_query, dtype=float)
    return {"mean": float(per_query.mean()), "per_query": per_query.tolist()}


def test_met_only_when_the_whole_ci_is_above_zero():
    rng = np.random.default_rng(0)
    base = rng.normal(0.3, 0.2, 80)
    assert lds_verdict(_lds(base + 0.2), _lds(base)) == "**met**"
    assert lds_verdict(_lds(base - 0.2), _lds(base)) == "**NOT met**"


def test_level_when_the_ci_contains_zero_even_if_the_mean_is_higher():
    rng = np.random.default_rng(1)
    base = rng.normal(0.4, 0.2, 80)
    ahead = base + 0.01 + np.resize([0.3, -0.3], 80)   # higher on average, not resolved by 80 queries
    a, b = _lds(ahead), _lds(base)
    assert a["mean"] > b["mean"]
    assert lds_verdict(a, b) == "**level** (CI contains 0)"


def test_picked_after_the_fact_gets_no_verdict_and_missing_ci_is_said():
    rng = np.random.default_rng(2)
    base = rng.normal(0.3, 0.2, 40)
    assert lds_verdict(_lds(base + 0.5), _lds(base), picked_after=True).startswith("– (picked on these queries")
    assert lds_verdict({"mean": 0.5}, _lds(base)) == "– (no paired CI)"


def test_cost_table_end_to_end_is_index_plus_queries():
    from types import SimpleNamespace

    from benchmarks.report import _cost_section, end_to_end_seconds

    indexed = SimpleNamespace(index_s=200.0, batch_s=8.0, single_s=0.5, state_bytes=1e6)   # 80 queries: 0.1 s each
    unindexed = SimpleNamespace(index_s=0.0, batch_s=40.0, single_s=9.0, state_bytes=0)
    assert end_to_end_seconds(indexed, 1, 80) == pytest.approx(200.5)              # measured single query
    assert end_to_end_seconds(indexed, 100, 80) == pytest.approx(210.0)            # 200 + 100 x 0.1
    assert end_to_end_seconds(indexed, 10_000, 80) == pytest.approx(1200.0)
    assert end_to_end_seconds(unindexed, 100, 80) == pytest.approx(50.0)
    loaded = SimpleNamespace(index_s=float("nan"), batch_s=8.0, single_s=float("nan"), state_bytes=0)
    assert end_to_end_seconds(loaded, 1, 80) == pytest.approx(0.1)                 # no index time, no single time
    lines = _cost_section({"stride": {"res": indexed}, "bm25": {"res": unindexed}}, ["bm25", "stride"], 80)
    table = [ln for ln in lines if ln.startswith("| ")]
    assert table[0].endswith("| end to end: 1 query | 100 queries | 10,000 queries |")
    assert table[1].startswith("| BM25 |") and table[2].startswith("| **STRIDE (defaults)** |")
    assert len(table) == 3


def test_shortfalls_name_the_stored_gradient_index_when_it_is_as_fast():
    """A stored-gradient index that answers queries within 10x of STRIDE is listed among the
    shortfalls with both per-query times, both states and both index times; a 10x slower one is not."""
    from types import SimpleNamespace

    from benchmarks.report import _shortfalls

    def entry(index_s, batch_s, single_s, state_bytes):
        return {"res": SimpleNamespace(index_s=index_s, batch_s=batch_s, single_s=single_s, state_bytes=state_bytes),
                "m": {"lds": {"mean": 0.4}}}

    stride = entry(58.0, 80 * 0.0177, 0.028, 33.6e6)
    rows = {"stride": stride, "gradient_dot_store": entry(15.0, 80 * 0.0196, 0.13, 1.91e9)}
    text = _shortfalls(rows, [], {}, {}, {}, 2000, 80)
    line = next(ln for ln in text.splitlines() if "stored gradients" in ln)
    assert "not 10x lower" in line and "17.7 ms" in line and "19.6 ms" in line
    assert "1.91 GB" in line and "33.60 MB" in line and "58" in line and "15" in line
    rows["gradient_dot_store"] = entry(15.0, 80 * 0.5, 5.0, 1.91e9)
    assert "stored gradients" not in _shortfalls(rows, [], {}, {}, {}, 2000, 80)
