"""Subset design: which training examples each steering operator is trained on.

STRIDE puts every one of ``n`` training examples into exactly ``d`` of ``K`` random
subsets. The membership matrix ``M`` (``K x n``, entries in {0, 1}) is then, with high
probability, the adjacency matrix of a bipartite expander, and a k-sparse influence
vector ``w`` is recoverable from ``y = M w`` by l1 minimisation once
``K = O(k log(n / k))``.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

__all__ = ["SubsetDesign", "recommended_n_subsets", "supported_sparsity", "check_design_size",
           "DEFAULTS_SPARSITY"]

#: influential documents per query the default K was sized for (docs/method.md, defaults table)
DEFAULTS_SPARSITY = 20


def recommended_n_subsets(n_examples: int, sparsity: int, constant: float = 2.0) -> int:
    """Measurements ``K`` that sparse recovery needs for a ``sparsity``-sparse influence vector.

    Returns ``ceil(constant * k * log(n / k))`` (at least ``k + 1``); the constant is a
    rule of thumb, the order ``k log(n/k)`` is the theory's.
    """
    if n_examples < 1 or sparsity < 1:
        raise ValueError("n_examples and sparsity must be >= 1")
    k = min(sparsity, n_examples)
    return max(k + 1, math.ceil(constant * k * math.log(max(n_examples / k, 2.0))))


def supported_sparsity(n_examples: int, n_subsets: int, constant: float = 2.0) -> int:
    """The largest ``k`` that ``K = n_subsets`` measurements support under the rule of
    `recommended_n_subsets` (``K >= constant * k * log(n / k)``); 0 if none. E.g. K=256 supports
    k=30 at n=2,000 but only k=11 at n=1e6."""
    lo, hi = 0, min(int(n_examples), int(n_subsets))
    while lo < hi:  # recommended_n_subsets grows with k (for k < n / e), so bisect
        mid = (lo + hi + 1) // 2
        if recommended_n_subsets(n_examples, mid, constant) <= n_subsets:
            lo = mid
        else:
            hi = mid - 1
    return lo


def check_design_size(n_examples: int, n_subsets: int, subsets_per_example: int) -> None:
    """Refuse (``ValueError``) a design in which some subset would have no member.

    ``n`` examples in ``d`` subsets each give ``n * d`` memberships; the ``K`` subsets can
    all be non-empty only when ``n * d >= K`` (an empty subset's operator has nothing to be
    trained on). The message names the largest valid ``K``, the smallest valid ``d`` and
    the smallest corpus for the given ``K`` and ``d``.
    """
    n, K, d = int(n_examples), int(n_subsets), int(subsets_per_example)
    if n * d >= K:
        return
    raise ValueError(
        f"K={K} subsets but {n} training examples x d={d} = {n * d} memberships: each subset needs "
        f"a member. Use n_subsets <= {n * d} or subsets_per_example >= {-(-K // n)} "
        f"(or train on at least {-(-K // d)} examples)"
    )


@dataclass(frozen=True)
class SubsetDesign:
    """A column-regular random design: each example belongs to exactly ``d`` of ``K`` subsets.

    Guarantees: every subset has at least one member (``n * d >= K`` is required, else
    ``ValueError``), and, when ``n > 1`` and ``n * (K - d) >= K``, every subset leaves at
    least one example out (so stability rows can be drawn for every operator).

    Args:
        n_examples: number of training examples ``n`` (columns).
        n_subsets: number of subsets / steering operators ``K`` (rows).
        subsets_per_example: ``d``, the number of subsets each example is put in.
        seed: seed of the design; the same arguments always give the same matrix.
        sparsity: optional expected number ``k`` of influential examples per query; a
            warning is raised when ``K`` is below the ``O(k log(n/k))`` regime.
    """

    n_examples: int
    n_subsets: int
    subsets_per_example: int
    seed: int = 0
    sparsity: int | None = None

    def __post_init__(self) -> None:
        n, K, d = self.n_examples, self.n_subsets, self.subsets_per_example
        for name, value in (("n_examples", n), ("n_subsets", K), ("subsets_per_example", d)):
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool):
                raise TypeError(f"{name} must be an int, got {type(value).__name__}")
        if n < 1:
            raise ValueError(f"n_examples must be >= 1, got {n}: pass at least one training example")
        if K < 1:
            raise ValueError(f"n_subsets (K) must be >= 1, got {K}")
        if d < 1:
            raise ValueError(f"subsets_per_example (d) must be >= 1, got {d}")
        if d > K:
            raise ValueError(
                f"subsets_per_example (d={d}) cannot exceed n_subsets (K={K}): every example "
                f"must sit in d distinct subsets; lower d or raise K"
            )
        check_design_size(n, K, d)
        if self.sparsity is not None:
            needed = recommended_n_subsets(n, self.sparsity)
            if K < needed:
                warnings.warn(
                    f"n_subsets K={K} is below the sparse-recovery regime for sparsity "
                    f"k={self.sparsity} and n={n} (about {needed} = 2 k log(n/k)); recovery of "
                    f"influence vectors that dense may be unreliable. Raise n_subsets.",
                    stacklevel=3,
                )

    @property
    def membership(self) -> sp.csr_matrix:
        """``M``: ``scipy.sparse.csr_matrix`` of shape ``[K, n]``, float32 0/1, exactly d ones per column."""
        return _membership(self.n_examples, self.n_subsets, self.subsets_per_example, self.seed)

    def members(self, subset: int) -> np.ndarray:
        """Indices (int64, sorted) of the training examples in subset ``subset``."""
        if not 0 <= subset < self.n_subsets:
            raise IndexError(f"subset {subset} out of range [0, {self.n_subsets})")
        row = self.membership.getrow(subset)
        return np.sort(row.indices.astype(np.int64))

    def subsets_of(self, example: int) -> np.ndarray:
        """Indices (int64, sorted) of the ``d`` subsets that contain training example ``example``."""
        if not 0 <= example < self.n_examples:
            raise IndexError(f"example {example} out of range [0, {self.n_examples})")
        col = self.membership.tocsc().getcol(example)
        return np.sort(col.indices.astype(np.int64))

    def subset_sizes(self) -> np.ndarray:
        """Number of members of each subset, int64 ``[K]``."""
        return np.asarray(self.membership.sum(axis=1)).ravel().astype(np.int64)

    def to_dict(self) -> dict:
        return {
            "n_examples": int(self.n_examples),
            "n_subsets": int(self.n_subsets),
            "subsets_per_example": int(self.subsets_per_example),
            "seed": int(self.seed),
            "sparsity": None if self.sparsity is None else int(self.sparsity),
        }


_CACHE: dict[tuple[int, int, int, int], sp.csr_matrix] = {}


def _membership(n: int, K: int, d: int, seed: int) -> sp.csr_matrix:
    key = (n, K, d, seed)
    if key not in _CACHE:
        rng = np.random.default_rng(seed)
        # Balanced assignment: deal n*d slots from concatenated random permutations of the
        # K subsets (so subset sizes differ by at most one), then redraw the few columns
        # whose d slots straddle two permutations and repeat a subset.
        total = n * d
        reps = -(-total // K)
        pool = np.concatenate([rng.permutation(K) for _ in range(reps)])[:total]
        rows = pool.reshape(n, d)
        sorted_rows = np.sort(rows, axis=1)
        bad = np.nonzero((np.diff(sorted_rows, axis=1) == 0).any(axis=1))[0]
        for j in bad:
            rows[j] = rng.choice(K, size=d, replace=False)
        _cover(rows, K, rng)
        cols = np.repeat(np.arange(n), d)
        data = np.ones(n * d, dtype=np.float32)
        matrix = sp.csr_matrix((data, (rows.ravel(), cols)), shape=(K, n))
        matrix.sum_duplicates()
        _CACHE[key] = matrix
    return _CACHE[key].copy()


def _cover(rows: np.ndarray, K: int, rng: np.random.Generator) -> None:
    """Repair ``rows`` (``[n, d]`` subset ids, distinct per row) in place so that every
    subset has a member (needs ``n * d >= K``) and, when ``n > 1`` and ``n * (K - d) >= K``,
    a non-member. Each repair moves one membership of one example from the largest subset
    to an empty one (or from a full subset to the smallest one), so rows keep ``d``
    distinct subsets and designs that need no repair are unchanged (and draw nothing from ``rng``)."""
    n, d = rows.shape
    sizes = np.bincount(rows.ravel(), minlength=K)
    for k in np.flatnonzero(sizes == 0):
        # n*d >= K memberships over <= K-1 non-empty subsets: the largest has >= 2 members
        donor = int(np.argmax(sizes))
        j = int(rng.choice(np.flatnonzero((rows == donor).any(axis=1))))
        rows[j][rows[j] == donor] = k
        sizes[donor] -= 1
        sizes[k] += 1
    if n > 1 and n * (K - d) >= K:
        for k in np.flatnonzero(sizes == n):
            # n*(K-d) >= K non-memberships over <= K-1 non-full subsets: the smallest misses >= 2
            taker = int(np.argmin(sizes))
            j = int(rng.choice(np.flatnonzero(~(rows == taker).any(axis=1))))
            rows[j][rows[j] == k] = taker
            sizes[k] -= 1
            sizes[taker] += 1
