"""Recovery: per-example influence from the ``K`` measurements by sparse regression.

Under the additive-influence assumption ``y ~= M w (+ c)``, the influence of every
training example on a query is the Lasso solution

    w = argmin_w  1/(2K) ||y - M w - c||^2 + lambda ||w||_1

(scikit-learn's scaling). ``lambda`` is chosen per query by a documented rule:
``"fraction"``: ``lambda = fraction * lambda_max`` where ``lambda_max = ||M^T (y - mean y)||_inf / K``
is the smallest value giving ``w = 0``; ``"cv"``: 5-fold cross-validated ``LassoCV``.
The intercept ``c`` (``fit_intercept=True``) absorbs a shift shared by all operators,
which the stability loss tries to suppress but never removes entirely.
"""

from __future__ import annotations

import warnings

import numpy as np
import scipy.sparse as sp
from jaxtyping import Float
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import Lasso, LassoCV
from tqdm.auto import tqdm

__all__ = ["lambda_max", "recover", "recover_one"]


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


def recover_one(
    y: Float[np.ndarray, "K"],
    membership: sp.spmatrix,
    rule: str = "fraction",
    fraction: float = 0.3,
    fit_intercept: bool = True,
    seed: int = 0,
) -> tuple[Float[np.ndarray, "n"], float]:
    """Influence vector ``w [n]`` and the ``lambda`` used, for one query's measurements ``y [K]``."""
    y = np.asarray(y, dtype=np.float64)
    if y.shape != (membership.shape[0],):
        raise ValueError(f"y has shape {y.shape}, expected ({membership.shape[0]},): one value per subset")
    X = sp.csc_matrix(membership, dtype=np.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        if rule == "cv":
            model = LassoCV(cv=5, alphas=30, fit_intercept=fit_intercept, max_iter=5000, random_state=seed)
            model.fit(X, y)
            return model.coef_.astype(np.float32), float(model.alpha_)
        if rule != "fraction":
            raise ValueError(f"unknown lambda rule {rule!r}: use 'fraction' or 'cv'")
        lam_max = lambda_max(y, X, fit_intercept)
        if lam_max <= 0:
            return np.zeros(X.shape[1], dtype=np.float32), 0.0
        lam = fraction * lam_max
        model = Lasso(alpha=lam, fit_intercept=fit_intercept, max_iter=10000, tol=1e-6)
        model.fit(X, y)
        return model.coef_.astype(np.float32), float(lam)


def recover(
    y: Float[np.ndarray, "q K"],
    membership: sp.spmatrix,
    rule: str = "fraction",
    fraction: float = 0.3,
    fit_intercept: bool = True,
    progress: bool = True,
    seed: int = 0,
) -> tuple[Float[np.ndarray, "q n"], Float[np.ndarray, "q"]]:
    """Influence scores ``[q, n]`` (float32; positive = proponent) and lambdas ``[q]`` for every query."""
    y = np.asarray(y, dtype=np.float64)
    if y.ndim != 2:
        raise ValueError(f"y must be [n_queries, K], got shape {y.shape}")
    if y.shape[1] != membership.shape[0]:
        raise ValueError(f"y has {y.shape[1]} values per query, expected {membership.shape[0]}: one per subset")
    if rule == "fraction":
        scores, lambdas = _recover_fraction(y, membership, fraction, fit_intercept)
    else:
        scores = np.zeros((y.shape[0], membership.shape[1]), dtype=np.float32)
        lambdas = np.zeros(y.shape[0], dtype=np.float64)
        for i in tqdm(range(y.shape[0]), disable=not progress, desc="sparse recovery", unit="query"):
            scores[i], lambdas[i] = recover_one(y[i], membership, rule, fraction, fit_intercept, seed)
    scores += 0.0  # the Lasso returns -0.0 for some zeroed coefficients; show them as 0
    return scores, lambdas


def _recover_fraction(y: np.ndarray, membership: sp.spmatrix, fraction: float,
                      fit_intercept: bool) -> tuple[np.ndarray, np.ndarray]:
    """The ``"fraction"`` rule for all queries in one scikit-learn call.

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
