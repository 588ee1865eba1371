"""Gradient baselines on one checkpoint: gradient dot product (TracIn), gradient cosine, TRAK.

All use STRIDE's losses: a query's gradient is that of its mean completion NLL, a
training text's gradient that of its mean NLL over every token after the first
(`token_nll` with the `loss_mask` of `encode_queries` / `encode_texts`). Per-example
gradients are taken one example at a time (``per_example="loop"``, the default: no padding)
or a chunk of ``batch_size`` examples at once under ``torch.func.vmap`` (``per_example="vmap"``:
the same gradients up to float rounding; faster where batching pays, e.g. on a GPU).
"""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import torch
from torch import Tensor

from ..results import Attribution
from ._common import ModelHandle, base_provenance, check_inputs, iter_loss_gradients, loss_gradients, select_parameters

__all__ = ["gradient_similarity", "trak", "trak_features", "trak_scores", "example_gradients", "GaussianProjection"]


def example_gradients(
    model: Any,
    *,
    texts: Optional[Sequence[str]] = None,
    prompts: Optional[Sequence[str]] = None,
    completions: Optional[Sequence[str]] = None,
    params: Any = "all",
    max_length: int = 64,
    batch_size: int = 32,
    tokenizer: Any = None,
    progress: bool = False,
    per_example: str = "loop",
) -> Tensor:
    """Flattened per-example loss gradients ``[n, P]`` (float32, CPU), as the baselines use them.

    Pass ``texts`` (training loss: mean NLL of every token after the first) or
    ``prompts`` and ``completions`` (query loss: mean NLL of the completion tokens).
    ``params``: ``"all"`` or a list of parameter names / ``fnmatch`` patterns.
    """
    handle = ModelHandle(model, tokenizer, per_example)
    named = select_parameters(handle.module, params)
    batch, _ = _encode_either(handle, texts, prompts, completions, max_length)
    return loss_gradients(handle, batch, named, batch_size, progress)


def _encode_either(handle: ModelHandle, texts, prompts, completions, max_length: int) -> tuple[Any, str]:
    """``texts`` (training loss) or ``prompts`` + ``completions`` (query loss), encoded by
    ``handle``, with a progress label; a clear error when neither is given."""
    if texts is not None:
        return handle.encode_train(list(texts), max_length), "train gradients"
    if prompts is not None and completions is not None:
        return handle.encode_queries(list(prompts), list(completions), max_length), "query gradients"
    raise ValueError("pass texts=... or prompts=... and completions=...")


def _gradient_settings(handle: ModelHandle, named, params, max_length) -> dict[str, Any]:
    return {
        "params": params if isinstance(params, str) else list(params),
        "n_parameters": int(sum(p.numel() for _, p in named)),
        "parameter_names": [n for n, _ in named],
        "max_length": max_length,
        "query_loss": "mean completion NLL",
        "train_loss": "mean NLL of every token after the first",
        "per_example": handle.per_example,
    }


def gradient_similarity(
    model: Any,
    train_texts: Any,
    prompts: Sequence[str],
    completions: Sequence[str],
    *,
    normalize: bool = False,
    params: Any = "all",
    batch_size: int = 32,
    max_length: int = 64,
    query_ids: Optional[Sequence[Any]] = None,
    train_ids: Optional[Sequence[Any]] = None,
    tokenizer: Any = None,
    progress: bool = False,
    per_example: str = "loop",
) -> Attribution:
    """Gradient dot product (``normalize=False``, TracIn at one checkpoint with learning
    rate 1) or cosine (``normalize=True``) between each query's and each training text's
    loss gradient.

    ``scores[q, j] = <g_q, g_j>``: the first-order decrease of the query's loss after one
    SGD step (step size 1) on example ``j``, so positive = proponent. Query gradients are
    kept (``[q, P]``); training gradients are computed ``batch_size`` at a time and dropped.
    """
    train, prompts, completions, qids, tids = check_inputs(train_texts, prompts, completions, query_ids, train_ids)
    handle = ModelHandle(model, tokenizer, per_example)
    named = select_parameters(handle.module, params)
    queries = handle.encode_queries(prompts, completions, max_length)
    texts = handle.encode_train(train, max_length)
    gq = loss_gradients(handle, queries, named, batch_size, progress, "query gradients").to(handle.device)
    if normalize:
        gq = torch.nn.functional.normalize(gq, dim=-1)
    scores = torch.empty(len(prompts), len(train))
    for rows, g in iter_loss_gradients(handle, texts, named, batch_size, progress, "train gradients"):
        if normalize:
            g = torch.nn.functional.normalize(g, dim=-1)
        scores[:, rows] = (gq @ g.T).float().cpu()
    method = "gradient_cosine" if normalize else "gradient_dot"
    return Attribution(
        scores=scores,
        query_ids=qids,
        train_ids=tids,
        query_texts=[p + c for p, c in zip(prompts, completions)],
        train_texts=train,
        provenance=base_provenance(method, handle.backend, normalize=normalize, checkpoints=1,
                                   learning_rate=1.0, **_gradient_settings(handle, named, params, max_length)),
    )


class GaussianProjection:
    """A seeded Gaussian random projection ``R [P, k]`` with entries ``N(0, 1/k)``
    (so ``E[R R^T] = I`` and ``<R^T g, R^T h> ~= <g, h>``), generated block by block
    (one block per parameter tensor) from ``torch.Generator().manual_seed(seed)``.

    Stored in float32: ``4 P k`` bytes; ``max_bytes`` guards against accidents.
    """

    def __init__(self, n_params: int, proj_dim: int, seed: int = 0, device: Any = "cpu",
                 block_sizes: Optional[Sequence[int]] = None, max_bytes: float = 4 * 2**30) -> None:
        if proj_dim < 1:
            raise ValueError(f"proj_dim must be >= 1, got {proj_dim}")
        if 4.0 * n_params * proj_dim > max_bytes:
            raise ValueError(
                f"a {n_params} x {proj_dim} projection needs {4.0 * n_params * proj_dim / 2**30:.1f} GiB "
                f"(limit {max_bytes / 2**30:.1f} GiB): restrict params=... or lower proj_dim"
            )
        sizes = list(block_sizes) if block_sizes is not None else [n_params]
        if sum(sizes) != n_params:
            raise ValueError("block sizes do not add up to n_params")
        gen = torch.Generator().manual_seed(int(seed))
        scale = 1.0 / math.sqrt(proj_dim)
        self.matrix = torch.cat([torch.randn(s, proj_dim, generator=gen) * scale for s in sizes]).to(device)
        self.proj_dim = proj_dim
        self.seed = seed

    def __call__(self, gradients: Tensor) -> Tensor:
        """``[n, P] -> [n, k]``."""
        return gradients.to(self.matrix.dtype) @ self.matrix


def _trak_features(handle, batch, named, projection, batch_size, progress, desc) -> Tensor:
    feats = [projection(g).cpu() for _, g in iter_loss_gradients(handle, batch, named, batch_size, progress, desc)]
    return torch.cat(feats).double()


def trak_features(
    model: Any,
    *,
    texts: Optional[Sequence[str]] = None,
    prompts: Optional[Sequence[str]] = None,
    completions: Optional[Sequence[str]] = None,
    proj_dim: int = 512,
    seed: int = 0,
    params: Any = "all",
    max_length: int = 64,
    batch_size: int = 32,
    tokenizer: Any = None,
    progress: bool = False,
    per_example: str = "loop",
) -> Tensor:
    """TRAK features ``phi = R^T g`` ``[n, proj_dim]`` (float64, CPU) of ``texts`` (training loss)
    or of ``prompts`` + ``completions`` (query loss), with ``R`` the seeded `GaussianProjection`.
    The columns of ``R`` are i.i.d., so the first ``k`` columns of these features are themselves
    features under a valid ``k``-dimensional Gaussian projection (not the one ``proj_dim=k``
    draws): one feature pass serves a sweep over smaller sizes (`trak_scores` is invariant to
    the features' overall scale)."""
    handle = ModelHandle(model, tokenizer, per_example)
    named = select_parameters(handle.module, params)
    n_params = int(sum(p.numel() for _, p in named))
    projection = GaussianProjection(n_params, proj_dim, seed, handle.device, [p.numel() for _, p in named])
    batch, desc = _encode_either(handle, texts, prompts, completions, max_length)
    return _trak_features(handle, batch, named, projection, batch_size, progress, desc)


def trak_scores(phi_q: Tensor, phi: Tensor, damping: float) -> tuple[Tensor, float]:
    """``scores = Phi_q (Phi^T Phi + lambda I)^-1 Phi^T`` ``[q, n]`` (float64) from query
    features ``phi_q [q, k]`` and training features ``phi [n, k]``, with ``lambda = damping *
    mean_j ||phi_j||^2`` (relative damping). Returns ``(scores, lambda)``."""
    if damping < 0:
        raise ValueError(f"damping must be >= 0, got {damping}")
    phi_q, phi = phi_q.double(), phi.double()
    gram = phi.T @ phi
    lam = float(damping) * float((phi * phi).sum(1).mean())
    gram.diagonal().add_(lam)
    try:
        factor = torch.linalg.cholesky(gram)
        weights = torch.cholesky_solve(phi.T, factor)  # (Phi^T Phi + lam I)^-1 Phi^T  [k, n]
    except RuntimeError:  # singular (damping 0 and n < k): least squares via the pseudo-inverse
        weights = torch.linalg.pinv(gram, hermitian=True) @ phi.T
    return phi_q @ weights, lam


def trak(
    model: Any,
    train_texts: Any,
    prompts: Sequence[str],
    completions: Sequence[str],
    *,
    proj_dim: int = 512,
    damping: float = 1e-3,
    seed: int = 0,
    params: Any = "all",
    batch_size: int = 32,
    max_length: int = 64,
    query_ids: Optional[Sequence[Any]] = None,
    train_ids: Optional[Sequence[Any]] = None,
    tokenizer: Any = None,
    progress: bool = False,
    per_example: str = "loop",
) -> Attribution:
    """TRAK-style scores: ``phi = R^T g`` (seeded Gaussian projection of the loss gradient to
    ``proj_dim``, `trak_features`), then per model

        scores_m = Phi_q (Phi^T Phi + lambda I)^-1 Phi^T

    with ``Phi [n, k]`` the training features and ``lambda = damping * mean_j ||phi_j||^2``
    (relative damping: the mean non-zero eigenvalue of ``Phi^T Phi`` when ``n <= k``;
    `trak_scores`). ``model`` may be one model or a sequence of independently trained models
    of the same architecture (an ensemble, as in TRAK): the scores are the mean of the
    per-model scores, model ``m`` projected with seed ``seed + m``. The absolute lambdas are
    in the provenance. Positive = proponent.

    Simplifications against TRAK (Park et al. 2023): loss gradients instead of the margin
    ``log p/(1-p)`` gradients, no ``Q = diag(1 - p)`` reweighting, no sparsification.
    """
    train, prompts, completions, qids, tids = check_inputs(train_texts, prompts, completions, query_ids, train_ids)
    if damping < 0:
        raise ValueError(f"damping must be >= 0, got {damping}")
    models = list(model) if isinstance(model, (list, tuple)) else [model]
    if not models:
        raise ValueError("trak needs at least one model")
    total: Optional[Tensor] = None
    lams = []
    common = dict(proj_dim=proj_dim, params=params, max_length=max_length, batch_size=batch_size,
                  tokenizer=tokenizer, progress=progress, per_example=per_example)
    for m, one in enumerate(models):
        phi_q = trak_features(one, prompts=prompts, completions=completions, seed=seed + m, **common)
        phi = trak_features(one, texts=train, seed=seed + m, **common)
        scores, lam = trak_scores(phi_q, phi, damping)
        total = scores if total is None else total + scores
        lams.append(lam)
    handle = ModelHandle(models[0], tokenizer)
    named = select_parameters(handle.module, params)
    return Attribution(
        scores=(total / len(models)).float(),
        query_ids=qids,
        train_ids=tids,
        query_texts=[p + c for p, c in zip(prompts, completions)],
        train_texts=train,
        provenance=base_provenance("trak", handle.backend, proj_dim=proj_dim, damping=damping,
                                   damping_absolute=lams[0] if len(lams) == 1 else lams, seed=seed,
                                   n_models=len(models), projection="gaussian N(0, 1/proj_dim)",
                                   **_gradient_settings(handle, named, params, max_length)),
    )
