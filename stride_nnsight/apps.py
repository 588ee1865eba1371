"""Downstream uses of an `Attribution`: choosing training data and flagging contamination.

Both work from scores alone (any method's `Attribution`), so they compose with STRIDE, the
baselines and `Attribution.cat`; the functions state exactly what they compute. What they buy
is measured on the public benchmark by ``python -m benchmarks.data_selection`` (retraining on
the selected half; `benchmarks/RESULTS-data-selection.md`) and ``python -m
benchmarks.contamination`` (planted verbatim, paraphrased and absent items against loss,
Min-K%, zlib and BM25; `benchmarks/RESULTS-contamination.md`).
"""

from __future__ import annotations

from typing import Optional, Union

import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor

from .results import Attribution

__all__ = ["SELECTION_RULES", "select_documents", "contamination_scores"]

SELECTION_RULES = ("total", "per_query", "mean_rank")


def _budget(budget: Union[int, float], n: int) -> int:
    if isinstance(budget, bool) or not isinstance(budget, (int, float)):
        raise TypeError(f"budget must be a number of documents (int) or a fraction of them (float), got {budget!r}")
    if isinstance(budget, float):
        if not 0.0 < budget <= 1.0:
            raise ValueError(f"a fractional budget must lie in (0, 1], got {budget}")
        return max(1, int(round(budget * n)))
    if not 1 <= budget <= n:
        raise ValueError(f"budget must be between 1 and the {n} training documents, got {budget}")
    return int(budget)


def select_documents(attr: Attribution, budget: Union[int, float], rule: str = "total") -> Int[Tensor, "k"]:
    """Training documents (column positions) that most support the queries of ``attr``.

    The queries stand for the behaviour to improve (a target set); the selection keeps the
    documents that lower their loss. ``budget``: how many documents (an int) or which fraction of
    the corpus (a float in (0, 1]).

    Rules:
        ``"total"``: rank documents by their summed positive score over the queries (proponent
            mass); ties and documents with no positive score keep corpus order.
        ``"per_query"``: round robin over the queries, each taking its next strongest proponent
            not yet chosen, so no single query dominates the budget.
        ``"mean_rank"``: rank documents within each query (1 = largest score, ties share the
            mean rank) and keep the lowest mean rank over queries.

    When the proponents run out before the budget, the rest is filled in corpus order from the
    documents with no positive score (``"total"``, ``"per_query"``). Non-finite rows are refused.
    Returns int64 ``[budget]`` column positions (use ``attr.train_ids`` for ids), no repeats.
    """
    if rule not in SELECTION_RULES:
        raise ValueError(f"unknown selection rule {rule!r}: use one of {SELECTION_RULES}")
    bad = [attr.query_ids[i] for i, s in enumerate(attr.row_status()) if s == "non_finite"]
    if bad:
        raise ValueError(f"queries {bad} have non-finite scores: drop them before selecting (attr[rows])")
    n = attr.n_train
    k = _budget(budget, n)
    scores = attr.scores.numpy().astype(np.float64)  # [q, n]
    if rule == "total":
        mass = np.clip(scores, 0.0, None).sum(axis=0)
        order = np.argsort(-mass, kind="stable")
    elif rule == "mean_rank":
        from scipy.stats import rankdata

        ranks = rankdata(-scores, axis=1, method="average")
        order = np.argsort(ranks.mean(axis=0), kind="stable")
    else:
        queues = [[j for j in np.argsort(-row, kind="stable") if row[j] > 0] for row in scores]
        chosen: list[int] = []
        taken = np.zeros(n, dtype=bool)
        while len(chosen) < k and any(queues):
            for queue in queues:
                while queue and taken[queue[0]]:
                    queue.pop(0)
                if queue and len(chosen) < k:
                    j = queue.pop(0)
                    taken[j] = True
                    chosen.append(int(j))
        rest = [j for j in range(n) if not taken[j]]
        order = np.asarray(chosen + rest, dtype=np.int64)
    return torch.from_numpy(np.asarray(order[:k], dtype=np.int64))


def contamination_scores(attr: Attribution, floor: Optional[Float[Tensor, "q"]] = None) -> Float[Tensor, "q"]:
    """How strongly each query (an evaluation item) is traced to single training documents:
    its largest positive score over its noise floor (``attr.noise_floor``, or ``floor``).

    A verbatim or lightly paraphrased copy of an evaluation item in the corpus tends to be a
    strong, isolated proponent of it; an item the corpus does not contain gets scores at noise
    level (a ratio near or below 1). Rank or threshold these to flag likely contamination; 0
    for a query without a positive score. Raises ``ValueError`` when no floor is known
    (attribute with ``null_permutations > 0``). Returns float32 ``[q]``."""
    floor = attr.noise_floor if floor is None else torch.as_tensor(floor, dtype=torch.float32)
    if floor is None:
        raise ValueError("contamination_scores needs each query's noise floor: attribute with "
                         "stride.attribute(..., null_permutations=8) (the default) or pass floor=")
    if floor.shape != (attr.n_queries,):
        raise ValueError(f"floor must have one value per query ({attr.n_queries}), got shape {tuple(floor.shape)}")
    out = torch.zeros(attr.n_queries)
    for q in range(attr.n_queries):
        top = float(attr._row(q).max()) if attr.n_train else 0.0
        if top > 0:
            out[q] = top / float(floor[q]) if float(floor[q]) > 0 else float("inf")
    return out
