"""The small interface every toolkit adapter implements.

STRIDE needs exactly one thing from a toolkit: run the frozen model on a token batch,
read the residual stream at the output of one decoder block, optionally replace it
with an edited version, and return the logits. Everything else (operators, losses,
fitting, measurement, recovery) is toolkit-independent and lives elsewhere.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Callable, Optional

import torch
from jaxtyping import Float, Int
from torch import Tensor

Edit = Callable[[Tensor], Tensor]

__all__ = ["ModelBackend", "Edit", "model_fingerprint", "named_weights", "unique_weights", "fingerprint_weights",
           "fingerprint_kind", "check_finite_weights", "FINGERPRINT_VERSION"]


class ModelBackend:
    """Adapter between STRIDE and a toolkit's model object.

    Attributes set by subclasses: ``name`` (str), ``n_layers``, ``d_model``,
    ``vocab_size`` (ints), ``tokenizer`` (a Hugging Face tokenizer), ``model`` (the user's
    toolkit object) and ``torch_module`` (the underlying ``nn.Module``).
    """

    name: str = "base"
    n_layers: int
    d_model: int
    vocab_size: int

    def forward(
        self,
        input_ids: Int[Tensor, "b t"],
        attention_mask: Int[Tensor, "b t"],
        layer: int,
        edit: Optional[Edit] = None,
        intervention: Any = None,
    ) -> tuple[Float[Tensor, "b t V"], Float[Tensor, "b t d"]]:
        """Run the model; return ``(logits, z)`` where ``z`` is the residual stream at the
        output of block ``layer`` *before* ``edit`` (which, if given, maps ``z`` to the
        activation the rest of the network sees). Gradients flow to ``edit``'s parameters.

        ``intervention`` is the user's own edit of the run, in the toolkit's idiom: for
        nnsight a callable ``fn(model)`` executed inside the trace before the steering site
        (e.g. an activation patch at an earlier layer); for TransformerLens a list of
        ``(hook_name, hook_fn)`` pairs added to ``run_with_hooks``."""
        raise NotImplementedError

    def steer(self, operators: Any, operator: Any, scale: float = 1.0) -> Any:
        """Apply ``operator`` of ``operators`` in the user's own run (see ``Stride.steer``)."""
        raise NotImplementedError

    def hook_name(self, layer: int) -> str:
        """Human-readable name of the steered site (TransformerLens style)."""
        return f"blocks.{layer}.hook_resid_post"

    @property
    def device(self) -> torch.device:
        for p in self.torch_module.parameters():
            if p.device.type != "meta":
                return p.device
        return torch.device("cpu")

    def block_module(self, layer: int) -> torch.nn.Module:
        """The ``nn.Module`` of decoder block ``layer`` (subclasses know where the blocks are)."""
        raise NotImplementedError

    def layer_device(self, layer: int) -> torch.device:
        """Device where decoder block ``layer`` runs: where the operators steering it live.

        Equal to `device` for a model on one device. For a model dispatched over several
        devices (``from_pretrained(..., device_map="auto")``) it is the device of that block's
        weights, or, for a block whose weights are offloaded (``meta`` at rest), the execution
        device of its accelerate hook."""
        try:
            module = self.block_module(self.check_layer(int(layer)))
        except NotImplementedError:
            return self.device
        hook = getattr(module, "_hf_hook", None)
        execution = getattr(hook, "execution_device", None)
        for p in module.parameters():
            if p.device.type != "meta":
                return p.device
        if execution is not None:
            return torch.device(execution) if not isinstance(execution, int) else torch.device("cuda", execution)
        return self.device

    @property
    def dtype(self) -> torch.dtype:
        for p in self.torch_module.parameters():
            return p.dtype
        return torch.float32

    #: config fields that hold a model's context length, in the order they are read
    CONTEXT_LENGTH_FIELDS = ("n_positions", "max_position_embeddings", "n_ctx", "seq_length",
                             "max_sequence_length", "max_seq_len", "seq_len")

    @property
    def context_length(self) -> Optional[int]:
        """Longest token sequence the model accepts (int), read from its Hugging Face config
        (the first positive int of `CONTEXT_LENGTH_FIELDS`, also in a nested ``text_config``);
        ``None`` when unknown, and then STRIDE caps no lengths."""
        config = self.hf_config()
        for cfg in (config, getattr(config, "text_config", None)):
            for name in self.CONTEXT_LENGTH_FIELDS:
                value = getattr(cfg, name, None) if cfg is not None else None
                if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                    return value
        return None

    def check_layer(self, layer: int) -> int:
        if not isinstance(layer, int) or isinstance(layer, bool):
            raise TypeError(f"layer must be an int, got {type(layer).__name__}")
        if not -self.n_layers <= layer < self.n_layers:
            raise ValueError(
                f"layer {layer} is out of range: this model has {self.n_layers} decoder blocks "
                f"(valid layers 0..{self.n_layers - 1}, or negative indices from the end)"
            )
        return layer % self.n_layers

    def freeze(self) -> None:
        """Put the base model in eval mode and stop gradients into its weights.

        Acts on the module that runs (``torch_module``); a lazily loaded model must be
        `materialize`d first, or its real weights would stay trainable."""
        self.torch_module.eval()
        for p in self.torch_module.parameters():
            p.requires_grad_(False)

    def materialize(self) -> None:
        """Load real weights if the toolkit object still holds ``meta`` placeholders (a
        lazily loaded model). Default: nothing to do."""

    def named_weights(self) -> list[tuple[str, Tensor]]:
        """``(Hugging Face parameter name, tensor)`` for every weight, each tensor once
        (the module function `named_weights`); what `fingerprint` covers."""
        return named_weights(self.torch_module)

    def hf_config(self) -> Any:
        """The Hugging Face config of the wrapped model (``None`` if it has none)."""
        return getattr(self.torch_module, "config", None)

    def fingerprint(self, values: bool = True) -> str:
        """`fingerprint_weights` of the model: config, and name, shape, dtype and sampled
        values of every weight (``values=False``: no values, the ``"shapes"`` kind)."""
        return fingerprint_weights(self.hf_config(), self.named_weights(), values=values)

    def fingerprint_kind(self) -> str:
        """What `fingerprint` covers here: ``"weights"``, ``"shapes"`` (meta weights, e.g.
        a remote model) or ``"partial"``; see `fingerprint_kind`."""
        return fingerprint_kind(self.named_weights())


#: Version of the fingerprint algorithm; saved with fitted states so that a state written by
#: an older algorithm is reported as such instead of as a different model.
FINGERPRINT_VERSION = 2

#: Values sampled per weight tensor (evenly spaced over the flattened tensor, first and last
#: included; every value of smaller tensors).
FINGERPRINT_SAMPLE = 256

_CONFIG_SKIP = ("transformers_version", "torch_dtype", "dtype", "attn_implementation", "use_cache",
                "architectures", "output_attentions", "output_hidden_states", "return_dict")


def named_weights(module: torch.nn.Module) -> list[tuple[str, Tensor]]:
    """The weights a fingerprint covers: ``module.named_parameters()``, each tensor once
    (see `unique_weights`), sorted by name."""
    return unique_weights(module.named_parameters(remove_duplicate=False))


def unique_weights(pairs: Any) -> list[tuple[str, Tensor]]:
    """``(name, parameter)`` pairs with each tensor once, sorted by name.

    A parameter registered under several names (tied weights) is kept once, under its
    alphabetically first name; a parameter whose memory lies inside a larger parameter's
    (a partial view, e.g. a TransformerLens bridge's split q/k/v of GPT-2's fused
    ``c_attn``) is left out, since the larger one covers it.
    """
    by_id: dict[int, tuple[str, Tensor]] = {}
    for name, p in pairs:
        if id(p) not in by_id or name < by_id[id(p)][0]:
            by_id[id(p)] = (name, p)
    by_storage: dict[int, list[tuple[int, int, int, str]]] = {}  # storage -> (start, end, numel, name)
    for name, p in by_id.values():
        if p.device.type != "meta" and p.numel() > 0:
            start = p.data_ptr()
            by_storage.setdefault(p.untyped_storage().data_ptr(), []).append(
                (start, start + p.numel() * p.element_size(), p.numel(), name))
    views = {name for group in by_storage.values() if len(group) > 1 for start, end, numel, name in group
             if any(o_numel > numel and o_start <= start and end <= o_end for o_start, o_end, o_numel, _ in group)}
    kept = [(name, p) for name, p in by_id.values() if name not in views]
    return sorted(kept, key=lambda item: item[0])


def _config_items(config: Any) -> dict[str, Any]:
    if config is None or not hasattr(config, "to_dict"):
        return {}
    return {k: v for k, v in config.to_dict().items()
            if isinstance(v, (int, float, str, bool)) and not k.startswith("_") and k not in _CONFIG_SKIP}


def _sample(p: Tensor, sample: int) -> bytes:
    """Exact float32 bits of ``sample`` values spread evenly over ``p`` (all of them if fewer)."""
    flat = p.detach().reshape(-1)
    if flat.numel() > sample:
        index = torch.linspace(0, flat.numel() - 1, sample, dtype=torch.float64).round().long()
        flat = flat[index.to(flat.device)]
    return flat.float().cpu().contiguous().numpy().tobytes()


def fingerprint_kind(weights: list[tuple[str, Tensor]]) -> str:
    """``"weights"`` when every tensor has values here, ``"shapes"`` when all are on the
    ``meta`` device (a remote model: only config, names, shapes and dtypes are hashed),
    ``"partial"`` otherwise."""
    meta = sum(p.device.type == "meta" for _, p in weights)
    return "weights" if meta == 0 else "shapes" if meta == len(weights) else "partial"


def fingerprint_weights(config: Any, weights: list[tuple[str, Tensor]], sample: int = FINGERPRINT_SAMPLE,
                        values: bool = True) -> str:
    """Hash of a model's config and of every weight tensor in ``weights`` (``(name, tensor)``
    pairs, see `named_weights`): its name, shape, dtype and, unless it is on ``meta`` or
    ``values=False``, the exact values of ``sample`` evenly spaced entries. 16 hex digits."""
    h = hashlib.sha256(f"stride-fingerprint-v{FINGERPRINT_VERSION}".encode())
    h.update(json.dumps(_config_items(config), sort_keys=True, default=str).encode())
    for name, p in weights:
        h.update(f"{name}|{tuple(p.shape)}|{str(p.dtype).replace('torch.', '')}".encode())
        if values and p.device.type != "meta":
            h.update(_sample(p, sample))
    return h.hexdigest()[:16]


def model_fingerprint(module: torch.nn.Module, sample: int = FINGERPRINT_SAMPLE, values: bool = True) -> str:
    """A short hash identifying a Hugging Face model from its config and ALL its weights.

    Covers every parameter (`named_weights`): name, shape, dtype, and the exact values of
    ``sample`` evenly spaced entries per tensor, so any fine-tune, merged adapter or edit
    of a whole weight matrix changes it (an edit of single entries between the sampled
    ones may not). Cost: one gather of ``sample`` values per tensor (under 0.1 s for a
    124M-parameter GPT-2 on one CPU thread). Weights on the ``meta`` device (remote
    models) contribute their name, shape and dtype only; ``values=False`` hashes only
    those for every tensor.
    Toolkit-independent as long as the toolkit presents the HF parameter names (the
    TransformerLens backend maps its bridge's names back to them).
    """
    return fingerprint_weights(getattr(module, "config", None), named_weights(module), sample, values)


def _all_finite(t: Tensor) -> bool:
    """Whether ``t`` has no NaN/inf, from its min and max (NaN propagates; ~10x cheaper than
    ``isfinite(t).all()``, which allocates a mask as large as ``t``)."""
    try:
        low, high = torch.aminmax(t)
    except RuntimeError:  # dtypes aminmax does not support here
        return bool(torch.isfinite(t).all())
    return bool(torch.isfinite(low)) and bool(torch.isfinite(high))


def check_finite_weights(weights: list[tuple[str, Tensor]]) -> None:
    """Raise ``FloatingPointError`` naming the first weights (of ``(name, tensor)`` pairs)
    that contain NaN or inf; ``meta`` tensors are skipped."""
    bad = [name for name, p in weights if p.device.type != "meta" and p.is_floating_point() and p.numel()
           and not _all_finite(p.detach())]
    if bad:
        raise FloatingPointError(
            f"the model has non-finite weights (NaN or inf) in {len(bad)} tensor(s), first: "
            f"{', '.join(bad[:5])}. Every forward pass would produce NaN, so no operator can be fitted "
            "or measured: check how the model was loaded, trained or edited (e.g. an fp16 overflow).")
