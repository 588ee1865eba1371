"""The token component of the recovery: diffuse influence carried by the completion's own tokens.

The Lasso (`stride_nnsight.recovery`) explains each query's measurements ``y [K]`` with a few
documents: ``y ~= M s + c``, ``s`` sparse. Influence on a text continuation is often spread over
many documents instead: a small language model's loss on a completion depends on how often the
completion's tokens occur in training, so every document that holds one of them helps a little.
No sparse ``s`` of ``K`` measurements can represent hundreds of small contributions, and a dense
solve over ``n`` unknowns is underdetermined once ``n > K``.

The token component models that part with one coefficient per *completion token* instead of one
per document: document ``j``'s influence is ``sum_t v_t [t in doc j]`` over the completion's
distinct tokens ``t`` (``m`` of them, ``m << K``), so ``v`` is well determined whatever ``n``.
Fitted to what the Lasso left, ``r = y - M s``:

    v = argmin_{v >= 0} || centre(r) - centre(G) v ||^2,   G = M P_T   [K, m]

where ``P [n, V]`` says which tokens each training document holds among its scored tokens and
``P_T`` its columns for the completion's tokens; centring plays the intercept's part. Each held
token's entry is ``1 / L_j`` (``L_j``: document ``j``'s number of scored tokens; the default
``weights="per_document"``), so ``G[k, t]`` sums, over subset ``k``'s documents holding ``t``,
the share of the document that one of its tokens is. The operators are fitted that way: a
document's fidelity loss is the mean over its scored positions, so every document weighs the same
and a long document spreads its weight over more tokens (`stride_nnsight.operators.step_losses`).
``weights="presence"`` (1 per held token: ``G[k, t]`` counts documents) is the form used before
2026-12-04. ``v >= 0``: a document that holds
the completion's tokens can only help predict them (proponent), which also keeps tokens the
measurements do not support at 0. The scores become ``s + P_T v``.

Cost per query: one ``K x m`` non-negative least squares and a sparse product; ``M P`` is
computed once per call (``nnz(P) * d`` operations). The component is dense over the documents
that hold a chosen token: its non-zeros per query are up to the document frequencies of the
chosen tokens summed (at most ``n``), so at large ``n`` attribute queries in batches.
"""

from __future__ import annotations

import warnings
from typing import Sequence

import numpy as np
import scipy.sparse as sp
from jaxtyping import Float
from scipy.optimize import nnls

__all__ = ["RECOVERIES", "TOKEN_WEIGHTS", "WARN_BYTES", "token_presence", "weigh_presence", "completion_tokens",
           "token_component", "add_token_component"]

#: ``StrideArguments.recovery``: the Lasso alone, or the Lasso plus the token component.
RECOVERIES = ("lasso", "lasso+tokens")

#: ``StrideArguments.token_weights``: a held token's entry of ``P`` is ``1 / L_j`` (the share of
#: document ``j``'s scored tokens it is, as in the operators' fit) or 1.
TOKEN_WEIGHTS = ("per_document", "presence")

#: `add_token_component` warns when the scores it returns take more than this many bytes (CSR:
#: 12 bytes per non-zero): the token component is dense over the documents holding a chosen
#: token, so at large ``n`` a big batch of queries can take gigabytes.
WARN_BYTES: float = 1e9


def token_presence(input_ids: np.ndarray, loss_mask: np.ndarray, vocab_size: int,
                   weights: str = "per_document") -> sp.csr_matrix:
    """``P [n, V]`` float64 CSR, non-zero where document ``j`` holds token ``t`` among its scored
    tokens (``loss_mask`` 1: every token after BOS for training texts): ``1 / L_j`` with ``L_j``
    the document's number of scored tokens (``weights="per_document"``, default: each document
    weighs 1 in total over its distinct tokens' positions, as in the operators' fit) or 1
    (``weights="presence"``). A document with no scored token has an empty row."""
    if weights not in TOKEN_WEIGHTS:
        raise ValueError(f"weights must be one of {TOKEN_WEIGHTS}, got {weights!r}")
    ids = np.asarray(input_ids, dtype=np.int64)
    mask = np.asarray(loss_mask).astype(bool)
    if ids.shape != mask.shape or ids.ndim != 2:
        raise ValueError(f"input_ids and loss_mask must both be [n, T], got {ids.shape} and {mask.shape}")
    rows = np.broadcast_to(np.arange(ids.shape[0])[:, None], ids.shape)[mask]
    cols = ids[mask]
    if cols.size and (cols.min() < 0 or cols.max() >= vocab_size):
        raise ValueError(f"token ids must lie in [0, {vocab_size}), got {cols.min()}..{cols.max()}")
    P = sp.csr_matrix((np.ones(cols.size), (rows, cols)), shape=(ids.shape[0], int(vocab_size)))
    P.sum_duplicates()
    P.data[:] = 1.0
    return weigh_presence(P, mask.sum(axis=1), weights)


def weigh_presence(presence: sp.spmatrix, scored: np.ndarray, weights: str) -> sp.csr_matrix:
    """``presence [n, V]`` (any positive entries where a document holds a token) with its entries
    set as `token_presence` sets them: ``1 / scored[j]`` in row ``j`` (``weights="per_document"``;
    ``scored [n]``: each document's number of scored tokens) or 1 (``"presence"``). Lets a caller
    that kept one weighting and the counts switch without encoding the corpus again."""
    if weights not in TOKEN_WEIGHTS:
        raise ValueError(f"weights must be one of {TOKEN_WEIGHTS}, got {weights!r}")
    P = sp.csr_matrix(presence, dtype=np.float64, copy=True)
    P.data[:] = 1.0
    if weights == "per_document":
        P = sp.csr_matrix(sp.diags(1.0 / np.maximum(np.asarray(scored, dtype=np.float64), 1.0)) @ P)
    return P


def completion_tokens(input_ids: np.ndarray, loss_mask: np.ndarray) -> list[np.ndarray]:
    """Each query's distinct scored (completion) token ids, sorted: ``q`` int64 arrays."""
    ids = np.asarray(input_ids, dtype=np.int64)
    mask = np.asarray(loss_mask).astype(bool)
    return [np.unique(ids[i][mask[i]]) for i in range(ids.shape[0])]


def token_component(
    residual: Float[np.ndarray, "q K"],
    membership: sp.spmatrix,
    presence: sp.spmatrix,
    tokens: Sequence[np.ndarray],
) -> tuple[sp.csr_matrix, list[dict[int, float]]]:
    """The token component ``P_T v`` ``[q, n]`` (float32 CSR) of each query's ``residual`` (its
    measurements minus the Lasso's subset sums ``M s``), and each query's non-zero coefficients
    ``{token id: v_t}`` (module docstring). A query with no completion token in any training
    document gets an empty row."""
    r = np.asarray(residual, dtype=np.float64)
    M = sp.csr_matrix(membership, dtype=np.float64)
    P = sp.csc_matrix(presence, dtype=np.float64)
    if r.ndim != 2 or r.shape[1] != M.shape[0]:
        raise ValueError(f"residual must be [q, K] with K = {M.shape[0]}, got {r.shape}")
    if P.shape[0] != M.shape[1]:
        raise ValueError(f"presence has {P.shape[0]} documents, the design {M.shape[1]}")
    if len(tokens) != r.shape[0]:
        raise ValueError(f"{len(tokens)} token lists for {r.shape[0]} queries")
    counts = sp.csc_matrix(M @ P)  # [K, V]: documents of each subset holding each token
    df = np.diff(P.indptr)
    rows, coefficients = [], []
    for i, t in enumerate(tokens):
        t = np.asarray(t, dtype=np.int64)
        t = t[(t >= 0) & (t < P.shape[1])]
        t = t[df[t] > 0]
        if t.size == 0:
            rows.append(sp.csr_matrix((1, P.shape[0]), dtype=np.float32))
            coefficients.append({})
            continue
        G = counts[:, t].toarray()
        G -= G.mean(axis=0)
        v, _ = nnls(G, r[i] - r[i].mean())
        keep = v > 0
        coefficients.append({int(a): float(b) for a, b in zip(t[keep], v[keep])})
        row = (P[:, t[keep]] @ v[keep]) if keep.any() else np.zeros(P.shape[0])
        rows.append(sp.csr_matrix(np.asarray(row, dtype=np.float32).reshape(1, -1)))
    out = sp.vstack(rows, format="csr") if rows else sp.csr_matrix((0, P.shape[0]), dtype=np.float32)
    out.eliminate_zeros()
    return out.astype(np.float32), coefficients


def add_token_component(
    y: Float[np.ndarray, "q K"],
    membership: sp.spmatrix,
    lasso_scores: sp.spmatrix,
    presence: sp.spmatrix,
    tokens: Sequence[np.ndarray],
) -> tuple[sp.csr_matrix, list[dict[int, float]]]:
    """``lasso_scores + token_component(y - M s)``: the ``"lasso+tokens"`` recovery's scores
    ``[q, n]`` (float32 CSR) and each query's token coefficients."""
    s = sp.csr_matrix(lasso_scores, dtype=np.float64)
    fitted = np.asarray((s @ sp.csr_matrix(membership, dtype=np.float64).T).todense())  # [q, K]: M s per query
    extra, coefficients = token_component(np.asarray(y, dtype=np.float64) - fitted, membership, presence, tokens)
    out = sp.csr_matrix(s + extra.astype(np.float64), dtype=np.float32)
    out.eliminate_zeros()
    size = 12.0 * out.nnz
    if size > WARN_BYTES:
        q = max(out.shape[0], 1)
        warnings.warn(f"the scores of these {out.shape[0]} queries take {size / 1e9:.1f} GB ({out.nnz / q:,.0f} non-zeros "
                      f"per query of {out.shape[1]:,} documents: the token component is dense over the documents "
                      "holding a chosen completion token). Fix: attribute fewer queries per call, or pass "
                      "recovery=\"lasso\" for scores with at most K non-zeros per query.", UserWarning, stacklevel=3)
    return out, coefficients
