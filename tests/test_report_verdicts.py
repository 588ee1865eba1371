"""Benchmark report verdicts respect the paired CI (benchmarks/report.py `lds_verdict`)."""

from __future__ import annotations

import numpy as np

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
