"""Representation similarity: cosine of mean-pooled residual streams."""

from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ..inputs import TokenBatch
from ..results import Attribution
from ._common import ModelHandle, base_provenance, check_inputs

__all__ = ["representation_similarity", "pooled_representations"]


@torch.no_grad()
def pooled_representations(
    handle: ModelHandle,
    batch: TokenBatch,
    layer: int,
    batch_size: int = 32,
    skip_bos: bool = True,
    progress: bool = False,
    desc: str = "representations",
) -> Tensor:
    """Mean over real tokens of the residual stream at the output of block ``layer``: ``[n, d]`` float32.

    Runs the backend's own forward (the site STRIDE steers). Padding never enters the
    mean; with ``skip_bos`` the first position is left out when the tokenizer prepends
    BOS (it is the same token at the same position in every text, so it would add a
    shared component to every vector and inflate all cosines).
    """
    backend = handle.backend
    bos = getattr(handle.tokenizer, "bos_token_id", None) is not None
    out = []
    bar = tqdm(total=len(batch), disable=not progress, desc=desc, unit="ex")
    for start in range(0, len(batch), batch_size):
        part = batch.rows(list(range(start, min(start + batch_size, len(batch))))).to(handle.device)
        _, z = backend.forward(part.input_ids, part.attention_mask, layer)
        mask = part.attention_mask.to(torch.float32).clone()
        if skip_bos and bos:
            keep = mask.sum(1) > 1  # never empty a row
            mask[keep, 0] = 0.0
        pooled = (z.float() * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp(min=1.0)
        out.append(pooled.cpu())
        bar.update(len(part))
    bar.close()
    return torch.cat(out)


def representation_similarity(
    model: Any,
    train_texts: Any,
    prompts: Sequence[str],
    completions: Sequence[str],
    *,
    layer: int = -1,
    batch_size: int = 32,
    max_length: int = 64,
    skip_bos: bool = True,
    query_ids: Optional[Sequence[Any]] = None,
    train_ids: Optional[Sequence[Any]] = None,
    tokenizer: Any = None,
    progress: bool = False,
) -> Attribution:
    """Cosine similarity of mean-pooled residual streams (output of block ``layer``).

    The query is ``prompt + completion`` pooled over all its tokens (prompt included),
    a training text over all its tokens; both tokenized as STRIDE does
    (`encode_queries` / `encode_texts`, BOS prepended, truncated to ``max_length``).
    ``scores[q, j]`` in ``[-1, 1]``; 1 for identical token sequences.
    """
    train, prompts, completions, qids, tids = check_inputs(train_texts, prompts, completions, query_ids, train_ids)
    handle = ModelHandle(model, tokenizer)
    layer_index = handle.backend.check_layer(layer)
    q = pooled_representations(handle, handle.encode_queries(prompts, completions, max_length), layer_index,
                               batch_size, skip_bos, progress, "query representations")
    t = pooled_representations(handle, handle.encode_train(train, max_length), layer_index,
                               batch_size, skip_bos, progress, "train representations")
    q = torch.nn.functional.normalize(q.double(), dim=-1)
    t = torch.nn.functional.normalize(t.double(), dim=-1)
    return Attribution(
        scores=(q @ t.T).float(),
        query_ids=qids,
        train_ids=tids,
        query_texts=[p + c for p, c in zip(prompts, completions)],
        train_texts=train,
        provenance=base_provenance("representation_similarity", handle.backend, layer=layer_index,
                                   hook=handle.backend.hook_name(layer_index), pooling="mean",
                                   skip_bos=skip_bos, similarity="cosine", max_length=max_length),
    )
