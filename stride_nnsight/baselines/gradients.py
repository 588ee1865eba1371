"""Gradient baselines on one checkpoint: gradient dot product (TracIn), gradient cosine, TRAK.

All use STRIDE's losses: a query's gradient is that of its mean completion NLL, a
training text's gradient that of its mean NLL over every token after the first
(`token_nll` with the `loss_mask` of `encode_queries` / `encode_texts`). Per-example
gradients are taken one example at a time (exact, no padding); fine for small models.
"""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import torch
from torch import Tensor

from ..results import Attribution
from ._common import ModelHandle, base_provenance, check_inputs, iter_loss_gradients, loss_gradients, select_parameters

__all__ = ["gradient_similarity", "trak", "example_gradients", "GaussianProjection"]


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
) -> Tensor:
    """Flattened per-example loss gradients ``[n, P]`` (float32, CPU), as the baselines use them.

    Pass ``texts`` (training loss: mean NLL of every token after the first) or
    ``prompts`` and ``completions`` (query loss: mean NLL of the completion tokens).
    ``params``: ``"all"`` or a list of parameter names / ``fnmatch`` patterns.
    """
    handle = ModelHandle(model, tokenizer)
    named = select_parameters(handle.module, params)
    if texts is not None:
        batch = handle.encode_train(list(texts), max_length)
    elif prompts is not None and completions is not None:
        batch = handle.encode_queries(list(prompts), list(completions), max_length)
    else:
        raise ValueError("pass texts=... or prompts=... and completions=...")
    return loss_gradients(handle, batch, named, batch_size, progress)


def _gradient_settings(handle: ModelHandle, named, params, max_length) -> dict[str, Any]:
    return {
        "params": params if isinstance(params, str) else list(params),
        "n_parameters": int(sum(p.numel() for _, p in named)),
        "parameter_names": [n for n, _ in named],
        "max_length": max_length,
        "query_loss": "mean completion NLL",
        "train_loss": "mean NLL of every token after the first",
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
) -> Attribution:
    """Gradient dot product (``normalize=False``, TracIn at one checkpoint with learning
    rate 1) or cosine (``normalize=True``) between each query's and each training text's
    loss gradient.

    ``scores[q, j] = <g_q, g_j>``: the first-order decrease of the query's loss after one
    SGD step (step size 1) on example ``j``, so positive = proponent. Query gradients are
    kept (``[q, P]``); training gradients are computed ``batch_size`` at a time and dropped.
    """
    train, prompts, completions, qids, tids = check_inputs(train_texts, prompts, completions, query_ids, train_ids)
    handle = ModelHandle(model, tokenizer)
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
) -> Attribution:
    """TRAK-style scores from one model: ``phi = R^T g`` (seeded Gaussian projection of the
    loss gradient to ``proj_dim``), then

        scores = Phi_q (Phi^T Phi + lambda I)^-1 Phi^T

    with ``Phi [n, k]`` the training features. ``lambda = damping * mean_j ||phi_j||^2``
    (relative damping: the mean non-zero eigenvalue of ``Phi^T Phi`` when ``n <= k``);
    the absolute value is in the provenance. Positive = proponent.

    Simplifications against TRAK (Park et al. 2023): one model (no ensemble over
    independently trained checkpoints), loss gradients instead of the margin
    ``log p/(1-p)`` gradients, no ``Q = diag(1 - p)`` reweighting, no sparsification.
    """
    train, prompts, completions, qids, tids = check_inputs(train_texts, prompts, completions, query_ids, train_ids)
    if damping < 0:
        raise ValueError(f"damping must be >= 0, got {damping}")
    handle = ModelHandle(model, tokenizer)
    named = select_parameters(handle.module, params)
    n_params = int(sum(p.numel() for _, p in named))
    projection = GaussianProjection(n_params, proj_dim, seed, handle.device, [p.numel() for _, p in named])
    queries = handle.encode_queries(prompts, completions, max_length)
    texts = handle.encode_train(train, max_length)
    phi_q = _trak_features(handle, queries, named, projection, batch_size, progress, "query gradients")
    phi = _trak_features(handle, texts, named, projection, batch_size, progress, "train gradients")
    del projection
    gram = phi.T @ phi
    lam = float(damping) * float((phi * phi).sum(1).mean())
    gram.diagonal().add_(lam)
    try:
        factor = torch.linalg.cholesky(gram)
        weights = torch.cholesky_solve(phi.T, factor)  # (Phi^T Phi + lam I)^-1 Phi^T  [k, n]
    except RuntimeError:  # singular (damping 0 and n < k): least squares via the pseudo-inverse
        weights = torch.linalg.pinv(gram, hermitian=True) @ phi.T
    scores = phi_q @ weights
    return Attribution(
        scores=scores.float(),
        query_ids=qids,
        train_ids=tids,
        query_texts=[p + c for p, c in zip(prompts, completions)],
        train_texts=train,
        provenance=base_provenance("trak", handle.backend, proj_dim=proj_dim, damping=damping,
                                   damping_absolute=lam, seed=seed, n_models=1,
                                   projection="gaussian N(0, 1/proj_dim)",
                                   **_gradient_settings(handle, named, params, max_length)),
    )
