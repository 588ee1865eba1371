"""EK-FAC influence functions through kronfluence (Grosse et al. 2023; kronfluence 1.0.1).

kronfluence tracks only ``nn.Linear`` and ``nn.Conv2d`` modules (exact type). Hugging
Face GPT-2 (and GPT-J-style code that reuses it) implements its projections with
``transformers.pytorch_utils.Conv1D`` (``y = x @ W + b`` with ``W [in, out]``), which
kronfluence would silently skip. `conv1d_to_linear` swaps each for an ``nn.Linear``
with ``weight = W.T`` on a deep copy of the model; `ekfac` checks that the copy's
logits equal the original's before using it.
"""

from __future__ import annotations

import copy
from importlib.metadata import PackageNotFoundError, version
import fnmatch
import logging
import warnings
from typing import Any, Optional, Sequence

import torch
from torch import Tensor
from torch.utils.data import Dataset

from .. import storage
from ..inputs import TokenBatch
from ..operators import token_nll
from ..results import Attribution
from ._common import ModelHandle, base_provenance, call_logits, check_inputs, eval_mode, require

__all__ = ["ekfac", "conv1d_to_linear", "linear_module_names", "query_batch_size_for", "QUERY_GRADIENT_BUDGET_BYTES"]

#: Memory the default query batch may spend on the queries' preconditioned gradients (bytes).
QUERY_GRADIENT_BUDGET_BYTES = 1 << 30


def _is_conv1d(module: torch.nn.Module) -> bool:
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "weight") \
        and module.weight.dim() == 2


@torch.no_grad()
def conv1d_to_linear(model: torch.nn.Module, copy_model: bool = True) -> torch.nn.Module:
    """Replace every ``transformers`` ``Conv1D`` by the equivalent ``nn.Linear``.

    ``Conv1D(nf, nx)`` stores ``weight [nx, nf]`` and computes ``x @ weight + bias``;
    the replacement is ``nn.Linear(nx, nf)`` with ``weight = Conv1D.weight.T`` (copied,
    contiguous) and the same bias, dtype and device. Works on a deep copy unless
    ``copy_model=False``. Returns the converted model (parameter names are unchanged:
    ``...c_attn.weight`` is now ``[out, in]``).
    """
    if copy_model:
        model = copy.deepcopy(model)
    targets = [(name, m) for name, m in model.named_modules() if _is_conv1d(m)]
    for name, conv in targets:
        w = conv.weight  # [in, out]
        linear = torch.nn.Linear(w.shape[0], w.shape[1], bias=conv.bias is not None, device=w.device, dtype=w.dtype)
        linear.weight.copy_(w.T.contiguous())
        if conv.bias is not None:
            linear.bias.copy_(conv.bias)
        linear.train(conv.training)
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, linear)
    return model


def linear_module_names(model: torch.nn.Module, modules: Any = None) -> list[str]:
    """Names of the ``nn.Linear`` modules EK-FAC tracks.

    ``modules=None``: every ``nn.Linear`` except the output head
    (``model.get_output_embeddings()``, tied to the input embedding in GPT-2). Otherwise a
    list of module names or ``fnmatch`` patterns (``"transformer.h.*.mlp.*"``), each of
    which must match at least one ``nn.Linear``.
    """
    linear = [(n, m) for n, m in model.named_modules() if type(m) is torch.nn.Linear]
    if modules is None:
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        names = [n for n, m in linear if m is not head]
    else:
        patterns = [modules] if isinstance(modules, str) else list(modules)
        names = []
        for pattern in patterns:
            hits = [n for n, _ in linear if n == pattern or fnmatch.fnmatchcase(n, pattern)]
            if not hits:
                raise ValueError(f"modules: {pattern!r} matches no nn.Linear (after Conv1D conversion) of "
                                 f"{type(model).__name__}")
            names.extend(h for h in hits if h not in names)
    if not names:
        raise ValueError(f"{type(model).__name__} has no nn.Linear module for EK-FAC to track")
    return names


def _version(package: str) -> str:
    try:
        return version(package)
    except PackageNotFoundError:  # pragma: no cover
        return "?"


class _Rows(Dataset):
    """A padded ``TokenBatch`` as a map-style dataset of dicts (all rows one width)."""

    def __init__(self, batch: TokenBatch) -> None:
        self.batch = batch

    def __len__(self) -> int:
        return len(self.batch)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        b = self.batch
        return {"input_ids": b.input_ids[i], "attention_mask": b.attention_mask[i], "loss_mask": b.loss_mask[i]}


def _make_task(Task, tracked: list[str], seed: int):
    class StrideLMTask(Task):
        """Losses as STRIDE defines them: per-row mean NLL over the scored tokens, summed over rows."""

        def __init__(self) -> None:
            super().__init__()
            self.generator = torch.Generator().manual_seed(int(seed))

        def compute_train_loss(self, batch: Any, model: torch.nn.Module, sample: bool = False) -> Tensor:
            ids, mask = batch["input_ids"], batch["attention_mask"]
            logits = call_logits(model, ids, mask)
            targets = ids
            if sample:  # true Fisher: targets drawn from the model's own predictions
                with torch.no_grad():
                    probs = torch.softmax(logits[:, :-1].detach().float(), dim=-1)
                    flat = probs.reshape(-1, probs.shape[-1]).cpu()
                    drawn = torch.multinomial(flat, 1, generator=self.generator).reshape(probs.shape[:-1])
                    targets = ids.clone()
                    targets[:, 1:] = drawn.to(ids.device)
            return token_nll(logits, targets, batch["loss_mask"]).sum()

        def compute_measurement(self, batch: Any, model: torch.nn.Module) -> Tensor:
            logits = call_logits(model, batch["input_ids"], batch["attention_mask"])
            return token_nll(logits, batch["input_ids"], batch["loss_mask"]).sum()

        def get_influence_tracked_modules(self) -> list[str]:
            return list(tracked)

        def get_attention_mask(self, batch: Any) -> Tensor:
            return batch["attention_mask"]

    return StrideLMTask()


def query_batch_size_for(model: torch.nn.Module, tracked: Sequence[str], n_queries: int,
                         budget_bytes: int = QUERY_GRADIENT_BUDGET_BYTES) -> int:
    """The default query batch: as many queries as fit ``budget_bytes`` of gradients, at most all.

    kronfluence holds each query's preconditioned gradient of every tracked module (float32,
    weight plus bias: ``4 x (out x in + out)`` bytes per module and query) while it passes over
    the training set, and it recomputes every training gradient once per query batch; so the
    fewest batches that fit memory are the cheapest. Returns
    ``clamp(budget_bytes // per_query_bytes, 1, n_queries)``.
    """
    per_query = 0
    for name in tracked:
        module = model.get_submodule(name)
        per_query += module.weight.numel() + (module.bias.numel() if module.bias is not None else 0)
    per_query *= 4
    return int(max(1, min(int(n_queries), int(budget_bytes) // max(per_query, 1))))


def _plain_hf_copy(handle: ModelHandle) -> torch.nn.Module:
    """A deep copy of the Hugging Face model behind the backend, as plain HF modules.

    nnsight: a deep copy of ``torch_module``. TransformerLens: the bridge rewires its HF
    model in place (every module wrapped as ``..._original_component``) and cannot be
    deep-copied, so a fresh model of the same class is built from its config and loaded
    with the wrapped weights (``._original_component`` stripped from the names; the
    bridge's extra split q/k/v views are dropped). `ekfac` then checks the logits.
    """
    module = handle.module
    if handle.backend.name != "transformer_lens":
        return copy.deepcopy(module)
    original = getattr(module, "original_model", None)
    if original is None or not hasattr(original, "config"):
        raise TypeError("ekfac: could not reach the Hugging Face model inside the TransformerLens bridge")
    with torch.random.fork_rng(devices=[]):  # the throwaway initialisation must not move the user's RNG
        fresh = type(original)(original.config)
    wanted = fresh.state_dict()
    mapped = {}
    for key, value in original.state_dict().items():
        name = key.replace("._original_component", "")
        if name in wanted and wanted[name].shape == value.shape:
            mapped[name] = value.detach().clone()
    fresh.load_state_dict(mapped, strict=False)
    return fresh.to(device=handle.device, dtype=torch.float32)


def ekfac(
    model: Any,
    train_texts: Any,
    prompts: Sequence[str],
    completions: Sequence[str],
    *,
    damping: Optional[float] = None,
    modules: Any = None,
    empirical_fisher: bool = False,
    factor_texts: Any = None,
    batch_size: int = 8,
    query_batch_size: Optional[int] = None,
    max_length: int = 64,
    seed: int = 0,
    output_dir: Optional[str] = None,
    query_ids: Optional[Sequence[Any]] = None,
    train_ids: Optional[Sequence[Any]] = None,
    tokenizer: Any = None,
    progress: bool = False,
    check_atol: float = 1e-5,
) -> Attribution:
    """EK-FAC influence of every training text on every query, computed by kronfluence.

    ``scores[q, j] = grad L_q^T (G + damping I)^-1 grad L_j`` with ``G`` the EK-FAC
    approximation of the Gauss-Newton Hessian (true Fisher by default, empirical with
    ``empirical_fisher=True``) fitted on ``factor_texts`` (default: the training texts),
    ``L_q`` the query's mean completion NLL (kronfluence's *measurement*) and ``L_j`` the
    text's mean NLL. Upweighting example ``j`` by ``eps`` changes the query loss by
    ``-eps * scores[q, j]``, so positive = proponent, the same sign as every other method
    here; kronfluence's own output already has this sign (no flip applied).

    Args:
        damping: kronfluence's ``damping_factor``; ``None`` = its heuristic (0.1 x the mean
            eigenvalue, per module).
        modules: ``nn.Linear`` names/patterns to track (after Conv1D conversion);
            ``None`` = every ``nn.Linear`` but the output head.
        query_batch_size: queries per pass over the training set; kronfluence recomputes every
            training gradient once per query batch, so the query time falls with fewer batches
            (scores are the same). ``None`` = all queries, or as many as keep their
            preconditioned gradients within `QUERY_GRADIENT_BUDGET_BYTES` (1 GiB;
            `query_batch_size_for`).
        output_dir: where kronfluence writes factors and scores (a temporary
            directory, removed afterwards, if ``None``).
        check_atol: the Conv1D->Linear copy's logits must match the original's within
            ``check_atol * max(1, max |logit|)`` on up to 8 training texts (they are
            bit-identical for GPT-2 on CPU; the tolerance is for other kernels).

    Needs ``kronfluence`` (``pip install 'stride-nnsight[eval]'``).
    """
    require("kronfluence", "kronfluence")
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from kronfluence.task import Task

    if query_batch_size is not None and (isinstance(query_batch_size, bool) or not isinstance(query_batch_size, int)
                                         or query_batch_size < 1):
        raise ValueError(f"ekfac: query_batch_size must be a positive int, or None for all queries within "
                         f"{QUERY_GRADIENT_BUDGET_BYTES >> 20} MiB of gradients; got {query_batch_size!r}")
    train, prompts, completions, qids, tids = check_inputs(train_texts, prompts, completions, query_ids, train_ids)
    handle = ModelHandle(model, tokenizer)
    queries = handle.encode_queries(prompts, completions, max_length)
    texts = handle.encode_train(train, max_length)
    factor_batch = texts if factor_texts is None else handle.encode_train(list(factor_texts), max_length)

    plain = _plain_hf_copy(handle).eval()
    n_converted = sum(1 for m in plain.modules() if _is_conv1d(m))
    converted = conv1d_to_linear(plain, copy_model=False).eval()
    with torch.no_grad(), eval_mode(handle.module):
        probe = texts.rows(list(range(min(len(texts), 8)))).to(handle.device)
        a = handle.logits(probe.input_ids, probe.attention_mask)
        b = call_logits(converted, probe.input_ids, probe.attention_mask)
        real = probe.attention_mask.bool()
        diff = float((a.float() - b.float()).abs()[real].max()) if real.any() else 0.0
        scale = max(1.0, float(a.float().abs()[real].max())) if real.any() else 1.0
    if diff > check_atol * scale:
        raise RuntimeError(f"ekfac: the Conv1D->nn.Linear copy of the model differs from the original "
                           f"(max |logit diff| {diff:.3g} > {check_atol} x {scale:.3g}); refusing to use it")

    tracked = linear_module_names(converted, modules)
    if query_batch_size is None:
        query_batch_size = query_batch_size_for(converted, tracked, len(queries))
    for p in converted.parameters():
        p.requires_grad_(False)
    task = _make_task(Task, tracked, seed)
    prepared = prepare_model(converted, task)

    factor_args = FactorArguments(strategy="ekfac", use_empirical_fisher=empirical_fisher)
    score_args = ScoreArguments(damping_factor=damping)
    with storage.temporary_directory("stride_ekfac_") as tmp, warnings.catch_warnings():
        # kronfluence 1.0.1 builds torch.cuda.amp.GradScaler (deprecated in torch >= 2.4; harmless)
        warnings.filterwarnings("ignore", message=r".*GradScaler.*", category=FutureWarning)
        analyzer = Analyzer(
            analysis_name="stride_baseline",
            model=prepared,
            task=task,
            cpu=handle.device.type == "cpu",
            disable_tqdm=not progress,
            output_dir=output_dir or tmp,
            log_level=logging.WARNING,
        )
        analyzer.fit_all_factors(
            factors_name="ekfac",
            dataset=_Rows(factor_batch),
            per_device_batch_size=batch_size,
            factor_args=factor_args,
            overwrite_output_dir=True,
        )
        analyzer.compute_pairwise_scores(
            scores_name="pairwise",
            factors_name="ekfac",
            query_dataset=_Rows(queries),
            train_dataset=_Rows(texts),
            per_device_query_batch_size=query_batch_size,
            per_device_train_batch_size=batch_size,
            score_args=score_args,
            overwrite_output_dir=True,
        )
        scores = analyzer.load_pairwise_scores(scores_name="pairwise")["all_modules"].detach().float().cpu()
    return Attribution(
        scores=scores,
        query_ids=qids,
        train_ids=tids,
        query_texts=[p + c for p, c in zip(prompts, completions)],
        train_texts=train,
        provenance=base_provenance(
            "ekfac", handle.backend, damping=damping, damping_rule="kronfluence heuristic (0.1 x mean eigenvalue)"
            if damping is None else "absolute", tracked_modules=tracked, empirical_fisher=empirical_fisher,
            factor_examples=len(factor_batch), max_length=max_length, seed=seed,
            query_batch_size=query_batch_size,
            conv1d_converted=n_converted, conversion_max_abs_logit_diff=diff,
            implementation=f"kronfluence {_version('kronfluence')}",
            query_loss="mean completion NLL (kronfluence measurement)",
            train_loss="mean NLL of every token after the first",
        ),
    )
