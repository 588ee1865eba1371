"""The result object: an influence matrix with named axes and its provenance."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from jaxtyping import Float
from torch import Tensor

__all__ = ["Attribution"]

DIMS = ("query", "train")


def _short(text: Optional[str], width: int = 60) -> str:
    if text is None:
        return ""
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 3] + "..."


@dataclass
class Attribution:
    """Influence of every training example on every query.

    Attributes:
        scores: float32 tensor ``[n_queries, n_train]`` (dims ``("query", "train")``).
            ``scores[q, j] > 0``: training example ``j`` is a *proponent* of query ``q``
            (its subsets' operators raise the query's metric, i.e. lower its loss);
            ``< 0``: an opponent. Units: change of the metric (nats of loss for the
            default metric) attributed to the example.
        query_ids, train_ids: identifiers of the rows / columns.
        query_texts, train_texts: optional texts (prompt + completion for queries).
        provenance: how the scores were made (method, layer, hook, placement, K, d,
            rank, lambdas, seeds, model fingerprint, ...).
        measurements: optional raw measurements ``[n_queries, K]`` they were recovered from.
    """

    scores: Float[Tensor, "query train"]
    query_ids: list[Any]
    train_ids: list[Any]
    query_texts: Optional[list[str]] = None
    train_texts: Optional[list[str]] = None
    provenance: dict[str, Any] = field(default_factory=dict)
    measurements: Optional[Float[Tensor, "query K"]] = None

    dims = DIMS

    def __post_init__(self) -> None:
        if not isinstance(self.scores, Tensor):
            self.scores = torch.as_tensor(self.scores)
        self.scores = self.scores.detach().to(torch.float32).cpu()
        if self.scores.dim() != 2:
            raise ValueError(f"scores must be 2-D [n_queries, n_train], got shape {tuple(self.scores.shape)}")
        q, n = self.scores.shape
        self.query_ids = list(self.query_ids) if self.query_ids is not None else list(range(q))
        self.train_ids = list(self.train_ids) if self.train_ids is not None else list(range(n))
        if len(self.query_ids) != q or len(self.train_ids) != n:
            raise ValueError(
                f"ids do not match scores {tuple(self.scores.shape)}: {len(self.query_ids)} query ids, "
                f"{len(self.train_ids)} train ids"
            )
        for name, texts, size in (("query_texts", self.query_texts, q), ("train_texts", self.train_texts, n)):
            if texts is not None and len(texts) != size:
                raise ValueError(f"{name} has {len(texts)} entries, expected {size}")

    # ------------------------------------------------------------------ basics
    @property
    def shape(self) -> torch.Size:
        return self.scores.shape

    @property
    def n_queries(self) -> int:
        return self.scores.shape[0]

    @property
    def n_train(self) -> int:
        return self.scores.shape[1]

    def __len__(self) -> int:
        return self.n_queries

    def axis(self, dim: str) -> int:
        """Position of a named axis: ``axis("query") == 0``, ``axis("train") == 1``."""
        if dim not in DIMS:
            raise KeyError(f"unknown axis {dim!r}: the axes are {DIMS}")
        return DIMS.index(dim)

    def sel(self, query: Any = None, train: Any = None) -> Tensor:
        """Scores selected by *ids* along the named axes (xarray style).

        ``query`` / ``train`` may be one id (that axis is dropped) or a list of ids;
        ``None`` keeps the whole axis. ``attr.sel(query="q1", train=[3, 7])`` -> ``[2]``.
        """
        out = self.scores
        for dim, ids, wanted in (("query", self.query_ids, query), ("train", self.train_ids, train)):
            if wanted is None:
                continue
            lookup = {key: i for i, key in enumerate(ids)}
            many = isinstance(wanted, (list, tuple))
            keys = list(wanted) if many else [wanted]
            missing = [key for key in keys if key not in lookup]
            if missing:
                raise KeyError(f"no {dim} with id(s) {missing}")
            index = torch.tensor([lookup[key] for key in keys])
            axis = self.axis(dim) - (0 if out.dim() == 2 else 1)
            out = out.index_select(axis, index)
            if not many:
                out = out.squeeze(axis)
        return out

    def __getitem__(self, index: int | slice | Sequence[int] | Tensor) -> "Attribution":
        """Select queries (rows); the result is again an ``Attribution``."""
        if isinstance(index, int):
            index = [index]
        rows = list(range(self.n_queries))[index] if isinstance(index, slice) else \
            [int(i) for i in torch.as_tensor(index).reshape(-1).tolist()]
        return Attribution(
            scores=self.scores[rows],
            query_ids=[self.query_ids[i] for i in rows],
            train_ids=self.train_ids,
            query_texts=None if self.query_texts is None else [self.query_texts[i] for i in rows],
            train_texts=self.train_texts,
            provenance=dict(self.provenance),
            measurements=None if self.measurements is None else self.measurements[rows],
        )

    def query_index(self, query: Any) -> int:
        """Row of a query given its position (int) or its id."""
        if isinstance(query, int) and query not in self.query_ids:
            if not -self.n_queries <= query < self.n_queries:
                raise IndexError(f"query {query} out of range for {self.n_queries} queries")
            return query % self.n_queries
        try:
            return self.query_ids.index(query)
        except ValueError:
            raise KeyError(f"no query with id {query!r}") from None

    # ----------------------------------------------------------------- ranking
    def top_k(self, k: int = 10, query: Any = None, opponents: bool = False):
        """The ``k`` strongest proponents (or opponents) as a ``pandas.DataFrame``.

        Columns: ``query_id, rank, train_index, train_id, score`` (+ ``text`` when
        train texts are known). ``query=None`` gives every query.
        """
        import pandas as pd

        if not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be a positive int, got {k!r}")
        k = min(k, self.n_train)
        rows = range(self.n_queries) if query is None else [self.query_index(query)]
        records = []
        for q in rows:
            values, index = torch.topk(-self.scores[q] if opponents else self.scores[q], k)
            for rank, (v, j) in enumerate(zip(values.tolist(), index.tolist()), start=1):
                rec = {"query_id": self.query_ids[q], "rank": rank, "train_index": j,
                       "train_id": self.train_ids[j], "score": -v if opponents else v}
                if self.train_texts is not None:
                    rec["text"] = self.train_texts[j]
                records.append(rec)
        return pd.DataFrame.from_records(records)

    def to_pandas(self, long: bool = False):
        """Wide ``DataFrame`` (index query ids, columns train ids) or, with ``long=True``,
        one row per (query, train example) pair."""
        import pandas as pd

        wide = pd.DataFrame(self.scores.numpy(), index=pd.Index(self.query_ids, name="query"),
                            columns=pd.Index(self.train_ids, name="train"))
        if not long:
            return wide
        return wide.stack().rename("score").reset_index()

    # -------------------------------------------------------------- combining
    @classmethod
    def cat(cls, parts: Sequence["Attribution"]) -> "Attribution":
        """Concatenate attributions of different query batches over the same training set."""
        parts = list(parts)
        if not parts:
            raise ValueError("nothing to concatenate")
        first = parts[0]
        for p in parts[1:]:
            if p.train_ids != first.train_ids:
                raise ValueError("cannot concatenate attributions over different training sets")
        has_texts = all(p.query_texts is not None for p in parts)
        has_meas = all(p.measurements is not None for p in parts)
        prov = dict(first.provenance)
        if "lambdas" in prov:
            prov["lambdas"] = [x for p in parts for x in p.provenance.get("lambdas", [])]
        return cls(
            scores=torch.cat([p.scores for p in parts]),
            query_ids=[i for p in parts for i in p.query_ids],
            train_ids=first.train_ids,
            query_texts=[t for p in parts for t in p.query_texts] if has_texts else None,
            train_texts=first.train_texts,
            provenance=prov,
            measurements=torch.cat([p.measurements for p in parts]) if has_meas else None,
        )

    # ------------------------------------------------------------------- I/O
    def to_dict(self) -> dict[str, Any]:
        return {
            "scores": self.scores,
            "query_ids": self.query_ids,
            "train_ids": self.train_ids,
            "query_texts": self.query_texts,
            "train_texts": self.train_texts,
            "provenance": self.provenance,
            "measurements": self.measurements,
        }

    def save(self, path: str | os.PathLike) -> Path:
        """Write to ``path`` (a ``torch.save`` file); read back with ``Attribution.load``."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(self.to_dict(), path)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Attribution":
        return cls(**torch.load(Path(path), weights_only=False))

    # ------------------------------------------------------------------ display
    def __repr__(self) -> str:
        p = self.provenance
        keys = ("method", "backend", "hook", "placement", "n_subsets", "subsets_per_example", "rank", "lambda_rule")
        info = ", ".join(f"{k}={p[k]}" for k in keys if k in p)
        lines = [f"Attribution(queries={self.n_queries}, train={self.n_train}" + (f", {info}" if info else "") + ")"]
        for q in range(min(self.n_queries, 3)):
            j = int(torch.argmax(self.scores[q]))
            text = _short(self.query_texts[q]) if self.query_texts else str(self.query_ids[q])
            top = _short(self.train_texts[j], 40) if self.train_texts else str(self.train_ids[j])
            lines.append(f"  [{q}] {text!r} <- top proponent {self.train_ids[j]!r} "
                         f"({float(self.scores[q, j]):+.4f}) {top!r}")
        if self.n_queries > 3:
            lines.append(f"  ... {self.n_queries - 3} more queries")
        return "\n".join(lines)


class AttributionCache(dict):
    """Attributions of the same queries from several steered sites, keyed by hook name
    (``"blocks.{l}.hook_resid_post"``), like TransformerLens' ``ActivationCache``.

    ``cache["blocks.2.hook_resid_post"]`` is an ``Attribution``; ``stack()`` gives a
    ``[n_sites, q, n]`` tensor; ``mean()`` an ``Attribution`` of the averaged scores.
    """

    def __setitem__(self, key: str, value: Attribution) -> None:
        if not isinstance(value, Attribution):
            raise TypeError(f"values must be Attribution, got {type(value).__name__}")
        for other in self.values():
            if other.shape != value.shape or other.train_ids != value.train_ids or other.query_ids != value.query_ids:
                raise ValueError("all attributions in a cache must cover the same queries and training examples")
        super().__setitem__(key, value)

    def stack(self) -> Float[Tensor, "site query train"]:
        """Scores of every site, stacked in insertion order: ``[n_sites, q, n]``."""
        if not self:
            raise ValueError("the cache is empty")
        return torch.stack([a.scores for a in self.values()])

    def mean(self) -> Attribution:
        """The site-averaged attribution (provenance lists the sites)."""
        first = next(iter(self.values()))
        prov = dict(first.provenance, hook=list(self.keys()), combined="mean over sites")
        return Attribution(self.stack().mean(0), first.query_ids, first.train_ids, first.query_texts,
                           first.train_texts, prov)

    def __repr__(self) -> str:
        shape = tuple(next(iter(self.values())).shape) if self else ()
        return f"AttributionCache(sites={list(self.keys())}, shape={shape})"
