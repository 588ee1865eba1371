"""Membership (contamination) baselines from the model alone: loss, Min-K% probability, zlib ratio.

They answer "did the model see this text in training?" from the model's token probabilities,
with no access to the corpus; the standard references for contamination detection against which
`stride_nnsight.apps.contamination_scores` (and BM25, which reads the corpus) are compared.
Every score is oriented so that **higher = more likely contained**:

* ``"loss"``: minus the mean next-token NLL of the text (nats/token) (Yeom et al., 2018);
* ``"min_k"``: the mean log-probability of the ``k`` fraction of the text's tokens the model
  finds least likely (Min-K% Prob, Shi et al., 2024; ``k = 0.2`` by default);
* ``"zlib"``: minus the ratio of the text's mean NLL to its zlib-compressed size in bytes
  (Carlini et al., 2021): a text the model finds easy *relative to how compressible it is*.

Texts are tokenized as STRIDE tokenizes training texts (`encode_texts`: BOS prepended when the
tokenizer has one; every token after the first is scored).
"""

from __future__ import annotations

import math
import zlib
from typing import Any, Optional, Sequence

import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from ..inputs import as_text_list
from ._common import ModelHandle, eval_mode

__all__ = ["MEMBERSHIP_METHODS", "token_logprobs", "membership_scores"]

MEMBERSHIP_METHODS = ("loss", "min_k", "zlib")


@torch.no_grad()
def token_logprobs(model: Any, texts: Any, *, max_length: Optional[int] = 64, batch_size: int = 32,
                   tokenizer: Any = None, progress: bool = False) -> list[Float[Tensor, "t"]]:
    """Per text, the log-probability (nats, float32) of each scored token given the tokens before it.

    ``model``: anything the library accepts (nnsight ``TransformersModel``, TransformerLens bridge,
    HF causal LM with ``tokenizer=``). ``max_length``: tokens kept per text (BOS included);
    ``None`` keeps all (up to what the model accepts). Returns a list of ``[t_i]`` tensors, ``t_i``
    = the text's token count (BOS excluded) after truncation.
    """
    texts = as_text_list(texts, "texts")
    handle = ModelHandle(model, tokenizer)
    batch = handle.encode_train(texts, max_length)
    out: list[Tensor] = []
    bar = tqdm(total=len(batch), disable=not progress, desc="token log-probabilities", unit="text")
    with eval_mode(handle.module):
        for start in range(0, len(batch), batch_size):
            part = batch.rows(list(range(start, min(start + batch_size, len(batch))))).to(handle.device)
            logp = torch.log_softmax(handle.logits(part.input_ids, part.attention_mask)[:, :-1].float(), dim=-1)
            taken = logp.gather(-1, part.input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)
            scored = part.loss_mask[:, 1:].bool()
            out.extend(row[mask].cpu() for row, mask in zip(taken, scored))
            bar.update(len(part))
    bar.close()
    return out


def membership_scores(model: Any, texts: Any, methods: Sequence[str] = MEMBERSHIP_METHODS, *, k: float = 0.2,
                      max_length: Optional[int] = 64, batch_size: int = 32, tokenizer: Any = None,
                      progress: bool = False) -> dict[str, Float[Tensor, "n"]]:
    """Contamination scores of ``texts`` from the model's token probabilities (higher = more likely
    seen in training), one float32 ``[n]`` tensor per name in ``methods`` (module docstring).

    ``k``: the Min-K% fraction of tokens, in (0, 1]; at least one token is always used.
    ``texts`` are the evaluation items as the model would read them (for a prompt/completion item,
    ``prompt + completion``).
    """
    unknown = [m for m in methods if m not in MEMBERSHIP_METHODS]
    if unknown or not methods:
        raise ValueError(f"unknown membership methods {unknown}: use some of {MEMBERSHIP_METHODS}")
    if not 0.0 < k <= 1.0:
        raise ValueError(f"k is a fraction of the tokens in (0, 1], got {k}")
    texts = as_text_list(texts, "texts")
    logps = token_logprobs(model, texts, max_length=max_length, batch_size=batch_size, tokenizer=tokenizer,
                           progress=progress)
    out: dict[str, Tensor] = {}
    mean_nll = torch.tensor([-float(lp.mean()) for lp in logps])
    if "loss" in methods:
        out["loss"] = -mean_nll
    if "min_k" in methods:
        out["min_k"] = torch.tensor([float(lp.sort().values[: max(1, math.ceil(k * len(lp)))].mean())
                                     for lp in logps])
    if "zlib" in methods:
        size = torch.tensor([float(len(zlib.compress(t.encode("utf-8")))) for t in texts])
        out["zlib"] = -mean_nll / size
    return {name: out[name].float() for name in methods}
