"""nnsight adapter: the operator is an intervention on a decoder block's output inside
``model.trace(...)``; nothing is registered on the torch module itself."""

from __future__ import annotations

import os
from functools import reduce
from typing import Any, Optional

import torch
from torch import Tensor

from ..operators import steered_forward
from .base import Edit, ModelBackend

__all__ = ["NNsightBackend", "find_layers_path", "tokenizer_from_config"]


def find_layers_path(module: torch.nn.Module, n_layers: Optional[int] = None) -> str:
    """Dotted path of the ``nn.ModuleList`` holding the decoder blocks
    (``transformer.h`` for GPT-2, ``model.layers`` for Llama/Qwen, ``gpt_neox.layers``...)."""
    best: Optional[str] = None
    for name, child in module.named_modules():
        if isinstance(child, torch.nn.ModuleList) and len(child) > 0:
            if n_layers is None or len(child) == n_layers:
                if best is None or len(name) < len(best):
                    best = name
    if best is None:
        raise ValueError(
            "could not find the decoder blocks (an nn.ModuleList"
            + (f" of {n_layers} layers" if n_layers else "")
            + f") in {type(module).__name__}; pass layers_path='...' (e.g. 'model.layers')"
        )
    return best


def _config_int(config: Any, *names: str) -> Optional[int]:
    for name in names:
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    text_config = getattr(config, "text_config", None)
    if text_config is not None and text_config is not config:
        return _config_int(text_config, *names)
    return None


def tokenizer_from_config(config: Any) -> Any:
    """``AutoTokenizer.from_pretrained(config._name_or_path)`` when that is a local
    directory holding a tokenizer (a model loaded from a path); ``ValueError`` otherwise."""
    source = getattr(config, "_name_or_path", "") or ""
    if isinstance(source, str) and source and os.path.isdir(source):
        from transformers import AutoTokenizer

        try:
            return AutoTokenizer.from_pretrained(source)
        except (OSError, ValueError) as error:
            raise ValueError(
                f"the model has no tokenizer and none could be loaded from its directory {source!r} "
                f"({type(error).__name__}: {error}): pass tokenizer=AutoTokenizer.from_pretrained(...) "
                "to the nnsight model or to Stride"
            ) from error
    raise ValueError(
        "the model has no tokenizer"
        + (f" and its source {source!r} is not a local directory" if source else "")
        + ": pass tokenizer=... to Stride, or build the nnsight model with one, e.g. "
        "TransformersModel(path, tokenizer=AutoTokenizer.from_pretrained(path), task='text-generation')"
    )


class NNsightBackend(ModelBackend):
    """Wraps an nnsight ``TransformersModel`` / ``LanguageModel`` (or any ``NNsight`` model
    around a Hugging Face causal LM)."""

    name = "nnsight"

    def __init__(self, model: Any, layers_path: Optional[str] = None, tokenizer: Any = None) -> None:
        self.model = model
        config = getattr(self.torch_module, "config", None)
        n_layers = _config_int(config, "num_hidden_layers", "n_layer", "num_layers")
        self.layers_path = layers_path or find_layers_path(self.torch_module, n_layers)
        blocks = reduce(getattr, self.layers_path.split("."), self.torch_module)
        self.n_layers = len(blocks)
        self.d_model = _config_int(config, "hidden_size", "n_embd", "d_model")
        self.vocab_size = _config_int(config, "vocab_size")
        if self.d_model is None or self.vocab_size is None:
            raise ValueError(
                f"could not read hidden size / vocab size from {type(self.torch_module).__name__}.config"
            )
        self.tokenizer = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
        if self.tokenizer is None:
            self.tokenizer = tokenizer_from_config(config)

    @property
    def torch_module(self) -> torch.nn.Module:
        """The ``nn.Module`` the nnsight model runs now. Read on every use: a lazily loaded
        model swaps its ``meta`` skeleton for the real module when it is dispatched."""
        return self.model._module

    def materialize(self) -> None:
        """Dispatch a lazily loaded model (``TransformersModel(path)`` builds on ``meta`` and
        loads the weights at its first trace), so that fingerprinting and `freeze` see the
        real weights. Raises ``ValueError`` with advice if real weights cannot be had here."""
        if getattr(self.model, "dispatched", True) is False and callable(getattr(self.model, "dispatch", None)):
            self.model.dispatch()
        params = list(self.torch_module.parameters())
        if params and all(p.device.type == "meta" for p in params):
            raise ValueError(
                f"the weights of this {type(self.model).__name__} are on the meta device (not loaded) and "
                "could not be loaded here: load the model with its weights (e.g. "
                "TransformersModel(path, tokenizer=..., dispatch=True)), or pass remote=... to Stride to "
                "run on a server that has them"
            )

    def block_module(self, layer: int) -> torch.nn.Module:
        """The ``nn.Module`` of decoder block ``layer`` (outside a trace)."""
        return reduce(getattr, self.layers_path.split("."), self.torch_module)[layer]

    def block(self, layer: int):
        """The envoy of decoder block ``layer`` (usable inside a trace)."""
        return reduce(getattr, self.layers_path.split("."), self.model)[layer]

    def forward(self, input_ids: Tensor, attention_mask: Tensor, layer: int, edit: Optional[Edit] = None,
                intervention: Any = None):
        if intervention is not None and not callable(intervention):
            raise TypeError("for nnsight models, intervention must be a callable fn(model) run inside the trace")
        return steered_forward(self.model, self.layers_path, layer, input_ids, attention_mask, edit, intervention)

    def steer(self, operators: Any, operator: Any, scale: float = 1.0) -> None:
        """Apply ``operator`` inside the *current* ``model.trace(...)``: exactly the edit that
        fitting and measurement apply (`steered_forward` / `step_losses`).

        Residual placement replaces the output ``z [b, t, d]`` of block ``operators.layer``
        by ``z + scale * B(z) a_k``. Logits placement reads that block's output and adds
        ``scale * B(z) a_k`` to the model's *final* logits ``model.output.logits [b, t, V]``,
        i.e. after any transform the model applies past its output head (Cohere's
        ``logit_scale``, Granite's ``logits_scaling``, Gemma 2's final soft-capping), which
        is what fit and measurement edit. Head placement adds ``scale * B(z) a_k`` to the output
        head's input (the final hidden state). Call it before touching modules that run after
        the steered block (nnsight visits modules in execution order); with the logits
        placement read the steered logits afterwards as ``model.output.logits``."""
        block = self.block(operators.layer)
        out = block.output
        hidden = out[0] if isinstance(out, tuple) else out
        delta = operators.delta(hidden, operator) * scale
        if operators.placement == "residual":
            steered = hidden + delta.to(hidden.dtype)
            block.output = (steered,) + tuple(out[1:]) if isinstance(out, tuple) else steered
        elif operators.placement == "head":  # the output head's input (the final hidden state)
            from ..activations import head_path

            head = reduce(getattr, head_path(self).split("."), self.model)
            h = head.input
            head.input = h + delta.to(device=h.device, dtype=h.dtype)
        else:
            output = self.model.output
            logits = output.logits
            output.logits = logits + delta.to(device=logits.device, dtype=logits.dtype)
