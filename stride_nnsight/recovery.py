"""Recovery: per-example influence from the ``K`` measurements by sparse regression.

Under the additive-influence assumption ``y ~= M w (+ c)``, the influence of every
training example on a query is the Lasso solution

    w = argmin_w  1/(2K) ||y - M w - c||^2 + lambda ||w||_1

(scikit-learn's scaling). ``lambda`` is chosen per query by a documented rule:
``"fraction"``: ``lambda = fraction * lambda_max`` where ``lambda_max = ||M^T (y - mean y)||_inf / K``
is the smallest value giving ``w = 0``; ``"cv"``: 5-fold cross-validated ``LassoCV``.
The intercept ``c`` (``fit_intercept=True``) absorbs a shift shared by all operators,
which the stability loss tries to suppress but never removes entirely.

Two solvers give the ``"fraction"`` rule's solution (``solver=`` of `recover`):

* ``"reference"``: one multi-target scikit-learn ``Lasso`` over all ``n`` columns (stops at a
  duality gap <= ``2e-6 P(0)``, ``P(0) = ||y - mean y||^2 / (2K)`` the objective at ``w = 0``).
  Its coordinate descent sweeps every column each epoch and needs more epochs as ``n`` grows
  (super-linear in ``n``), and it holds ``[q, n]`` float64 coefficients.
* ``"working_set"``: per query, a Lasso on a small *working set* of columns (centred densely:
  ``K x |working set|``), then the optimality (KKT) conditions of all ``n`` columns from one
  sparse product ``X_c^T r = M^T (r - mean r)`` (``M`` stays sparse; the intercept is exact),
  then a new working set (the support plus the worst violators, doubling), until the full
  problem's duality gap is <= ``GAP_TOL`` of its objective, a certificate that the objective
  is within ``GAP_TOL`` (relative) of the optimum. Queries are solved in chunks (one sparse
  product per chunk and round), so memory is ``O(n * chunk)`` (never ``[q, n]``), and the
  scores come out sparse. Same objective as the reference (tested); when the optimum is not
  unique (supports larger than ``K``, small lambdas) the supports may differ.

``"auto"`` (default) uses the working set from ``WORKING_SET_MIN_N`` training examples on.
"""

from __future__ import annotations

import concurrent.futures as cf
import warnings
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence, Union

import numpy as np
import scipy.sparse as sp
from jaxtyping import Float
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import Lasso, LassoCV, enet_path, lars_path
from tqdm.auto import tqdm

__all__ = ["lambda_max", "lasso_objective", "recover", "recover_one", "recover_sparse", "noise_floor",
           "operator_cv_errors", "shared_fraction", "SHARED_CV_GRID", "SHARED_CV_QUERIES",
           "WORKING_SET_MIN_N", "CHUNK_ELEMENTS", "GAP_TOL", "SOLVERS"]

#: Number of training examples ``n`` from which ``solver="auto"`` uses the working-set solver
#: (below it, the one-call scikit-learn reference is fast and exact enough). Module constant:
#: tests patch it to force either path.
WORKING_SET_MIN_N: int = 20_000

#: Working-set solver: most float64 entries of one ``[n, chunk]`` block of correlations
#: ``M^T r`` (2**21 = 16 MiB). ``chunk = clip(CHUNK_ELEMENTS // n, 1, q)`` queries are solved
#: together; the solver's peak memory is about two such blocks per thread plus ``M`` as float64
#: (``12 d n`` bytes), never ``[q, n]``.
CHUNK_ELEMENTS: int = 1 << 21

#: Working-set solver: stop when the duality gap of a query's full Lasso problem is at most
#: ``GAP_TOL * P(w)``, ``P(w)`` its objective: the objective is then within ``GAP_TOL``
#: (relative) of the optimum, certified. (The reference stops at a gap of ``2e-6 * P(0)``,
#: ``P(0) = ||y - mean y||^2 / (2K)`` the objective at ``w = 0``.)
GAP_TOL: float = 1e-7

SOLVERS = ("auto", "reference", "working_set")

#: Fractions of ``lambda_max`` the ``"shared_cv"`` rule chooses from (`shared_fraction`).
SHARED_CV_GRID: tuple[float, ...] = (0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.7)
#: Most queries `shared_fraction` cross-validates on (evenly spaced over the batch): bounds its
#: cost at ``len(SHARED_CV_GRID) * folds`` recoveries of this many queries.
SHARED_CV_QUERIES: int = 64

_FIRST_SET = 64          # columns in a query's first working set (largest |M^T y|), and least growth
_NEAR = 0.9              # columns with |X_c^T r| / K > _NEAR * lambda may join a working set
_MAX_OUTER = 100         # KKT rounds before giving up on a query (with a warning)
_INNER_MAX_ITER = 10_000  # coordinate-descent epochs per working-set solve, at most (the reference's max_iter)
_INNER_EPOCHS = 64       # epochs between two gap checks of a working-set solve (doubling up to 8x)
_CD_EPOCHS = 256         # coordinate-descent epochs before a working-set solve tries an exact solve
_LARS_MAX_ITER = 5_000   # LARS steps per working-set solve, at most
#: Gap target of a working-set solve, relative to ``P(w)``: ``0.1 * (full gap / P(w))`` of the
#: round (early rounds need no precise solve), at most ``_INNER_TOL``, at least
#: ``_INNER_TOL_FLOOR * GAP_TOL``.
_INNER_TOL = 1e-2
_INNER_TOL_FLOOR = 0.1


def lambda_max(y: np.ndarray, membership: sp.spmatrix, fit_intercept: bool = True) -> float:
    """Smallest Lasso penalty (scikit-learn scaling) at which every coefficient is zero."""
    y = np.asarray(y, dtype=np.float64)
    if fit_intercept:
        y = y - y.mean()
        col_means = np.asarray(membership.mean(axis=0)).ravel()
        corr = membership.T @ y - col_means * y.sum()
    else:
        corr = membership.T @ y
    return float(np.abs(corr).max() / membership.shape[0])


def lasso_objective(
    y: Float[np.ndarray, "K"],
    membership: sp.spmatrix,
    w: Union[Float[np.ndarray, "n"], sp.spmatrix],
    lam: float,
    fit_intercept: bool = True,
) -> float:
    """The Lasso objective ``1/(2K) ||y - M w - c||^2 + lam ||w||_1`` of ``w`` (dense ``[n]`` or a
    sparse ``[1, n]`` row), with the optimal intercept ``c = mean(y - M w)`` (``c = 0`` without one)."""
    y = np.asarray(y, dtype=np.float64)
    if sp.issparse(w):
        w = sp.csr_matrix(w, dtype=np.float64)
        if w.shape != (1, membership.shape[1]):
            raise ValueError(f"sparse w must be one row [1, {membership.shape[1]}], got {w.shape}")
        idx, vals = w.indices, w.data
    else:
        w = np.asarray(w, dtype=np.float64).ravel()
        idx = np.flatnonzero(w)
        vals = w[idx]
    fitted = np.asarray(sp.csc_matrix(membership)[:, idx] @ vals, dtype=np.float64).ravel()
    l1 = float(np.abs(vals).sum())
    r = y - fitted
    if fit_intercept:
        r = r - r.mean()
    return float(r @ r / (2 * y.shape[0]) + lam * l1)


def recover_one(
    y: Float[np.ndarray, "K"],
    membership: sp.spmatrix,
    rule: str = "fraction",
    fraction: float = 0.3,
    fit_intercept: bool = True,
    seed: int = 0,
) -> tuple[Float[np.ndarray, "n"], float]:
    """Influence vector ``w [n]`` and the ``lambda`` used, for one query's measurements ``y [K]``.

    Always the scikit-learn solver (the reference); `recover` picks a faster one for large ``n``."""
    y = np.asarray(y, dtype=np.float64)
    if y.shape != (membership.shape[0],):
        raise ValueError(f"y has shape {y.shape}, expected ({membership.shape[0]},): one value per subset")
    X = sp.csc_matrix(membership, dtype=np.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        if rule == "cv":
            model = LassoCV(cv=5, alphas=30, fit_intercept=fit_intercept, max_iter=5000, random_state=seed)
            model.fit(X, y)
            return model.coef_.astype(np.float32) + np.float32(0.0), float(model.alpha_)
        if rule != "fraction":
            raise ValueError(f"unknown lambda rule {rule!r}: use 'fraction' or 'cv'")
        lam_max = lambda_max(y, X, fit_intercept)
        if lam_max <= 0:
            return np.zeros(X.shape[1], dtype=np.float32), 0.0
        lam = fraction * lam_max
        model = Lasso(alpha=lam, fit_intercept=fit_intercept, max_iter=10000, tol=1e-6)
        model.fit(X, y)
        return model.coef_.astype(np.float32) + np.float32(0.0), float(lam)


def recover(
    y: Float[np.ndarray, "q K"],
    membership: sp.spmatrix,
    rule: str = "fraction",
    fraction: float = 0.3,
    fit_intercept: bool = True,
    progress: bool = True,
    seed: int = 0,
    *,
    sparse: bool = False,
    solver: str = "auto",
    n_jobs: int = 1,
) -> tuple[Union[Float[np.ndarray, "q n"], sp.csr_matrix], Float[np.ndarray, "q"]]:
    """Influence scores ``[q, n]`` (float32; positive = proponent) and lambdas ``[q]`` for every query.

    Args:
        y: measurements ``[q, K]``, one row per query, one value per subset.
        membership: the design's ``M`` ``[K, n]`` (0/1, scipy sparse).
        rule: the lambda rule, ``"fraction"`` or ``"cv"`` (module docstring).
        fraction: the ``"fraction"`` rule's lambda as a fraction of each query's ``lambda_max``
            (module docstring).
        fit_intercept: fit the intercept ``c`` (module docstring).
        seed: ``random_state`` of the ``"cv"`` rule's ``LassoCV``.
        progress: show a progress bar.
        sparse: return a ``scipy.sparse.csr_matrix`` ``[q, n]`` float32 (only the non-zero
            scores stored) instead of a dense ``np.ndarray``. The working-set solver builds it
            row by row, without a dense ``[q, n]`` intermediate (the reference and ``"cv"``
            paths, for small ``n``, convert their dense result). Use it for large ``n``: dense
            float32 scores take ``4 q n`` bytes (4 GB for 1000 queries and 1e6 examples).
        solver: ``"auto"`` (working set from `WORKING_SET_MIN_N` examples on), ``"reference"``
            (one scikit-learn Lasso over all columns) or ``"working_set"``; the ``"fraction"``
            rule only (``"cv"`` always uses scikit-learn's ``LassoCV``, one query at a time).
        n_jobs: threads for the working-set solver (chunks of queries in parallel; same
            scores for any value).

    Zero scores are ``+0.0`` (dense) or not stored (sparse).
    """
    y = np.asarray(y, dtype=np.float64)
    if y.ndim != 2:
        raise ValueError(f"y must be [n_queries, K], got shape {y.shape}")
    if y.shape[1] != membership.shape[0]:
        raise ValueError(f"y has {y.shape[1]} values per query, expected {membership.shape[0]}: one per subset")
    if solver not in SOLVERS:
        raise ValueError(f"unknown solver {solver!r}: use one of {SOLVERS}")
    if rule not in ("fraction", "cv"):
        raise ValueError(f"unknown lambda rule {rule!r}: use 'fraction' or 'cv'")
    if int(n_jobs) < 1:
        raise ValueError(f"n_jobs must be >= 1, got {n_jobs}")
    if rule == "fraction" and not (np.isfinite(fraction) and fraction > 0):
        raise ValueError(f"lambda fraction must be > 0 (lambda = fraction * lambda_max), got {fraction!r}: "
                         f"use e.g. 0.3 (the default) or 0.01 for a dense solution")
    n = membership.shape[1]
    use_ws = rule == "fraction" and (solver == "working_set" or (solver == "auto" and n >= WORKING_SET_MIN_N))
    if use_ws:
        scores, lambdas = _recover_working_set(y, membership, fraction, fit_intercept, progress, int(n_jobs))
        return (scores if sparse else scores.toarray()), lambdas
    if rule == "fraction":
        dense, lambdas = _recover_fraction(y, membership, fraction, fit_intercept)
        dense += 0.0  # the Lasso returns -0.0 for some zeroed coefficients; show them as 0
        return (sp.csr_matrix(dense) if sparse else dense), lambdas
    rows, lambdas = [], np.zeros(y.shape[0], dtype=np.float64)
    for i in tqdm(range(y.shape[0]), disable=not progress, desc="sparse recovery", unit="query"):
        w, lambdas[i] = recover_one(y[i], membership, rule, fraction, fit_intercept, seed)
        rows.append(sp.csr_matrix(w[None, :]) if sparse else w)
    if sparse:
        return (sp.vstack(rows, format="csr") if rows else sp.csr_matrix((0, n), dtype=np.float32)), lambdas
    return (np.stack(rows) if rows else np.zeros((0, n), dtype=np.float32)), lambdas


def noise_floor(
    y: Float[np.ndarray, "q K"],
    membership: sp.spmatrix,
    rule: str = "fraction",
    fraction: float = 0.3,
    fit_intercept: bool = True,
    n_permutations: int = 8,
    seed: int = 0,
    query_index: Optional[np.ndarray] = None,
) -> Float[np.ndarray, "q"]:
    """What the recovery returns from measurements that carry no information about the design.

    For each query, its ``K`` measurements are shuffled across the subsets ``n_permutations``
    times (the same values, with no link left to which documents each subset holds) and
    recovered with the same lambda rule. The floor is the largest absolute score any of those
    null recoveries gave the query (0 when they were all zero), in the scores' own units: a score
    at or below it is within what measurements of this size produce by chance. A heuristic,
    conservative calibration, not a test with a stated error rate: a strong signal inflates the
    shuffled measurements too, so weak true sources can fall below the floor. On synthetic
    designs (n=300, K=128, d=4; 30 queries with 3 planted sources, 30 pure-noise queries; the
    test in ``tests/test_recovery.py``) no noise query had a score above its floor, and 79% of the
    planted sources and no other document were above theirs. (A floor from the shuffled
    *residual* of each query's fit found every source but let 80% of the noise queries through:
    the Lasso's fit absorbs the largest noise, so the residual understates it.) Returns float64
    ``[q]``.

    Query ``i``'s shuffles come from its own generator, seeded by ``(seed, query_index[i])``
    (default ``query_index = 0..q-1``), so its floor does not depend on which other queries are
    recovered with it: queries split over processes (`stride_nnsight.distributed`) get the
    floors one process would give them."""
    y = np.asarray(y, dtype=np.float64)
    if int(n_permutations) < 1:
        raise ValueError(f"n_permutations must be >= 1, got {n_permutations}")
    index = np.arange(y.shape[0]) if query_index is None else np.asarray(query_index, dtype=np.int64)
    if index.shape != (y.shape[0],):
        raise ValueError(f"query_index must hold one index per query ({y.shape[0]}), got shape {index.shape}")
    rngs = [np.random.default_rng([int(seed), int(i)]) for i in index]
    floor = np.zeros(y.shape[0])
    for _ in range(int(n_permutations)):
        order = np.stack([rng.permutation(y.shape[1]) for rng in rngs]) if len(rngs) else np.zeros(y.shape, int)
        shuffled = np.take_along_axis(y, order, axis=1)
        scores, _ = recover(shuffled, membership, rule, fraction, fit_intercept, progress=False, seed=seed,
                            sparse=True)
        top = np.zeros(y.shape[0])
        if scores.nnz:
            top = np.asarray(abs(scores).max(axis=1).todense()).reshape(-1)
        floor = np.maximum(floor, top)
    return floor


def operator_cv_errors(
    y: Float[np.ndarray, "q K"],
    membership: sp.spmatrix,
    grid: Sequence[float] = SHARED_CV_GRID,
    folds: int = 5,
    fit_intercept: bool = True,
    seed: int = 0,
    score: Optional[Callable[[np.ndarray, np.ndarray], np.ndarray]] = None,
) -> Float[np.ndarray, "grid folds q"]:
    """Cross-validated error of the ``"fraction"`` rule at each fraction of ``grid``, over held-out
    *operators*: the ``K`` subsets are split into ``folds`` folds (seeded), each query is recovered
    from the other folds' measurements and the fold's measurements are predicted (``M w + c``).
    ``score(predicted [q, m], measured [q, m]) -> [q]`` defaults to the mean squared error over the
    fold's operators. Costs ``len(grid) * folds`` recoveries of all ``q`` queries."""
    y = np.asarray(y, dtype=np.float64)
    K = y.shape[1]
    if int(folds) < 2 or int(folds) > K:
        raise ValueError(f"folds must lie in [2, K={K}], got {folds}")
    fold = np.random.default_rng(seed).permutation(K) % int(folds)
    M = sp.csr_matrix(membership, dtype=np.float64)
    if score is None:
        score = lambda pred, actual: ((actual - pred) ** 2).mean(axis=1)  # noqa: E731
    errors = np.zeros((len(grid), int(folds), y.shape[0]))
    for k in range(int(folds)):
        train, test = fold != k, fold == k
        for i, f in enumerate(grid):
            w, _ = recover(y[:, train], M[train], "fraction", float(f), fit_intercept, progress=False, sparse=True)
            w = w.astype(np.float64)  # sparse [q, n]
            c = (y[:, train] - (M[train] @ w.T).T.toarray()).mean(axis=1, keepdims=True) if fit_intercept else 0.0
            pred = (M[test] @ w.T).T.toarray() + c
            errors[i, k] = score(pred, y[:, test])
    return errors


def shared_fraction(
    y: Float[np.ndarray, "q K"],
    membership: sp.spmatrix,
    fit_intercept: bool = True,
    grid: Sequence[float] = SHARED_CV_GRID,
    folds: int = 5,
    max_queries: int = SHARED_CV_QUERIES,
    seed: int = 0,
) -> tuple[float, dict]:
    """The ``"shared_cv"`` rule: one fraction of ``lambda_max`` for a batch of queries, chosen from
    the measurements alone. `operator_cv_errors` on at most ``max_queries`` queries (evenly spaced
    over the batch), each query's error divided by the variance of its measurements and averaged
    over queries; the chosen fraction is the largest of ``grid`` whose error is within one standard
    error (over the folds) of the lowest (the "1-SE" rule). Returns ``(fraction, diagnostics)``:
    ``grid``, ``errors``, ``standard_errors``, ``queries`` (the indices used).

    The choice depends on the batch (a query's scores can change with the queries recovered
    with it) and costs ``len(grid) * folds`` recoveries of the sample. Dev evidence (docs/method.md,
    "Lambda rule"): it improved LDS where ``n > K`` and lost where ``K > n``, where the operators'
    measurements are best predicted by an almost unpenalised fit."""
    y = np.asarray(y, dtype=np.float64)
    if y.ndim != 2 or y.shape[0] == 0:
        raise ValueError(f"y must be [n_queries >= 1, K], got shape {y.shape}")
    q = y.shape[0]
    idx = np.arange(q) if q <= max_queries else np.unique(np.linspace(0, q - 1, int(max_queries)).round().astype(int))
    sample = y[idx]
    errors = operator_cv_errors(sample, membership, grid, folds, fit_intercept, seed)
    scale = sample.var(axis=1) + np.finfo(np.float64).tiny
    per_fold = (errors / scale[None, None, :]).mean(axis=2)  # [grid, folds]
    mean = per_fold.mean(axis=1)
    se = per_fold.std(axis=1, ddof=1) / np.sqrt(per_fold.shape[1])
    best = int(mean.argmin())
    fraction = max(float(g) for g, m in zip(grid, mean) if m <= mean[best] + se[best])
    return fraction, {"grid": [float(g) for g in grid], "errors": mean.tolist(), "standard_errors": se.tolist(),
                      "queries": idx.tolist()}


def recover_sparse(
    y: Float[np.ndarray, "q K"],
    membership: sp.spmatrix,
    rule: str = "fraction",
    fraction: float = 0.3,
    fit_intercept: bool = True,
    progress: bool = True,
    seed: int = 0,
    *,
    solver: str = "auto",
    n_jobs: int = 1,
) -> tuple[sp.csr_matrix, Float[np.ndarray, "q"]]:
    """`recover` with ``sparse=True``: scores as a ``scipy.sparse.csr_matrix`` ``[q, n]`` float32."""
    return recover(y, membership, rule, fraction, fit_intercept, progress, seed,
                   sparse=True, solver=solver, n_jobs=n_jobs)


def _recover_fraction(y: np.ndarray, membership: sp.spmatrix, fraction: float,
                      fit_intercept: bool) -> tuple[np.ndarray, np.ndarray]:
    """The ``"fraction"`` rule for all queries in one scikit-learn call (the reference solver).

    The Lasso is scale-equivariant: dividing ``y_q`` by ``s`` divides its solution and
    ``lambda_max`` by ``s``. With ``s = lambda_max(y_q)`` every query's penalty becomes
    ``fraction``, so one multi-target ``Lasso(alpha=fraction)`` solves them all (one input
    check instead of one per query); the coefficients are scaled back. Same solutions as
    `recover_one` per query (tested).
    """
    X = sp.csc_matrix(membership, dtype=np.float64)
    q, n = y.shape[0], X.shape[1]
    scores = np.zeros((q, n), dtype=np.float32)
    lambdas = np.zeros(q, dtype=np.float64)
    lam_max = np.array([lambda_max(row, X, fit_intercept) for row in y])
    ok = np.flatnonzero(lam_max > 0)
    if ok.size:
        targets = (y[ok] / lam_max[ok, None]).T  # [K, q_ok]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            model = Lasso(alpha=fraction, fit_intercept=fit_intercept, max_iter=10000, tol=1e-6)
            model.fit(X, targets if ok.size > 1 else targets[:, 0])
        coef = np.atleast_2d(model.coef_)
        scores[ok] = (coef * lam_max[ok, None]).astype(np.float32)
        lambdas[ok] = fraction * lam_max[ok]
    return scores, lambdas


# --------------------------------------------------------------------------- working set
@dataclass
class _Design:
    """What every chunk shares: ``M^T`` as float64 CSR ``[n, K]`` and the column means ``[n]``."""

    MT: sp.csr_matrix
    col_means: np.ndarray
    fit_intercept: bool

    @classmethod
    def of(cls, membership: sp.spmatrix, fit_intercept: bool) -> "_Design":
        MT = sp.csr_matrix(membership.T, dtype=np.float64)
        MT.sum_duplicates()
        K = membership.shape[0]
        col_means = np.asarray(MT.sum(axis=1)).ravel() / K if fit_intercept else np.zeros(MT.shape[0])
        return cls(MT, col_means, fit_intercept)

    def columns(self, idx: np.ndarray) -> np.ndarray:
        """Centred columns ``X_c[:, idx] = M[:, idx] - mean`` as a Fortran ``[K, len(idx)]`` array."""
        block = self.MT[idx].toarray().T
        block -= self.col_means[idx]
        return np.asfortranarray(block)

    def abs_correlations(self, R: np.ndarray) -> np.ndarray:
        """``|X_c^T r| / K`` for residual rows ``R [b, K]``: ``[n, b]`` float64 from one sparse product.

        ``X_c^T r = M^T r - colmean * sum(r) = M^T (r - mean(r))`` (``M`` stays sparse)."""
        K = R.shape[1]
        Rt = R - R.mean(axis=1, keepdims=True) if self.fit_intercept else R
        C = self.MT @ np.ascontiguousarray((Rt / K).T)
        return np.abs(C, out=C)


@dataclass
class _Query:
    """One query's state in the working-set solver (centred problem, module docstring's scaling)."""

    yc: np.ndarray                  # centred measurements [K]
    p0: float                       # objective at w = 0: ||yc||^2 / (2K)
    lam: float = 0.0
    primal: float = 0.0             # objective at w, as of the last full gap
    active: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))  # working set
    X: Optional[np.ndarray] = None  # centred working-set columns, Fortran [K, |active|]
    w: np.ndarray = field(default_factory=lambda: np.zeros(0))
    r: Optional[np.ndarray] = None  # residual yc - X w [K]
    inner_tol: float = _INNER_TOL
    capped: bool = False            # the last working-set solve ran out of epochs
    rel_gap: float = np.inf         # full duality gap / objective, as of the last check
    done: bool = False
    converged: bool = False

    def gap(self, max_corr: float) -> float:
        """Duality gap of the full problem, given ``max_j |X_c^T r|_j / K`` over all ``n`` columns
        (dual point ``r * min(1, lam / max_corr)``); also updates ``self.primal``."""
        gap, self.primal = _duality_gap(self.yc, self.r, self.w, self.lam, max_corr)
        return gap

    def set_working_set(self, active: np.ndarray, design: _Design) -> None:
        """New working set ``active`` (int64, the current support first); warm start kept."""
        keep = self.w != 0
        w = np.zeros(active.size)
        w[: int(keep.sum())] = self.w[keep]
        self.active, self.w, self.X = active, w, design.columns(active)

    def solve(self) -> None:
        """Lasso on the working set to a duality gap <= ``inner_tol * P(w)`` (``P`` of the last full gap).

        Warm-started coordinate descent (scikit-learn's) for up to ``_CD_EPOCHS`` epochs; if that
        is not enough (near-degenerate working sets, where coordinate descent crawls), the exact
        LARS-Lasso path on the working set, then coordinate descent again from the better of the
        two, up to ``_INNER_MAX_ITER`` epochs in all. Before LARS, the exact solution for the support
        and signs that coordinate descent found (one linear solve) is tried: usually it is the
        answer. ``capped``: the target was not reached.
        """
        target = self.inner_tol * self.primal
        gap = self._coordinate_descent(target, _CD_EPOCHS)
        for exact in (self._refit_support, self._lars):
            if gap <= target:
                break
            w = exact()
            if w is not None:
                w_gap = self._working_set_gap(w)
                if w_gap < gap:
                    self.w, gap = w, w_gap
        if gap > target:
            gap = self._coordinate_descent(target, _INNER_MAX_ITER - _CD_EPOCHS)
        self.capped = gap > target
        self.r = self.yc - self.X @ self.w

    def _coordinate_descent(self, target: float, budget: int) -> float:
        """scikit-learn's coordinate descent from ``self.w`` in bursts of epochs, until its gap on the
        working set is <= ``target`` or ``budget`` epochs are spent; returns that gap.

        Bursts, because scikit-learn computes the gap only once its coordinate updates are tiny
        or at its last epoch, which on near-degenerate problems takes far more epochs than the gap."""
        epochs, spent, gap = _INNER_EPOCHS, 0, np.inf
        while spent < budget:  # (its ConvergenceWarnings are silenced by _recover_working_set)
            epochs = min(epochs, budget - spent)
            # scikit-learn stops at gap <= tol * ||yc||^2 / K = tol * 2 P(0) (this module's scaling)
            _, coefs, gaps = enet_path(self.X, self.yc, l1_ratio=1.0, alphas=[self.lam], precompute=False,
                                       coef_init=self.w, check_input=False, tol=target / (2 * self.p0),
                                       max_iter=epochs)
            self.w, gap, spent = coefs[:, 0].copy(), float(gaps[0]), spent + epochs
            if gap <= target * (1 + 1e-9):
                break
            epochs = min(2 * epochs, 8 * _INNER_EPOCHS)
        return gap

    def _refit_support(self) -> Optional[np.ndarray]:
        """The Lasso solution if the support ``S`` and signs ``z`` of ``self.w`` are the optimum's:
        ``w_S`` solves ``X_S^T X_S w_S = X_S^T yc - K lam z`` (None if singular or signs change)."""
        support = np.flatnonzero(self.w)
        if support.size == 0 or support.size > self.X.shape[0]:
            return None
        z = np.sign(self.w[support])
        XS = self.X[:, support]
        try:
            w_s = np.linalg.solve(XS.T @ XS, XS.T @ self.yc - self.X.shape[0] * self.lam * z)
        except np.linalg.LinAlgError:
            return None
        if not np.all(np.isfinite(w_s)) or np.any(np.sign(w_s) != z):
            return None
        w = np.zeros_like(self.w)
        w[support] = w_s
        return w

    def _lars(self) -> Optional[np.ndarray]:
        """Exact Lasso solution on the working set by the LARS-Lasso path (None if LARS fails)."""
        try:
            _, _, coef = lars_path(self.X, self.yc, alpha_min=self.lam, method="lasso", return_path=False,
                                   max_iter=_LARS_MAX_ITER)
        except (np.linalg.LinAlgError, ValueError, FloatingPointError):
            return None
        coef = np.asarray(coef, dtype=np.float64).ravel()
        return coef if coef.shape == self.w.shape and np.all(np.isfinite(coef)) else None

    def _working_set_gap(self, w: np.ndarray) -> float:
        """Duality gap of ``w`` on the working-set problem."""
        r = self.yc - self.X @ w
        return _duality_gap(self.yc, r, w, self.lam, float(np.abs(self.X.T @ r).max()) / r.shape[0])[0]

    def check(self, max_corr: float) -> bool:
        """Full duality gap from ``max_corr = max_j |X_c^T r|_j / K`` (all ``n`` columns); True (and
        ``done``) once it is <= ``GAP_TOL`` of the objective."""
        gap = self.gap(max_corr)
        self.rel_gap = gap / self.primal if self.primal > 0 else 0.0
        if self.rel_gap <= GAP_TOL:
            self.done = self.converged = True
        return self.done

    def renew(self, abs_corr: np.ndarray, design: _Design) -> None:
        """New working set and solve. ``abs_corr``: ``|X_c^T r| / K`` of all ``n`` columns (a strided
        column of the chunk's block: one pass, no block-sized temporaries; overwritten on the support).

        The new working set is the support plus, of the columns with ``abs_corr > _NEAR * lam``,
        the ``max(_FIRST_SET, |support|)`` largest (violators first)."""
        support = self.active[self.w != 0]
        abs_corr[support] = 0.0
        cand = np.flatnonzero(abs_corr > _NEAR * self.lam)
        values = abs_corr[cand]
        active_values = abs_corr[self.active]  # 0 on the support
        violators_outside = np.count_nonzero(values > self.lam) - np.count_nonzero(active_values > self.lam)
        if violators_outside == 0:  # the working set holds every violator
            if self.capped:  # and its solve ran out of epochs: stop (not converged)
                self.done = True
                return
            self.inner_tol = max(_INNER_TOL_FLOOR * GAP_TOL, min(self.inner_tol, 0.5 * GAP_TOL))
        else:
            self.inner_tol = max(_INNER_TOL_FLOOR * GAP_TOL, min(self.inner_tol, 0.1 * self.rel_gap))
        m = max(_FIRST_SET, support.size)
        if cand.size > m:
            top = np.argpartition(values, cand.size - m)[cand.size - m:]
            cand, values = cand[top], values[top]
        self.set_working_set(np.concatenate([support, cand[np.argsort(-values)]]).astype(np.int64), design)
        self.solve()


def _duality_gap(yc: np.ndarray, r: np.ndarray, w: np.ndarray, lam: float, max_corr: float) -> tuple[float, float]:
    """(duality gap, primal objective) of the centred Lasso at ``w`` with residual ``r = yc - X w``,
    given ``max_corr = max_j |X_j^T r| / K``; dual point ``r * min(1, lam / max_corr)``."""
    K = r.shape[0]
    rr = float(r @ r)
    primal = rr / (2 * K) + lam * float(np.abs(w).sum())
    s = 1.0 if max_corr <= lam else lam / max_corr
    dual = s * float(r @ yc) / K - s * s * rr / (2 * K)
    return primal - dual, primal


def _recover_working_set(y: np.ndarray, membership: sp.spmatrix, fraction: float, fit_intercept: bool,
                         progress: bool, n_jobs: int) -> tuple[sp.csr_matrix, np.ndarray]:
    """The ``"fraction"`` rule by the working-set solver: sparse scores ``[q, n]`` and lambdas ``[q]``."""
    q, n = y.shape[0], membership.shape[1]
    design = _Design.of(membership, fit_intercept)
    chunk = int(np.clip(CHUNK_ELEMENTS // max(n, 1), 1, max(q, 1)))
    # warnings.catch_warnings is not thread-safe: silence scikit-learn's inner-solve warnings here,
    # once, around every thread (the outcome is checked by the duality gap and reported below).
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        warnings.filterwarnings("ignore", category=RuntimeWarning, module=r"sklearn\.")
        results = _run_chunks(y, design, fraction, chunk, progress, n_jobs)
    rows = [row for part in results for row in part]
    not_converged = sum(not row[3] for row in rows)
    if not_converged:
        warnings.warn(f"working-set Lasso: {not_converged} of {q} queries stopped with a duality gap above "
                      f"GAP_TOL={GAP_TOL:g} of their objective (after {_INNER_MAX_ITER} coordinate-descent "
                      f"epochs on a working set, or {_MAX_OUTER} rounds); their scores are approximate. Such "
                      f"near-degenerate problems come from small lambda fractions: raise lambda_fraction.",
                      ConvergenceWarning, stacklevel=3)
    lambdas = np.array([row[2] for row in rows], dtype=np.float64)
    index_dtype = np.int32 if n < np.iinfo(np.int32).max else np.int64
    indptr = np.zeros(q + 1, dtype=index_dtype)
    indptr[1:] = np.cumsum([row[0].size for row in rows])
    indices = np.concatenate([row[0] for row in rows] + [np.zeros(0, np.int64)]).astype(index_dtype)
    data = np.concatenate([row[1] for row in rows] + [np.zeros(0, np.float32)]).astype(np.float32)
    return sp.csr_matrix((data, indices, indptr), shape=(q, n)), lambdas


def _run_chunks(y: np.ndarray, design: _Design, fraction: float, chunk: int, progress: bool,
                n_jobs: int) -> list:
    """`_solve_chunk` on ``y[s:s + chunk]`` for every start ``s``, in order; ``n_jobs`` threads."""
    q = y.shape[0]
    starts = list(range(0, q, chunk))
    results: list = [None] * len(starts)
    with tqdm(total=q, disable=not progress, desc="sparse recovery", unit="query") as bar:
        if n_jobs == 1 or len(starts) == 1:
            for i, s in enumerate(starts):
                results[i] = _solve_chunk(y[s:s + chunk], design, fraction)
                bar.update(min(chunk, q - s))
        else:
            with cf.ThreadPoolExecutor(max_workers=n_jobs) as pool:
                futures = {pool.submit(_solve_chunk, y[s:s + chunk], design, fraction): i
                           for i, s in enumerate(starts)}
                for fut in cf.as_completed(futures):
                    results[futures[fut]] = fut.result()
                    bar.update(min(chunk, q - starts[futures[fut]]))
    return results


def _solve_chunk(Y: np.ndarray, design: _Design, fraction: float) -> list:
    """Working-set Lasso for the queries ``Y [b, K]``: per query (indices, values, lambda, converged).

    Each round: one sparse product for the live queries' correlations ``[n, live]``, then per
    query its full gap and, unless that is small enough, its candidate columns and a new solve."""
    K = Y.shape[1]
    Yc = Y - Y.mean(axis=1, keepdims=True) if design.fit_intercept else Y.copy()
    queries = [_Query(yc=row.copy(), p0=float(row @ row) / (2 * K), r=row.copy()) for row in Yc]
    live = list(range(len(queries)))
    for round_ in range(_MAX_OUTER + 1):
        if not live:
            break
        C = design.abs_correlations(np.stack([queries[i].r for i in live]))  # [n, len(live)]
        max_corr = _column_max(C)
        for col, i in enumerate(live):
            qu = queries[i]
            if round_ == 0:
                if not max_corr[col] > 0:  # constant measurements: w = 0 and lambda = 0 (as the reference)
                    qu.done = qu.converged = True
                    continue
                qu.lam = fraction * float(max_corr[col])
            if round_ == _MAX_OUTER or qu.check(float(max_corr[col])):
                continue
            qu.renew(C[:, col], design)
        del C  # before the next round's block is allocated
        live = [i for i in live if not queries[i].done]
    return [_result(qu) for qu in queries]


def _column_max(C: np.ndarray) -> np.ndarray:
    """``C.max(axis=0)`` of a C-ordered ``[n, b]`` block with few columns, fast: numpy reduces
    over axis 0 with an inner loop of length ``b``, so fold 64 rows into each row first."""
    n, b = C.shape
    fold = (n // 64) * 64
    out = np.full(b, -np.inf)
    if fold:
        out = C[:fold].reshape(-1, 64 * b).max(axis=0).reshape(64, b).max(axis=0)
    if fold < n:
        out = np.maximum(out, C[fold:].max(axis=0))
    return out


def _result(qu: _Query) -> tuple[np.ndarray, np.ndarray, float, bool]:
    """Sorted non-zero indices (int64), their float32 scores (zeros dropped), lambda, converged."""
    vals = qu.w.astype(np.float32)
    keep = vals != 0  # also drops values below float32's range
    idx, vals = qu.active[keep], vals[keep] + np.float32(0.0)
    order = np.argsort(idx)
    return idx[order], vals[order], qu.lam, qu.converged
