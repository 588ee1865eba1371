"""Turning training texts and (prompt, completion) queries into padded token batches."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
from jaxtyping import Int
from torch import Tensor

__all__ = ["TokenBatch", "encode_texts", "encode_queries", "as_text_list"]


@dataclass
class TokenBatch:
    """Right-padded token ids with masks.

    ``input_ids [b, t]`` (int64), ``attention_mask [b, t]`` (1 on real tokens),
    ``loss_mask [b, t]`` (1 on tokens whose prediction is scored: every token after the
    first for training texts, the completion tokens for queries).
    """

    input_ids: Int[Tensor, "b t"]
    attention_mask: Int[Tensor, "b t"]
    loss_mask: Int[Tensor, "b t"]

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def rows(self, index: Tensor | Sequence[int]) -> "TokenBatch":
        """Select rows and trim trailing all-padding columns."""
        index = torch.as_tensor(index, dtype=torch.long)
        mask = self.attention_mask[index]
        width = max(int(mask.sum(1).max().item()), 2) if len(index) else 2
        return TokenBatch(self.input_ids[index, :width], mask[:, :width], self.loss_mask[index, :width])

    def to(self, device: torch.device) -> "TokenBatch":
        return TokenBatch(self.input_ids.to(device), self.attention_mask.to(device), self.loss_mask.to(device))


def as_text_list(texts: Any, name: str = "texts") -> list[str]:
    """Accept a list of str, a tuple, or a ``datasets.Dataset`` with a ``"text"`` column."""
    if isinstance(texts, str):
        raise TypeError(f"{name} must be a list of strings, not a single string: wrap it as [{name}]")
    column_names = getattr(texts, "column_names", None)
    if column_names is not None:
        if "text" not in column_names:
            raise ValueError(f"{name}: the dataset has no 'text' column (columns: {column_names})")
        texts = texts["text"]
    try:
        out = list(texts)
    except TypeError as e:
        raise TypeError(f"{name} must be a list of strings or a datasets.Dataset with a 'text' column") from e
    if not out:
        raise ValueError(f"{name} is empty: pass at least one text")
    for i, t in enumerate(out):
        if not isinstance(t, str):
            raise TypeError(f"{name}[{i}] is a {type(t).__name__}, expected str")
    return out


def _pad_id(tokenizer: Any) -> int:
    for attr in ("pad_token_id", "eos_token_id", "unk_token_id"):
        value = getattr(tokenizer, attr, None)
        if value is not None:
            return int(value)
    return 0


def _ids(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _pad(sequences: list[list[int]], scored: list[list[int]], pad_id: int) -> TokenBatch:
    width = max(2, max(len(s) for s in sequences))
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attn = torch.zeros((len(sequences), width), dtype=torch.long)
    loss = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, (seq, sc) in enumerate(zip(sequences, scored)):
        ids[i, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        attn[i, : len(seq)] = 1
        loss[i, : len(sc)] = torch.tensor(sc, dtype=torch.long)
    return TokenBatch(ids, attn, loss)


def encode_texts(tokenizer: Any, texts: Sequence[str], max_length: int) -> TokenBatch:
    """Tokenize training texts (truncated to ``max_length`` tokens, BOS prepended when the
    tokenizer has one); every token after the first is scored."""
    bos = getattr(tokenizer, "bos_token_id", None)
    seqs, scored = [], []
    for i, text in enumerate(texts):
        ids = _ids(tokenizer, text)
        if bos is not None:
            ids = [int(bos)] + ids
        ids = ids[:max_length]
        if len(ids) < 2:
            raise ValueError(f"training text {i} is too short to score (needs >= 1 token): {text!r}")
        seqs.append(ids)
        scored.append([0] + [1] * (len(ids) - 1))
    return _pad(seqs, scored, _pad_id(tokenizer))


def encode_queries(tokenizer: Any, prompts: Sequence[str], completions: Sequence[str], max_length: int) -> TokenBatch:
    """Tokenize ``prompt + completion`` pairs (each tokenized separately, then joined; BOS
    prepended when the tokenizer has one); only completion tokens are scored. Long prompts
    are cut from the left so the completion always fits."""
    if len(prompts) != len(completions):
        raise ValueError(f"got {len(prompts)} prompts but {len(completions)} completions: pass one completion per prompt")
    bos = getattr(tokenizer, "bos_token_id", None)
    seqs, scored = [], []
    for i, (p, c) in enumerate(zip(prompts, completions)):
        if not isinstance(p, str) or not isinstance(c, str):
            raise TypeError(f"query {i}: prompt and completion must be str")
        p_ids, c_ids = _ids(tokenizer, p), _ids(tokenizer, c)
        if not c_ids:
            raise ValueError(f"query {i}: the completion {c!r} has no tokens; attribution needs at least one")
        head = ([int(bos)] if bos is not None else []) + p_ids
        if not head:
            raise ValueError(f"query {i}: empty prompt and the tokenizer has no BOS token to condition on")
        keep = max_length - len(c_ids)
        if keep < 1:
            raise ValueError(f"query {i}: completion has {len(c_ids)} tokens, more than max_length={max_length}")
        head = head[-keep:]
        seqs.append(head + c_ids)
        scored.append([0] * len(head) + [1] * len(c_ids))
    return _pad(seqs, scored, _pad_id(tokenizer))
