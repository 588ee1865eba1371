"""``python -m benchmarks.lambda_rules``: rules for the Lasso penalty, side by side, from one fit.

The penalty only enters the recovery, so one default fit and one measurement of the queries
(``y [q, K]``) serve every rule: each rule recovers scores from the same ``y`` and design, and
the script prints LDS (nan queries as 0), LDS by query kind, fact recall@10, the mean number
of non-zero scores per query, the mean fraction of ``lambda_max`` the rule chose, and the
paired 95% CIs of the LDS difference against the first rule (resampling queries; then queries
and retrained models together). Benchmarks as in `benchmarks.compare_settings` (``--bench``).

Rules (``lambda = fraction * lambda_max`` per query unless stated):

* ``fraction=F``: a fixed fraction ``F`` (the library's ``lambda_rule="fraction"``).
* ``noise=C``: ``lambda = C * sigma * sqrt(2 log(n) * m) / K``, the universal threshold in the
  measurements' own noise units (``m``: the mean squared norm of a centred design column, ``d``
  for d memberships; ``sigma``: the noise level, estimated jointly with the fit as in the scaled
  Lasso: ``sigma = ||y - M w - c|| / sqrt(K)`` of the current fit, iterated to a fixed point).
  ``C = 1`` is where pure noise recovers to zero; the fraction of ``lambda_max`` this gives is a
  per-query signal-to-noise ratio, not a constant.
* ``cvpool``: one fraction for the whole corpus, the one of a grid with the lowest 5-fold
  cross-validated prediction error of held-out *operators'* measurements (each query's error
  divided by its variance, averaged over queries). Needs only the measurements.
* ``cvspearman`` / ``cvpearson``: as ``cvpool``, scored by the per-query Spearman (Pearson)
  correlation of predicted and measured held-out operators instead of the squared error: like
  LDS it ignores the Lasso's uniform shrinkage, which the squared error penalises.
* ``cvquery`` / ``cvquery1se``: the same cross-validation per query (each query its own fraction:
  lowest error, or the largest within one standard error of it).
* ``cvpool1se``: as ``cvpool``, the largest fraction whose error is within one standard error
  (over the folds) of the lowest: the library's ``lambda_rule="shared_cv"``
  (`stride_nnsight.recovery.shared_fraction`), here on every query of the batch (the library
  samples at most 64; ``shared_cv`` is exactly the library's rule, sample included).
* ``path=LO:HI``: the mean of the scores recovered at every fraction of the grid in ``[LO, HI]``
  (strong sources are non-zero at every fraction and keep large scores; weak, diffuse ones
  enter only at the low fractions, with small scores).
* ``cv``: scikit-learn ``LassoCV`` per query (the library's ``lambda_rule="cv"``).

These are *dev* benchmarks: a rule chosen here is judged on the held-out benchmark.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import scipy.sparse as sp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

from benchmarks.compare_settings import BENCHES, load_bench  # noqa: E402
from stride_nnsight import Stride  # noqa: E402
from stride_nnsight.evaluation import bootstrap_ci, fact_tracing, lds, paired_lds_ci  # noqa: E402
from stride_nnsight.recovery import lambda_max, operator_cv_errors, recover, shared_fraction  # noqa: E402

FRACTION_GRID = (0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.7)


def _lambda_maxes(y: np.ndarray, M: sp.spmatrix) -> np.ndarray:
    return np.array([lambda_max(row, M, True) for row in y])


def recover_fractions(y: np.ndarray, M: sp.spmatrix, fractions: np.ndarray) -> np.ndarray:
    """Dense scores ``[q, n]``, query ``i`` recovered at ``fractions[i] * lambda_max_i``
    (queries grouped by fraction so each group is one batched `recover` call)."""
    out = np.zeros((y.shape[0], M.shape[1]), dtype=np.float32)
    for f in np.unique(fractions):
        rows = np.flatnonzero(fractions == f)
        if f >= 1:
            continue
        scores, _ = recover(y[rows], M, "fraction", float(f), True, progress=False)
        out[rows] = scores
    return out


def column_scale(M: sp.spmatrix) -> float:
    """Mean squared norm of the centred design columns (``~d`` for ``d`` memberships)."""
    M = sp.csc_matrix(M, dtype=np.float64)
    K = M.shape[0]
    counts = np.asarray(M.sum(axis=0)).reshape(-1)
    return float(np.mean(counts - counts ** 2 / K))


def noise_fractions(y: np.ndarray, M: sp.spmatrix, c: float, iterations: int = 8) -> np.ndarray:
    """Per-query fractions of ``lambda_max`` of the ``noise=C`` rule (scaled-Lasso fixed point)."""
    q, K = y.shape
    n = M.shape[1]
    lam_max = _lambda_maxes(y, M)
    unit = np.sqrt(2 * np.log(n) * column_scale(M)) / K
    sigma = y.std(axis=1)  # start: all of y is noise (the fraction is then ~1)
    frac = np.ones(q)
    Mc = sp.csr_matrix(M, dtype=np.float64)
    for _ in range(iterations):
        frac = np.clip(c * sigma * unit / np.maximum(lam_max, 1e-300), 1e-3, 1.0)
        frac = np.round(frac, 3)  # groups queries for batched recovery; 0.1% of lambda_max
        w = recover_fractions(y, M, frac).astype(np.float64)
        pred = (Mc @ w.T).T
        resid = y - pred
        resid -= resid.mean(axis=1, keepdims=True)  # the intercept
        new = np.sqrt((resid ** 2).sum(axis=1) / K)
        if np.allclose(new, sigma, rtol=1e-3):
            break
        sigma = new
    return frac


def _row_correlation(a: np.ndarray, b: np.ndarray, rank: bool) -> np.ndarray:
    """Per-row Pearson (``rank``: Spearman) correlation of ``a`` and ``b`` ``[q, m]``; 0 where a row
    is constant (as LDS counts an undefined query)."""
    from scipy.stats import rankdata

    if rank:
        a, b = rankdata(a, axis=1), rankdata(b, axis=1)
    a = a - a.mean(axis=1, keepdims=True)
    b = b - b.mean(axis=1, keepdims=True)
    den = np.sqrt((a ** 2).sum(axis=1) * (b ** 2).sum(axis=1))
    return np.where(den > 0, (a * b).sum(axis=1) / np.where(den > 0, den, 1), 0.0)


def cvpool_fraction(y: np.ndarray, M: sp.spmatrix, grid=FRACTION_GRID, folds: int = 5, seed: int = 0,
                    criterion: str = "mse") -> tuple[float, dict[float, float]]:
    """One fraction for all queries: lowest mean normalised CV error over held-out operators
    (`stride_nnsight.recovery.operator_cv_errors`). ``criterion="spearman"`` / ``"pearson"``: the
    error is minus the per-query correlation of the held-out operators' predicted and measured
    values (scale-free, like LDS)."""
    score = None if criterion == "mse" else \
        (lambda pred, actual: -_row_correlation(pred, actual, criterion == "spearman"))
    errors = operator_cv_errors(y, M, grid, folds, True, seed, score=score)  # [grid, folds, q]
    if criterion == "mse":
        errors = errors / (y.var(axis=1) + 1e-30)[None, None, :]
    mean = errors.mean(axis=(1, 2))
    err = {f: float(e) for f, e in zip(grid, mean)}
    return min(grid, key=lambda f: err[f]), err


def cvquery_fractions(y: np.ndarray, M: sp.spmatrix, grid=FRACTION_GRID, folds: int = 5, seed: int = 0,
                      one_se: bool = True) -> np.ndarray:
    """Per query: the largest fraction whose 5-fold CV error over held-out operators is within
    one standard error (over the folds) of that query's lowest (``one_se=False``: the lowest)."""
    errors = operator_cv_errors(y, M, grid, folds, True, seed)
    mean, se = errors.mean(axis=1), errors.std(axis=1, ddof=1) / np.sqrt(folds)  # [grid, q]
    best = mean.argmin(axis=0)
    q = np.arange(y.shape[0])
    if not one_se:
        return np.asarray(grid)[best]
    ok = mean <= (mean[best, q] + se[best, q])[None, :]
    return np.asarray(grid)[np.array([np.flatnonzero(ok[:, j]).max() for j in q])]


def rules(names: list[str]) -> list[tuple[str, Callable[[np.ndarray, sp.spmatrix], tuple[np.ndarray, np.ndarray]]]]:
    """``(name, rule(y, M) -> (scores [q, n], fractions [q]))`` for each rule name."""
    out = []
    for name in names:
        kind, _, value = name.partition("=")
        if kind == "fraction":
            f = float(value)
            out.append((name, lambda y, M, f=f: (recover_fractions(y, M, np.full(len(y), f)), np.full(len(y), f))))
        elif kind == "noise":
            c = float(value)

            def noise(y, M, c=c):
                frac = noise_fractions(y, M, c)
                return recover_fractions(y, M, frac), frac
            out.append((name, noise))
        elif kind == "cvpool":
            def pooled(y, M):
                f, err = cvpool_fraction(y, M)
                print("  cvpool errors: " + ", ".join(f"{g}: {e:.4f}" for g, e in err.items()) + f" -> {f}",
                      flush=True)
                return recover_fractions(y, M, np.full(len(y), f)), np.full(len(y), f)
            out.append((name, pooled))
        elif kind in ("cvspearman", "cvpearson"):
            def pooled_corr(y, M, criterion=kind[2:]):
                f, err = cvpool_fraction(y, M, criterion=criterion)
                print(f"  {kind} errors: " + ", ".join(f"{g}: {e:.4f}" for g, e in err.items()) + f" -> {f}",
                      flush=True)
                return recover_fractions(y, M, np.full(len(y), f)), np.full(len(y), f)
            out.append((name, pooled_corr))
        elif kind in ("cvquery", "cvquery1se"):
            def per_query(y, M, one_se=kind.endswith("1se")):
                frac = cvquery_fractions(y, M, one_se=one_se)
                return recover_fractions(y, M, frac), frac
            out.append((name, per_query))
        elif kind == "cvpool1se":  # the library's lambda_rule="shared_cv", on every query of the batch
            def pooled_1se(y, M):
                f, diag = shared_fraction(y, M, True, FRACTION_GRID, max_queries=len(y))
                print(f"  cvpool1se: errors {[round(e, 4) for e in diag['errors']]} -> {f}", flush=True)
                return recover_fractions(y, M, np.full(len(y), f)), np.full(len(y), f)
            out.append((name, pooled_1se))
        elif kind == "shared_cv":  # exactly the library's rule: at most SHARED_CV_QUERIES queries sampled
            def shared(y, M):
                f, diag = shared_fraction(y, M, True)
                print(f"  shared_cv: {len(diag['queries'])} queries, errors {[round(e, 4) for e in diag['errors']]}"
                      f" -> {f}", flush=True)
                return recover_fractions(y, M, np.full(len(y), f)), np.full(len(y), f)
            out.append((name, shared))
        elif kind == "path":
            lo, hi = (float(v) for v in value.split(":"))
            grid = [g for g in FRACTION_GRID if lo <= g <= hi]

            def path(y, M, grid=grid):
                scores = sum(recover_fractions(y, M, np.full(len(y), g)) for g in grid) / len(grid)
                return scores, np.full(len(y), float(np.mean(grid)))
            out.append((name, path))
        elif kind == "cv":
            def percv(y, M):
                scores, lams = recover(y, M, "cv", progress=False)
                return scores, lams / np.maximum(_lambda_maxes(y, M), 1e-300)
            out.append((name, percv))
        else:
            raise SystemExit(f"unknown rule {name!r}: fraction=F, noise=C, cvpool, cvpool1se, path=LO:HI or cv")
    return out


def run(bench: dict[str, Any], names: list[str], n_boot: int = 1000) -> tuple[list[dict[str, Any]], float]:
    from nnsight import TransformersModel

    lm = TransformersModel(bench["model"], tokenizer=copy.deepcopy(bench["tokenizer"]), task="text-generation")
    start = time.process_time()
    stride = Stride(lm, **bench["stride_kwargs"]).fit(bench["documents"], progress=False)
    fit_s = time.process_time() - start
    attr = stride.attribute(bench["prompts"], bench["completions"], progress=False, null_permutations=0)
    y, M = attr.measurements.numpy().astype(np.float64), stride.design.membership
    kinds = np.asarray(bench["kinds"])
    facts = kinds == "fact"
    rows = []
    for name, rule in rules(names):
        t = time.process_time()
        scores, frac = rule(y, M)
        result = lds(scores, bench["truth"].masks, bench["truth"].losses, n_boot=n_boot)
        per_query = np.nan_to_num(np.asarray(result.per_query, dtype=float))
        rows.append({"rule": name, "scores": scores, "per_query": per_query, "lds": float(per_query.mean()),
                     "by_kind": {k: float(per_query[kinds == k].mean()) for k in sorted(set(kinds.tolist()))},
                     "recall@10": fact_tracing(scores[facts], bench["sources"], ks=(10,))["recall@10"],
                     "nnz": float((scores != 0).sum(axis=1).mean()), "fraction": float(np.mean(frac)),
                     "fraction_range": (float(np.min(frac)), float(np.max(frac))), "cpu_s": time.process_time() - t})
        print(f"  {name}: LDS {rows[-1]['lds']:.3f}", flush=True)
    return rows, fit_s


def report(rows: list[dict[str, Any]], truth, n_boot: int = 1000) -> str:
    kinds = list(rows[0]["by_kind"])
    head = ["rule", "recall@10", "LDS"] + [f"LDS {k}" for k in kinds] + \
        [f"LDS - {rows[0]['rule']} [95% CI]", "CI, queries + retrains resampled", "non-zeros/query",
         "fraction of lambda_max (mean, range)", "CPU s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    base = rows[0]
    for r in rows:
        diff = r["per_query"] - base["per_query"]
        lo, hi = bootstrap_ci(diff, 0.95, n_boot, 0)
        if r is base:
            model_ci = "-"
        else:
            _, mlo, mhi = paired_lds_ci(r["scores"], base["scores"], truth.masks, truth.losses, n_boot=n_boot)
            model_ci = f"[{mlo:+.3f}, {mhi:+.3f}]"
        lo_f, hi_f = r["fraction_range"]
        cells = [r["rule"], f"{r['recall@10']:.3f}", f"{r['lds']:.3f}"] + [f"{r['by_kind'][k]:.3f}" for k in kinds] + \
            [f"{diff.mean():+.3f} [{lo:+.3f}, {hi:+.3f}]", model_ci, f"{r['nnz']:.1f}",
             f"{r['fraction']:.3f} ({lo_f:.3f}-{hi_f:.3f})", f"{r['cpu_s']:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.lambda_rules", description=__doc__.split("\n")[0])
    p.add_argument("--bench", choices=BENCHES, default="gate")
    p.add_argument("rules", nargs="*", default=["fraction=0.3"],
                   help="fraction=F | noise=C | cvpool | cvpool1se | shared_cv | cvspearman | cvpearson | "
                        "cvquery | cvquery1se | path=LO:HI | cv; the first is the reference")
    a = p.parse_args(argv)
    print(f"load before: {os.getloadavg()}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}", flush=True)
    bench = load_bench(a.bench)
    rows, fit_s = run(bench, list(a.rules))
    print(f"bench {a.bench}: {len(bench['documents'])} documents, {len(bench['prompts'])} queries, "
          f"{bench['truth'].n_models} retrained models; one default fit ({fit_s:.1f} CPU s) serves every rule")
    print(report(rows, bench["truth"]))
    print(f"load after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
