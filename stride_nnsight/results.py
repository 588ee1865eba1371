"""The result object: an influence matrix with named axes and its provenance."""

from __future__ import annotations

import operator
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import numpy as np
import scipy.sparse as sp
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


# Health of a query row (``Attribution.row_status``).
OK, ALL_ZERO, NON_FINITE = "ok", "all_zero", "non_finite"

# Provenance keys that identify one fit (model, site, design, operators; a baseline's
# settings): ``Attribution.cat`` joins only parts that agree on all of them.
FIT_KEYS = ("method", "model_fingerprint", "layer", "hook", "placement", "n_subsets",
            "subsets_per_example", "rank", "seed", "design_seed", "steps", "settings")
# What was measured (the unit of the scores): parts must agree on these too.
MEASURE_KEYS = ("metric", "patched")
# Provenance entries holding one value per query row: concatenated by ``cat``.
PER_QUERY_KEYS = ("lambdas", "base_metric", "noise_floor", "token_coefficients")

_MISSING = object()
ATTRIBUTION_KIND = "attribution"  # kind of the files Attribution.save writes (stride_nnsight.storage)


def _as_scores(value: Any) -> tuple[Optional[Tensor], Optional[sp.csr_matrix]]:
    """``(dense, sparse)``: exactly one is set. Dense: a float32 CPU tensor. Sparse: a float32
    ``scipy.sparse.csr_matrix`` without explicit zeros. Accepts a tensor (strided, or a torch
    sparse COO / CSR tensor), an array-like, a scipy sparse matrix, or the ``{"layout": "csr", ...}``
    dict that ``Attribution.to_dict`` writes for sparse scores."""
    if isinstance(value, Mapping):
        if value.get("layout") != "csr":
            raise ValueError("scores given as a dict must be Attribution.to_dict()'s sparse form "
                             f"({{'layout': 'csr', ...}}), got keys {sorted(value)}")
        shape = tuple(int(x) for x in value["shape"])
        matrix = sp.csr_matrix((np.asarray(value["values"], dtype=np.float32),
                                np.asarray(value["indices"], dtype=np.int64),
                                np.asarray(value["indptr"], dtype=np.int64)), shape=shape)
    elif sp.issparse(value):
        matrix = sp.csr_matrix(value, dtype=np.float32)
    elif isinstance(value, Tensor) and value.layout != torch.strided:
        coo = value.detach().cpu().to_sparse_coo().coalesce()
        if coo.dim() != 2:
            raise ValueError(f"scores must be 2-D [n_queries, n_train], got shape {tuple(coo.shape)}")
        index = coo.indices().numpy()
        matrix = sp.csr_matrix((coo.values().float().numpy(), (index[0], index[1])), shape=tuple(coo.shape))
    else:
        dense = value if isinstance(value, Tensor) else torch.as_tensor(value)
        return dense.detach().to(torch.float32).cpu(), None
    matrix.sum_duplicates()
    matrix.eliminate_zeros()
    matrix.sort_indices()
    return None, matrix


def _as_int(value: Any, name: str) -> int:
    """``value`` as a Python ``int``: Python and numpy integers (and 0-d integer
    tensors) are accepted; bools, floats, strings and everything else raise TypeError."""
    if isinstance(value, (bool, np.bool_)) or (isinstance(value, Tensor) and value.dtype == torch.bool):
        raise TypeError(f"{name} must be an integer, got the bool {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an integer (int or numpy integer), "
                        f"got {type(value).__name__} {value!r}") from None


def _plain_id(key: Any) -> Any:
    """A numpy scalar or 0-d tensor id as the equal Python scalar (``np.int64(3)`` -> ``3``)."""
    if isinstance(key, np.generic) or (isinstance(key, Tensor) and key.dim() == 0):
        return key.item()
    return key


def _first_duplicate(ids: Sequence[Any]) -> Optional[tuple[Any, int, int]]:
    """``(id, first position, second position)`` of the first repeated id, else ``None``."""
    seen: dict[Any, int] = {}
    for i, key in enumerate(ids):
        try:
            hash(key)
            slot = key
        except TypeError:
            slot = ("<unhashable>", repr(key))
        if slot in seen:
            return key, seen[slot], i
        seen[slot] = i
    return None


def check_unique_ids(ids: Sequence[Any], name: str, where: str = "positions", what: str = "item") -> None:
    """``ValueError`` naming the first repeated id of ``ids`` (``name``: the argument's name)."""
    duplicate = _first_duplicate(ids)
    if duplicate is not None:
        key, first, second = duplicate
        raise ValueError(
            f"{name} must be unique, but {key!r} appears twice ({where} {first} and {second}); "
            f"give every {what} a distinct id (or pass {name}=None to number them 0..{len(ids) - 1})"
        )


def _names(ids: Sequence[Any], limit: int = 10) -> str:
    """``"q1, q3"``; at most ``limit`` names, then ``"... (N more)"``."""
    shown = ", ".join(str(key) for key in ids[:limit])
    return shown + (f", ... ({len(ids) - limit} more)" if len(ids) > limit else "")


def _same(a: Any, b: Any) -> bool:
    """Equality that also works for tensors / arrays (``False`` when not comparable)."""
    if a is b:
        return True
    if isinstance(a, Tensor) or isinstance(b, Tensor):
        return isinstance(a, Tensor) and isinstance(b, Tensor) and a.shape == b.shape and torch.equal(a, b)
    try:
        return bool(a == b)
    except (TypeError, ValueError, RuntimeError):
        return isinstance(a, np.ndarray) and isinstance(b, np.ndarray) and np.array_equal(a, b)


def _difference(key: str, a: Any, b: Any, part: int) -> str:
    """``provenance['settings']['lr'] is 0.1 in part 0 but 0.2 in part 2`` (first differing sub-key of dicts)."""
    where = f"provenance[{key!r}]"
    while isinstance(a, dict) and isinstance(b, dict):
        sub = next((s for s in list(a) + [s for s in b if s not in a]
                    if not _same(a.get(s, _MISSING), b.get(s, _MISSING))), None)
        if sub is None:
            break
        where += f"[{sub!r}]"
        a, b = a.get(sub, _MISSING), b.get(sub, _MISSING)

    def show(v: Any) -> str:
        return "<missing>" if v is _MISSING else _short(repr(v), 60)

    return f"{where} is {show(a)} in part 0 but {show(b)} in part {part}"


@dataclass
class Attribution:
    """Influence of every training example on every query.

    Attributes:
        scores: float32 tensor ``[n_queries, n_train]`` (dims ``("query", "train")``).
            May be given sparse (a ``scipy.sparse`` matrix or a torch sparse tensor): it is
            then *kept* sparse (``is_sparse``; STRIDE's Lasso scores have at most ``K``
            non-zeros per query), and ``scores`` builds the dense tensor on each access (a
            new tensor: editing it does not change the attribution). Indexing, ``sel``,
            ``top_k``, ``row_status``, ``cat``, ``save`` / ``load`` work on the sparse form;
            ``sparse_scores`` gives it as a torch sparse CSR tensor, ``to_dense()`` a dense copy.
            ``scores[q, j] > 0``: training example ``j`` is a *proponent* of query ``q``
            (its subsets' operators raise the query's metric, i.e. lower its loss);
            ``< 0``: an opponent. Units: change of the metric (nats of loss for the
            default metric) attributed to the example.
        query_ids, train_ids: identifiers of the rows / columns, each unique (ValueError
            otherwise); numpy scalar ids are stored as the equal Python scalars. Ids and
            positions are never mixed: ``sel`` / ``query_index`` / ``top_k(query=)`` take
            ids, ``attr[i]`` / ``top_k(row=)`` take positions.
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
        if self._dense is not None and self._dense.dim() != 2:
            raise ValueError(f"scores must be 2-D [n_queries, n_train], got shape {tuple(self._dense.shape)}")
        q, n = self.shape
        self.query_ids = [_plain_id(i) for i in self.query_ids] if self.query_ids is not None else list(range(q))
        self.train_ids = [_plain_id(i) for i in self.train_ids] if self.train_ids is not None else list(range(n))
        if len(self.query_ids) != q or len(self.train_ids) != n:
            raise ValueError(
                f"ids do not match scores {tuple(self.scores.shape)}: {len(self.query_ids)} query ids, "
                f"{len(self.train_ids)} train ids"
            )
        check_unique_ids(self.query_ids, "query_ids", "rows", "query")
        check_unique_ids(self.train_ids, "train_ids", "columns", "training example")
        for name, texts, size in (("query_texts", self.query_texts, q), ("train_texts", self.train_texts, n)):
            if texts is not None and len(texts) != size:
                raise ValueError(f"{name} has {len(texts)} entries, expected {size}")

    # ------------------------------------------------------------------ basics
    @property
    def shape(self) -> torch.Size:
        return torch.Size(self._sparse.shape) if self._sparse is not None else self._dense.shape

    @property
    def n_queries(self) -> int:
        return self.shape[0]

    @property
    def n_train(self) -> int:
        return self.shape[1]

    @property
    def is_sparse(self) -> bool:
        """Whether the scores are held sparse (only the non-zero entries are stored)."""
        return self._sparse is not None

    @property
    def nnz(self) -> int:
        """Number of non-zero scores."""
        return int(self._sparse.nnz) if self._sparse is not None else int((self._dense != 0).sum())

    @property
    def sparse_scores(self) -> Tensor:
        """The scores as a torch sparse CSR tensor ``[n_queries, n_train]`` (float32)."""
        m = self._csr()
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
            return torch.sparse_csr_tensor(torch.from_numpy(m.indptr.astype(np.int64)),
                                           torch.from_numpy(m.indices.astype(np.int64)),
                                           torch.from_numpy(np.asarray(m.data, dtype=np.float32)), size=m.shape,
                                           check_invariants=True)

    @property
    def noise_floor(self) -> Optional[Tensor]:
        """Per query ``[n_queries]``: the largest absolute score the recovery gave the query's
        measurements shuffled across the subsets (``provenance['noise_floor']``, from
        ``Stride.attribute(..., null_permutations=)``; `stride_nnsight.recovery.noise_floor`),
        or ``None`` when not computed. A score at or below it is indistinguishable from noise."""
        floor = self.provenance.get("noise_floor")
        if floor is None or len(floor) != self.n_queries:
            return None
        return torch.tensor([float("nan") if v is None else float(v) for v in floor], dtype=torch.float32)

    def _csr(self) -> sp.csr_matrix:
        return self._sparse if self._sparse is not None else _as_scores(sp.csr_matrix(self._dense.numpy()))[1]

    def to_dense(self) -> "Attribution":
        """A copy whose scores are held dense."""
        return Attribution(**{**self.to_dict(), "scores": self.scores})

    def to_sparse(self) -> "Attribution":
        """A copy whose scores are held sparse (zeros not stored)."""
        return Attribution(**{**self.to_dict(), "scores": self._csr()})

    def _row(self, q: int) -> Tensor:
        """Dense scores of row ``q``: ``[n_train]``."""
        if self._sparse is not None:
            return torch.from_numpy(self._sparse.getrow(q).toarray().reshape(-1))
        return self._dense[q]

    def _rows(self, rows: Sequence[int]) -> Any:
        """Scores of ``rows`` in the form they are held (dense tensor or sparse matrix)."""
        if self._sparse is not None:
            return self._sparse[np.asarray(rows, dtype=np.int64)]
        return self._dense[list(rows)]

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
        Numpy scalars / 1-D arrays (and tensors) of ids work like Python ints / lists.
        """
        picks: dict[str, tuple[list[int], bool]] = {}
        for dim, ids, wanted in (("query", self.query_ids, query), ("train", self.train_ids, train)):
            if wanted is None:
                continue
            lookup = {key: i for i, key in enumerate(ids)}
            many = isinstance(wanted, (list, tuple, range)) or \
                (isinstance(wanted, (np.ndarray, Tensor)) and wanted.ndim > 0)
            if isinstance(wanted, (np.ndarray, Tensor)) and many:
                wanted = wanted.reshape(-1).tolist()
            keys = [_plain_id(key) for key in wanted] if many else [_plain_id(wanted)]
            missing = [key for key in keys if key not in lookup]
            if missing:
                raise KeyError(f"no {dim} with id(s) {missing}")
            picks[dim] = ([lookup[key] for key in keys], many)
        rows, cols = picks.get("query", (None, True))[0], picks.get("train", (None, True))[0]
        if self._sparse is not None:  # only the selected block is made dense
            block = self._sparse
            if rows is not None:
                block = block[np.asarray(rows, dtype=np.int64)]
            if cols is not None:
                block = block[:, np.asarray(cols, dtype=np.int64)]
            out = torch.from_numpy(np.asarray(block.toarray(), dtype=np.float32))
        else:
            out = self._dense
            if rows is not None:
                out = out.index_select(0, torch.tensor(rows, dtype=torch.long))
            if cols is not None:
                out = out.index_select(1, torch.tensor(cols, dtype=torch.long))
        if not picks.get("train", (None, True))[1]:
            out = out.squeeze(1)
        if not picks.get("query", (None, True))[1]:
            out = out.squeeze(0)
        return out

    def __getitem__(self, index: int | slice | Sequence[int] | Tensor) -> "Attribution":
        """Select queries (rows) by *position*; the result is again an ``Attribution``.

        ``index``: an int or numpy integer (negative counts from the end), a slice, or a
        list / 1-D array / tensor of integer positions, each row at most once. Bools,
        floats and ids are refused (TypeError): select by id with
        ``attr[attr.query_index(query_id)]`` or ``attr.sel(query=...)``.
        """
        if isinstance(index, slice):
            rows = list(range(self.n_queries))[index]
        elif isinstance(index, (np.ndarray, Tensor)) and index.ndim > 0:
            rows = [self._position(i) for i in index.reshape(-1).tolist()]
        elif isinstance(index, (list, tuple, range)):
            rows = [self._position(i) for i in index]
        else:
            rows = [self._position(index)]
        duplicate = _first_duplicate(rows)
        if duplicate is not None:
            raise ValueError(f"row {duplicate[0]} is selected twice: each query can appear once in an Attribution")
        provenance = dict(self.provenance)
        for key in PER_QUERY_KEYS:  # one value per query row: keep the selected rows' values
            values = provenance.get(key)
            if isinstance(values, (list, tuple)) and len(values) == self.n_queries:
                provenance[key] = [values[i] for i in rows]
        return Attribution(
            scores=self._rows(rows),
            query_ids=[self.query_ids[i] for i in rows],
            train_ids=self.train_ids,
            query_texts=None if self.query_texts is None else [self.query_texts[i] for i in rows],
            train_texts=self.train_texts,
            provenance=provenance,
            measurements=None if self.measurements is None else self.measurements[rows],
        )

    def _position(self, row: Any) -> int:
        """Row ``row`` (int or numpy integer; negative counts from the end) as ``0..q-1``."""
        try:
            i = _as_int(row, "row")
        except TypeError as err:
            raise TypeError(f"{err}: rows are selected by position; to select a query by its id "
                            f"use attr.query_index(query_id) or top_k(query=query_id)") from None
        if not -self.n_queries <= i < self.n_queries:
            raise IndexError(f"row {i} out of range for {self.n_queries} queries")
        return i % self.n_queries

    def query_index(self, query_id: Any) -> int:
        """Row (position) of the query whose *id* is ``query_id``; ids only, never positions.

        Raises KeyError when no query has that id (for a position use ``attr[row]`` or
        ``top_k(row=...)``).
        """
        query_id = _plain_id(query_id)
        for i, key in enumerate(self.query_ids):
            if _same(key, query_id):
                return i
        hint = ""
        n = self.n_queries
        if isinstance(query_id, int) and not isinstance(query_id, bool) and -n <= query_id < n:
            hint = (f" ({query_id} is looked up as an id; for the query at row {query_id} "
                    f"use top_k(row={query_id}) or attr[{query_id}])")
        raise KeyError(f"no query with id {query_id!r}{hint}")

    def row_status(self) -> list[str]:
        """Health of each query row, in row order: ``"non_finite"`` (some score is NaN or
        inf: the attribution of that query is invalid), ``"all_zero"`` (every score is
        exactly 0: no signal, nothing to rank), else ``"ok"``. ``top_k`` and ``repr`` use it."""
        if self._sparse is not None:
            m = self._sparse
            row_of = np.repeat(np.arange(m.shape[0]), np.diff(m.indptr))
            finite = (np.bincount(row_of, weights=~np.isfinite(m.data), minlength=m.shape[0]) == 0).tolist()
            nonzero = (np.diff(m.indptr) > 0).tolist()  # explicit zeros are never stored
        else:
            finite = torch.isfinite(self._dense).all(dim=1).tolist()
            nonzero = (self._dense != 0).any(dim=1).tolist()
        return [NON_FINITE if not f else OK if nz else ALL_ZERO for f, nz in zip(finite, nonzero)]

    # ----------------------------------------------------------------- ranking
    def top_k(self, k: int = 10, *, query: Any = None, row: Any = None, opponents: bool = False,
              above_noise: bool = False):
        """The ``k`` strongest proponents (or opponents) as a ``pandas.DataFrame``.

        Args:
            k: at most this many training examples per query (int or numpy integer, ``>= 1``).
            query: the *id* of one query (as in ``query_ids``; looked up with ``query_index``).
            row: the *position* of one query (int or numpy integer; negative counts from
                the end). Give at most one of ``query`` / ``row``; neither ranks every query.
            opponents: rank the most negative scores instead of the most positive.
            above_noise: list only scores whose magnitude exceeds the query's noise floor
                (``noise_floor``; ``ValueError`` if it was not computed).

        Returns:
            table (pandas.DataFrame): Columns ``query_id, rank, train_index, train_id, score``
                (+ ``noise_ratio``, ``|score|`` over the query's noise floor, when ``noise_floor``
                is known; + ``text`` when train texts are known), best first within each query.
                Only strictly positive scores are proponents (strictly negative ones opponents):
                a score of exactly 0 is never listed, so a query with fewer than ``k`` such scores
                gets fewer rows, and an all-zero query gets none (one ``UserWarning`` names every
                such query).

        Raises:
            TypeError: both ``query`` and ``row`` given, or ``k`` / ``row`` not an integer.
            ValueError: ``k < 1``, or a selected query has a NaN/inf score. Raising (rather
                than skipping that query) is deliberate: a non-finite score means the
                measurement or recovery of the whole row failed, so its finite entries are
                not trustworthy either, and a table with the query silently missing would
                look complete. Drop such rows first (see ``row_status``).
            KeyError / IndexError: unknown ``query`` id / ``row`` out of range.
        """
        import pandas as pd

        if query is not None and row is not None:
            raise TypeError("give either query= (a query id) or row= (a row position), not both")
        k = _as_int(k, "k")
        if k < 1:
            raise ValueError(f"k must be a positive int, got {k!r}")
        if query is not None:
            rows = [self.query_index(query)]
        elif row is not None:
            rows = [self._position(row)]
        else:
            rows = list(range(self.n_queries))
        floor = self.noise_floor
        if above_noise and floor is None:
            raise ValueError("above_noise=True needs the queries' noise floor: attribute with "
                             "stride.attribute(..., null_permutations=8) (the default)")
        status = self.row_status()
        invalid = [self.query_ids[q] for q in rows if status[q] == NON_FINITE]
        if invalid:
            raise ValueError(
                f"{len(invalid)} of {len(rows)} queries have non-finite scores (NaN/inf): {_names(invalid)}; "
                f"their attribution is invalid, so nothing is ranked. Re-attribute them, or drop them first: "
                f"attr[[i for i, s in enumerate(attr.row_status()) if s != 'non_finite']]"
            )
        silent = [self.query_ids[q] for q in rows if status[q] == ALL_ZERO]
        if silent:
            warnings.warn(f"{len(silent)} of {len(rows)} queries have no non-zero score (no signal): {_names(silent)}",
                          UserWarning, stacklevel=2)
        columns = ["query_id", "rank", "train_index", "train_id", "score"] + \
            (["noise_ratio"] if floor is not None else []) + (["text"] if self.train_texts is not None else [])
        records = []
        for q in rows:
            if status[q] != OK:
                continue
            row_scores = self._row(q)
            signed = -row_scores if opponents else row_scores
            values, index = torch.topk(signed, min(k, self.n_train))
            rank = 0
            for v, j in zip(values.tolist(), index.tolist()):
                if not v > 0:
                    break
                ratio = None
                if floor is not None:
                    f = float(floor[q])
                    ratio = v / f if f > 0 else float("inf")
                    if above_noise and not ratio > 1.0:
                        continue
                rank += 1
                rec = {"query_id": self.query_ids[q], "rank": rank, "train_index": j,
                       "train_id": self.train_ids[j], "score": -v if opponents else v}
                if floor is not None:
                    rec["noise_ratio"] = ratio
                if self.train_texts is not None:
                    rec["text"] = self.train_texts[j]
                records.append(rec)
        return pd.DataFrame.from_records(records, columns=columns)

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
        """Concatenate attributions of different query batches of the *same fit*.

        Refused (ValueError naming the key or id) unless every part has the same
        ``train_ids`` and agrees on the provenance keys that identify a fit
        (``FIT_KEYS``: method, model fingerprint, layer/hook, placement, K, d, rank,
        seeds, steps, settings) and on what was measured (``metric``, ``patched``);
        a key missing from some parts counts as different. Query ids must be unique
        across parts. Parts of one fit attributed with different lambda settings may be
        joined: per-query entries (``lambdas``, ``base_metric``) are concatenated, and any
        other provenance entry that differs between parts (e.g. ``lambda_rule``,
        ``lambda_fraction``, ``remote``) becomes a list with one value per query row.
        """
        parts = list(parts)
        if not parts:
            raise ValueError("nothing to concatenate")
        first = parts[0]
        for i, p in enumerate(parts[1:], start=1):
            if p.train_ids != first.train_ids:
                raise ValueError(f"cannot concatenate attributions over different training sets (part {i} has "
                                 f"other train_ids than part 0): attribute every batch with the same fit")
            for key in FIT_KEYS + MEASURE_KEYS:
                a, b = first.provenance.get(key, _MISSING), p.provenance.get(key, _MISSING)
                if not _same(a, b):
                    what = "different fits" if key in FIT_KEYS else "different metrics"
                    fix = "attribute every batch with the same fitted Stride (or the same saved state)" \
                        if key in FIT_KEYS else "attribute every batch with the same metric and intervention"
                    raise ValueError(f"cannot concatenate attributions from {what}: "
                                     f"{_difference(key, a, b, i)}; {fix}")
        part_of = [i for i, p in enumerate(parts) for _ in range(p.n_queries)]
        duplicate = _first_duplicate([key for p in parts for key in p.query_ids])
        if duplicate is not None:
            key, a, b = duplicate
            raise ValueError(f"query id {key!r} is in part {part_of[a]} and part {part_of[b]}: each query can "
                             f"appear once; drop it from one part (e.g. with attr[rows]) before concatenating")
        has_texts = all(p.query_texts is not None for p in parts)
        has_meas = all(p.measurements is not None for p in parts)
        if any(p.is_sparse for p in parts):
            scores: Any = sp.vstack([p._csr() for p in parts], format="csr")
        else:
            scores = torch.cat([p._dense for p in parts])
        return cls(
            scores=scores,
            query_ids=[i for p in parts for i in p.query_ids],
            train_ids=first.train_ids,
            query_texts=[t for p in parts for t in p.query_texts] if has_texts else None,
            train_texts=first.train_texts,
            provenance=cls._joined_provenance(parts),
            measurements=torch.cat([p.measurements for p in parts]) if has_meas else None,
        )

    @staticmethod
    def _joined_provenance(parts: Sequence["Attribution"]) -> dict[str, Any]:
        """Provenance of ``cat(parts)``: equal entries kept, per-query entries concatenated
        (``None`` for a part without one), any other differing entry listed per query row."""
        keys = list(dict.fromkeys(key for p in parts for key in p.provenance))
        prov: dict[str, Any] = {}
        for key in keys:
            values = [p.provenance.get(key, _MISSING) for p in parts]
            if key in PER_QUERY_KEYS:
                prov[key] = [x for p, v in zip(parts, values)  # a part without one (missing or None): None per row
                             for x in (list(v) if isinstance(v, (list, tuple)) else [None] * p.n_queries)]
            elif all(_same(v, values[0]) for v in values[1:]):
                prov[key] = values[0]
            else:
                prov[key] = [None if v is _MISSING else v for p, v in zip(parts, values) for _ in range(p.n_queries)]
        return prov

    # ------------------------------------------------------------------- I/O
    def to_dict(self) -> dict[str, Any]:
        """The constructor's fields (``Attribution(**a.to_dict())`` rebuilds ``a``). Sparse
        scores are given as ``{"layout": "csr", "shape": [q, n], "indptr", "indices", "values"}``
        (int64 / int64 / float32 tensors), which the constructor and ``save`` accept."""
        if self._sparse is not None:
            m = self._sparse
            scores: Any = {"layout": "csr", "shape": [int(m.shape[0]), int(m.shape[1])],
                           "indptr": torch.from_numpy(m.indptr.astype(np.int64)),
                           "indices": torch.from_numpy(m.indices.astype(np.int64)),
                           "values": torch.from_numpy(np.asarray(m.data, dtype=np.float32))}
        else:
            scores = self._dense
        return {
            "scores": scores,
            "query_ids": self.query_ids,
            "train_ids": self.train_ids,
            "query_texts": self.query_texts,
            "train_texts": self.train_texts,
            "provenance": self.provenance,
            "measurements": self.measurements,
        }

    def save(self, path: str | os.PathLike) -> Path:
        """Write to ``path`` (a JSON manifest, e.g. ``attr.json``) plus the tensors in a
        ``.safetensors`` file beside it (``stride_nnsight.storage``; atomic, checksummed).
        Ids, texts and provenance must be JSON values or tuples (``TypeError`` naming the
        entry otherwise, before anything is written). Read back with ``Attribution.load``."""
        from . import storage

        return storage.save(Path(path), ATTRIBUTION_KIND, self.to_dict())

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Attribution":
        """Read a file written by ``save`` (or a format-1 file of stride-nnsight 0.1,
        read without unpickling code). Raises ``StateFileError`` for a corrupted, truncated,
        unknown-format or incomplete file."""
        from . import storage

        content = storage.load(Path(path), ATTRIBUTION_KIND, required=("scores", "query_ids", "train_ids"))
        fields_ = ("scores", "query_ids", "train_ids", "query_texts", "train_texts", "provenance", "measurements")
        return cls(**{k: content[k] for k in fields_ if k in content})

    # ------------------------------------------------------------------ display
    def _repr_html_(self) -> str:
        """Notebook display: the first 20 queries with their top 5 proponents and opponents."""
        from .view import attribution_html

        return attribution_html(self, k=5)

    def to_html(self, path: Optional[str | os.PathLike] = None, k: int = 10) -> str:
        """A standalone HTML report of every query (top ``k`` proponents and opponents, scores as
        bars, the words each document shares with the query marked, the provenance). Written to
        ``path`` when given (through ``stride_nnsight.storage``); the page is returned."""
        from .view import report_page

        page = report_page(self, k=k)
        if path is not None:
            from . import storage

            storage.write_text(path, page)
        return page

    def plot(self, row: Any = None, *, query: Any = None, **kwargs: Any):
        """One query's score histogram and influence-vs-rank plot as a matplotlib Figure
        (`stride_nnsight.plot.plot_attribution`; ``row``: position, default 0, or ``query``: id).
        Needs matplotlib (``pip install 'stride-nnsight[plot]'``)."""
        from .plot import plot_attribution

        return plot_attribution(self, row, query=query, **kwargs)

    def __repr__(self) -> str:
        p = self.provenance
        keys = ("method", "backend", "hook", "placement", "n_subsets", "subsets_per_example", "rank", "lambda_rule")
        info = ", ".join(f"{k}={_short(str(p[k]), 40)}" for k in keys if k in p)
        lines = [f"Attribution(queries={self.n_queries}, train={self.n_train}" + (f", {info}" if info else "") + ")"]
        status = self.row_status()
        for q in range(min(self.n_queries, 3)):
            text = _short(self.query_texts[q]) if self.query_texts else str(self.query_ids[q])
            lines.append(f"  [{q}] {text!r} <- " + self._repr_best(q, status[q]))
        if self.n_queries > 3:
            lines.append(f"  ... {self.n_queries - 3} more queries")
        bad = {s: status.count(s) for s in (NON_FINITE, ALL_ZERO) if s in status}
        if bad:
            notes = {NON_FINITE: "have NON-FINITE scores (invalid)", ALL_ZERO: "have no non-zero score"}
            lines.append("  warning: " + "; ".join(f"{n} of {self.n_queries} queries {notes[s]}"
                                                   for s, n in bad.items()))
        return "\n".join(lines)

    def _repr_best(self, q: int, status: str) -> str:
        """What ``repr`` shows for row ``q``: its top proponent, or why there is none."""
        if status == NON_FINITE:
            return "NON-FINITE scores (NaN/inf): attribution invalid"
        if status == ALL_ZERO:
            return "no non-zero score (no signal)"
        row = self._row(q)
        j = int(torch.argmax(row))
        if not float(row[j]) > 0:
            return "no proponent (no positive score)"
        top = _short(self.train_texts[j], 40) if self.train_texts else str(self.train_ids[j])
        return f"top proponent {self.train_ids[j]!r} ({float(row[j]):+.4f}) {top!r}"


def _get_scores(self: Attribution) -> Tensor:
    if self._sparse is not None:
        return torch.from_numpy(np.asarray(self._sparse.toarray(), dtype=np.float32))
    return self._dense


def _set_scores(self: Attribution, value: Any) -> None:
    self._dense, self._sparse = _as_scores(value)


# ``scores`` is a dataclass field whose storage is dense or sparse: the generated __init__ assigns
# it through this property (see the class docstring).
Attribution.scores = property(_get_scores, _set_scores,  # type: ignore[assignment]
                              doc="Scores ``[n_queries, n_train]`` as a dense float32 tensor (built on each "
                                  "access when held sparse).")


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
