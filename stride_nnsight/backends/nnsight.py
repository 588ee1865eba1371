"""nnsight adapter: the operator is an intervention on a decoder block's output inside
``model.trace(...)``; nothing is registered on the torch module itself."""

from __future__ import annotations

from functools import reduce
from typing import Any, Optional

import torch
from torch import Tensor

from ..operators import steered_forward
from .base import Edit, ModelBackend

__all__ = ["NNsightBackend", "find_layers_path"]


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


class NNsightBackend(ModelBackend):
    """Wraps an nnsight ``TransformersModel`` / ``LanguageModel`` (or any ``NNsight`` model
    around a Hugging Face causal LM)."""

    name = "nnsight"

    def __init__(self, model: Any, layers_path: Optional[str] = None, tokenizer: Any = None) -> None:
        self.model = model
        self.torch_module = model._module
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
            raise ValueError("the model has no tokenizer: pass tokenizer=... to Stride")

    def block(self, layer: int):
        """The envoy of decoder block ``layer`` (usable inside a trace)."""
        return reduce(getattr, self.layers_path.split("."), self.model)[layer]

    def output_head(self):
        """The envoy of the output embedding (``lm_head``), usable inside a trace."""
        head = self.torch_module.get_output_embeddings()
        for name, module in self.torch_module.named_modules():
            if module is head:
                return reduce(getattr, name.split("."), self.model)
        raise ValueError(f"{type(self.torch_module).__name__} has no output embedding module to steer")

    def forward(self, input_ids: Tensor, attention_mask: Tensor, layer: int, edit: Optional[Edit] = None,
                intervention: Any = None):
        if intervention is not None and not callable(intervention):
            raise TypeError("for nnsight models, intervention must be a callable fn(model) run inside the trace")
        return steered_forward(self.model, self.layers_path, layer, input_ids, attention_mask, edit, intervention)

    def steer(self, operators: Any, operator: Any, scale: float = 1.0) -> None:
        """Apply ``operator`` inside the *current* ``model.trace(...)``.

        Residual placement edits the output of block ``operators.layer``; logits placement
        reads that block's output and adds the operator's edit to the output head's logits.
        Call it before touching modules that run after the steered block (nnsight visits
        modules in execution order)."""
        block = self.block(operators.layer)
        out = block.output
        hidden = out[0] if isinstance(out, tuple) else out
        delta = operators.delta(hidden, operator) * scale
        if operators.placement == "residual":
            steered = hidden + delta.to(hidden.dtype)
            block.output = (steered,) + tuple(out[1:]) if isinstance(out, tuple) else steered
        else:
            head = self.output_head()
            head.output = head.output + delta.to(head.output.dtype)
