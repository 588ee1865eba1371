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

__all__ = ["ModelBackend", "Edit", "model_fingerprint"]


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

    @property
    def dtype(self) -> torch.dtype:
        for p in self.torch_module.parameters():
            return p.dtype
        return torch.float32

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
        """Put the base model in eval mode and stop gradients into its weights."""
        self.torch_module.eval()
        for p in self.torch_module.parameters():
            p.requires_grad_(False)

    def fingerprint(self) -> str:
        return model_fingerprint(self.torch_module)


def model_fingerprint(module: torch.nn.Module, sample: int = 4096) -> str:
    """A short hash identifying a Hugging Face model: its config and samples of its weights.

    Toolkit-independent: the same weights give the same fingerprint whether they are
    wrapped by nnsight or by a TransformerLens bridge (which renames and adds parameters),
    because only the config and the input/output embedding matrices (plus, for models
    without them, every parameter) are hashed. Weights on the ``meta`` device (remote
    models) contribute only their shape.
    """
    h = hashlib.sha256()
    config = getattr(module, "config", None)
    if config is not None and hasattr(config, "to_dict"):
        cfg = {k: v for k, v in config.to_dict().items()
               if isinstance(v, (int, float, str, bool, type(None))) and not k.startswith("_")
               and k not in ("transformers_version", "torch_dtype", "dtype", "attn_implementation", "use_cache")}
        h.update(json.dumps(cfg, sort_keys=True).encode())
    tensors: list[tuple[str, Tensor]] = []
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        layer = getattr(module, getter, lambda: None)()
        if layer is not None and getattr(layer, "weight", None) is not None:
            tensors.append((getter, layer.weight))
    if not tensors:
        tensors = list(module.named_parameters())
    for name, p in tensors:
        h.update(name.encode())
        h.update(str(tuple(p.shape)).encode())
        if p.device.type != "meta":
            flat = p.detach().reshape(-1)
            step = max(1, flat.numel() // sample)
            values = flat[::step][:sample].float().cpu().numpy()
            h.update(values.round(4).tobytes())
    return h.hexdigest()[:16]
