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

``fingerprint()`` hashes the wrapped Hugging Face model's config and weights under their
Hugging Face parameter names (`hf_named_weights` undoes the bridge's renaming), so it equals
the nnsight backend's fingerprint of the same weights: ``Stride.load(path, bridge)`` loads
operators fitted under nnsight strictly, and vice versa.

The bridge restructures the HF model in place (its submodules are wrapped by bridge
components, GPT-2's fused ``c_attn`` is exposed as ``q``/``k``/``v``): wrap a *copy* of an
HF model if the same object is also used elsewhere (e.g. under nnsight).
"""

from __future__ import annotations

import copy
import functools
import os
import warnings
from typing import Any, Callable, Optional

import torch
from torch import Tensor

from .. import storage
from .base import Edit, ModelBackend, unique_weights

__all__ = ["TransformerLensBackend", "make_hook", "resid_post_hook_name", "bridge_from_hf",
           "FINAL_LOGITS_HOOK", "install_final_logits_hook"]

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
        tokenizer_dir = tokenizer_dir or storage.persistent_temporary_directory("stride_tl_tokenizer_")
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


def _hf_module_names(module: torch.nn.Module, path: str = "", out: Optional[dict] = None) -> dict:
    """``{id(submodule): Hugging Face dotted path}`` for a model a bridge has rewired.

    The bridge replaces each Hugging Face submodule by a component that holds the original
    as ``_original_component`` and records the original's attribute name as ``name``
    (``"c_attn"`` for the component registered as ``qkv``; top-level components record
    their full path, e.g. ``"transformer.wte"``). ``_original_component`` steps are
    dropped and component attributes are renamed to ``name``."""
    out = {} if out is None else out
    out.setdefault(id(module), path)
    for attr, child in module._modules.items():
        if child is None:
            continue
        if attr == "_original_component":
            child_path = path
        else:
            name = getattr(child, "name", None)
            is_component = isinstance(name, str) and name and "_original_component" in child._modules
            if is_component and not (path + "." + attr if path else attr).endswith(name):
                attr = name
            child_path = f"{path}.{attr}" if path else attr
        _hf_module_names(child, child_path, out)
    return out


def hf_parameter_names(module: torch.nn.Module) -> Optional[set[str]]:
    """Parameter names of an *unwrapped* model of ``module``'s class and config, read off a
    skeleton built on the ``meta`` device (no memory, no weights); ``None`` if it cannot be
    built."""
    config = getattr(module, "config", None)
    build = getattr(type(module), "_from_config", None)
    if config is None or build is None:
        return None
    try:
        with torch.device("meta"):
            skeleton = build(copy.deepcopy(config))
    except Exception:  # noqa: BLE001 - custom classes: fall back to every renamed parameter
        return None
    return {name for name, _ in skeleton.named_parameters(remove_duplicate=False)}


def hf_named_weights(module: torch.nn.Module, keep: Optional[set[str]] = None) -> list[tuple[str, Tensor]]:
    """`unique_weights` of the Hugging Face model inside a TransformerLens bridge, under the
    parameter names the unwrapped Hugging Face model has (``transformer.h.0.attn.c_attn.weight``
    rather than ``transformer.h.0._original_component.attn.qkv._original_component.weight``).

    Weights the bridge adds (the split q/k/v it derives from a fused QKV weight: views of
    GPT-2's ``c_attn``, copies of GPT-NeoX's ``query_key_value``) are left out: names not in
    ``keep`` (the class's own parameter names, `hf_parameter_names`) are dropped, and
    `unique_weights` drops views inside a larger weight."""
    paths = _hf_module_names(module)
    renamed = {}
    for owner_name, owner in module.named_modules(remove_duplicate=False):
        prefix = paths.get(id(owner), owner_name)
        for pname, p in owner._parameters.items():
            name = f"{prefix}.{pname}" if prefix else pname
            if p is not None and (keep is None or name in keep):
                renamed[name] = p
    return unique_weights(renamed.items())


def _is_bridge(model: Any) -> bool:
    mro = {f"{c.__module__}.{c.__name__}" for c in type(model).__mro__}
    return any(name.startswith("transformer_lens.") for name in mro)


class TransformerLensBackend(ModelBackend):
    """Wraps a TransformerLens 4.x ``TransformerBridge``.

    Args:
        model: the bridge (from ``TransformerBridge.boot_transformers(...)``).
        tokenizer: a Hugging Face tokenizer; defaults to ``model.tokenizer``.
        layers_path: not applicable (the bridge names its decoder blocks ``blocks.{l}``
            itself); anything but ``None`` raises ``ValueError``.
    """

    name = "transformer_lens"

    def __init__(self, model: Any, tokenizer: Any = None, layers_path: Optional[str] = None) -> None:
        if layers_path is not None:
            raise ValueError(
                f"layers_path={layers_path!r} is for nnsight models only: a TransformerLens bridge "
                "exposes its decoder blocks itself (blocks.{l}.hook_resid_post, for every architecture "
                "it supports), so drop layers_path= when passing a TransformerBridge"
            )
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

    def block_module(self, layer: int) -> torch.nn.Module:
        """The bridge's decoder block ``layer`` (``blocks[layer]``)."""
        return self.model.blocks[layer]

    def hook_name(self, layer: int) -> str:
        return resid_post_hook_name(layer)

    @property
    def context_length(self) -> Optional[int]:
        """The wrapped Hugging Face model's context length (see `ModelBackend.context_length`),
        else the bridge's ``cfg.n_ctx``; ``None`` when neither is known."""
        found = super().context_length
        n_ctx = getattr(getattr(self.model, "cfg", None), "n_ctx", None)
        if found is None and isinstance(n_ctx, int) and n_ctx > 0:
            return n_ctx
        return found

    def hf_config(self) -> Any:
        original = getattr(self.model, "original_model", None)
        return getattr(original if isinstance(original, torch.nn.Module) else self.model, "config", None)

    def named_weights(self) -> list[tuple[str, Tensor]]:
        """The wrapped Hugging Face model's weights under their Hugging Face names (see
        `hf_named_weights`), so `fingerprint` equals the nnsight backend's for the same
        weights and operators fitted under one toolkit load strictly under the other."""
        original = getattr(self.model, "original_model", None)
        module = original if isinstance(original, torch.nn.Module) else self.model
        if getattr(self, "_hf_names", None) is None:
            self._hf_names = hf_parameter_names(module)
        return hf_named_weights(module, self._hf_names)

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
        ``with bridge.hooks(fwd_hooks=...)``. They apply exactly the edit that fitting and
        measurement apply. Residual placement: one hook at ``blocks.{l}.hook_resid_post``
        (``z -> z + scale * B(z) a_k``); logits placement: that hook reads ``z`` and a hook
        at `FINAL_LOGITS_HOOK` adds ``scale * B(z) a_k`` to the model's *final* logits, i.e.
        after the transforms some models apply past the unembedding (Cohere's
        ``logit_scale``, Granite's ``logits_scaling``, Gemma 2's final soft-capping), which
        ``unembed.hook_out`` precedes. The first logits-placement call installs that hook
        point on the bridge (`install_final_logits_hook`). Head placement: the second hook is
        `HEAD_INPUT_HOOK` (the output head's input, the final hidden state), which gets the edit."""
        name = self.hook_name(operators.layer)
        if operators.placement == "residual":
            return [(name, make_hook(lambda z: z + (scale * operators.delta(z, operator)).to(z.dtype)))]
        logits_hook = install_final_logits_hook(self.model) if operators.placement == "logits" else HEAD_INPUT_HOOK
        if logits_hook not in self.model.hook_dict:
            raise RuntimeError(f"this TransformerBridge has no hook point {logits_hook!r} (the output head's input), "
                               "which the head placement edits")
        seen: dict = {}

        def read(activation: Tensor, hook: Any) -> None:
            seen["z"] = activation

        def add(logits: Tensor, hook: Any) -> Tensor:
            if "z" not in seen:
                raise RuntimeError(f"{name} did not fire before the final logits: steer() needs both hooks")
            delta = scale * operators.delta(seen.pop("z"), operator)
            return logits + delta.to(device=logits.device, dtype=logits.dtype)

        return [(name, read), (logits_hook, add)]


#: The bridge's hook point on the output head's input (the final hidden state, after the final
#: norm): what the head placement edits.
HEAD_INPUT_HOOK = "unembed.hook_in"

#: Name of the hook point on a bridge's final logits ``[b, t, V]`` (what the bridge returns:
#: after the output head and any logit scaling / soft-capping of the architecture).
FINAL_LOGITS_HOOK = "hook_final_logits"


def install_final_logits_hook(bridge: Any) -> str:
    """Give ``bridge`` a hook point on its final logits and return its name (`FINAL_LOGITS_HOOK`).

    A TransformerLens 4 bridge has no hook after the Hugging Face model's forward: its last
    one, ``unembed.hook_out``, is the output head's result, *before* the transforms that
    ``CohereForCausalLM`` (``* logit_scale``), ``GraniteForCausalLM`` (``/ logits_scaling``)
    and Gemma 2 (final soft-capping ``c * tanh(x / c)``) apply to it, whereas what the
    bridge returns (and STRIDE fits and measures on) are the final logits. This adds a
    ``HookPoint`` attribute ``bridge.hook_final_logits`` (so it is in ``bridge.hook_dict``
    and usable with ``run_with_hooks`` / ``hooks`` / ``run_with_cache``) and a forward hook
    on ``bridge.original_model`` that passes its output's ``logits`` through it. Without
    hooks attached it is the identity. Idempotent; raises if the bridge already has an
    attribute of that name that this function did not create.
    """
    from transformer_lens.hook_points import HookPoint

    existing = getattr(bridge, FINAL_LOGITS_HOOK, None)
    if existing is not None:
        if isinstance(existing, HookPoint) and getattr(existing, "_stride_final_logits", False):
            return FINAL_LOGITS_HOOK
        raise RuntimeError(
            f"this bridge already has an attribute {FINAL_LOGITS_HOOK!r} not created by stride_nnsight, "
            "so the final-logits hook point cannot be installed: rename that attribute"
        )
    original = getattr(bridge, "original_model", None)
    if not isinstance(original, torch.nn.Module):
        raise TypeError(
            f"{type(bridge).__name__} has no original_model (the wrapped Hugging Face model) to hook "
            "its final logits on: boot the bridge with TransformerBridge.boot_transformers(...)"
        )
    point = HookPoint()
    point._stride_final_logits = True
    point.train(bridge.training)  # a new module starts in training mode; follow the bridge's
    setattr(bridge, FINAL_LOGITS_HOOK, point)  # the bridge registers it in hook_dict by name
    original.register_forward_hook(functools.partial(_route_final_logits, point))
    return FINAL_LOGITS_HOOK


def _route_final_logits(point: Any, module: Any, args: Any, output: Any) -> Any:
    """Forward hook on the Hugging Face model: its output's ``logits`` go through ``point``."""
    logits = getattr(output, "logits", None)
    if isinstance(logits, Tensor):
        output.logits = point(logits)
        return output
    if isinstance(output, tuple):  # return_dict=False: (loss?, logits, ...)
        for i, item in enumerate(output):
            if isinstance(item, Tensor) and item.dim() == 3:
                return output[:i] + (point(item),) + output[i + 1:]
    return output


def _user_hooks(intervention: Any) -> list:
    if intervention is None:
        return []
    hooks = list(intervention)
    for item in hooks:
        if not (isinstance(item, tuple) and len(item) == 2 and callable(item[1])):
            raise TypeError("for TransformerLens models, intervention must be a list of (hook_name, hook_fn) pairs")
    return hooks
