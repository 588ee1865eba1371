"""Measuring attribution quality: LDS, retraining ground truth, fact tracing, removal.

The protocols are the field's (docs/benchmarks.md describes them).
Everything here is method-agnostic: it takes a score matrix ``[n_queries, n_train]``
(an `Attribution`, a torch tensor or a numpy array; positive = proponent = the example
*lowers* the query's loss) and, where retraining is needed, two user-supplied callables:

* ``train_fn(indices, seed) -> model``: train a fresh model from scratch on the training
  examples ``indices`` (sorted ``int64`` array into the training set) with random seed
  ``seed`` (a non-negative int);
* ``eval_fn(model) -> losses``: the loss of every query under ``model``, array-like
  ``[n_queries]`` (nats, or whatever metric the scores are in units of; lower is better).

With the bundled toy setting (`stride_nnsight.toy`) they are typically::

    corpus = load_corpus(); tok = train_tokenizer(corpus.documents)
    def train_fn(indices, seed):
        torch.manual_seed(seed)
        model = GPT2LMHeadModel(tiny_gpt2_config(tok))
        return train_causal_lm(model, tok, [corpus.documents[i] for i in indices], seed=seed)
    def eval_fn(model):
        return completion_loss(model, tok, prompts, completions)[0].numpy()

Contents:

* `lds` -> `LDSResult`: linear datamodeling score against retrained models
  (`spearman_per_query`, `bootstrap_ci` are its building blocks).
* `draw_subset_masks`, `retrain_ground_truth` -> `RetrainingGroundTruth`: the retrained
  models' losses, resumable from an on-disk cache (one file per finished retrain).
* `fact_tracing`, `random_recall_at_k`, `random_mrr`: recall@k / MRR of known source
  documents, with exact expectations under random tie-breaking.
* `counterfactual_removal`: remove each query's top-k proponents, retrain, measure the
  loss rise, against removing k random examples.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np
import torch
from jaxtyping import Bool, Float
from scipy.special import gammaln
from scipy.stats import rankdata, spearmanr
from tqdm.auto import tqdm

from . import storage
from .results import Attribution

__all__ = [
    "LDSResult",
    "lds",
    "lds_replicates",
    "paired_lds_ci",
    "seed_to_seed_lds",
    "spearman_per_query",
    "bootstrap_ci",
    "draw_subset_masks",
    "RetrainingGroundTruth",
    "retrain_ground_truth",
    "fact_tracing",
    "random_recall_at_k",
    "random_mrr",
    "counterfactual_removal",
]

ScoresLike = Union[Attribution, torch.Tensor, np.ndarray, Sequence[Sequence[float]]]
TrainFn = Callable[[np.ndarray, int], Any]
EvalFn = Callable[[Any], Any]

#: Fewest finite (prediction, loss) pairs for which a query's Spearman correlation is computed.
MIN_MODELS_PER_QUERY = 3


# --------------------------------------------------------------------------------------
# Conversions
# --------------------------------------------------------------------------------------


def _as_scores(scores: ScoresLike) -> Float[np.ndarray, "q n"]:
    """Scores as a float64 array ``[n_queries, n_train]`` (a 1-D vector is one query)."""
    if isinstance(scores, Attribution):
        scores = scores.scores
    if isinstance(scores, torch.Tensor):
        out = scores.detach().cpu().to(torch.float64).numpy()
    else:
        out = np.asarray(scores, dtype=np.float64)
    if out.ndim == 1:
        out = out[None, :]
    if out.ndim != 2:
        raise ValueError(f"scores must be 2-D [n_queries, n_train], got shape {out.shape}")
    return out


def _as_masks(masks: Any) -> Bool[np.ndarray, "m n"]:
    """Masks as a bool array ``[n_models, n_train]``; only 0/1 (or bool) entries are accepted."""
    if isinstance(masks, torch.Tensor):
        masks = masks.detach().cpu().numpy()
    arr = np.asarray(masks)
    if arr.ndim != 2:
        raise ValueError(f"masks must be 2-D [n_models, n_train], got shape {arr.shape}")
    if arr.dtype != np.bool_:
        if not np.isin(arr, (0, 1)).all():
            raise ValueError("masks must be boolean or 0/1: mask[i, j] says whether model i was trained on example j")
        arr = arr.astype(bool)
    return arr


def _as_loss_vector(value: Any, n_queries: Optional[int], what: str) -> Float[np.ndarray, "q"]:
    """``eval_fn``'s output as a float64 vector ``[n_queries]``."""
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().to(torch.float64).numpy()
    arr = np.asarray(value, dtype=np.float64)
    if arr.ndim == 0 or (arr.ndim == 2 and 1 in arr.shape):
        arr = arr.reshape(-1)
    if arr.ndim != 1:
        raise ValueError(f"{what}: eval_fn must return one loss per query (a 1-D array), got shape {arr.shape}")
    if n_queries is not None and arr.shape[0] != n_queries:
        raise ValueError(f"{what}: eval_fn returned {arr.shape[0]} losses, expected {n_queries} (one per query)")
    return arr


# --------------------------------------------------------------------------------------
# Statistics helpers
# --------------------------------------------------------------------------------------


def bootstrap_ci(
    values: Any,
    confidence: float = 0.95,
    n_boot: int = 1000,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile-bootstrap confidence interval of the mean of ``values``.

    Args:
        values: 1-D array-like; non-finite entries (nan, inf) are dropped first.
        confidence: Coverage of the interval, in (0, 1).
        n_boot: Bootstrap resamples (with replacement, same size as the finite values).
        seed: Seed of the resampling (``numpy.random.default_rng``), so the interval is
            reproducible.

    Returns:
        ``(low, high)``: the ``(1-confidence)/2`` and ``(1+confidence)/2`` quantiles of the
        resampled means. ``(nan, nan)`` with no finite value; ``(v, v)`` with exactly one.
    """
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return float("nan"), float("nan")
    if v.size == 1:
        return float(v[0]), float(v[0])
    rng = np.random.default_rng(seed)
    # resample in chunks so that n_boot x n indices never need much memory
    chunk = max(1, min(n_boot, 10_000_000 // v.size))
    means = np.empty(n_boot)
    for start in range(0, n_boot, chunk):
        stop = min(n_boot, start + chunk)
        idx = rng.integers(0, v.size, size=(stop - start, v.size))
        means[start:stop] = v[idx].mean(axis=1)
    alpha = (1.0 - confidence) / 2.0
    low, high = np.quantile(means, [alpha, 1.0 - alpha])
    return float(low), float(high)


def spearman_per_query(
    predictions: Float[np.ndarray, "m q"],
    targets: Float[np.ndarray, "m q"],
) -> Float[np.ndarray, "q"]:
    """Spearman correlation of each column of ``predictions`` with the same column of ``targets``.

    Uses `scipy.stats.spearmanr` (average ranks for ties). Per column, pairs where either
    value is non-finite are dropped. The correlation is ``nan`` where fewer than
    `MIN_MODELS_PER_QUERY` pairs remain or where either vector is constant (no ranking to
    compare); no warning is raised for those.

    Args:
        predictions: ``[m, q]``, e.g. predicted effects of ``m`` subsets on ``q`` queries.
        targets: ``[m, q]``, same shape.

    Returns:
        float64 ``[q]`` in ``[-1, 1]`` or ``nan``.
    """
    p = np.asarray(predictions, dtype=np.float64)
    t = np.asarray(targets, dtype=np.float64)
    if p.ndim == 1:
        p = p[:, None]
    if t.ndim == 1:
        t = t[:, None]
    if p.shape != t.shape or p.ndim != 2:
        raise ValueError(f"predictions {p.shape} and targets {t.shape} must both be [m, q]")
    out = np.full(p.shape[1], np.nan)
    for j in range(p.shape[1]):
        ok = np.isfinite(p[:, j]) & np.isfinite(t[:, j])
        a, b = p[ok, j], t[ok, j]
        if a.size < MIN_MODELS_PER_QUERY or np.ptp(a) == 0 or np.ptp(b) == 0:
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out[j] = float(spearmanr(a, b).statistic)
    return out


# --------------------------------------------------------------------------------------
# LDS
# --------------------------------------------------------------------------------------


@dataclass
class LDSResult:
    """Linear datamodeling score of one score matrix against retrained models.

    Attributes:
        per_query: float64 ``[n_queries]``: Spearman correlation, over the ``n_models``
            retrained models, between the predicted effect of each model's training subset
            (sum of the query's scores over the kept examples) and ``-loss`` of the query
            under that model. ``nan`` where undefined (constant predictions, e.g. an
            all-zero score row, or constant losses, or < 3 finite models).
        mean: Mean of the finite entries of ``per_query`` (the LDS as usually reported).
        ci_low, ci_high: Percentile-bootstrap confidence interval of ``mean``, resampling
            the finite queries (``n_boot`` resamples, fixed ``seed``; see `bootstrap_ci`).
        confidence: Coverage of the interval (0.95 by default).
        n_queries: Number of queries (rows of the scores), ``nan`` ones included.
        n_models: Number of retrained subsets (seeds of one subset are averaged first).
        n_nan: Queries whose correlation is ``nan`` and is excluded from ``mean``.
        mean_nan_as_zero: Mean with the ``nan`` queries counted as 0 correlation: the
            conservative figure for comparing methods that differ in how often they return
            an all-zero (uninformative) row.
        n_seeds: Training seeds averaged per subset (1 for ``losses`` of shape ``[m, q]``).
        ci_method: How the interval was made (``"bootstrap-percentile over queries"``).
    """

    per_query: Float[np.ndarray, "q"]
    mean: float
    ci_low: float
    ci_high: float
    confidence: float
    n_queries: int
    n_models: int
    n_nan: int
    mean_nan_as_zero: float
    n_seeds: int = 1
    ci_method: str = "bootstrap-percentile over queries"

    @property
    def n_valid(self) -> int:
        """Queries with a finite correlation (those averaged in `mean`)."""
        return self.n_queries - self.n_nan

    def to_dict(self) -> dict[str, Any]:
        """Plain scalars (for JSON / tables); ``per_query`` as a list with ``None`` for nan."""
        return {
            "lds": self.mean, "ci_low": self.ci_low, "ci_high": self.ci_high,
            "confidence": self.confidence, "n_queries": self.n_queries, "n_models": self.n_models,
            "n_seeds": self.n_seeds, "n_nan": self.n_nan, "lds_nan_as_zero": self.mean_nan_as_zero,
            "ci_method": self.ci_method,
            "per_query": [None if not np.isfinite(v) else float(v) for v in self.per_query],
        }

    def __repr__(self) -> str:
        pct = int(round(self.confidence * 100))
        text = (f"LDSResult(lds={self.mean:.4f}, {pct}% CI [{self.ci_low:.4f}, {self.ci_high:.4f}], "
                f"queries={self.n_queries}, models={self.n_models}")
        if self.n_seeds > 1:
            text += f" x {self.n_seeds} seeds"
        if self.n_nan:
            text += f", {self.n_nan} nan queries excluded (lds with nan as 0: {self.mean_nan_as_zero:.4f})"
        return text + ")"


def _average_seeds(losses: np.ndarray) -> tuple[np.ndarray, int]:
    """``[m, q]`` stays; ``[m, s, q]`` -> mean over the seeds (nan seeds ignored) ``[m, q]``."""
    if losses.ndim == 2:
        return losses, 1
    if losses.ndim == 3:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-nan slices stay nan
            return np.nanmean(losses, axis=1), losses.shape[1]
    raise ValueError(f"losses must be [n_models, n_queries] or [n_models, n_seeds, n_queries], got shape {losses.shape}")


def lds(
    scores: ScoresLike,
    masks: Any,
    losses: Any,
    confidence: float = 0.95,
    n_boot: int = 1000,
    seed: int = 0,
) -> LDSResult:
    """Linear datamodeling score (LDS) of ``scores`` against retrained models.

    For query ``q`` and retrained model ``i`` the prediction is the sum of the query's
    scores over the examples model ``i`` was trained on, ``(masks @ scores[q])[i]``
    (scores are "loss lowered", so a larger prediction should mean a lower loss); LDS of
    the query is the Spearman correlation over models of predictions and ``-losses[:, q]``.
    The LDS is the mean over queries; ``nan`` queries (see `LDSResult`) are excluded and
    counted. Random scores give about 0; 1 is a perfect ranking of the subsets.

    Args:
        scores: ``[n_queries, n_train]``: an `Attribution`, tensor or array.
        masks: ``[n_models, n_train]`` bool or 0/1: ``masks[i, j]`` is whether retrained
            model ``i`` saw training example ``j`` (e.g. `draw_subset_masks`).
        losses: ``[n_models, n_queries]`` loss of each query under each retrained model,
            or ``[n_models, n_seeds, n_queries]`` for several training seeds per subset
            (averaged over seeds first, ignoring nan seeds). Non-finite losses (a failed
            model) are dropped for that query.
        confidence: Coverage of the bootstrap interval.
        n_boot: Bootstrap resamples over queries.
        seed: Seed of the bootstrap.

    Returns:
        `LDSResult` with ``per_query [n_queries]``, ``mean``, ``ci_low``, ``ci_high``, ...
    """
    s = _as_scores(scores)
    n_queries, n_train = s.shape
    m, loss, n_seeds = _ground_truth_arrays(masks, losses, n_train, n_queries)
    predictions = m.astype(np.float64) @ s.T  # [m, q]
    per_query = spearman_per_query(predictions, -loss)
    finite = np.isfinite(per_query)
    n_nan = int((~finite).sum())
    mean = float(per_query[finite].mean()) if finite.any() else float("nan")
    low, high = bootstrap_ci(per_query, confidence, n_boot, seed)
    return LDSResult(
        per_query=per_query, mean=mean, ci_low=low, ci_high=high, confidence=confidence,
        n_queries=n_queries, n_models=m.shape[0], n_nan=n_nan,
        mean_nan_as_zero=float(np.where(finite, per_query, 0.0).mean()) if n_queries else float("nan"),
        n_seeds=n_seeds,
    )


def _spearman_columns(p: np.ndarray, t: np.ndarray) -> np.ndarray:
    """`spearman_per_query` for ``[m, q]`` arrays, vectorised when every value is finite (ranks
    with average ties, then Pearson per column; ``nan`` for a constant column or < 3 models)."""
    if not (np.isfinite(p).all() and np.isfinite(t).all()):
        return spearman_per_query(p, t)
    if p.shape[0] < MIN_MODELS_PER_QUERY:
        return np.full(p.shape[1], np.nan)
    rp = rankdata(p, axis=0)
    rt = rankdata(t, axis=0)
    rp -= rp.mean(axis=0)
    rt -= rt.mean(axis=0)
    den = np.sqrt((rp * rp).sum(axis=0) * (rt * rt).sum(axis=0))
    with np.errstate(invalid="ignore", divide="ignore"):
        r = (rp * rt).sum(axis=0) / den
    r[~(den > 0)] = np.nan
    return r


def _ground_truth_arrays(masks: Any, losses: Any, n_train: int,
                         n_queries: int) -> tuple[np.ndarray, np.ndarray, int]:
    """``(masks [m, n] bool, losses [m, q] float64 averaged over seeds, n_seeds)``, checked
    against the scores' shape ``[n_queries, n_train]``."""
    m = _as_masks(masks)
    if isinstance(losses, torch.Tensor):
        losses = losses.detach().cpu().to(torch.float64).numpy()
    loss, n_seeds = _average_seeds(np.asarray(losses, dtype=np.float64))
    if m.shape[1] != n_train:
        raise ValueError(f"masks cover {m.shape[1]} training examples but scores have {n_train}")
    if loss.shape != (m.shape[0], n_queries):
        raise ValueError(f"losses (after averaging seeds) have shape {loss.shape}, expected "
                         f"(n_models={m.shape[0]}, n_queries={n_queries})")
    return m, loss, n_seeds


def lds_replicates(
    scores: Sequence[ScoresLike],
    masks: Any,
    losses: Any,
    n_boot: int = 1000,
    seed: int = 0,
    resample_models: bool = True,
    resample_queries: bool = True,
) -> Float[np.ndarray, "boot methods"]:
    """Bootstrap replicates of the LDS of several score matrices, resampled *together*.

    Each replicate draws the retrained models (rows of ``masks`` / ``losses``) and the queries
    with replacement (either can be switched off), recomputes every query's Spearman
    correlation on the drawn models, and averages over the drawn queries (``nan`` queries count
    as 0, the conservative `LDSResult.mean_nan_as_zero`). The same draw serves every method, so
    differences between columns are paired. Returns ``[n_boot, len(scores)]``."""
    mats = [_as_scores(s) for s in scores]
    if not mats:
        raise ValueError("lds_replicates needs at least one score matrix")
    q, n = mats[0].shape
    if any(x.shape != (q, n) for x in mats):
        raise ValueError(f"every score matrix must have the shape of the first, {(q, n)}")
    m, loss, _ = _ground_truth_arrays(masks, losses, n, q)
    preds = np.stack([m.astype(np.float64) @ x.T for x in mats])  # [methods, m, q]
    n_methods, n_models = len(mats), m.shape[0]
    rng = np.random.default_rng(seed)
    out = np.empty((int(n_boot), n_methods))
    for b in range(int(n_boot)):
        rows = rng.integers(0, n_models, n_models) if resample_models else np.arange(n_models)
        cols = rng.integers(0, q, q) if resample_queries else np.arange(q)
        target = -loss[rows][:, cols]
        # every method's drawn predictions side by side, [m, methods * q]: one ranking call per draw
        drawn = preds[:, rows][:, :, cols].transpose(1, 0, 2).reshape(n_models, n_methods * q)
        rho = _spearman_columns(drawn, np.tile(target, (1, n_methods))).reshape(n_methods, q)
        out[b] = np.nan_to_num(rho, nan=0.0).mean(axis=1)
    return out


def paired_lds_ci(
    scores_a: ScoresLike,
    scores_b: ScoresLike,
    masks: Any,
    losses: Any,
    confidence: float = 0.95,
    n_boot: int = 1000,
    seed: int = 0,
    resample_models: bool = True,
) -> tuple[float, float, float]:
    """LDS of ``scores_a`` minus LDS of ``scores_b`` (``nan`` queries as 0) and its paired
    percentile-bootstrap interval, resampling queries *and* (by default) retrained models, so
    the interval also carries the ground truth's own sampling error. Returns
    ``(difference, low, high)``."""
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    a, b = _as_scores(scores_a), _as_scores(scores_b)
    point = lds_replicates([a, b], masks, losses, n_boot=1, resample_models=False, resample_queries=False)[0]
    reps = lds_replicates([a, b], masks, losses, n_boot=n_boot, seed=seed, resample_models=resample_models)
    diff = reps[:, 0] - reps[:, 1]
    alpha = (1.0 - confidence) / 2.0
    low, high = np.quantile(diff, [alpha, 1.0 - alpha])
    return float(point[0] - point[1]), float(low), float(high)


def seed_to_seed_lds(losses: Any, confidence: float = 0.95, n_boot: int = 1000, seed: int = 0) -> LDSResult:
    """The ground truth's noise ceiling: per query, the Spearman correlation over subsets between
    the losses of two retrains of the same subset with different training seeds
    (``losses [n_models, n_seeds >= 2, n_queries]``; seeds 0 and 1 are compared).

    This is the reliability ``rho`` of a single-seed target (the LDS one seed's *actual* losses
    reach as the "prediction" of the other seed's). With loss = subset effect + seed noise, a
    method that predicted the subset effect exactly would reach a correlation of about
    ``sqrt(rho)`` against one seed's losses and ``sqrt(2 rho / (1 + rho))`` against the mean of two
    seeds (Spearman-Brown; exact for Pearson correlations, approximate for Spearman's): the LDS
    ceiling the ground truth allows. ``mean`` excludes nan queries."""
    if isinstance(losses, torch.Tensor):
        losses = losses.detach().cpu().to(torch.float64).numpy()
    loss = np.asarray(losses, dtype=np.float64)
    if loss.ndim != 3 or loss.shape[1] < 2:
        raise ValueError(f"seed_to_seed_lds needs losses [n_models, n_seeds >= 2, n_queries], got {loss.shape}: "
                         "retrain with retrain_ground_truth(..., n_seeds=2)")
    per_query = spearman_per_query(loss[:, 0, :], loss[:, 1, :])
    finite = np.isfinite(per_query)
    low, high = bootstrap_ci(per_query, confidence, n_boot, seed)
    return LDSResult(per_query=per_query, mean=float(per_query[finite].mean()) if finite.any() else float("nan"),
                     ci_low=low, ci_high=high, confidence=confidence, n_queries=loss.shape[2], n_models=loss.shape[0],
                     n_nan=int((~finite).sum()), mean_nan_as_zero=float(np.where(finite, per_query, 0.0).mean()),
                     n_seeds=2, ci_method="seed 0 vs seed 1 retrains; bootstrap-percentile over queries")


# --------------------------------------------------------------------------------------
# Retraining ground truth
# --------------------------------------------------------------------------------------


def draw_subset_masks(n_train: int, n_models: int, fraction: float = 0.5, seed: int = 0) -> Bool[np.ndarray, "m n"]:
    """Random training subsets for LDS: ``[n_models, n_train]`` bool.

    Every subset holds exactly ``max(1, round(fraction * n_train))`` examples, drawn
    uniformly without replacement, independently per model, from
    ``numpy.random.default_rng(seed)``. Masks are drawn one after the other, so the first
    ``k`` masks do not depend on ``n_models``. (These subsets are the evaluation's, not
    STRIDE's operator subsets: use a seed unrelated to the design's.)
    """
    if n_train < 1 or n_models < 1:
        raise ValueError(f"n_train and n_models must be >= 1, got {n_train} and {n_models}")
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    size = max(1, int(round(fraction * n_train)))
    rng = np.random.default_rng(seed)
    masks = np.zeros((n_models, n_train), dtype=bool)
    for i in range(n_models):
        masks[i, rng.choice(n_train, size=size, replace=False)] = True
    return masks


def _train_seed(seed: int, model: int, rep: int) -> int:
    """The seed passed to ``train_fn`` for subset ``model``, repetition ``rep`` (a 31-bit int)."""
    state = np.random.SeedSequence([seed, model, rep]).generate_state(1, dtype=np.uint32)[0]
    return int(state) & 0x7FFFFFFF


def _mask_digest(mask: np.ndarray) -> str:
    return hashlib.sha256(np.packbits(mask.astype(bool)).tobytes()).hexdigest()[:16]


@dataclass
class RetrainingGroundTruth:
    """Query losses of models retrained from scratch on random subsets (LDS ground truth).

    Attributes:
        masks: bool ``[n_models, n_train]``: the examples each model was trained on.
        losses: float64 ``[n_models, n_queries]`` (``n_seeds == 1``) or
            ``[n_models, n_seeds, n_queries]``: ``eval_fn`` of each retrained model.
        train_seeds: int64 ``[n_models, n_seeds]``: the seed passed to ``train_fn``.
        settings: ``n_train, n_models, fraction, seed, n_seeds`` (+ ``extra``), as in the
            cache manifest.
    """

    masks: Bool[np.ndarray, "m n"]
    losses: np.ndarray
    train_seeds: np.ndarray
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def n_models(self) -> int:
        return self.masks.shape[0]

    @property
    def n_train(self) -> int:
        return self.masks.shape[1]

    @property
    def n_queries(self) -> int:
        return self.losses.shape[-1]

    def lds(self, scores: ScoresLike, confidence: float = 0.95, n_boot: int = 1000, seed: int = 0) -> LDSResult:
        """`lds` of ``scores`` against these models."""
        return lds(scores, self.masks, self.losses, confidence=confidence, n_boot=n_boot, seed=seed)

    def __repr__(self) -> str:
        s = self.settings
        return (f"RetrainingGroundTruth(models={self.n_models}, train={self.n_train}, queries={self.n_queries}, "
                f"fraction={s.get('fraction')}, seeds_per_subset={s.get('n_seeds', 1)}, seed={s.get('seed')})")


def _check_manifest(path: Path, manifest: dict[str, Any]) -> None:
    """Write the manifest if absent; raise if the one on disk differs."""
    if path.exists():
        try:
            found = storage.read_json(path)
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"cannot read the retraining cache manifest {path}: {e}") from e
        if found != manifest:
            diff = {k: (found.get(k), manifest.get(k)) for k in sorted(set(found) | set(manifest))
                    if found.get(k) != manifest.get(k)}
            details = ", ".join(f"{k}: cache has {a!r}, requested {b!r}" for k, (a, b) in diff.items())
            raise ValueError(
                f"the retraining cache {path.parent} was made with other settings ({details}). "
                "Use another cache_dir, or delete this one to start over."
            )
        return
    stray = sorted(path.parent.glob("retrain_*.npz"))
    if stray:
        raise ValueError(f"the retraining cache {path.parent} holds {len(stray)} result files but no manifest.json: "
                         "cannot tell which settings made them. Use another cache_dir or delete it.")
    storage.write_manifest(path, manifest)


def retrain_ground_truth(
    train_fn: TrainFn,
    eval_fn: EvalFn,
    n_train: int,
    n_models: int,
    fraction: float = 0.5,
    seed: int = 0,
    cache_dir: Optional[Union[str, os.PathLike]] = None,
    progress: bool = True,
    n_seeds: int = 1,
    extra: Optional[dict[str, Any]] = None,
    reuse_dir: Optional[Union[str, os.PathLike]] = None,
) -> RetrainingGroundTruth:
    """Retrain on random subsets and record every query's loss (ground truth for `lds`).

    Masks come from ``draw_subset_masks(n_train, n_models, fraction, seed)``. For mask
    ``i`` and repetition ``r < n_seeds``: ``model = train_fn(indices, train_seed)`` with
    ``indices = np.flatnonzero(masks[i])`` (sorted ``int64``) and ``train_seed`` a fixed
    function of ``(seed, i, r)`` (different for every model), then
    ``losses = eval_fn(model)`` (``[n_queries]``); the model is then dropped. Cost:
    ``n_models * n_seeds`` trainings, one after the other.

    Resumable: with ``cache_dir``, a ``manifest.json`` of the settings (``n_train,
    n_models, fraction, seed, n_seeds, extra``) is written first and each finished
    retrain is saved at once to ``retrain_{i:05d}_s{r}.npz`` (losses, seed, a digest of
    the mask; written to a temporary file and renamed, so a crash never leaves a partial
    file). A rerun with the same settings loads the finished ones and trains only the
    missing ones; an exception in ``train_fn``/``eval_fn`` propagates after the finished
    ones are safe on disk. A manifest with other settings raises ``ValueError``.

    Args:
        train_fn: ``(indices [k] int64, seed int) -> model``: trains from scratch.
        eval_fn: ``model -> [n_queries]`` query losses (array, tensor or list).
        n_train: Size of the training set.
        n_models: Number of subsets (the paper uses 256 subsets of 30%).
        fraction: Fraction of the training set in each subset.
        seed: Seed of the masks and of the training seeds.
        cache_dir: Folder for the resumable cache (created if missing); ``None``: no cache.
        progress: Show a tqdm progress bar over retrains.
        n_seeds: Trainings per subset with different seeds (losses then ``[m, s, q]``;
            `lds` averages them).
        extra: JSON-serialisable settings that also identify the run (model config,
            query set, training hyper-parameters ...); stored in and checked against the
            manifest, so a cache made for other queries is not silently reused.
        reuse_dir: another cache of the same masks and seed (e.g. the single-seed cache when
            adding a second seed, or a cache of fewer subsets when adding subsets: masks are
            drawn one after the other, so subset ``i`` is the same whatever ``n_models``): its
            finished retrains of matching (subset, seed) files are hard-linked (or copied) into
            ``cache_dir`` instead of retrained. Only files whose mask digest and training seed
            match are taken, and only when that cache's manifest agrees on everything but
            ``n_seeds`` and ``n_models``; needs ``cache_dir``.

    Returns:
        `RetrainingGroundTruth` with ``masks [m, n]`` and ``losses [m, q]`` (or ``[m, s, q]``).
    """
    if n_seeds < 1:
        raise ValueError(f"n_seeds must be >= 1, got {n_seeds}")
    if seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed}")
    masks = draw_subset_masks(n_train, n_models, fraction, seed)
    settings: dict[str, Any] = {
        "format": 1, "n_train": int(n_train), "n_models": int(n_models), "fraction": float(fraction),
        "seed": int(seed), "n_seeds": int(n_seeds), "extra": json.loads(json.dumps(extra)) if extra else None,
    }
    seeds = np.array([[_train_seed(seed, i, r) for r in range(n_seeds)] for i in range(n_models)], dtype=np.int64)
    digests = [_mask_digest(masks[i]) for i in range(n_models)]

    cache = Path(cache_dir) if cache_dir is not None else None
    done: dict[tuple[int, int], np.ndarray] = {}
    n_queries: Optional[int] = None
    if reuse_dir is not None and cache is None:
        raise ValueError("reuse_dir needs a cache_dir to link the reused retrains into")
    if cache is not None:
        cache.mkdir(parents=True, exist_ok=True)
        _check_manifest(cache / "manifest.json", settings)
        if reuse_dir is not None:
            _reuse_retrains(Path(reuse_dir), cache, settings, n_models, n_seeds, seeds, digests)
        for i in range(n_models):
            for r in range(n_seeds):
                path = cache / f"retrain_{i:05d}_s{r}.npz"
                if not path.exists():
                    continue
                try:
                    z = storage.read_arrays(path, ("losses", "mask_digest", "train_seed"))
                    loss = np.asarray(z["losses"], dtype=np.float64)
                    digest, file_seed = str(z["mask_digest"]), int(z["train_seed"])
                except Exception as e:  # unreadable file: train it again
                    warnings.warn(f"ignoring unreadable retraining result {path} ({e}); it will be retrained")
                    continue
                if digest != digests[i] or file_seed != seeds[i, r]:
                    raise ValueError(f"{path} does not match the subset/seed it should hold (the mask RNG or "
                                     "seed derivation changed?): delete the cache to start over")
                if n_queries is not None and loss.shape[0] != n_queries:
                    raise ValueError(f"{path} holds {loss.shape[0]} query losses, other files {n_queries}")
                n_queries = loss.shape[0]
                done[(i, r)] = loss

    total = n_models * n_seeds
    bar = tqdm(total=total, initial=len(done), disable=not progress, desc="retraining", unit="model")
    try:
        for i in range(n_models):
            indices = np.flatnonzero(masks[i]).astype(np.int64)
            for r in range(n_seeds):
                if (i, r) in done:
                    continue
                model = train_fn(indices, int(seeds[i, r]))
                loss = _as_loss_vector(eval_fn(model), n_queries, f"model {i} (seed {r})")
                del model
                n_queries = loss.shape[0]
                if cache is not None:
                    path = cache / f"retrain_{i:05d}_s{r}.npz"
                    storage.write_arrays(path, losses=loss, train_seed=np.int64(seeds[i, r]),
                                         mask_digest=np.str_(digests[i]), model=np.int64(i), rep=np.int64(r))
                done[(i, r)] = loss
                bar.update(1)
    finally:
        bar.close()

    assert n_queries is not None
    losses = np.empty((n_models, n_seeds, n_queries))
    for (i, r), loss in done.items():
        losses[i, r] = loss
    return RetrainingGroundTruth(masks=masks, losses=losses[:, 0] if n_seeds == 1 else losses,
                                 train_seeds=seeds, settings=settings)


def _reuse_retrains(source: Path, cache: Path, settings: dict[str, Any], n_models: int, n_seeds: int,
                    seeds: np.ndarray, digests: list[str]) -> None:
    """Link (or copy) ``source``'s finished retrains that this run needs into ``cache``."""
    try:
        theirs = storage.read_json(source / "manifest.json")
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"reuse_dir {source} has no readable manifest.json ({e})") from e
    free = ("n_seeds", "n_models")  # subset i and its training seeds do not depend on either
    mine = {k: v for k, v in settings.items() if k not in free}
    if {k: v for k, v in theirs.items() if k not in free} != mine:
        raise ValueError(f"reuse_dir {source} was made with other settings than this run (apart from n_seeds and "
                         "n_models): its retrains cannot be reused")
    for i in range(min(n_models, int(theirs.get("n_models", n_models)))):
        for r in range(min(n_seeds, int(theirs.get("n_seeds", 1)))):
            name = f"retrain_{i:05d}_s{r}.npz"
            src, dst = source / name, cache / name
            if dst.exists() or not src.exists():
                continue
            try:
                z = storage.read_arrays(src, ("mask_digest", "train_seed"))
                ok = str(z["mask_digest"]) == digests[i] and int(z["train_seed"]) == int(seeds[i, r])
            except Exception:  # unreadable: leave it, it will be retrained
                continue
            if ok:
                storage.link_or_copy(src, dst)


# --------------------------------------------------------------------------------------
# Fact tracing
# --------------------------------------------------------------------------------------

_TIES = ("expected", "pessimistic", "optimistic")


def _expected_inverse_rank(greater: int, group: int, n_rel: int) -> tuple[float, float]:
    """``E[1/rank]`` and ``E[rank]`` of the first of ``n_rel`` relevant docs placed uniformly
    at random among ``group`` tied docs that follow ``greater`` higher-scored docs."""
    x = np.arange(1, group - n_rel + 2, dtype=np.float64)  # position of the first relevant in the group
    # P(X = x) = C(group - x, n_rel - 1) / C(group, n_rel)
    logc = (gammaln(group - x + 1) - gammaln(n_rel) - gammaln(group - x - n_rel + 2)
            - (gammaln(group + 1) - gammaln(n_rel + 1) - gammaln(group - n_rel + 1)))
    p = np.exp(logc)
    p /= p.sum()
    return float((p / (greater + x)).sum()), float(greater + (group + 1) / (n_rel + 1))


def _trace_one(row: np.ndarray, rel: np.ndarray, ks: Sequence[int], ties: str) -> tuple[list[float], float, float]:
    """Recall at each k, reciprocal rank and rank (1-based) of the first relevant doc, for one query."""
    n = row.shape[0]
    is_rel = np.zeros(n, dtype=bool)
    is_rel[rel] = True
    if ties == "expected":
        # position of a relevant doc is uniform within its tie group
        neg = np.sort(-row)  # ascending negated scores = descending scores
        greater = np.searchsorted(neg, -row[rel], side="left")          # docs scored strictly higher
        equal = np.searchsorted(neg, -row[rel], side="right") - greater  # tie group size (itself included)
        recalls = [float(np.clip((min(k, n) - greater) / equal, 0.0, 1.0).mean()) for k in ks]
        top = row[rel].max()
        g_top = int(np.sum(row > top))
        e_top = int(np.sum(row == top))
        r_top = int(np.sum(row[rel] == top))
        rr, rank = _expected_inverse_rank(g_top, e_top, r_top)
        return recalls, rr, rank
    # deterministic tie-breaking: relevant docs last (pessimistic) or first (optimistic) among ties
    secondary = is_rel if ties == "pessimistic" else ~is_rel
    order = np.lexsort((secondary, -row))  # last key is primary
    ranks = np.empty(n, dtype=np.int64)
    ranks[order] = np.arange(1, n + 1)
    rel_ranks = ranks[rel]
    recalls = [float(np.mean(rel_ranks <= k)) for k in ks]
    first = int(rel_ranks.min())
    return recalls, 1.0 / first, float(first)


def fact_tracing(
    scores: ScoresLike,
    relevant: Sequence[Sequence[int]],
    ks: Sequence[int] = (1, 5, 10),
    ties: str = "expected",
) -> dict[str, Any]:
    """Recall@k and MRR of known relevant training documents in each query's ranking.

    Each query's training examples are ranked by descending score (rank 1 = strongest
    proponent). ``recall@k`` of a query is ``|top-k ∩ relevant| / |relevant|``, ``mrr``
    the mean over queries of ``1 / rank`` of its best-ranked relevant document.

    Ties matter: sparse (Lasso) scores are often exactly 0 for most examples, and a
    constant row would otherwise rank documents by index. ``ties="expected"`` (default)
    reports the exact expectation under uniformly random tie-breaking (a relevant doc
    tied with ``e`` docs right after ``g`` higher ones is in the top-k with probability
    ``clip((k-g)/e, 0, 1)``); ``"pessimistic"`` / ``"optimistic"`` put relevant docs last
    / first among ties. An all-constant row thus scores exactly the random baseline.

    Args:
        scores: ``[n_queries, n_train]`` (`Attribution`, tensor or array).
        relevant: One sequence of training indices per query (e.g. ``fact.source_ids``);
            each must be non-empty; duplicates are ignored.
        ks: Cut-offs ``k`` for recall@k (a ``k`` above ``n_train`` counts as ``n_train``).
        ties: ``"expected"``, ``"pessimistic"`` or ``"optimistic"``.

    Returns:
        dict with ``"recall@k"`` (float, one key per k), ``"mrr"`` (float),
        ``"n_queries"``, ``"ties"``, ``"per_query"``: dict of float64 ``[n_queries]``
        arrays ``"recall@k"``, ``"reciprocal_rank"`` and ``"first_rank"`` (1-based rank of
        the first relevant doc; expected rank under ``"expected"``), and ``"random"``:
        the same metrics for a uniformly random ranking (``"recall@k"`` = k / n_train,
        ``"mrr"`` = mean of `random_mrr` over queries).
    """
    if ties not in _TIES:
        raise ValueError(f"ties must be one of {_TIES}, got {ties!r}")
    s = _as_scores(scores)
    n_queries, n_train = s.shape
    if len(relevant) != n_queries:
        raise ValueError(f"relevant has {len(relevant)} entries, expected one per query ({n_queries})")
    if not np.isfinite(s).all():
        raise ValueError("scores contain nan or inf: cannot rank training examples")
    ks = [int(k) for k in ks]
    if any(k < 1 for k in ks):
        raise ValueError(f"every k must be >= 1, got {ks}")
    recalls = np.zeros((len(ks), n_queries))
    rr = np.zeros(n_queries)
    first = np.zeros(n_queries)
    random_rr = np.zeros(n_queries)
    for q in range(n_queries):
        rel = np.unique(np.asarray(list(relevant[q]), dtype=np.int64))
        if rel.size == 0:
            raise ValueError(f"query {q} has no relevant documents: fact tracing needs at least one per query")
        if rel.min() < 0 or rel.max() >= n_train:
            raise ValueError(f"query {q}: relevant indices must be in [0, {n_train}), got {rel.tolist()}")
        rec, rr[q], first[q] = _trace_one(s[q], rel, ks, ties)
        recalls[:, q] = rec
        random_rr[q] = random_mrr(n_train, rel.size)
    out: dict[str, Any] = {f"recall@{k}": float(recalls[i].mean()) for i, k in enumerate(ks)}
    out["mrr"] = float(rr.mean())
    out["n_queries"] = n_queries
    out["ties"] = ties
    out["per_query"] = {**{f"recall@{k}": recalls[i] for i, k in enumerate(ks)},
                        "reciprocal_rank": rr, "first_rank": first}
    out["random"] = {**{f"recall@{k}": random_recall_at_k(n_train, 1, k) for k in ks},
                     "mrr": float(random_rr.mean())}
    return out


def random_recall_at_k(n_train: int, n_relevant: int, k: int) -> float:
    """Expected recall@k of a uniformly random ranking: ``min(k, n_train) / n_train``.

    Each relevant doc is in a random top-k with probability ``k/n``, so the expected
    fraction of the ``n_relevant`` relevant docs found is ``k/n`` whatever ``n_relevant``
    (which is only checked).
    """
    if n_train < 1 or not 1 <= n_relevant <= n_train or k < 1:
        raise ValueError(f"need n_train >= 1, 1 <= n_relevant <= n_train, k >= 1; got {n_train}, {n_relevant}, {k}")
    return min(k, n_train) / n_train


def random_mrr(n_train: int, n_relevant: int) -> float:
    """Expected reciprocal rank of the first of ``n_relevant`` relevant docs in a random ranking of ``n_train``."""
    if n_train < 1 or not 1 <= n_relevant <= n_train:
        raise ValueError(f"need n_train >= 1 and 1 <= n_relevant <= n_train; got {n_train}, {n_relevant}")
    return _expected_inverse_rank(0, n_train, n_relevant)[0]


# --------------------------------------------------------------------------------------
# Counterfactual removal
# --------------------------------------------------------------------------------------


def counterfactual_removal(
    scores: ScoresLike,
    train_fn: TrainFn,
    eval_fn: EvalFn,
    k: int,
    n_random: int = 5,
    seed: int = 0,
    query_indices: Optional[Sequence[int]] = None,
    progress: bool = True,
    base_losses: Optional[Any] = None,
) -> dict[str, Any]:
    """Loss rise of each query when its top-k proponents are removed, vs k random examples.

    1. Full model: ``train_fn(all indices, seed)``, ``eval_fn`` -> base losses ``[n_queries]``
       (skipped when ``base_losses`` is given).
    2. For each evaluated query ``q``: remove its ``k`` highest-scored training examples
       (strongest proponents; ties broken by index; examples with score <= 0 are removed
       too if fewer than ``k`` are positive), retrain ``train_fn(kept, seed)`` and record
       ``loss[q] - base[q]``. One retrain per query.
    3. Random baseline: ``n_random`` retrains, each without ``k`` uniformly random
       examples (``numpy.random.default_rng(seed)``). A random removal does not depend on
       the query, so each such retrain gives the random loss rise of *every* query at
       once; the per-query baseline is the mean over the ``n_random`` removals.

    Every retrain uses the same training ``seed`` (common random numbers), so the
    differences come from the data removed and not from the training noise.
    Cost: ``1 + len(query_indices) + n_random`` trainings.

    Args:
        scores: ``[n_queries, n_train]`` (positive = proponent).
        train_fn: ``(indices [n_kept] int64 sorted, seed) -> model``.
        eval_fn: ``model -> [n_queries]`` query losses.
        k: Examples removed per query (1 <= k < n_train).
        n_random: Random removals (>= 1).
        seed: Training seed and seed of the random removals.
        query_indices: Queries to evaluate (rows of ``scores``); ``None``: all.
        progress: tqdm progress bar over retrains.
        base_losses: ``[n_queries]`` losses of the model trained on everything with ``seed``,
            if already known.

    Returns:
        dict with ``"k"``, ``"query_indices"`` int ``[p]``, ``"removed"`` int ``[p, k]``,
        ``"base_loss"``, ``"topk_loss"``, ``"topk_rise"``, ``"random_rise"`` (mean over the
        random removals), ``"rise_over_random"`` (``topk_rise - random_rise``), all float64
        ``[p]``; ``"random_rise_all"`` ``[n_random, p]``; scalars ``"mean_topk_rise"``,
        ``"mean_random_rise"``, ``"frac_topk_above_random"`` (queries whose top-k rise exceeds
        their random rise) and ``"n_retrains"``.
    """
    s = _as_scores(scores)
    n_queries, n_train = s.shape
    if not 1 <= k < n_train:
        raise ValueError(f"k must be in [1, n_train={n_train}), got {k}")
    if n_random < 1:
        raise ValueError(f"n_random must be >= 1, got {n_random}")
    qs = np.arange(n_queries) if query_indices is None else np.asarray(list(query_indices), dtype=np.int64)
    if qs.size and (qs.min() < -n_queries or qs.max() >= n_queries):
        raise ValueError(f"query_indices must be in [0, {n_queries})")
    qs = qs % n_queries
    all_idx = np.arange(n_train, dtype=np.int64)

    n_retrains = len(qs) + n_random + (base_losses is None)
    bar = tqdm(total=n_retrains, disable=not progress, desc="counterfactual removal", unit="model")

    def losses_without(removed: np.ndarray, what: str) -> np.ndarray:
        kept = np.setdiff1d(all_idx, removed, assume_unique=True)
        loss = _as_loss_vector(eval_fn(train_fn(kept, int(seed))), n_queries, what)
        bar.update(1)
        return loss

    try:
        if base_losses is None:
            base = losses_without(np.empty(0, dtype=np.int64), "full model")
        else:
            base = _as_loss_vector(base_losses, n_queries, "base_losses")
        removed = np.stack([np.argsort(-s[q], kind="stable")[:k] for q in qs]) if len(qs) else \
            np.empty((0, k), dtype=np.int64)
        topk_loss = np.array([losses_without(removed[i], f"query {q} top-{k} removed")[q]
                              for i, q in enumerate(qs)], dtype=np.float64)
        rng = np.random.default_rng(seed)
        random_all = np.stack([
            losses_without(np.sort(rng.choice(n_train, size=k, replace=False)), f"random removal {r}")[qs]
            for r in range(n_random)
        ]) - base[qs][None, :]
    finally:
        bar.close()

    topk_rise = topk_loss - base[qs]
    random_rise = random_all.mean(axis=0)
    return {
        "k": int(k),
        "query_indices": qs,
        "removed": removed.astype(np.int64),
        "base_loss": base[qs],
        "topk_loss": topk_loss,
        "topk_rise": topk_rise,
        "random_rise": random_rise,
        "random_rise_all": random_all,
        "rise_over_random": topk_rise - random_rise,
        "mean_topk_rise": float(topk_rise.mean()) if len(qs) else float("nan"),
        "mean_random_rise": float(random_rise.mean()) if len(qs) else float("nan"),
        "frac_topk_above_random": float((topk_rise > random_rise).mean()) if len(qs) else float("nan"),
        "n_retrains": int(n_retrains),
    }
