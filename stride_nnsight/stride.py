"""The facade: ``Stride(model).fit(texts)`` then ``.attribute(prompts, completions)``."""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import warnings
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import scipy.sparse as sp
import torch

from . import __version__, distributed, storage
from .activations import ActivationCache, HeadMismatchError, cache_size_bytes, use_activation_cache
from .arguments import DEFAULT_RANK, StrideArguments
from .backends import ModelBackend, resolve_backend
from .backends.base import FINGERPRINT_VERSION, check_finite_weights
from .design import DEFAULTS_SPARSITY, SubsetDesign, check_design_size, recommended_n_subsets, supported_sparsity
from .fitting import FitHistory, OperatorFitter, candidate_seed, fit_candidates
from .inputs import TokenBatch, as_text_list, encode_queries, encode_texts, resolve_max_length
from .measurement import Metric, measure
from .operators import SteeringOperators, edit_width, state_bytes
from .recovery import noise_floor, recover, shared_fraction
from .token_component import add_token_component, completion_tokens, token_presence, weigh_presence
from .results import Attribution, AttributionCache, check_unique_ids

__all__ = ["Stride", "STATE_FILE", "PartialFitError", "attribute_layers", "find_state_file"]

STATE_FILE = "stride_state.json"  # manifest; the tensors sit beside it (stride_nnsight.storage)
LEGACY_STATE_FILE = "stride_state.pt"  # format 1 (stride-nnsight 0.1): still read, without unpickling code
STATE_KIND = "stride_state"
STATE_KEYS = ("args", "design", "operators", "history", "train_ids", "train_texts", "fingerprint")


class PartialFitError(RuntimeError):
    """The operators were fitted for fewer steps than planned (interrupted or failed fit)."""


def find_state_file(path: str | os.PathLike) -> Optional[Path]:
    """The saved state in directory ``path`` (current format, else format 1), or ``None``."""
    return storage.find(path, STATE_FILE, LEGACY_STATE_FILE)


def _in_eval_mode(method: Callable) -> Callable:
    """Run a `Stride` method with the model's torch module in eval mode.

    A model the user put back into training mode (``model.train()``) would fit and measure
    with dropout active, so scores would change from call to call. The method then warns
    (once per ``Stride``), runs with every submodule in eval mode, and afterwards puts back
    in training mode exactly the submodules that were in it."""

    @functools.wraps(method)
    def wrapper(self: "Stride", *args: Any, **kwargs: Any) -> Any:
        module = self.backend.torch_module
        training = [m for m in module.modules() if m.training]
        if training:
            if not self._warned_train_mode:
                self._warned_train_mode = True
                warnings.warn(
                    f"the model is in training mode ({len(training)} module(s) with .training=True): "
                    "dropout would make fitting and the attribution scores change between calls. "
                    f"Stride.{method.__name__}() runs it in eval mode and restores your mode afterwards; "
                    "call model.eval() to silence this warning",
                    UserWarning, stacklevel=2)
            module.eval()
        try:
            return method(self, *args, **kwargs)
        finally:
            for m in training:
                m.training = True

    return wrapper


def warn_if_underdetermined(n_examples: int, n_subsets: int) -> None:
    """Warn when ``K`` measurements are too few for a corpus this large: with ``n >= 10 K``
    and fewer than ``DEFAULTS_SPARSITY`` recoverable documents per query (`supported_sparsity`),
    sparse recovery loses precision (synthetic recovery with K=256: precision@10 falls from about
    0.97 at n=1e3 to 0.83 at 1e5 and 0.44 at n=1e6; at n=1e6, K=512 gives 0.91 and K=1024 0.99;
    benchmarks/RESULTS-recovery-scaling.md)."""
    k = supported_sparsity(n_examples, n_subsets)
    if n_examples >= 10 * n_subsets and k < DEFAULTS_SPARSITY:
        warnings.warn(
            f"n_subsets K={n_subsets} is small for {n_examples:,} training documents: it supports recovering "
            f"about {k} influential documents per query (K >= 2 k log(n/k)), the defaults were sized for "
            f"{DEFAULTS_SPARSITY}; expect lower precision (measured on synthetic designs with 10 influential "
            "documents per query: precision@10 0.83 at n=1e5 and 0.44 at n=1e6 with K=256; 0.91 with K=512 and 0.99 "
            "with K=1024 at n=1e6). Raise n_subsets to at least "
            f"{recommended_n_subsets(n_examples, DEFAULTS_SPARSITY)} (state and measurement cost grow with K)",
            UserWarning, stacklevel=3)


class Stride:
    """STRIDE training data attribution for an nnsight (or TransformerLens) model.

    Example::

        stride = Stride(model, layer=2, n_subsets=256, subsets_per_example=8, rank=16,
                        placement="residual", seed=0)
        stride.fit(train_texts)
        attr = stride.attribute(prompts, completions)   # Attribution, scores [q, n]

    Args:
        model: an nnsight ``TransformersModel`` / ``LanguageModel``, or a TransformerLens
            ``TransformerBridge``. It is used frozen (eval mode, no weight gradients).
        layer: decoder block whose output is read (and, for ``"residual"``, steered);
            negative values count from the end. This and the five settings below are the
            most used; ``None`` keeps the value of ``args`` (or the default); each is the
            `StrideArguments` field of the same name.
        n_subsets: ``K``, number of subsets / operators; default: chosen from the training set
            at fit time, ``min(512, n d // 2)`` (`StrideArguments.subsets_for`).
        subsets_per_example: ``d``, subsets each training example belongs to.
        rank: ``r``, size of the shared basis (default 8).
        placement: ``"logits"``, ``"residual"`` or ``"head"``: where the edit is applied.
        seed: seeds the design, the operators' initialisation and the fitting's sampling.
        args: a full ``StrideArguments``; keyword ``settings`` override single fields.
        tokenizer: only needed when the model object carries none.
        layers_path: nnsight models only: dotted path of the ``nn.ModuleList`` of decoder
            blocks (e.g. ``"model.layers"``) when it cannot be found automatically (it is the
            shortest ``ModuleList`` with ``config.num_hidden_layers`` entries otherwise).
        remote: run ``fit`` / ``measure`` in nnsight sessions on a server: ``True`` (NDIF),
            a host URL, or ``"local"`` (nnsight's in-process simulation); ``remote_*``
            keywords (``remote_session_budget_s``, ``remote_steps_per_session``, ...) tune
            how the work is cut into sessions. See ``stride_nnsight.remote`` and docs/remote.md.
    """

    def __init__(
        self,
        model: Any,
        layer: Optional[int] = None,
        n_subsets: Optional[int] = None,
        subsets_per_example: Optional[int] = None,
        rank: Optional[int] = None,
        placement: Optional[str] = None,
        seed: Optional[int] = None,
        *,
        args: Optional[StrideArguments] = None,
        tokenizer: Any = None,
        layers_path: Optional[str] = None,
        remote: bool | str = False,
        **settings: Any,
    ) -> None:
        named = {"layer": layer, "n_subsets": n_subsets, "subsets_per_example": subsets_per_example,
                 "rank": rank, "placement": placement, "seed": seed}
        changes = {k: v for k, v in named.items() if v is not None}
        from .remote import RemoteSettings, check_remote

        self.remote = check_remote(remote)
        self.remote_settings = RemoteSettings.pop_from(settings)  # takes the remote_* keywords out
        changes.update(settings)
        self.args = (args or StrideArguments()).replace(**changes)
        self._auto_subsets = self.args.n_subsets is None  # resolved from the training set by fit()
        # resolved by fit() within max_state_mb (StrideArguments.capped_state)
        self._auto_rank = self.args.rank is None
        self._auto_columns = self.args.logit_columns is None
        self.model = model
        backend_options = {k: v for k, v in {"tokenizer": tokenizer, "layers_path": layers_path}.items()
                           if v is not None}
        self.backend: ModelBackend = resolve_backend(model, **backend_options)
        if not self.remote or self.remote == "local":  # "local" simulates the server on this machine
            self.backend.materialize()  # a lazily loaded model: real weights, so freeze/fingerprint see them
        if self.remote and self.args.placement == "head":
            raise ValueError("placement='head' runs on local models only for now: the remote session code does not "
                             "read the output head's input yet. Use placement='logits' with remote=..., or run the "
                             "model locally")
        self.layer = self.backend.check_layer(self.args.layer)
        self.backend.freeze()
        self._head: Any = None  # the verified output head (head placement), built on first use
        self._warned_train_mode = False
        self.design: Optional[SubsetDesign] = None
        self.operators: Optional[SteeringOperators] = None
        self.history = FitHistory()
        self.cache_used: Optional[bool] = None  # whether the last fit read an activation cache
        self.train_texts: Optional[list[str]] = None
        self.train_ids: Optional[list[Any]] = None
        self.train_max_length: Optional[int] = None  # effective tokens per training text, set by fit()
        self._take_fingerprint()  # again at fit(); checked before every measurement

    # ------------------------------------------------------------------ build
    @property
    def is_fitted(self) -> bool:
        return (self.operators is not None and self.train_texts is not None
                and len(self.history) >= self.args.fit_steps(len(self.train_texts)))

    @property
    def hook_name(self) -> str:
        return self.backend.hook_name(self.layer)

    def _new_operators(self) -> SteeringOperators:
        """Operators initialised from ``args.seed`` alone; the global torch RNG is left as it was."""
        out_dim = edit_width(self.args.placement, self.backend.d_model, self.backend.vocab_size)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.args.seed)
            ops = SteeringOperators(self.args.n_subsets, self.backend.d_model, self.args.rank, out_dim,
                                    placement=self.args.placement, layer=self.layer, hidden=self.args.basis_hidden,
                                    compute_dtype=self.args.operator_dtype, columns=self.args.logit_columns)
        # on the steered block's device: for a model dispatched over several devices
        # (device_map="auto") that is not the input device; edits are moved where they are added.
        # A remote fit places them on the server (next to the deployed model's block) instead.
        return ops.to(self.backend.device if self.remote else self.backend.layer_device(self.layer))

    def _cap_state(self) -> Optional[str]:
        """Resolve ``rank`` and ``logit_columns`` for this fit's ``K`` within ``max_state_mb``
        (`StrideArguments.capped_state`). Returns the warning to give when the cap lowered the rank
        or left tokens unedited (given by `fit` once the corpus's coverage is known), else None."""
        out_dim = edit_width(self.args.placement, self.backend.d_model, self.backend.vocab_size)
        auto = self.args.replace(rank=None if self._auto_rank else self.args.rank,
                                 logit_columns=None if self._auto_columns else self.args.logit_columns)
        self.args = auto.capped_state(self.args.n_subsets, self.backend.d_model, out_dim)
        changed = []
        if self._auto_rank and self.args.rank < DEFAULT_RANK:
            changed.append(f"rank {DEFAULT_RANK} -> {self.args.rank}")
        if self._auto_columns and self.args.logit_columns is not None:
            changed.append(f"coefficient columns {out_dim:,} -> {self.args.logit_columns:,} (the rarer corpus tokens "
                           "are left unedited)")
        if not changed:
            return None
        full = state_bytes(self.args.n_subsets, DEFAULT_RANK if self._auto_rank else self.args.rank,
                           self.backend.d_model, out_dim, self.args.basis_hidden,
                           None if self._auto_columns else self.args.logit_columns)
        return (f"the operators' state would take {full / 1e6:,.0f} MB (K={self.args.n_subsets}, {out_dim:,} edited "
                f"entries), over max_state_mb={self.args.max_state_mb:g}: {'; '.join(changed)}. This costs some "
                "attribution quality (docs/method.md, 'State cap'); for the full state pass max_state_mb=None (or a "
                "larger cap)")

    # ------------------------------------------------------------ model guard
    def _take_fingerprint(self) -> None:
        """Record the model's fingerprint now (`ModelBackend.fingerprint`: config and every
        weight's name, shape, dtype and sampled values; names and shapes only for weights
        on ``meta``, i.e. a remote model, ``fingerprint_kind == "shapes"``)."""
        self.fingerprint = self.backend.fingerprint()
        self.fingerprint_kind = self.backend.fingerprint_kind()
        self.shape_fingerprint = self.backend.fingerprint(values=False)
        self.fitted_fingerprint = self.fingerprint  # Stride.load sets the saved one

    def _check_model_unchanged(self) -> None:
        """``ValueError`` if the model's weights or config changed since `fit` / `load`."""
        if self.fingerprint_kind == "weights":
            current, recorded = self.backend.fingerprint(), self.fingerprint
        else:  # meta weights when fitted (remote): a simulated remote run may have loaded them since
            current, recorded = self.backend.fingerprint(values=False), self.shape_fingerprint
        if current != recorded:
            raise ValueError(
                f"the model changed since the operators were fitted/loaded: its fingerprint was "
                f"{recorded} then and is {current} now (weights or config were modified, or "
                "another model was put in its place). The operators only describe the model they were "
                "fitted on: restore that model's weights, or refit with stride.fit(...) on the current one "
                "(Stride.load(path, model, strict=False) uses saved operators on another model knowingly)"
            )

    def _check_saved_fingerprint(self, state: dict) -> None:
        """``Stride.load(strict=True)``: ``ValueError`` unless this model is the one the saved
        operators were fitted on. Full-weight fingerprints are compared when both sides have
        weights here; when either side had only ``meta`` weights (a remote model) only the
        architecture can be compared (``shape_fingerprint``), with a warning."""
        saved, version = state["fingerprint"], state.get("fingerprint_version", 1)
        saved_kind = state.get("fingerprint_kind", "weights")
        if saved == self.fingerprint:
            return
        if version != FINGERPRINT_VERSION:
            raise ValueError(
                f"cannot verify the model: this state was saved by an older stride-nnsight whose model "
                f"fingerprint (version {version}, {saved}) covered only the config and the embeddings, this "
                f"version's ({FINGERPRINT_VERSION}) covers every weight. Load with strict=False if you are sure "
                "it is the same model (then save again to store the new fingerprint), or refit"
            )
        if saved_kind == "weights" and self.fingerprint_kind == "weights":
            mine, theirs, what = self.fingerprint, saved, "fingerprint"
        else:
            mine, theirs, what = self.shape_fingerprint, state.get("shape_fingerprint"), "architecture fingerprint"
        if mine != theirs:
            full = "" if what == "fingerprint" else f" (fingerprints: saved {saved}, this model {self.fingerprint})"
            raise ValueError(
                f"model mismatch: the saved operators were fitted on a model with {what} {theirs}, this "
                f"model has {mine}{full}. Load with the same model (weights and config), or pass strict=False "
                "to force it."
            )
        if what != "fingerprint":
            warnings.warn(
                f"only the architecture could be verified (saved fingerprint kind {saved_kind!r}, this model "
                f"{self.fingerprint_kind!r}: weights on the meta device, e.g. a remote model, have no values "
                "here); make sure the weights are the ones the operators were fitted on",
                UserWarning, stacklevel=3)

    def _check_finite_model(self) -> None:
        """``FloatingPointError`` naming the first NaN/inf weights of the model (local weights only)."""
        check_finite_weights(self.backend.named_weights())

    def _encode_train(self) -> TokenBatch:
        """The training texts as tokens, each cut to `resolve_max_length` (``args.max_length``
        clipped to the model's context, or the context when ``None``; truncation warns).
        Records the effective length in ``train_max_length``: that cap for an int
        ``max_length``, else the longest training document (BOS included) up to the context."""
        context = self.backend.context_length
        cap = resolve_max_length(self.args.max_length, context)
        batch = encode_texts(self.backend.tokenizer, self.train_texts, cap, context_length=context)
        self.train_max_length = cap if self.args.max_length is not None else int(batch.input_ids.shape[1])
        return batch

    # -------------------------------------------------------------------- fit
    @_in_eval_mode
    def fit(
        self,
        train_texts: Any,
        train_ids: Optional[Sequence[Any]] = None,
        *,
        progress: bool = True,
        checkpoint_dir: Optional[str | os.PathLike] = None,
        cache_dir: Optional[str | os.PathLike] = None,
        overwrite: bool = False,
    ) -> "Stride":
        """Build the subset design over ``train_texts`` and train all ``K`` operators.

        Args:
            train_texts: ``list[str]`` or a ``datasets.Dataset`` with a ``"text"`` column.
            train_ids: optional ids (default ``0..n-1``).
            progress: show a progress bar.
            checkpoint_dir: if given, progress is written there and a later call with the
                same directory resumes (also after Ctrl-C or a crash). It resumes only the same
                run (same corpus and ids, model fingerprint and settings); a checkpoint of
                another run raises ``CheckpointMismatchError`` naming what differs.
            cache_dir: where the activation cache is kept (see ``activation_cache`` in
                ``StrideArguments``): default ``checkpoint_dir/activations`` when a checkpoint
                dir is given (kept, resumable, reused by a resumed fit), else a temporary
                directory removed after the fit. Its size is printed before it is written.
            overwrite: discard a checkpoint in ``checkpoint_dir`` (and an activation cache of
                another run in ``cache_dir``) and start over.
        Returns ``self``; the loss curve is in ``self.history``. If the fit is interrupted
        or fails, ``self`` holds the steps that ran (``is_fitted`` is False) and
        ``attribute`` / ``save`` refuse it unless ``allow_partial=True``.
        """
        texts = as_text_list(train_texts, "train_texts")
        if train_ids is not None and len(train_ids) != len(texts):
            raise ValueError(f"train_ids has {len(train_ids)} entries but there are {len(texts)} texts")
        if train_ids is not None:
            check_unique_ids(list(train_ids), "train_ids", "positions", "training example")
        if self._auto_subsets:  # n_subsets=None: K from the training set (StrideArguments.subsets_for)
            self.args = self.args.replace(n_subsets=StrideArguments.auto_subsets(len(texts),
                                                                                 self.args.subsets_per_example))
        if self.args.fit_vocabulary is not None and (self.remote or self.args.placement != "logits"):
            # candidates serve the logits placement of a local fit only: the others read the whole
            # vocabulary, and the settings (provenance, saved state) say so
            self.args = self.args.replace(fit_vocabulary=None)
        check_design_size(len(texts), self.args.n_subsets, self.args.subsets_per_example)  # before any work
        capped = self._cap_state()
        if self.remote and distributed.rank_and_world()[1] > 1:
            raise ValueError("a remote fit runs in NDIF sessions, not split over torch.distributed processes: run it "
                             "from one process (without torchrun)")
        warn_if_underdetermined(len(texts), self.args.n_subsets)
        self.backend.freeze()  # no weight gradients, also if requires_grad was switched back on since Stride()
        self._check_finite_model()
        self._take_fingerprint()  # the model the operators are fitted on; checked before every measurement
        self.history = FitHistory()  # from here on this Stride is not fitted until the new fit ends
        self.train_texts = texts
        self.train_ids = list(train_ids) if train_ids is not None else list(range(len(texts)))
        self.design = SubsetDesign(len(texts), self.args.n_subsets, self.args.subsets_per_example, self.args.seed)
        self.operators = self._new_operators()
        identity = {"corpus": storage.tree_hash([self.train_texts, self.train_ids]),
                    "model fingerprint": self.fingerprint,
                    "layers path": getattr(self.backend, "layers_path", None)}
        tokens = self._encode_train()
        if self.args.recovery == "lasso+tokens":  # its token component reads the fit's own encoding
            self._token_presence(tokens)  # (with "lasso", built on first use: attribute(recovery=...))
        if self.operators.column_of is not None:  # more vocabulary than coefficient columns: by frequency
            # of the tokens the fit predicts (targets: BOS and padding are never predicted)
            counts = torch.bincount(tokens.input_ids[tokens.loss_mask.bool()].reshape(-1).cpu(),
                                    minlength=self.backend.vocab_size)[: self.backend.vocab_size]
            self.operators.assign_columns(counts, self.args.seed)
            edited = float(counts[self.operators.edited_tokens().cpu()].sum()) / max(1.0, float(counts.sum()))
            if capped is not None:
                capped += f". The edited tokens cover {edited:.2%} of the corpus's target tokens"
        if capped is not None:
            warnings.warn(capped, stacklevel=2)
        with contextlib.ExitStack() as stack:
            activations = None if self.remote else self._activation_cache(tokens, checkpoint_dir, cache_dir,
                                                                          overwrite, progress, stack)
            self.cache_used = activations is not None
            head = None
            if self.args.placement == "head":
                head = activations.head if activations is not None else self.output_head(tokens)
            fitter = OperatorFitter(self.backend, self.operators, self.design, tokens, self.args,
                                    identity=identity, activations=activations, head=head)
            try:
                if self.remote:
                    from .remote import fit_remote

                    fit_remote(self, fitter, progress=progress, checkpoint_dir=checkpoint_dir, overwrite=overwrite)
                else:
                    fitter.run(progress=progress, checkpoint_dir=checkpoint_dir, overwrite=overwrite)
            finally:
                self.history = fitter.history  # the steps that ran (all of them unless the fit raised)
        return self

    def output_head(self, tokens: Optional[TokenBatch] = None) -> Any:
        """The model's output head as a function ``head(h [..., d]) -> logits [..., V]`` (the head
        placement's path to the logits: `stride_nnsight.activations.head_function`), verified once
        against the model's own logits on up to 4 rows of ``tokens`` (default: a short probe
        text); `HeadMismatchError` if the model transforms its logits in a way it cannot rebuild."""
        if self._head is None:
            from .activations import head_function, read_activations, verify_head

            head = head_function(self.backend)
            if tokens is None:
                tokens = encode_texts(self.backend.tokenizer, ["The head of the model is checked here."], 16)
            probe = tokens.rows(list(range(min(4, len(tokens))))).to(self.backend.device)
            z, h, logits = read_activations(self.backend, probe.input_ids, probe.attention_mask, self.layer)
            verify_head(head, h, logits, probe.attention_mask)
            self._head = head
        return self._head

    def _activation_cache(self, tokens: TokenBatch, checkpoint_dir: Optional[str | os.PathLike],
                          cache_dir: Optional[str | os.PathLike], overwrite: bool, progress: bool,
                          stack: contextlib.ExitStack) -> Optional[ActivationCache]:
        """The activation cache this fit reads (built now if needed), or ``None`` when the
        settings, the placement or the model rule it out (``activation_cache``)."""
        setting = self.args.activation_cache
        if setting == "auto" and checkpoint_dir is not None and not overwrite:
            # a fit resumed (possibly with more steps) keeps the forward its checkpoint was made with
            previous = OperatorFitter.checkpoint_forward(Path(checkpoint_dir))
            if previous is not None:
                setting = previous != "live"
        rows = self.args.batch_size + (min(self.args.linearity_operators, self.args.n_subsets)
                                       if self.args.linearity_weight > 0 else 0)
        if cache_dir is not None:
            directory = Path(cache_dir)
        elif checkpoint_dir is not None:
            directory = Path(checkpoint_dir) / "activations"
        else:  # under torch.distributed every rank uses rank 0's temporary directory
            temporary = stack.enter_context(storage.temporary_directory("stride-activations-")) \
                if distributed.is_main_process() else None
            directory = Path(distributed.broadcast_object(temporary))
        directory.mkdir(parents=True, exist_ok=True)
        use, reason = use_activation_cache(
            setting, self.args.placement, remote=bool(self.remote), fit_rows=self.args.fit_steps(len(tokens)) * rows,
            n_documents=len(tokens), size_bytes=cache_size_bytes(tokens, self.backend.d_model,
                                                                 self.args.activation_cache_dtype,
                                                                 fit_candidates(self.args)),
            free_bytes=shutil.disk_usage(directory).free)
        if not use:
            return None
        try:
            return ActivationCache.build(self.backend, tokens, self.layer, directory, fingerprint=self.fingerprint,
                                         dtype=self.args.activation_cache_dtype, batch_size=2 * self.args.batch_size,
                                         progress=progress, overwrite=overwrite,
                                         candidates=fit_candidates(self.args), candidate_seed=candidate_seed(self.args))
        except HeadMismatchError as error:
            if setting is True:
                raise
            warnings.warn(f"fitting without the activation cache: {error}", stacklevel=3)
            return None

    @property
    def steps_planned(self) -> Optional[int]:
        """Optimiser steps the fit runs in full (``None`` before ``fit``)."""
        return None if self.train_texts is None else self.args.fit_steps(len(self.train_texts))

    def _require_complete(self, allow_partial: bool, action: str) -> None:
        """Refuse operators whose fit stopped early (Ctrl-C, a failed chunk) unless allowed."""
        self._require_fit()
        planned, ran = self.steps_planned, len(self.history)
        if planned is not None and ran < planned and not allow_partial:
            raise PartialFitError(
                f"cannot {action}: this Stride is only partly fitted ({ran} of {planned} steps ran; the fit was "
                "interrupted or failed). Call fit() again with the same checkpoint_dir to finish it, or pass "
                "allow_partial=True to use the partly fitted operators anyway"
            )

    def _require_fit(self) -> None:
        if self.operators is None or self.design is None:
            raise RuntimeError("this Stride is not fitted yet: call stride.fit(train_texts) or Stride.load(path, model)")

    # -------------------------------------------------------------- measure
    def encode_queries(self, prompts: Sequence[str], completions: Sequence[str]) -> TokenBatch:
        prompts = as_text_list(prompts, "prompts")
        completions = as_text_list(completions, "completions")
        context = self.backend.context_length
        return encode_queries(self.backend.tokenizer, prompts, completions,
                              resolve_max_length(self.args.max_length, context), context_length=context)

    @_in_eval_mode
    def measure(
        self,
        prompts: Sequence[str],
        completions: Sequence[str],
        *,
        metric: Optional[Metric] = None,
        intervention: Any = None,
        progress: bool = True,
        measurement: Optional[str] = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw measurements ``y [q, K]`` (metric change under each operator, first-order or exact:
        ``measurement``, default the fitted `StrideArguments.measurement`) and base metric ``[q]``."""
        self._require_fit()
        self._check_model_unchanged()
        args = self.args if measurement is None else self.args.replace(measurement=measurement)
        first_order = args.first_order_measurement(default_metric=metric is None)
        queries = self.encode_queries(prompts, completions)
        if intervention is not None and self.remote:
            raise NotImplementedError("intervention= is not supported with remote=...: run the patch locally")
        try:
            if self.remote:
                from .remote import measure_remote

                return measure_remote(self, queries, metric=metric, progress=progress, first_order=first_order)
            head = self.output_head(queries) if self.operators.placement == "head" else None
            return measure(self.backend, self.operators, queries, self.args.measure_batch_size, metric, progress,
                           intervention=intervention, head=head, first_order=first_order)
        except FloatingPointError:
            self._check_finite_model()  # NaN/inf weights are the likelier cause: name them
            raise

    def attribute(
        self,
        prompts: Sequence[str],
        completions: Sequence[str],
        *,
        query_ids: Optional[Sequence[Any]] = None,
        metric: Optional[Metric] = None,
        intervention: Any = None,
        lambda_rule: Optional[str] = None,
        lambda_fraction: Optional[float] = None,
        recovery: Optional[str] = None,
        token_weights: Optional[str] = None,
        measurement: Optional[str] = None,
        progress: bool = True,
        allow_partial: bool = False,
        null_permutations: int = 8,
    ) -> Attribution:
        """Attribute each ``prompt + completion`` to the training examples.

        Returns an ``Attribution`` with ``scores [len(prompts), n_train]`` (positive =
        the example lowers the completion's loss, or raises ``metric`` when given), held
        sparse (at most ``K`` non-zeros per query; ``attr.scores`` is the dense view,
        ``attr.sparse_scores`` the torch sparse CSR tensor).
        ``metric(logits [b, t, V], batch: TokenBatch) -> [b]`` replaces the default
        (negative mean completion NLL), e.g. a logit difference between two tokens.
        ``intervention`` applies the user's own patch in every measured run: for nnsight a
        callable ``fn(model)`` executed inside the trace (before the steered layer), for
        TransformerLens a list of ``(hook_name, hook_fn)``; the scores then attribute the
        metric *of the patched model*.
        ``lambda_rule``, ``lambda_fraction``, ``recovery``, ``token_weights``, ``measurement``:
        override the fitted settings for this call (`StrideArguments`; ``measurement="exact"``
        measures each operator's exact effect instead of its first-order one, which ``"auto"``, the
        default, takes for the default metric under the logits and head placements). ``recovery="lasso+tokens"`` (the default) adds,
        after the Lasso, one non-negative coefficient per completion token, given to every training
        document that holds the token in proportion to ``token_weights`` (``"per_document"``: the
        token's share ``1 / L`` of the document's scored tokens; `stride_nnsight.token_component`):
        the scores then have up to the number of documents holding those tokens as non-zeros per
        query, not ``K``; it applies to the default metric only (a custom ``metric`` gets the Lasso
        alone). The noise floor is the Lasso's (shuffled measurements through the Lasso), so
        ``above_noise`` keeps only scores above what the Lasso gives noise.
        ``allow_partial``: accept operators whose fit stopped early (``PartialFitError``
        otherwise); the provenance's ``steps_run`` / ``steps_planned`` show it.
        ``null_permutations``: how many times each query's measurements are shuffled across the
        subsets and recovered again to give its noise floor (``attr.noise_floor``; `top_k`
        shows each score's ``noise_ratio`` and ``above_noise=True`` hides what noise alone
        produces; `stride_nnsight.recovery.noise_floor`). Costs that many extra recoveries
        (recovery is ~0.1 plain forward per query, `benchmarks/SCALING.md`); 0 skips it.
        """
        self._require_complete(allow_partial, "attribute")
        prompts = as_text_list(prompts, "prompts")
        completions = as_text_list(completions, "completions")
        if query_ids is not None and len(query_ids) != len(prompts):
            raise ValueError(f"query_ids has {len(query_ids)} entries but there are {len(prompts)} prompts")
        if query_ids is not None:
            check_unique_ids(list(query_ids), "query_ids", "positions", "query")  # before any measuring
        args = self.args.replace(**{k: v for k, v in {"lambda_rule": lambda_rule, "lambda_fraction": lambda_fraction,
                                                       "recovery": recovery, "token_weights": token_weights,
                                                       "measurement": measurement}.items() if v is not None})
        first_order = args.first_order_measurement(default_metric=metric is None)  # bad combinations raise here
        if isinstance(null_permutations, bool) or not isinstance(null_permutations, int) or null_permutations < 0:
            raise ValueError(f"null_permutations must be an int >= 0 (0: no noise floor), got {null_permutations!r}")
        y, base, scores, lambdas, floor, selection, tokens = self._measure_and_recover(
            prompts, completions, args, metric=metric, intervention=intervention, progress=progress,
            null_permutations=null_permutations)
        fraction = selection["fraction"] if selection is not None else args.lambda_fraction
        return Attribution(
            scores=scores,  # kept sparse

            query_ids=list(query_ids) if query_ids is not None else list(range(len(prompts))),
            train_ids=self.train_ids,
            query_texts=[p + c for p, c in zip(prompts, completions)],
            train_texts=self.train_texts,
            provenance=self.provenance(lambda_rule=args.lambda_rule, lambda_fraction=fraction,
                                       lambda_selection=selection,
                                       recovery=args.recovery if tokens is not None else "lasso",
                                       token_weights=args.token_weights if tokens is not None else None,
                                       token_coefficients=tokens,
                                       measurement="first_order" if first_order else "exact",
                                       lambdas=lambdas.tolist(), metric=getattr(metric, "__name__", "custom")
                                       if metric is not None else "negative_completion_loss",
                                       base_metric=base.tolist(), patched=intervention is not None,
                                       noise_floor=floor, null_permutations=null_permutations),
            measurements=y,
        )

    def _measure_and_recover(self, prompts: list[str], completions: list[str], args: StrideArguments, *,
                             metric: Optional[Metric], intervention: Any, progress: bool,
                             null_permutations: int
                             ) -> tuple[torch.Tensor, torch.Tensor, Any, np.ndarray, Any, Optional[dict],
                                        Optional[list]]:
        """Measurements ``y [q, K]``, base metric ``[q]``, sparse scores ``[q, n]``, lambdas ``[q]``,
        noise floor (list or ``None``) of the queries, the ``"shared_cv"`` rule's choice
        (``{"fraction", ...diagnostics}``; ``None`` under the other rules) and, under
        ``recovery="lasso+tokens"`` with the default metric, each query's token coefficients
        (``{"token id": v}``; else ``None``). Under torch.distributed
        (local models) each rank measures and recovers its share of the queries
        (`distributed.local_indices`) and the rows are gathered, in order, on every rank: the
        single-process result (``"shared_cv"`` chooses its fraction from every rank's measurements)."""
        rank, world = distributed.rank_and_world()
        if world > 1 and len(prompts) != len(completions):
            raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions: give one completion per "
                             "prompt")
        local = distributed.local_indices(len(prompts)) if world > 1 and not self.remote else \
            np.arange(len(prompts), dtype=np.int64)
        K = self.args.n_subsets
        mine = world > 1 and not self.remote
        if len(local):
            y, base = self.measure([prompts[i] for i in local] if mine else prompts,
                                   [completions[i] for i in local] if mine else completions, metric=metric,
                                   intervention=intervention, progress=progress and rank == 0,
                                   measurement=args.measurement)
        else:  # more processes than queries
            y, base = torch.zeros(0, K), torch.zeros(0)
        rule, fraction, selection = args.lambda_rule, args.lambda_fraction, None
        if rule == "shared_cv" and len(prompts):  # one fraction, from every rank's measurements
            everyone = y.numpy()
            if mine:
                everyone = np.stack(distributed.assemble_rows(
                    distributed.all_gather_objects((local, list(y.numpy()))), len(prompts)))
            fraction, diagnostics = shared_fraction(everyone, self.design.membership, args.fit_intercept,
                                                    seed=args.seed)
            rule, selection = "fraction", {"fraction": fraction, **diagnostics}
        if len(local):
            scores, lambdas = recover(y.numpy(), self.design.membership, rule, fraction,
                                      args.fit_intercept, progress=progress and rank == 0, seed=args.seed,
                                      sparse=True)
            floor = noise_floor(y.numpy(), self.design.membership, rule, fraction,
                                args.fit_intercept, n_permutations=null_permutations, seed=args.seed,
                                query_index=local) if null_permutations else None
        else:
            scores, lambdas = sp.csr_matrix((0, len(self.train_texts)), dtype=np.float32), np.zeros(0)
            floor = np.zeros(0) if null_permutations else None
        with_tokens = args.recovery == "lasso+tokens" and metric is None
        coefficients: Optional[list] = [] if with_tokens else None
        if with_tokens and len(local):
            queries = self.encode_queries([prompts[i] for i in local], [completions[i] for i in local])
            scores, found = add_token_component(
                y.numpy(), self.design.membership, scores, self._token_presence(weights=args.token_weights),
                completion_tokens(queries.input_ids.numpy(), queries.loss_mask.numpy()))
            coefficients = [{str(t): v for t, v in c.items()} for c in found]
        if world == 1 or self.remote:
            return y, base, scores, lambdas, (floor.tolist() if floor is not None else None), selection, coefficients
        # one gather of per-query rows (measurements, base, scores, lambda, floor, token coefficients), in order
        rows = [(y[i], base[i], scores[i], lambdas[i], None if floor is None else floor[i],
                 None if coefficients is None else coefficients[i]) for i in range(len(local))]
        q = len(prompts)
        gathered = distributed.assemble_rows(distributed.all_gather_objects((local, rows)), q)
        if q:
            ys, bases, score_rows, lams, floors, coefs = zip(*gathered)
            y, base, scores = torch.stack(ys), torch.stack(bases), sp.vstack(score_rows, format="csr")
            lambdas, floor = np.asarray(lams), (np.asarray(floors) if null_permutations else None)
            coefficients = list(coefs) if with_tokens else None
        return y, base, scores, lambdas, (floor.tolist() if floor is not None else None), selection, coefficients

    def _token_presence(self, batch: Optional[TokenBatch] = None,
                        weights: Optional[str] = None) -> sp.csr_matrix:
        """``P [n, V]``: which tokens each training document holds among its scored tokens, as the
        fit encoded them, weighted by ``weights`` (default: the fitted ``token_weights``;
        `token_component.token_presence`); computed once per fitted corpus: from ``batch`` (the
        fit's own encoding) when given, else by encoding the training texts again at the fit's
        length (a loaded Stride). Another weighting of the same corpus is derived from the kept one
        and the documents' scored-token counts, without encoding again."""
        weights = self.args.token_weights if weights is None else weights
        corpus = (id(self.train_texts), len(self.train_texts), self.train_max_length)
        key = corpus + (weights,)
        cached = getattr(self, "_presence", None)
        if batch is None:
            if cached is not None and cached[0] == key:
                return cached[1]
            counts = getattr(self, "_scored_counts", None)
            if cached is not None and cached[0][:3] == corpus and counts is not None and counts[0] == corpus:
                presence = weigh_presence(cached[1], counts[1], weights)
                self._presence = (key, presence)
                return presence
            context = self.backend.context_length
            cap = self.train_max_length if self.train_max_length is not None else \
                resolve_max_length(self.args.max_length, context)
            with warnings.catch_warnings():  # the fit already warned about what the cap cuts
                warnings.simplefilter("ignore", UserWarning)
                batch = encode_texts(self.backend.tokenizer, self.train_texts, cap, context_length=context)
        ids = batch.input_ids.numpy()
        vocab = max(int(self.backend.vocab_size), int(ids.max()) + 1 if ids.size else 0)
        mask = batch.loss_mask.numpy()
        presence = token_presence(ids, mask, vocab, weights=weights)
        self._presence = (key, presence)
        self._scored_counts = (corpus, mask.astype(bool).sum(axis=1))
        return presence

    # ----------------------------------------------------------------- steer
    def steer(self, operator: Any, scale: float = 1.0) -> Any:
        """Apply operator ``operator`` (an int, per-row ids ``[b]``, or mixing weights over
        the ``K`` operators ``[K]`` / ``[b, K]``) in *your own* run, so it composes with
        activation patching.

        nnsight: call inside ``with model.trace(...):`` (before touching later modules);
        it edits the trace in place and returns ``None``.
        TransformerLens: returns ``fwd_hooks`` for ``run_with_hooks(fwd_hooks=...)`` or
        ``with bridge.hooks(fwd_hooks=...)``.
        ``scale`` multiplies the operator's edit (0 = no steering).
        """
        self._require_fit()
        return self.backend.steer(self.operators, operator, scale)

    # ------------------------------------------------------------ provenance
    def provenance(self, **extra: Any) -> dict[str, Any]:
        module = self.backend.torch_module
        config = getattr(module, "config", None)
        name = getattr(config, "_name_or_path", "") or type(module).__name__
        prov = {
            "method": "STRIDE",
            "package_version": __version__,
            "backend": self.backend.name,
            "model": name,
            "model_fingerprint": self.fingerprint,
            "fingerprint_kind": self.fingerprint_kind,  # "weights", or "shapes" for a remote model's meta weights
            "fitted_fingerprint": self.fitted_fingerprint,
            "layer": self.layer,
            "hook": self.hook_name,
            "placement": self.args.placement,
            "n_subsets": self.args.n_subsets,
            "subsets_per_example": self.args.subsets_per_example,
            "rank": self.args.rank,
            "fit_vocabulary": self.args.fit_vocabulary,  # None: the fit read the whole vocabulary
            "seed": self.args.seed,
            "design_seed": self.args.seed,
            "steps": len(self.history),
            "steps_run": len(self.history),
            "steps_planned": self.steps_planned,
            "activation_cache": self.cache_used,
            "supported_sparsity": None if self.train_texts is None else supported_sparsity(len(self.train_texts),
                                                                                           self.args.n_subsets),
            "settings": self.args.to_dict(),
            "max_length": self.train_max_length,  # effective tokens per training text (BOS included)
            "query_max_length": resolve_max_length(self.args.max_length, self.backend.context_length, warn=False),
            "remote": self.remote if isinstance(self.remote, (bool, str)) else type(self.remote).__name__,
        }
        prov.update(extra)
        return prov

    # ---------------------------------------------------------------- save
    def save(self, path: str | os.PathLike, *, allow_partial: bool = False) -> Path:
        """Write everything needed to attribute new queries (settings, design, operators,
        training ids/texts, loss curve, model fingerprint) to directory ``path``: the
        manifest ``stride_state.json`` and a ``.safetensors`` file beside it
        (``stride_nnsight.storage``; atomic). Training ids must be str, int, float, bool,
        None or tuples of them (``TypeError`` otherwise, before anything is written).
        A partly fitted Stride is refused (``PartialFitError``) unless ``allow_partial=True``."""
        self._require_complete(allow_partial, "save")
        bad = [k for k, v in self.operators.state_dict().items() if not bool(torch.isfinite(v).all())]
        if bad:
            raise FloatingPointError(f"refusing to save non-finite (NaN/inf) operators ({', '.join(bad)}): "
                                     "refit them (check the model's weights, or lower lr)")
        directory = Path(path)
        state = {
            "args": self.args.to_dict(),
            "layer": self.layer,
            "design": self.design.to_dict(),
            "operators": {k: v.detach().cpu() for k, v in self.operators.state_dict().items()},
            "operator_settings": self.operators.settings(),
            "history": self.history.to_dict(),
            "train_ids": self.train_ids,
            "train_texts": self.train_texts,
            "fingerprint": self.fingerprint,
            "fingerprint_kind": self.fingerprint_kind,
            "fingerprint_version": FINGERPRINT_VERSION,
            "shape_fingerprint": self.shape_fingerprint,
            "backend": self.backend.name,
            "steps_planned": self.steps_planned,
            "max_length": self.train_max_length,
            "activation_cache": self.cache_used,
        }
        storage.save(directory / STATE_FILE, STATE_KIND, state)
        return directory

    @classmethod
    def load(cls, path: str | os.PathLike, model: Any, *, strict: bool = True, tokenizer: Any = None,
             layers_path: Optional[str] = None, remote: bool | str = False, **remote_settings: Any) -> "Stride":
        """Restore a fitted ``Stride`` saved with ``save`` for ``model``.

        ``remote`` / ``remote_*`` settings: as for ``Stride(...)``; with ``remote`` set a lazily
        loaded model keeps its weights on the server (only its architecture is verified).

        Refuses (``ValueError``) a model whose fingerprint differs from the one it was
        fitted on, unless ``strict=False``. ``tokenizer`` / ``layers_path``: as for ``Stride(...)``.
        ``path``: the directory given to ``save`` (or its ``stride_state.json``, or a
        ``stride_state.pt`` of stride-nnsight 0.1, read without unpickling code). Raises
        ``StateFileError`` for a corrupted, truncated, unknown-format or incomplete file.
        """
        file = find_state_file(path) if Path(path).is_dir() else Path(path)
        if file is None or not file.exists():
            raise FileNotFoundError(f"no saved STRIDE state at {Path(path) / STATE_FILE if file is None else file}: "
                                    "pass the directory given to stride.save()")
        state = storage.load(file, STATE_KIND, required=STATE_KEYS)
        unknown = sorted(k for k in remote_settings if not k.startswith("remote_"))
        if unknown:
            raise TypeError(f"Stride.load() got unexpected keyword(s) {unknown}: the settings are the saved ones; "
                            "only remote_* settings can be given")
        stride = cls(model, args=StrideArguments.from_saved(state["args"]), tokenizer=tokenizer, layers_path=layers_path,
                     remote=remote, **remote_settings)
        if strict:
            stride._check_saved_fingerprint(state)
        stride.fitted_fingerprint = state["fingerprint"]
        stride.design = SubsetDesign(**state["design"])
        stride.operators = stride._new_operators()
        stride.operators.load_state_dict(state["operators"])
        stride.operators.eval()
        stride.history = FitHistory.from_dict(state["history"])
        stride.train_ids = state["train_ids"]
        stride.train_texts = state["train_texts"]
        stride.train_max_length = state.get("max_length", state["args"].get("max_length"))
        stride.cache_used = state.get("activation_cache")
        return stride

    def __repr__(self) -> str:
        status = f"fitted on {self.design.n_examples} examples" if self.operators is not None else "not fitted"
        if self.operators is not None and self.steps_planned is not None and len(self.history) < self.steps_planned:
            status = f"partly fitted on {self.design.n_examples} examples ({len(self.history)} of " \
                     f"{self.steps_planned} steps)"
        a = self.args
        return (f"Stride(backend={self.backend.name}, hook={self.hook_name!r}, placement={a.placement!r}, "
                f"K={'auto' if a.n_subsets is None else a.n_subsets}, d={a.subsets_per_example}, "
                f"rank={'auto' if a.rank is None else a.rank}, {status})")


def attribute_layers(strides: Sequence[Stride], prompts: Sequence[str], completions: Sequence[str],
                     **kwargs: Any) -> AttributionCache:
    """Attribute the same queries with several fitted ``Stride`` objects (typically one per
    layer) and key the results by hook name, like an ``ActivationCache``.

    ``kwargs`` go to every ``Stride.attribute`` call. Raises if two strides steer the same site.
    """
    cache = AttributionCache()
    for stride in strides:
        if stride.hook_name in cache:
            raise ValueError(f"two strides steer the same site {stride.hook_name}: pass one per layer")
        cache[stride.hook_name] = stride.attribute(prompts, completions, **kwargs)
    return cache
