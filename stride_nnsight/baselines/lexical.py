"""BM25: lexical overlap between the query (prompt + completion, or either part) and each training text."""

from __future__ import annotations

import re
from typing import Any, Optional, Sequence

import numpy as np
import torch

from ..results import Attribution
from ._common import base_provenance, check_inputs, require

__all__ = ["bm25", "word_tokenize"]

_WORD = re.compile(r"\w+")

#: What `bm25` reads as the query text.
QUERY_PARTS = ("prompt+completion", "completion", "prompt")


def word_tokenize(text: str) -> list[str]:
    """Lowercase word tokens (``\\w+`` runs): ``"The cat's mat."`` -> ``["the", "cat", "s", "mat"]``."""
    return _WORD.findall(text.lower())


def bm25(
    train_texts: Any,
    prompts: Sequence[str],
    completions: Sequence[str],
    *,
    k1: float = 1.5,
    b: float = 0.75,
    epsilon: float = 0.25,
    query: str = "prompt+completion",
    query_ids: Optional[Sequence[Any]] = None,
    train_ids: Optional[Sequence[Any]] = None,
) -> Attribution:
    """Okapi BM25 scores of every training text for every query (``rank_bm25.BM25Okapi``).

    ``query`` chooses the query text: ``"prompt+completion"`` (default), ``"completion"``
    (only the words whose loss is attributed; the stronger variant on the benchmarks here,
    docs/baselines.md) or ``"prompt"``. Query and documents are tokenized with
    `word_tokenize` (lowercase ``\\w+`` words). ``scores[q, j] >= 0``, higher = more
    lexical overlap (read as a proponent). ``epsilon`` is rank_bm25's floor for the idf
    of terms found in more than half of the documents (``epsilon * mean idf``).
    No model is involved, so the provenance carries no model fingerprint.
    """
    rank_bm25 = require("rank_bm25", "rank-bm25")
    if query not in QUERY_PARTS:
        raise ValueError(f"bm25: query={query!r} is not one of {QUERY_PARTS}")
    train, prompts, completions, qids, tids = check_inputs(train_texts, prompts, completions, query_ids, train_ids)
    corpus = [word_tokenize(t) for t in train]
    if not any(corpus):
        raise ValueError("bm25: no training text contains a word")
    index = rank_bm25.BM25Okapi(corpus, k1=k1, b=b, epsilon=epsilon)
    parts = {"prompt+completion": lambda p, c: p + c, "completion": lambda p, c: c, "prompt": lambda p, c: p}[query]
    queries = [parts(p, c) for p, c in zip(prompts, completions)]
    empty = [i for i, q in enumerate(queries) if not word_tokenize(q)] if query != "prompt+completion" else []
    if empty:
        raise ValueError(f"bm25: query={query!r} leaves {len(empty)} queries without a word (first: index {empty[0]}, "
                         f"{queries[empty[0]]!r}), so they would score every text 0; use query='prompt+completion'")
    scores = np.stack([np.asarray(index.get_scores(word_tokenize(q)), dtype=np.float64) for q in queries])
    return Attribution(
        scores=torch.from_numpy(scores.astype(np.float32)),
        query_ids=qids,
        train_ids=tids,
        query_texts=queries,
        train_texts=train,
        provenance=base_provenance("bm25", k1=k1, b=b, epsilon=epsilon, query=query,
                                   tokenization="lowercase \\w+ words", implementation="rank_bm25.BM25Okapi"),
    )
