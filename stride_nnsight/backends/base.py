"""The small interface every toolkit adapter implements.

STRIDE needs exactly one thing from a toolkit: run the frozen model on a token batch,
read the residual stream at the output of one decoder block, optionally replace it
with an edited version, and return the logits. Everything else (operators, losses,
fitting, measurement, recovery) is toolkit-independent and lives elsewhere.
"""

from __future__ import annotations

import hashlib
import json
from typing import Callable, Optional

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
    ) -> tuple[Float[Tensor, "b t V"], Float[Tensor, "b t d"]]:
        """Run the model; return ``(logits, z)`` where ``z`` is the residual stream at the
        output of block ``layer`` *before* ``edit`` (which, if given, maps ``z`` to the
        activation the rest of the network sees). Gradients flow to ``edit``'s parameters."""
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


def model_fingerprint(module: torch.nn.Module, sample: int = 2048) -> str:
    """A short hash identifying a model: its class, config and a sample of every weight.

    Hashes the first ``sample`` values of each parameter (cheap for large models);
    parameters on the ``meta`` device (remote models) contribute only their shape.
    """
    h = hashlib.sha256()
    h.update(type(module).__name__.encode())
    config = getattr(module, "config", None)
    if config is not None and hasattr(config, "to_dict"):
        cfg = {k: v for k, v in config.to_dict().items() if isinstance(v, (int, float, str, bool, type(None)))}
        for key in ("_name_or_path", "transformers_version", "torch_dtype", "dtype", "_commit_hash"):
            cfg.pop(key, None)
        h.update(json.dumps(cfg, sort_keys=True).encode())
    for name, p in module.named_parameters():
        h.update(name.encode())
        h.update(str(tuple(p.shape)).encode())
        if p.device.type != "meta":
            values = p.detach().reshape(-1)[:sample].float().cpu().numpy()
            h.update(values.round(6).tobytes())
    return h.hexdigest()[:16]
