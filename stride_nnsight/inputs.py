"""Turning training texts and (prompt, completion) queries into padded token batches."""

from __future__ import annotations

import sys
import warnings
from collections.abc import Mapping, Set
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np
import torch
from jaxtyping import Int
from torch import Tensor

__all__ = ["TokenBatch", "encode_texts", "encode_queries", "as_text_list", "resolve_max_length"]


@dataclass
class TokenBatch:
    """Right-padded token ids with masks.

    ``input_ids [b, t]`` (int64), ``attention_mask [b, t]`` (1 on real tokens),
    ``loss_mask [b, t]`` (1 on tokens whose prediction is scored: every token after the
    first for training texts, the completion tokens for queries).

    Memory: ``t`` is the longest row, so a batch costs ``24 * b * t`` bytes (three int64
    tensors), e.g. 10,000 training documents padded to 512 tokens take 123 MB; one long
    outlier document widens every row. ``rows`` trims the selected rows to *their* longest
    row, so the forward passes never run on more padding than their own batch needs.
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
    """Turn a collection of texts into a ``list[str]`` whose positions are the example ids.

    Accepted: a list / tuple / generator of str, a 1-D numpy array of str, a pandas
    ``Series`` (its values), a pandas ``DataFrame`` or ``datasets.Dataset`` with a ``"text"``
    column. Refused with the fix in the message: a single str, a dict (iterating it gives its
    keys), a set (no stable order, so ids would change between runs), a table without a
    ``"text"`` column, a non-str element (its index is named), a text that is not valid
    UTF-8 (e.g. a lone surrogate; its index is named), an empty collection.
    """
    if isinstance(texts, (str, bytes)):
        raise TypeError(f"{name} must be a list of strings, not a single string: wrap it as [{name}]")
    ids_name = "train_ids" if name == "train_texts" else "query_ids"
    if isinstance(texts, Mapping):
        if getattr(texts, "column_names", None) is not None:  # datasets.DatasetDict
            raise TypeError(f"{name} is a {type(texts).__name__} of splits {list(texts)}: pick one split, "
                            f"e.g. {name}=ds[{next(iter(texts), 'train')!r}]")
        raise TypeError(f"{name} is a {type(texts).__name__}: iterating it gives its keys, not its texts. "
                        f"Pass list(d.values()) and {ids_name}=list(d.keys())")
    if isinstance(texts, Set):
        raise TypeError(f"{name} is a {type(texts).__name__}, which has no stable order: example ids (positions) "
                        f"would change from run to run. Pass sorted({name}) or a list")
    texts = _table_column(texts, name)
    if isinstance(texts, np.ndarray) and texts.ndim != 1:
        raise ValueError(f"{name} is a numpy array of shape {texts.shape}: pass a 1-D array (one text per entry)")
    try:
        out = list(texts)
    except TypeError as e:
        raise TypeError(f"{name} must be a list of strings or a datasets.Dataset with a 'text' column, "
                        f"got {type(texts).__name__}") from e
    if not out:
        raise ValueError(f"{name} is empty: pass at least one text")
    for i, t in enumerate(out):
        if not isinstance(t, str):
            missing = " (a missing value?)" if t is None or (isinstance(t, float) and t != t) else ""
            raise TypeError(f"{name}[{i}] is a {type(t).__name__}{missing}, expected str")
        if type(t) is not str:  # numpy.str_ and other str subclasses: store plain str
            out[i] = str(t)
        try:
            t.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError(f"{name}[{i}] cannot be used: it starts {t[:40]!r}. {_tokenize_fix(t)}") from None
    return out


def _table_column(texts: Any, name: str) -> Any:
    """The ``"text"`` column of a pandas DataFrame / ``datasets.Dataset``, the values of a
    pandas Series; anything else unchanged."""
    pd = sys.modules.get("pandas")  # a pandas object implies pandas is imported
    if pd is not None and isinstance(texts, pd.DataFrame):
        columns = [str(c) for c in texts.columns]
        if "text" not in texts.columns:
            raise ValueError(f"{name}: the DataFrame has no 'text' column (columns: {columns}); rename the "
                             f"column holding the texts to 'text' or pass that column, e.g. df[{columns[0]!r}]"
                             if columns else f"{name}: the DataFrame has no columns")
        texts = texts["text"]
    if pd is not None and isinstance(texts, pd.Series):
        return texts.tolist()
    column_names = getattr(texts, "column_names", None)
    if column_names is not None:
        if "text" not in column_names:
            raise ValueError(f"{name}: the dataset has no 'text' column (columns: {column_names})")
        texts = texts["text"]
    return texts


def resolve_max_length(max_length: Optional[int], context_length: Optional[int], *,
                       warn: bool = True) -> Optional[int]:
    """The token cap to encode with: ``max_length`` clipped to the model's ``context_length``
    (with a one-line ``UserWarning`` when it is larger and ``warn``), or ``context_length``
    when ``max_length`` is ``None``. ``None`` means no cap (neither is known)."""
    if max_length is None:
        return context_length
    if context_length is not None and max_length > context_length:
        if warn:
            warnings.warn(f"max_length={max_length} exceeds the model's context of {context_length} tokens: "
                          f"using max_length={context_length}", UserWarning, stacklevel=3)
        return int(context_length)
    return int(max_length)


def _pad_id(tokenizer: Any) -> int:
    for attr in ("pad_token_id", "eos_token_id", "unk_token_id"):
        value = getattr(tokenizer, attr, None)
        if value is not None:
            return int(value)
    return 0


def _ids(tokenizer: Any, text: str, what: str) -> list[int]:
    """Token ids of ``text`` (no special tokens); a tokenizer failure names ``what`` (e.g.
    ``"training text 3"``), shows the text's start and says how to fix it."""
    try:
        try:  # verbose=False: the library truncates and warns itself (`encode_texts`), so the
            # tokenizer's own "longer than the specified maximum ... indexing errors" is moot
            return list(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])
        except TypeError as e:
            if "verbose" not in str(e):
                raise
            return list(tokenizer(text, add_special_tokens=False)["input_ids"])  # a tokenizer without verbose=
    except Exception as e:
        raise ValueError(f"{what} could not be tokenized ({type(e).__name__}: {e}); it starts "
                         f"{text[:40]!r}. {_tokenize_fix(text)}") from e


def _tokenize_fix(text: str) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        return (f"It holds a character that is not valid UTF-8 ({text[e.start]!r} at position {e.start}, e.g. a "
                f"lone surrogate left by bad decoding): clean it, e.g. text.encode('utf-8', 'replace').decode()")
    return "Check that the tokenizer accepts this text on its own: tokenizer(text)."


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


def encode_texts(tokenizer: Any, texts: Sequence[str], max_length: Optional[int], *,
                 context_length: Optional[int] = None) -> TokenBatch:
    """Tokenize training texts (BOS prepended when the tokenizer has one); every token after
    the first is scored.

    ``max_length``: tokens kept per text (BOS included), ``None`` = all. Truncating any text
    raises one ``UserWarning`` counting the cut texts. ``context_length`` (the model's) only
    words that warning's advice. The batch is ``[n, T]`` with ``T`` the longest kept text.
    """
    bos = getattr(tokenizer, "bos_token_id", None)
    seqs, scored, lengths = [], [], []
    for i, text in enumerate(texts):
        ids = _ids(tokenizer, text, f"training text {i}")
        if bos is not None:
            ids = [int(bos)] + ids
        lengths.append(len(ids))
        if max_length is not None:
            ids = ids[:max_length]
        if len(ids) < 2:
            raise ValueError(f"training text {i} is too short to score (needs >= 1 token): {text!r}")
        seqs.append(ids)
        scored.append([0] + [1] * (len(ids) - 1))
    if max_length is not None:
        cut = sum(length > max_length for length in lengths)
        if cut:
            if context_length is not None and max_length >= context_length:
                fix = (f"{max_length} tokens is the model's context: split long documents into chunks of at most "
                       f"{max_length} tokens")
            else:
                fix = (f"raise max_length (max_length=None uses the longest document, up to the model's context) "
                       f"or split long documents into chunks of at most {max_length} tokens")
            warnings.warn(f"{cut} of {len(lengths)} training documents are longer than max_length={max_length} "
                          f"tokens (longest: {max(lengths)} tokens, BOS included) and were truncated: their later "
                          f"tokens are neither trained on nor attributed. Fix: {fix}.", UserWarning, stacklevel=2)
    return _pad(seqs, scored, _pad_id(tokenizer))


def encode_queries(tokenizer: Any, prompts: Sequence[str], completions: Sequence[str], max_length: Optional[int], *,
                   context_length: Optional[int] = None) -> TokenBatch:
    """Tokenize ``prompt + completion`` pairs (each tokenized separately, then joined; BOS
    prepended when the tokenizer has one); only completion tokens are scored.

    ``max_length``: tokens per query (``None`` = no cap). A longer query keeps its whole
    completion and loses the *first* tokens of its prompt; one ``UserWarning`` counts the
    queries cut. ``context_length`` (the model's) only words that warning's advice.
    """
    if len(prompts) != len(completions):
        raise ValueError(f"got {len(prompts)} prompts but {len(completions)} completions: pass one completion per prompt")
    bos = getattr(tokenizer, "bos_token_id", None)
    seqs, scored, cut, longest = [], [], 0, 0
    for i, (p, c) in enumerate(zip(prompts, completions)):
        if not isinstance(p, str) or not isinstance(c, str):
            raise TypeError(f"query {i}: prompt and completion must be str")
        p_ids, c_ids = _ids(tokenizer, p, f"query {i} (prompt)"), _ids(tokenizer, c, f"query {i} (completion)")
        if not c_ids:
            raise ValueError(f"query {i}: the completion {c!r} has no tokens; attribution needs at least one")
        head = ([int(bos)] if bos is not None else []) + p_ids
        if not head:
            raise ValueError(f"query {i}: empty prompt and the tokenizer has no BOS token to condition on")
        if max_length is not None:
            keep = max_length - len(c_ids)
            if keep < 1:
                raise ValueError(f"query {i}: completion has {len(c_ids)} tokens, more than max_length={max_length} "
                                 f"allows (one token of prompt or BOS must fit too): shorten the completion")
            if len(head) > keep:
                cut += 1
                longest = max(longest, len(head) + len(c_ids))
                head = head[-keep:]
        seqs.append(head + c_ids)
        scored.append([0] * len(head) + [1] * len(c_ids))
    if cut:
        where = "the model's context" if context_length is not None and max_length >= context_length else "max_length"
        warnings.warn(f"{cut} of {len(seqs)} queries are longer than {max_length} tokens ({where}; longest: "
                      f"{longest} tokens, BOS included): their prompts were cut from the left, so the attribution "
                      f"only sees their last tokens. Fix: shorten those prompts"
                      + (" or raise max_length" if where == "max_length" else "") + ".", UserWarning, stacklevel=2)
    return _pad(seqs, scored, _pad_id(tokenizer))
