"""Toolkit adapters. ``resolve_backend(model)`` picks the right one for a user's model."""

from __future__ import annotations

from typing import Any

from .base import ModelBackend, model_fingerprint

__all__ = ["ModelBackend", "resolve_backend", "model_fingerprint"]


def resolve_backend(model: Any, **kwargs: Any) -> ModelBackend:
    """Wrap ``model`` (an nnsight model or a TransformerLens ``TransformerBridge``)."""
    if isinstance(model, ModelBackend):
        return model
    cls = type(model)
    mro = {f"{c.__module__}.{c.__name__}" for c in cls.__mro__}
    if any(name.startswith("nnsight.") for name in mro):
        from .nnsight import NNsightBackend

        return NNsightBackend(model, **kwargs)
    if any(name.startswith("transformer_lens.") for name in mro):
        from .transformer_lens import TransformerLensBackend

        return TransformerLensBackend(model, **kwargs)
    if isinstance(model, __import__("torch").nn.Module):
        raise TypeError(
            f"got a bare {cls.__name__}: wrap it first, e.g. "
            "`from nnsight import TransformersModel; model = TransformersModel(hf_model, "
            "tokenizer=tok, task='text-generation')`"
        )
    raise TypeError(
        f"unsupported model type {cls.__name__}: pass an nnsight TransformersModel/LanguageModel "
        "or a TransformerLens TransformerBridge"
    )
