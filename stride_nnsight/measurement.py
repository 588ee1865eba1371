"""Measurements: how each operator moves a query's metric.

For query ``x`` and operator ``k``: ``y_k(x) = f_k(x) - f_base(x)``, where ``f`` is a
scalar per query that is *higher* when the model "does the thing" more. The default
metric is the negative mean completion NLL, so ``y_k = Loss_base(x) - Loss_k(x)``:
positive when subset ``k``'s operator lowers the query's loss (the paper's sign, docs/method.md).

A user metric ``metric(logits, batch) -> [b]`` (logits ``[b, t, V]``, ``batch`` a
``TokenBatch``) can replace the loss, e.g. a logit difference between two tokens.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from .backends.base import ModelBackend
from .inputs import TokenBatch
from .operators import SteeringOperators, completion_measurements, head_measurements, token_nll

__all__ = ["Metric", "negative_completion_loss", "measure"]

Metric = Callable[[Tensor, TokenBatch], Tensor]


def negative_completion_loss(logits: Tensor, batch: TokenBatch) -> Tensor:
    """Default metric: ``-mean NLL`` of the scored (completion) tokens, per row ``[b]`` (nats)."""
    return -token_nll(logits, batch.input_ids, batch.loss_mask)


def _check_metric_output(value: Tensor, rows: int) -> Tensor:
    if not isinstance(value, Tensor) or value.shape != (rows,):
        shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
        raise ValueError(f"metric must return a tensor of shape [{rows}] (one scalar per row), got {shape}")
    return value


@torch.no_grad()
def measure(
    backend: ModelBackend,
    operators: SteeringOperators,
    queries: TokenBatch,
    batch_size: int = 256,
    metric: Optional[Metric] = None,
    progress: bool = True,
    intervention: Any = None,
    head: Optional[Callable[[Tensor], Tensor]] = None,
    first_order: bool = False,
) -> tuple[Float[Tensor, "q K"], Float[Tensor, "q"]]:
    """All ``K`` measurements for every query.

    Returns ``(y, base)``: ``y [q, K]`` float32 with ``y[i, k] = f_k(x_i) - f_base(x_i)``
    and ``base [q]`` the unsteered metric (for the default metric, minus the loss in nats).
    Residual placement runs ``q * K`` steered rows in chunks of ``batch_size``; logits
    placement needs one forward per query chunk and adds all ``K`` edits to its logits
    (with the default metric, only at the scored positions and for all queries of the
    chunk at once: `completion_measurements`).
    ``intervention`` (the user's own patch, see ``ModelBackend.forward``) is applied in
    every run, unsteered and steered alike, so ``y`` measures the operators *on the
    patched model*.
    Head placement: one forward per query chunk reads ``z`` and the output head's input ``h``;
    every operator's logits are ``head(h + B(z) a_k)`` (``head``: the model's output head,
    default `stride_nnsight.activations.head_function`), at the scored positions only with the
    default metric (`head_measurements`).
    ``first_order`` (default metric, logits or head placement only): each ``y[i, k]`` is the
    first-order part of the change, the metric's gradient w.r.t. the edited vector dotted with
    operator ``k``'s edit (`operators.completion_measurements`); ``StrideArguments.measurement``.
    """
    if first_order and (metric is not None or operators.placement == "residual"):
        raise ValueError("first-order measurements need the default metric and the 'logits' or 'head' placement")
    default_metric = metric is None
    metric = metric or negative_completion_loss
    operators.eval()
    device = backend.device
    K, n_q = operators.n_operators, len(queries)
    layer = operators.layer
    base = torch.empty(n_q)
    y = torch.empty(n_q, K)
    q_chunk = max(1, batch_size // 4)
    bar = tqdm(total=n_q * K, disable=not progress, desc="measuring operators", unit="row")
    if operators.placement == "head" and head is None:
        from .activations import head_function

        head = head_function(backend)
    for start in range(0, n_q, q_chunk):
        idx = list(range(start, min(start + q_chunk, n_q)))
        batch = queries.rows(idx).to(device)
        if operators.placement == "head":
            from .activations import read_activations

            z, h, logits = read_activations(backend, batch.input_ids, batch.attention_mask, layer, intervention)
        else:
            logits, z = backend.forward(batch.input_ids, batch.attention_mask, layer, intervention=intervention)
        base_values = _check_metric_output(metric(logits, batch), len(idx)).float().cpu()
        base[idx] = base_values
        if operators.placement == "head" and default_metric:
            values, _ = head_measurements(operators, head, z, h, batch.input_ids, batch.loss_mask,
                                          first_order=first_order)
            y[idx] = values.float().cpu()
            bar.update(len(idx) * K)
        elif operators.placement == "logits" and default_metric:
            values, _ = completion_measurements(operators, z, logits, batch.input_ids, batch.loss_mask,
                                                first_order=first_order)
            y[idx] = values.float().cpu()
            bar.update(len(idx) * K)
        elif operators.placement in ("logits", "head"):  # a custom metric: full steered logits, one query at a time
            edited_site = h if operators.placement == "head" else logits
            k_chunk = max(1, batch_size)
            for row, i in enumerate(idx):
                one = batch.rows([row])
                width = one.input_ids.shape[1]
                for k0 in range(0, K, k_chunk):
                    ks = torch.arange(k0, min(k0 + k_chunk, K), device=device)
                    rep = _repeat(one, len(ks))
                    steered = operators(z[row: row + 1, :width].expand(len(ks), -1, -1), ks,
                                        target=edited_site[row: row + 1, :width].expand(len(ks), -1, -1))
                    if operators.placement == "head":
                        steered = head(steered)
                    y[i, k0: k0 + len(ks)] = _check_metric_output(metric(steered, rep), len(ks)).float().cpu() \
                        - base_values[row]
                    bar.update(len(ks))
        else:
            pairs = [(row, k) for row in range(len(idx)) for k in range(K)]
            for p0 in range(0, len(pairs), batch_size):
                chunk = pairs[p0: p0 + batch_size]
                rows = torch.tensor([r for r, _ in chunk])
                ks = torch.tensor([k for _, k in chunk], device=device)
                sub = batch.rows(rows)
                steered, _ = backend.forward(sub.input_ids, sub.attention_mask, layer, edit=lambda h: operators(h, ks),
                                              intervention=intervention)
                values = _check_metric_output(metric(steered, sub), len(chunk)).float().cpu()
                y[torch.tensor(idx)[rows], ks.cpu()] = values - base_values[rows]
                bar.update(len(chunk))
    bar.close()
    if not torch.isfinite(y).all():
        bad = int((~torch.isfinite(y)).any(1).nonzero()[0, 0])
        raise FloatingPointError(f"non-finite measurement for query {bad}: check the metric and the inputs")
    return y, base


def _repeat(batch: TokenBatch, times: int) -> TokenBatch:
    return TokenBatch(batch.input_ids.expand(times, -1), batch.attention_mask.expand(times, -1),
                      batch.loss_mask.expand(times, -1))

