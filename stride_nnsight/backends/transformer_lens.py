"""TransformerLens adapter: the operator is a forward hook on ``blocks.{l}.hook_resid_post``.

Works with a TransformerLens 4.x ``transformer_lens.model_bridge.TransformerBridge``
(TransformerLens 4 no longer has ``HookedTransformer``). Make one from a local Hugging Face
model directory::

    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformer_lens.model_bridge import TransformerBridge

    hf_model = AutoModelForCausalLM.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)    # loaded from a directory, see below
    bridge = TransformerBridge.boot_transformers(path, hf_model=hf_model, tokenizer=tokenizer,
                                                 device="cpu")

Numerics: choices made so the bridge computes exactly what the Hugging Face model computes
------------------------------------------------------------------------------------------

* **No weight processing.** ``boot_transformers`` returns a bridge that runs the *raw* HF
  weights through the HF modules (bridge components wrap and call them), so logits
  and the residual stream equal the HF model's to float precision. We therefore never call
  ``bridge.enable_compatibility_mode()``: with its defaults it folds the layer norms into
  the following linear layers and *centres* the weights writing to the residual stream
  and the unembedding (HookedTransformer's load-time processing). That leaves the model's
  next-token distribution unchanged but shifts the residual stream (by its per-position
  mean) and the logits (by a per-position constant), i.e. the operators would be fitted in
  another coordinate system than the one the same model presents under nnsight, and
  ``fingerprint()`` changes. If a bridge in compatibility mode with processed weights is
  passed, `TransformerLensBackend` still works (the edit is applied to whatever the bridge
  computes) but warns. ``enable_compatibility_mode(no_processing=True)`` (aliases only)
  keeps HF numerics and is accepted silently.
* **Eager attention.** ``boot_transformers`` switches the HF model to
  ``attn_implementation="eager"`` (in place, also on an ``hf_model=`` you pass) so that
  attention-pattern hooks fire. Compared with an HF model running the default ``"sdpa"``
  kernel this gives <=1e-6 (fp32) differences from operation order, not a different model;
  load the HF model with ``attn_implementation="eager"`` for bit-comparable runs.
* **Attention mask.** `forward` passes the batch's 0/1 mask as
  ``bridge.run_with_hooks(input_ids, fwd_hooks=..., attention_mask=mask)``; the bridge's
  ``forward`` hands it to the HF model exactly as nnsight does
  (``model(input_ids=..., attention_mask=...)``). For right-padded rows
  the bridge keeps the default ``arange`` position ids (it derives positions from the mask
  only for rows with a pad *before* a real token, i.e. left padding), so every non-pad
  position is computed exactly as in an unpadded run.
* **Tokenizer.** The bridge re-loads the tokenizer it is given with
  ``AutoTokenizer.from_pretrained(tokenizer.name_or_path, add_bos_token=True)``; a
  tokenizer built in memory (no ``name_or_path``) makes ``boot_transformers`` fail with
  ``KeyError: 'name_or_path'`` - save it with ``save_pretrained(dir)`` and load it back
  from ``dir`` first. STRIDE itself encodes with ``add_special_tokens=False`` and prepends
  BOS explicitly, so the bridge's ``add_bos_token=True`` does not change its batches.

``fingerprint()`` hashes the bridge (type ``TransformerBridge``, its renamed parameters), so
it differs from the nnsight backend's fingerprint of the same weights even though the
numerics agree: ``Stride.load(path, bridge, strict=False)`` loads operators fitted under
nnsight.

The bridge restructures the HF model in place (its submodules are wrapped by bridge
components, GPT-2's fused ``c_attn`` is exposed as ``q``/``k``/``v``): wrap a *copy* of an
HF model if the same object is also used elsewhere (e.g. under nnsight).
"""

from __future__ import annotations

import copy
import os
import tempfile
import warnings
from typing import Any, Callable, Optional

import torch
from torch import Tensor

from .base import model_fingerprint, Edit, ModelBackend

__all__ = ["TransformerLensBackend", "make_hook", "resid_post_hook_name", "bridge_from_hf"]

#: A TransformerLens forward hook: ``fn(activation, hook) -> new activation``.
HookFn = Callable[..., Tensor]


def resid_post_hook_name(layer: int) -> str:
    """TransformerLens name of the residual stream after decoder block ``layer``."""
    return f"blocks.{layer}.hook_resid_post"


def make_hook(edit: Edit) -> HookFn:
    """Turn ``edit`` (``z [b, t, d] -> z' [b, t, d]``) into a TransformerLens forward hook.

    The returned ``fn(activation, hook)`` returns ``edit(activation)``, which TransformerLens
    uses in place of the activation. Use it with the toolkit's own API, e.g.::

        bridge.run_with_hooks(tokens, fwd_hooks=[("blocks.3.hook_resid_post", make_hook(edit))])
        with bridge.hooks(fwd_hooks=[("blocks.3.hook_resid_post", make_hook(edit))]):
            bridge.generate(...)
    """
    if not callable(edit):
        raise TypeError(f"edit must be callable (z -> edited z), got {type(edit).__name__}")

    def stride_edit_hook(activation: Tensor, hook: Any = None) -> Tensor:
        edited = edit(activation)
        if not isinstance(edited, Tensor) or edited.shape != activation.shape:
            raise ValueError(
                "a residual-stream edit must return a tensor of the activation's shape "
                f"{tuple(activation.shape)}, got "
                + (str(tuple(edited.shape)) if isinstance(edited, Tensor) else type(edited).__name__)
            )
        return edited.to(activation.dtype)

    return stride_edit_hook


def bridge_from_hf(
    hf_model: torch.nn.Module,
    tokenizer: Any,
    *,
    copy_model: bool = False,
    device: Any = None,
    tokenizer_dir: Optional[str] = None,
) -> Any:
    """Boot a TransformerLens ``TransformerBridge`` around an in-memory HF causal LM.

    Calls ``TransformerBridge.boot_transformers(name, hf_model=hf_model, tokenizer=tok,
    device=device, dtype=<the model's dtype>)`` and returns the bridge (raw HF numerics, no
    weight processing). Handles the two pitfalls of doing so by hand:

    * the bridge re-loads the tokenizer from its ``name_or_path``; a tokenizer built in
      memory has none (``KeyError: 'name_or_path'``) and a hub name may not be reachable,
      so unless it was loaded from a local directory it is saved to ``tokenizer_dir`` (a
      fresh temporary directory if ``None``) and loaded back from there first;
    * the bridge rewires ``hf_model``'s submodules in place (and switches it to eager
      attention): pass ``copy_model=True`` to wrap a deep copy and leave ``hf_model``
      untouched (e.g. to keep using it under nnsight).

    ``device`` defaults to the device of the model's first parameter (boot_transformers
    would otherwise record CUDA as the bridge's device when one is available).
    """
    from transformer_lens.model_bridge import TransformerBridge
    from transformers import AutoTokenizer

    if tokenizer is None:
        raise ValueError("bridge_from_hf needs the model's tokenizer")
    source = tokenizer.init_kwargs.get("name_or_path")
    if not (isinstance(source, str) and os.path.isdir(source)) or tokenizer_dir is not None:
        tokenizer_dir = tokenizer_dir or tempfile.mkdtemp(prefix="stride_tl_tokenizer_")
        tokenizer.save_pretrained(tokenizer_dir)
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    name = tokenizer.init_kwargs["name_or_path"]
    if copy_model:
        hf_model = copy.deepcopy(hf_model)
    first = next(hf_model.parameters(), None)
    if device is None:
        device = first.device if first is not None else "cpu"
    dtype = first.dtype if first is not None else torch.float32
    bridge = TransformerBridge.boot_transformers(
        name, hf_model=hf_model, tokenizer=tokenizer, device=device, dtype=dtype
    )
    bridge.eval()
    return bridge


def _is_bridge(model: Any) -> bool:
    mro = {f"{c.__module__}.{c.__name__}" for c in type(model).__mro__}
    return any(name.startswith("transformer_lens.") for name in mro)


class TransformerLensBackend(ModelBackend):
    """Wraps a TransformerLens 4.x ``TransformerBridge``.

    Args:
        model: the bridge (from ``TransformerBridge.boot_transformers(...)``).
        tokenizer: a Hugging Face tokenizer; defaults to ``model.tokenizer``.
    """

    name = "transformer_lens"

    def __init__(self, model: Any, tokenizer: Any = None) -> None:
        if not _is_bridge(model) or not isinstance(model, torch.nn.Module):
            raise TypeError(
                f"expected a TransformerLens TransformerBridge, got {type(model).__name__}"
            )
        if not hasattr(model, "run_with_hooks") or not hasattr(model, "cfg"):
            raise TypeError(
                f"{type(model).__name__} has no run_with_hooks/cfg: pass a TransformerLens 4 "
                "TransformerBridge (TransformerBridge.boot_transformers(...))"
            )
        self.model = model
        # The bridge is an nn.Module whose parameters()/named_parameters() are the wrapped HF
        # model's weights and whose train()/eval() reach that model, so freeze() and
        # fingerprint() operate on the real weights.
        self.torch_module = model
        cfg = model.cfg
        self.n_layers = int(cfg.n_layers)
        self.d_model = int(cfg.d_model)
        d_vocab_out = getattr(cfg, "d_vocab_out", None)
        self.vocab_size = int(d_vocab_out if isinstance(d_vocab_out, int) and d_vocab_out > 0 else cfg.d_vocab)
        self.tokenizer = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
        if self.tokenizer is None:
            raise ValueError("the bridge has no tokenizer: pass tokenizer=... to Stride")
        if getattr(model, "_weights_processed", False):
            # process_weights() / enable_compatibility_mode() with its defaults folded the
            # layer norms and centred the weights; see the module docstring.
            warnings.warn(
                "this TransformerBridge has processed weights (enable_compatibility_mode() / "
                "process_weights(): folded layer norms, centred weights), so its residual "
                "stream and logits differ from the Hugging Face model's and STRIDE operators "
                "fitted on it are not interchangeable with ones fitted on the raw model (e.g. "
                "under nnsight). Boot a fresh bridge without enable_compatibility_mode() (or "
                "with enable_compatibility_mode(no_processing=True)) to keep HF numerics.",
                stacklevel=3,
            )

    def hook_name(self, layer: int) -> str:
        return resid_post_hook_name(layer)

    def fingerprint(self) -> str:
        """Fingerprint of the wrapped Hugging Face model: equal to the nnsight backend's for
        the same weights, so operators fitted under one toolkit load under the other."""
        original = getattr(self.model, "original_model", None)
        return model_fingerprint(original if isinstance(original, torch.nn.Module) else self.model)

    def forward(self, input_ids: Tensor, attention_mask: Tensor, layer: int, edit: Optional[Edit] = None,
                intervention: Any = None):
        layer = self.check_layer(layer)
        captured: dict[str, Tensor] = {}
        apply = make_hook(edit) if edit is not None else None

        def hook_fn(activation: Tensor, hook: Any) -> Optional[Tensor]:
            # TransformerLens passes the activation itself; keep it (pre-edit) as z.
            captured["z"] = activation
            return apply(activation, hook) if apply is not None else None

        logits = self.model.run_with_hooks(
            input_ids,
            fwd_hooks=list(_user_hooks(intervention)) + [(self.hook_name(layer), hook_fn)],
            attention_mask=attention_mask,
            return_type="logits",
        )
        if "z" not in captured:
            raise RuntimeError(f"hook {self.hook_name(layer)} did not fire during the forward pass")
        return logits, captured["z"]

    def steer(self, operators: Any, operator: Any, scale: float = 1.0) -> list:
        """Hooks that apply ``operator``: pass them to ``run_with_hooks(fwd_hooks=...)`` or
        ``with bridge.hooks(fwd_hooks=...)``. Residual placement: one hook at
        ``blocks.{l}.hook_resid_post``; logits placement: that hook reads ``z`` and a hook on
        the unembedding output adds the edit to the logits."""
        name = self.hook_name(operators.layer)
        if operators.placement == "residual":
            return [(name, make_hook(lambda z: z + scale * operators.delta(z, operator).to(z.dtype)))]
        seen: dict = {}

        def read(activation: Tensor, hook: Any) -> None:
            seen["z"] = activation

        def add(logits: Tensor, hook: Any) -> Tensor:
            return logits + scale * operators.delta(seen["z"], operator).to(logits.dtype)

        return [(name, read), (UNEMBED_HOOK, add)]


UNEMBED_HOOK = "unembed.hook_out"


def _user_hooks(intervention: Any) -> list:
    if intervention is None:
        return []
    hooks = list(intervention)
    for item in hooks:
        if not (isinstance(item, tuple) and len(item) == 2 and callable(item[1])):
            raise TypeError("for TransformerLens models, intervention must be a list of (hook_name, hook_fn) pairs")
    return hooks
