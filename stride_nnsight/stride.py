"""The facade: ``Stride(model).fit(texts)`` then ``.attribute(prompts, completions)``."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from . import __version__
from .arguments import StrideArguments
from .backends import ModelBackend, resolve_backend
from .design import SubsetDesign
from .fitting import FitHistory, OperatorFitter
from .inputs import TokenBatch, as_text_list, encode_queries, encode_texts
from .measurement import Metric, measure
from .operators import SteeringOperators
from .recovery import recover
from .results import Attribution, AttributionCache

__all__ = ["Stride", "STATE_FILE", "attribute_layers"]

STATE_FILE = "stride_state.pt"


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
        layer, n_subsets, subsets_per_example, rank, placement, seed: the most used
            settings; ``None`` keeps the value of ``args`` (or the default).
        args: a full ``StrideArguments``; keyword ``settings`` override single fields.
        tokenizer: only needed when the model object carries none.
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
        self.model = model
        self.backend: ModelBackend = resolve_backend(model, tokenizer=tokenizer) if tokenizer is not None \
            else resolve_backend(model)
        self.layer = self.backend.check_layer(self.args.layer)
        self.backend.freeze()
        self.design: Optional[SubsetDesign] = None
        self.operators: Optional[SteeringOperators] = None
        self.history = FitHistory()
        self.train_texts: Optional[list[str]] = None
        self.train_ids: Optional[list[Any]] = None
        self.fingerprint = self.backend.fingerprint()

    # ------------------------------------------------------------------ build
    @property
    def is_fitted(self) -> bool:
        return (self.operators is not None and self.train_texts is not None
                and len(self.history) >= self.args.fit_steps(len(self.train_texts)))

    @property
    def hook_name(self) -> str:
        return self.backend.hook_name(self.layer)

    def _new_operators(self) -> SteeringOperators:
        torch.manual_seed(self.args.seed)
        out_dim = self.backend.d_model if self.args.placement == "residual" else self.backend.vocab_size
        ops = SteeringOperators(self.args.n_subsets, self.backend.d_model, self.args.rank, out_dim,
                                placement=self.args.placement, layer=self.layer, hidden=self.args.basis_hidden)
        return ops.to(self.backend.device)

    def _encode_train(self) -> TokenBatch:
        return encode_texts(self.backend.tokenizer, self.train_texts, self.args.max_length)

    # -------------------------------------------------------------------- fit
    def fit(
        self,
        train_texts: Any,
        train_ids: Optional[Sequence[Any]] = None,
        *,
        progress: bool = True,
        checkpoint_dir: Optional[str | os.PathLike] = None,
    ) -> "Stride":
        """Build the subset design over ``train_texts`` and train all ``K`` operators.

        Args:
            train_texts: ``list[str]`` or a ``datasets.Dataset`` with a ``"text"`` column.
            train_ids: optional ids (default ``0..n-1``).
            progress: show a progress bar.
            checkpoint_dir: if given, progress is written there and a later call with the
                same directory resumes (also after Ctrl-C or a crash).
        Returns ``self``; the loss curve is in ``self.history``.
        """
        texts = as_text_list(train_texts, "train_texts")
        if train_ids is not None and len(train_ids) != len(texts):
            raise ValueError(f"train_ids has {len(train_ids)} entries but there are {len(texts)} texts")
        self.train_texts = texts
        self.train_ids = list(train_ids) if train_ids is not None else list(range(len(texts)))
        self.design = SubsetDesign(len(texts), self.args.n_subsets, self.args.subsets_per_example, self.args.seed)
        self.operators = self._new_operators()
        fitter = OperatorFitter(self.backend, self.operators, self.design, self._encode_train(), self.args)
        if self.remote:
            from .remote import fit_remote

            self.history = fit_remote(self, fitter, progress=progress, checkpoint_dir=checkpoint_dir)
        else:
            self.history = fitter.run(progress=progress, checkpoint_dir=checkpoint_dir)
        return self

    def _require_fit(self) -> None:
        if self.operators is None or self.design is None:
            raise RuntimeError("this Stride is not fitted yet: call stride.fit(train_texts) or Stride.load(path, model)")

    # -------------------------------------------------------------- measure
    def encode_queries(self, prompts: Sequence[str], completions: Sequence[str]) -> TokenBatch:
        prompts = as_text_list(prompts, "prompts")
        completions = as_text_list(completions, "completions")
        return encode_queries(self.backend.tokenizer, prompts, completions, self.args.max_length)

    def measure(
        self,
        prompts: Sequence[str],
        completions: Sequence[str],
        *,
        metric: Optional[Metric] = None,
        intervention: Any = None,
        progress: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw measurements ``y [q, K]`` (metric change under each operator) and base metric ``[q]``."""
        self._require_fit()
        queries = self.encode_queries(prompts, completions)
        if intervention is not None and self.remote:
            raise NotImplementedError("intervention= is not supported with remote=...: run the patch locally")
        if self.remote:
            from .remote import measure_remote

            return measure_remote(self, queries, metric=metric, progress=progress)
        return measure(self.backend, self.operators, queries, self.args.measure_batch_size, metric, progress,
                       intervention=intervention)

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
        progress: bool = True,
    ) -> Attribution:
        """Attribute each ``prompt + completion`` to the training examples.

        Returns an ``Attribution`` with ``scores [len(prompts), n_train]`` (positive =
        the example lowers the completion's loss, or raises ``metric`` when given).
        ``metric(logits [b, t, V], batch: TokenBatch) -> [b]`` replaces the default
        (negative mean completion NLL), e.g. a logit difference between two tokens.
        ``intervention`` applies the user's own patch in every measured run: for nnsight a
        callable ``fn(model)`` executed inside the trace (before the steered layer), for
        TransformerLens a list of ``(hook_name, hook_fn)``; the scores then attribute the
        metric *of the patched model*.
        """
        self._require_fit()
        prompts = as_text_list(prompts, "prompts")
        completions = as_text_list(completions, "completions")
        if query_ids is not None and len(query_ids) != len(prompts):
            raise ValueError(f"query_ids has {len(query_ids)} entries but there are {len(prompts)} prompts")
        args = self.args.replace(**{k: v for k, v in {"lambda_rule": lambda_rule,
                                                       "lambda_fraction": lambda_fraction}.items() if v is not None})
        y, base = self.measure(prompts, completions, metric=metric, intervention=intervention, progress=progress)
        scores, lambdas = recover(y.numpy(), self.design.membership, args.lambda_rule, args.lambda_fraction,
                                  args.fit_intercept, progress=progress, seed=args.seed)
        return Attribution(
            scores=torch.from_numpy(scores),
            query_ids=list(query_ids) if query_ids is not None else list(range(len(prompts))),
            train_ids=self.train_ids,
            query_texts=[p + c for p, c in zip(prompts, completions)],
            train_texts=self.train_texts,
            provenance=self.provenance(lambda_rule=args.lambda_rule, lambda_fraction=args.lambda_fraction,
                                       lambdas=lambdas.tolist(), metric=getattr(metric, "__name__", "custom")
                                       if metric is not None else "negative_completion_loss",
                                       base_metric=base.tolist(), patched=intervention is not None),
            measurements=y,
        )

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
            "layer": self.layer,
            "hook": self.hook_name,
            "placement": self.args.placement,
            "n_subsets": self.args.n_subsets,
            "subsets_per_example": self.args.subsets_per_example,
            "rank": self.args.rank,
            "seed": self.args.seed,
            "design_seed": self.args.seed,
            "steps": len(self.history),
            "settings": self.args.to_dict(),
            "remote": self.remote if isinstance(self.remote, (bool, str)) else type(self.remote).__name__,
        }
        prov.update(extra)
        return prov

    # ---------------------------------------------------------------- save
    def save(self, path: str | os.PathLike) -> Path:
        """Write everything needed to attribute new queries (settings, design, operators,
        training ids/texts, loss curve, model fingerprint) to directory ``path``."""
        self._require_fit()
        directory = Path(path)
        directory.mkdir(parents=True, exist_ok=True)
        state = {
            "format": 1,
            "package_version": __version__,
            "args": self.args.to_dict(),
            "layer": self.layer,
            "design": self.design.to_dict(),
            "operators": {k: v.detach().cpu() for k, v in self.operators.state_dict().items()},
            "operator_settings": self.operators.settings(),
            "history": self.history.to_dict(),
            "train_ids": self.train_ids,
            "train_texts": self.train_texts,
            "fingerprint": self.fingerprint,
            "backend": self.backend.name,
        }
        target = directory / STATE_FILE
        tmp = target.with_suffix(".tmp")
        torch.save(state, tmp)
        os.replace(tmp, target)
        return directory

    @classmethod
    def load(cls, path: str | os.PathLike, model: Any, *, strict: bool = True, tokenizer: Any = None) -> "Stride":
        """Restore a fitted ``Stride`` saved with ``save`` for ``model``.

        Refuses (``ValueError``) a model whose fingerprint differs from the one it was
        fitted on, unless ``strict=False``.
        """
        file = Path(path) / STATE_FILE if Path(path).is_dir() else Path(path)
        if not file.exists():
            raise FileNotFoundError(f"no saved STRIDE state at {file}: pass the directory given to stride.save()")
        state = torch.load(file, weights_only=False)
        stride = cls(model, args=StrideArguments.from_dict(state["args"]), tokenizer=tokenizer)
        if strict and stride.fingerprint != state["fingerprint"]:
            raise ValueError(
                f"model mismatch: the saved operators were fitted on a model with fingerprint "
                f"{state['fingerprint']}, this model has {stride.fingerprint}. Load with the same model "
                "(weights and config), or pass strict=False to force it."
            )
        stride.design = SubsetDesign(**state["design"])
        stride.operators = stride._new_operators()
        stride.operators.load_state_dict(state["operators"])
        stride.operators.eval()
        stride.history = FitHistory.from_dict(state["history"])
        stride.train_ids = state["train_ids"]
        stride.train_texts = state["train_texts"]
        return stride

    def __repr__(self) -> str:
        status = f"fitted on {self.design.n_examples} examples" if self.operators is not None else "not fitted"
        a = self.args
        return (f"Stride(backend={self.backend.name}, hook={self.hook_name!r}, placement={a.placement!r}, "
                f"K={a.n_subsets}, d={a.subsets_per_example}, rank={a.rank}, {status})")


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
