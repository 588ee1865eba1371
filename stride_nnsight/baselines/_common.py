"""Shared plumbing for the baselines: inputs, provenance, the torch module, per-example loss gradients."""

from __future__ import annotations

import contextlib
import copy
import fnmatch
import warnings
from typing import Any, Iterator, Optional, Sequence

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .. import __version__
from ..backends import ModelBackend, resolve_backend
from ..inputs import TokenBatch, as_text_list, encode_queries, encode_texts
from ..operators import token_nll

EVAL_EXTRA = "pip install 'stride-nnsight[eval]'"


def require(module: str, package: str):
    """Import an optional dependency or raise an ImportError naming the extra."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            f"this baseline needs the optional package {package!r}: install it with `{EVAL_EXTRA}` "
            f"(or `pip install {package}`)"
        ) from e


# ----------------------------------------------------------------------------- inputs
def check_inputs(
    train_texts: Any,
    prompts: Any,
    completions: Any,
    query_ids: Optional[Sequence[Any]],
    train_ids: Optional[Sequence[Any]],
) -> tuple[list[str], list[str], list[str], list[Any], list[Any]]:
    """Validate texts and ids; returns ``(train_texts, prompts, completions, query_ids, train_ids)``."""
    train = as_text_list(train_texts, "train_texts")
    prompts = as_text_list(prompts, "prompts")
    completions = as_text_list(completions, "completions")
    if len(prompts) != len(completions):
        raise ValueError(f"got {len(prompts)} prompts but {len(completions)} completions: pass one completion per prompt")
    if query_ids is not None and len(query_ids) != len(prompts):
        raise ValueError(f"query_ids has {len(query_ids)} entries but there are {len(prompts)} prompts")
    if train_ids is not None and len(train_ids) != len(train):
        raise ValueError(f"train_ids has {len(train_ids)} entries but there are {len(train)} texts")
    qids = list(query_ids) if query_ids is not None else list(range(len(prompts)))
    tids = list(train_ids) if train_ids is not None else list(range(len(train)))
    return train, prompts, completions, qids, tids


def base_provenance(method: str, backend: Optional[ModelBackend] = None, **settings: Any) -> dict[str, Any]:
    """Provenance shared by all baselines (method, package version, model identity, settings)."""
    prov: dict[str, Any] = {"method": method, "package_version": __version__}
    if backend is not None:
        module = backend.torch_module
        config = getattr(module, "config", None)
        prov.update({
            "backend": backend.name,
            "model": getattr(config, "_name_or_path", "") or type(module).__name__,
            "model_fingerprint": backend.fingerprint(),
        })
    prov.update(settings)
    prov["settings"] = dict(settings)
    return prov


# ------------------------------------------------------------------------ the model
#: how per-example gradients are taken: one example at a time (``"loop"``), or a padded chunk at
#: once under ``torch.func.vmap`` (``"vmap"``; the same numbers, see `iter_loss_gradients`)
PER_EXAMPLE_MODES = ("loop", "vmap")


class ModelHandle:
    """The torch side of a backend, for gradient work in plain torch.

    ``module`` is the float32 ``nn.Module`` that gradients are taken through (the
    backend's module itself, or a float32 deep copy when the model is in another
    dtype); ``logits(ids, mask)`` runs it and returns ``[b, t, V]``.
    """

    def __init__(self, model: Any, tokenizer: Any = None, per_example: str = "loop") -> None:
        if per_example not in PER_EXAMPLE_MODES:
            raise ValueError(f"per_example must be one of {PER_EXAMPLE_MODES} (how per-example gradients are "
                             f"taken), got {per_example!r}")
        self.per_example = per_example
        self.backend: ModelBackend = resolve_backend(model, tokenizer=tokenizer) if tokenizer is not None \
            else resolve_backend(model)
        module = self.backend.torch_module
        dtypes = {p.dtype for p in module.parameters() if p.is_floating_point()}
        if dtypes and dtypes != {torch.float32}:
            warnings.warn(
                f"the model's parameters are {sorted(map(str, dtypes))}; gradient baselines run on a float32 "
                "deep copy of it (memory: one more copy of the model)", stacklevel=3)
            module = copy.deepcopy(module).float()
        self.module = module
        self.tokenizer = self.backend.tokenizer
        self.device = self.backend.device
        self._tl = self.backend.name == "transformer_lens"

    def logits(self, input_ids: Tensor, attention_mask: Tensor, module: Optional[torch.nn.Module] = None) -> Tensor:
        return call_logits(module if module is not None else self.module, input_ids, attention_mask, self._tl)

    def encode_train(self, texts: Sequence[str], max_length: int) -> TokenBatch:
        return encode_texts(self.tokenizer, texts, max_length)

    def encode_queries(self, prompts: Sequence[str], completions: Sequence[str], max_length: int) -> TokenBatch:
        return encode_queries(self.tokenizer, prompts, completions, max_length)


def call_logits(module: torch.nn.Module, input_ids: Tensor, attention_mask: Tensor, positional: bool = False) -> Tensor:
    """Logits ``[b, t, V]`` of an HF causal LM (``model(input_ids=..., attention_mask=...)``)
    or a TransformerLens bridge (``bridge(input_ids, attention_mask=...)``)."""
    if positional:
        out = module(input_ids, attention_mask=attention_mask)
    else:
        out = module(input_ids=input_ids, attention_mask=attention_mask)
    if isinstance(out, Tensor):
        return out
    if isinstance(out, tuple):
        return out[0]
    return out.logits


@contextlib.contextmanager
def eval_mode(module: torch.nn.Module) -> Iterator[None]:
    """Eval mode for the duration (dropout off); restores the previous mode."""
    was_training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)


def select_parameters(module: torch.nn.Module, params: Any = "all") -> list[tuple[str, torch.nn.Parameter]]:
    """Named parameters to take gradients of.

    ``params="all"``: every parameter (tied weights once, as ``named_parameters`` lists
    them). Otherwise a list of names or ``fnmatch`` patterns (``"transformer.h.*.mlp.*"``);
    each must match at least one parameter.
    """
    named = [(n, p) for n, p in module.named_parameters() if p.numel() > 0]
    if isinstance(params, str):
        if params == "all":
            return named
        params = [params]
    patterns = list(params)
    if not patterns:
        raise ValueError("params is empty: pass 'all' or a list of parameter names / patterns")
    chosen, seen = [], set()
    for pattern in patterns:
        hits = [(n, p) for n, p in named if n == pattern or fnmatch.fnmatchcase(n, pattern)]
        if not hits:
            some = ", ".join(n for n, _ in named[:6])
            raise ValueError(f"params: {pattern!r} matches no parameter of {type(module).__name__} (e.g. {some}, ...)")
        for n, p in hits:
            if n not in seen:
                seen.add(n)
                chosen.append((n, p))
    return chosen


@contextlib.contextmanager
def gradients_on(tensors: Sequence[Tensor]) -> Iterator[None]:
    """Temporarily ``requires_grad_(True)`` on ``tensors`` (STRIDE freezes the model)."""
    before = [t.requires_grad for t in tensors]
    try:
        for t in tensors:
            t.requires_grad_(True)
        yield
    finally:
        for t, flag in zip(tensors, before):
            t.requires_grad_(flag)


def iter_loss_gradients(
    handle: ModelHandle,
    batch: TokenBatch,
    named_params: list[tuple[str, Tensor]],
    chunk: int = 32,
    progress: bool = False,
    desc: str = "gradients",
) -> Iterator[tuple[list[int], Tensor]]:
    """Per-example gradients of the mean NLL over each row's scored tokens.

    Yields ``(rows, G)`` with ``G [len(rows), P]`` float32 on the model's device
    (parameters flattened and concatenated in ``named_params`` order). With
    ``handle.per_example == "loop"`` each example runs alone, trimmed to its own length (no
    padding). With ``"vmap"`` a chunk of ``chunk`` examples runs at once under
    ``torch.func.vmap(torch.func.grad(...))``, right-padded to the chunk's longest row with an
    all-ones attention mask: in a causal LM a token never sees the padding after it and its
    position ids are unchanged, and the loss masks the padding out, so the gradients are the
    same up to float rounding (tested).
    """
    tensors = [p for _, p in named_params]
    n = len(batch)
    if handle.per_example == "vmap":
        yield from _vmap_loss_gradients(handle, batch, named_params, chunk, progress, desc)
        return
    bar = tqdm(total=n, disable=not progress, desc=desc, unit="ex")
    with eval_mode(handle.module), gradients_on(tensors), torch.enable_grad():
        for start in range(0, n, chunk):
            rows = list(range(start, min(start + chunk, n)))
            out = []
            for i in rows:
                one = batch.rows([i]).to(handle.device)
                logits = handle.logits(one.input_ids, one.attention_mask)
                loss = token_nll(logits, one.input_ids, one.loss_mask)[0]
                grads = torch.autograd.grad(loss, tensors, allow_unused=True)
                out.append(torch.cat([
                    (g if g is not None else torch.zeros_like(t)).reshape(-1).float()
                    for g, t in zip(grads, tensors)
                ]))
                bar.update(1)
            yield rows, torch.stack(out)
    bar.close()


def _vmap_loss_gradients(handle: ModelHandle, batch: TokenBatch, named_params: list[tuple[str, Tensor]],
                         chunk: int, progress: bool, desc: str) -> Iterator[tuple[list[int], Tensor]]:
    """`iter_loss_gradients` for ``per_example="vmap"``."""
    from torch.func import functional_call, grad, vmap

    names = [name for name, _ in named_params]
    params = {name: p.detach() for name, p in named_params}
    module = handle.module

    def loss(p: dict, ids: Tensor, loss_mask: Tensor) -> Tensor:
        ones = torch.ones(1, ids.shape[0], dtype=torch.long, device=ids.device)   # unbatched: no data-dependent branch
        out = functional_call(module, p, (ids[None],), {"attention_mask": ones})
        logits = out if isinstance(out, Tensor) else out[0] if isinstance(out, tuple) else out.logits
        return token_nll(logits, ids[None], loss_mask[None])[0]

    per_example = vmap(grad(loss), in_dims=(None, 0, 0))
    n = len(batch)
    bar = tqdm(total=n, disable=not progress, desc=desc, unit="ex")
    with eval_mode(module):
        for start in range(0, n, chunk):
            rows = list(range(start, min(start + chunk, n)))
            sub = batch.rows(rows).to(handle.device)   # right-padded to the chunk's longest row
            grads = per_example(params, sub.input_ids, sub.loss_mask)
            yield rows, torch.cat([grads[name].reshape(len(rows), -1).float() for name in names], dim=1)
            bar.update(len(rows))
    bar.close()


def loss_gradients(
    handle: ModelHandle,
    batch: TokenBatch,
    named_params: list[tuple[str, Tensor]],
    chunk: int = 32,
    progress: bool = False,
    desc: str = "gradients",
) -> Tensor:
    """All per-example gradients ``[n, P]`` (float32, CPU). Memory ``4 n P`` bytes."""
    parts = [g.cpu() for _, g in iter_loss_gradients(handle, batch, named_params, chunk, progress, desc)]
    return torch.cat(parts)
