"""Activation cache: the frozen model's activations of the training corpus, computed once.

A fit step with the ``"logits"`` placement needs, for each of its rows, only two things from
the frozen model: the residual stream ``z`` at the output of block ``layer`` (what the basis
network reads) and the model's final logits (what the operator's edit is added to). Both are
the same at every step, so recomputing them (one full forward of ~64 rows per step, most of a
step's cost) can be replaced by reading them from disk. This module

* reads ``z_l``, the final hidden state ``h`` (the input of the output head, after the final
  norm) and the logits in one forward (`read_activations`, nnsight and TransformerLens);
* rebuilds the final logits from ``h`` exactly as the model does (`head_function`: the output
  head plus the transforms some architectures apply after it), so the cache stores ``2 d``
  numbers per token instead of ``V``;
* writes ``z_l`` and ``h`` of every training document's real tokens to ``.npy`` memory-mapped
  files (`ActivationCache.build`: resumable, identity-checked, verified on its first batch);
* serves a fit step's rows from them (`ActivationCache.rows`, `ActivationCache.forward_for`,
  the latter a drop-in ``forward`` for ``operators.step_losses``).

The residual placement is not cached: its edit changes everything after block ``layer``, so
those blocks have to run at every step.

Files under ``cache_dir``: ``activations.json`` (the manifest: identity, shapes, progress),
``z.npy`` / ``h_final.npy`` (``[N, d]``, ``N`` = real tokens of the corpus, documents one
after another in corpus order), ``tokens.npy`` (``[N]`` int64 token ids, to check what is read)
and ``offsets.npy`` (``[n + 1]`` int64: document ``i`` is ``offsets[i]:offsets[i + 1]``).
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
from functools import reduce
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from . import distributed, storage
from .inputs import TokenBatch
from .operators import document_candidates
from .storage import create_array, open_array, write_manifest

__all__ = [
    "ActivationCache",
    "ActivationCacheError",
    "ActivationCacheMismatchError",
    "HeadMismatchError",
    "STORAGE_DTYPES",
    "cache_size_bytes",
    "head_function",
    "read_activations",
    "use_activation_cache",
    "verify_head",
]

logger = logging.getLogger(__name__)

MANIFEST_NAME = "activations.json"
CACHE_KIND = "stride_activation_cache"
CACHE_FORMAT = 1
MANIFEST_KEYS = ("identity", "n_documents", "n_tokens", "size_bytes", "done")
ARRAY_FILES = {"z": "z.npy", "h": "h_final.npy", "tokens": "tokens.npy", "offsets": "offsets.npy",
               "cand_ids": "candidate_ids.npy", "cand_logw": "candidate_log_weights.npy"}
#: storage dtype name -> numpy dtype of the file (bfloat16 is kept as its raw 16 bits, uint16)
STORAGE_DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": np.uint16}


#: An activation cache cannot be used: unreadable, incomplete, or of another format.
ActivationCacheError = storage.CacheFileError


class ActivationCacheMismatchError(ActivationCacheError):
    """``cache_dir`` holds a cache of another corpus, model, layer or dtype; the message names
    what differs and how to start over."""


class HeadMismatchError(ActivationCacheError):
    """The model's final logits could not be rebuilt from the output head's input, so an
    activation cache cannot stand in for this model's forward pass."""


def read_manifest(path: Path) -> Optional[dict]:
    """The cache's JSON manifest at ``path`` (``None`` if there is none), checked."""
    return storage.read_json_manifest(path, CACHE_KIND, CACHE_FORMAT, MANIFEST_KEYS, what="activation cache")


def remove_files(directory: Path) -> None:
    """Delete the cache's manifest and arrays in ``directory`` (other files are left alone)."""
    storage.remove_files(Path(directory), (MANIFEST_NAME, *ARRAY_FILES.values()))


def to_storage(values: Tensor, dtype: str) -> np.ndarray:
    """``values [..., d]`` (any float dtype, any device) as a numpy array of storage ``dtype``."""
    values = values.detach()
    if dtype == "bfloat16":
        return values.to("cpu", torch.bfloat16).contiguous().view(torch.int16).numpy().view(np.uint16)
    return values.to("cpu", getattr(torch, dtype)).contiguous().numpy()


def from_storage(values: np.ndarray, dtype: str) -> Tensor:
    """Stored values back as a float32 CPU tensor (a copy)."""
    values = np.ascontiguousarray(values)
    if dtype == "bfloat16":
        return torch.from_numpy(values.view(np.int16).copy()).view(torch.bfloat16).float()
    return torch.from_numpy(values.astype(np.float32, copy=True))


# ---------------------------------------------------------------------------------------
# The output head
# ---------------------------------------------------------------------------------------


def _causal_lm(backend: Any) -> torch.nn.Module:
    """The Hugging Face causal LM behind ``backend`` (the bridge's ``original_model`` for
    TransformerLens)."""
    if backend.name == "transformer_lens":
        module = getattr(backend.model, "original_model", None)
        if not isinstance(module, torch.nn.Module):
            raise HeadMismatchError(
                "this TransformerBridge has no original_model (the wrapped Hugging Face model), so its output "
                "head cannot be found: fit without the activation cache (activation_cache=False)")
        return module
    if backend.name == "nnsight":
        return backend.torch_module
    raise TypeError(f"activation caches support the nnsight and transformer_lens backends, got {backend.name!r}")


def _unwrapped(module: torch.nn.Module) -> torch.nn.Module:
    """``module`` without TransformerLens bridge wrappers (they hold the HF module as
    ``_original_component`` and run hook points around it)."""
    while isinstance(getattr(module, "_original_component", None), torch.nn.Module):
        module = module._original_component
    return module


def _config_value(config: Any, name: str) -> Any:
    for cfg in (config, getattr(config, "text_config", None)):
        value = getattr(cfg, name, None) if cfg is not None else None
        if value is not None:
            return value
    return None


def output_head(backend: Any) -> torch.nn.Module:
    """The output embedding (``lm_head``) module of ``backend``'s model (unwrapped)."""
    model = _causal_lm(backend)
    head = model.get_output_embeddings() if callable(getattr(model, "get_output_embeddings", None)) else None
    if not isinstance(head, torch.nn.Module):
        raise HeadMismatchError(
            f"{type(model).__name__} has no output embedding (get_output_embeddings() is None), so its logits "
            "cannot be rebuilt from cached activations: fit without the activation cache (activation_cache=False)")
    return _unwrapped(head)


def post_head_transforms(backend: Any) -> list[tuple[str, Callable[[Tensor], Tensor]]]:
    """What the model applies to the head's output to give its final logits, in order, as
    ``(description, fn)`` pairs: ``final_logits_bias`` (added), Cohere's ``logit_scale``
    (multiplied), Granite's ``logits_scaling`` (divided), ``output_multiplier`` (multiplied),
    Gemma's ``final_logit_softcapping`` (``c * tanh(x / c)``). Empty for GPT-2, Llama, ...
    A transform not listed here is caught by `verify_head`."""
    model = _causal_lm(backend)
    config = getattr(model, "config", None)
    out: list[tuple[str, Callable[[Tensor], Tensor]]] = []
    bias = getattr(model, "final_logits_bias", None)
    if isinstance(bias, Tensor):
        out.append(("+ final_logits_bias", lambda x, b=bias: x + b.to(x.device, x.dtype)))
    scale = getattr(model, "logit_scale", None)
    if isinstance(scale, (int, float, Tensor)) and not isinstance(scale, bool):
        out.append((f"* logit_scale ({float(scale):g})", lambda x, s=scale: x * s))
    scaling = _config_value(config, "logits_scaling")
    if isinstance(scaling, (int, float)) and not isinstance(scaling, bool):
        out.append((f"/ logits_scaling ({scaling:g})", lambda x, s=scaling: x / s))
    multiplier = _config_value(config, "output_multiplier")
    if isinstance(multiplier, (int, float)) and not isinstance(multiplier, bool):
        out.append((f"* output_multiplier ({multiplier:g})", lambda x, m=multiplier: x * m))
    cap = _config_value(config, "final_logit_softcapping")
    if isinstance(cap, (int, float)) and not isinstance(cap, bool) and cap > 0:
        out.append((f"softcap ({cap:g})", lambda x, c=cap: torch.tanh(x / c) * c))
    return out


def head_function(backend: Any) -> Callable[[Tensor], Tensor]:
    """``head(h [..., d]) -> logits [..., V]``: the model's final logits from the final hidden
    state ``h`` (the input of the output head, i.e. after the final norm), computed as the
    model computes them: the output head (in the head's dtype, on its device) and then the
    `post_head_transforms`. The returned function has a ``description`` attribute (str).
    Runs without gradients into the model (its weights are frozen)."""
    head = output_head(backend)
    transforms = post_head_transforms(backend)
    weight = next(head.parameters(), None)
    dtype = weight.dtype if weight is not None else torch.float32
    device = weight.device if weight is not None else torch.device("cpu")

    def apply(h: Tensor) -> Tensor:
        logits = head(h.to(device=device, dtype=dtype))
        for _, fn in transforms:
            logits = fn(logits)
        return logits

    apply.description = " then ".join([type(head).__name__] + [name for name, _ in transforms])
    apply.device = device
    apply.dtype = dtype
    return apply


def verify_head(head: Callable[[Tensor], Tensor], h: Tensor, logits: Tensor, attention_mask: Tensor,
                model_dtype: Optional[torch.dtype] = None) -> float:
    """Check that ``head(h)`` reproduces the model's ``logits [b, t, V]`` on real tokens
    (``attention_mask [b, t]`` 1): max abs difference <= ``tol * scale`` with ``scale =
    max(1, max |logits|)`` and ``tol = 1e-4`` for float32 models (``4 * eps`` of the model's
    dtype for half precision). Returns the max abs difference; raises `HeadMismatchError`."""
    with torch.no_grad():
        mask = attention_mask.to(logits.device).bool()
        expected = logits[mask].float()
        got = head(h.to(logits.device)[mask]).to(logits.device).float()
        if got.shape != expected.shape:
            raise HeadMismatchError(
                f"the rebuilt logits have shape {tuple(got.shape)} per token, the model's {tuple(expected.shape)}: "
                "the cache cannot be used for this architecture; fit without it (activation_cache=False)")
        diff = float((got - expected).abs().max()) if expected.numel() else 0.0
        scale = max(1.0, float(expected.abs().max())) if expected.numel() else 1.0
        dtype = model_dtype or logits.dtype
        tol = max(1e-4, 4 * torch.finfo(dtype).eps) if dtype.is_floating_point else 1e-4
    if not diff <= tol * scale:  # also catches NaN
        description = getattr(head, "description", "the output head")
        raise HeadMismatchError(
            f"the model's final logits could not be rebuilt from the input of its output head: max |difference| "
            f"{diff:.3g} > {tol * scale:.3g} (rebuilt as: {description}). This architecture transforms its logits "
            "in a way stride_nnsight.activations.head_function does not know, so the activation cache cannot be "
            "used for it: fit without the cache (activation_cache=False)")
    return diff


# ---------------------------------------------------------------------------------------
# One forward pass: (z_l, h_final, logits)
# ---------------------------------------------------------------------------------------


def _module_path(root: torch.nn.Module, target: torch.nn.Module) -> str:
    for name, module in root.named_modules(remove_duplicate=False):
        if module is target:
            return name
    raise HeadMismatchError(f"the output head {type(target).__name__} is not a submodule of the model")


def head_path(backend: Any) -> str:
    """Dotted path of the output head in the nnsight model (e.g. ``"lm_head"``)."""
    model = _causal_lm(backend)
    return _module_path(model, model.get_output_embeddings())


def _read_nnsight(backend: Any, input_ids: Tensor, attention_mask: Tensor, layer: int,
                  intervention: Any = None) -> tuple:
    model = backend.model
    head_envoy = reduce(getattr, head_path(backend).split("."), model)
    blocks = reduce(getattr, backend.layers_path.split("."), model)
    if intervention is not None and not callable(intervention):
        raise TypeError("for nnsight models, intervention must be a callable fn(model) run inside the trace")
    box: list = []
    with model.trace(input_ids=input_ids, attention_mask=attention_mask):  # modules in execution order
        if intervention is not None:
            intervention(model)
        out = blocks[layer].output
        box.append(out[0] if isinstance(out, tuple) else out)
        box.append(head_envoy.input)
        box.append(model.output.logits)
    return box[0], box[1], box[2]


def _read_transformer_lens(backend: Any, input_ids: Tensor, attention_mask: Tensor, layer: int,
                           intervention: Any = None) -> tuple:
    from .backends.transformer_lens import _user_hooks

    bridge = backend.model
    names = {"z": backend.hook_name(layer), "h": "unembed.hook_in"}
    missing = [name for name in names.values() if name not in bridge.hook_dict]
    if missing:
        raise HeadMismatchError(
            f"this TransformerBridge has no hook point {missing[0]!r}, so the input of its output head cannot be "
            "read: fit without the activation cache (activation_cache=False)")
    captured: dict[str, Tensor] = {}

    def grab(key: str) -> Callable:
        def hook(activation: Tensor, hook: Any = None) -> None:
            captured[key] = activation

        return hook

    logits = bridge.run_with_hooks(input_ids, fwd_hooks=list(_user_hooks(intervention)) +
                                   [(names[k], grab(k)) for k in names],
                                   attention_mask=attention_mask, return_type="logits")
    for key, name in names.items():
        if key not in captured:
            raise RuntimeError(f"hook {name} did not fire during the forward pass")
    return captured["z"], captured["h"], logits


def read_activations(backend: Any, input_ids: Tensor, attention_mask: Tensor, layer: int,
                     intervention: Any = None) -> tuple[Tensor, Tensor, Tensor]:
    """Run the frozen model once on a token batch (no gradients) and return ``(z [b, t, d],
    h [b, t, d], logits [b, t, V])``: the residual stream at the output of block ``layer`` (what
    ``backend.forward`` returns as ``z``), the input of the output head (the final hidden state,
    after the final norm) and the model's final logits. ``backend``: an nnsight or
    TransformerLens backend (``backend.name``). ``intervention``: the user's own patch, as for
    ``ModelBackend.forward`` (nnsight: ``fn(model)`` run first in the trace; TransformerLens:
    ``(hook_name, hook_fn)`` pairs)."""
    layer = backend.check_layer(layer)
    with torch.no_grad():
        if backend.name == "nnsight":
            return _read_nnsight(backend, input_ids, attention_mask, layer, intervention)
        if backend.name == "transformer_lens":
            return _read_transformer_lens(backend, input_ids, attention_mask, layer, intervention)
    raise TypeError(f"activation caches support the nnsight and transformer_lens backends, got {backend.name!r}")


# ---------------------------------------------------------------------------------------
# The cache
# ---------------------------------------------------------------------------------------


def _storage_dtype(dtype: Any) -> str:
    name = str(dtype).replace("torch.", "")
    if name not in STORAGE_DTYPES:
        raise ValueError(f"activation cache dtype must be one of {list(STORAGE_DTYPES)}, got {dtype!r}")
    return name


def document_lengths(texts: TokenBatch) -> np.ndarray:
    """Real tokens per document ``[n]`` int64; `ValueError` unless every row is right-padded
    (its real tokens a prefix), which is how `inputs.encode_texts` builds training batches."""
    mask = texts.attention_mask.detach().cpu().bool()
    lengths = mask.sum(1)
    prefix = torch.arange(mask.shape[1])[None, :] < lengths[:, None]
    if not torch.equal(mask, prefix):
        bad = int((mask != prefix).any(1).nonzero()[0])
        raise ValueError(f"training document {bad} is not right-padded (its attention mask is not 1...1 0...0): "
                         "the activation cache stores real tokens as a prefix; encode with inputs.encode_texts")
    return lengths.numpy().astype(np.int64)


def _real_tokens(texts: TokenBatch, lengths: np.ndarray) -> np.ndarray:
    ids = texts.input_ids.detach().cpu().numpy().astype(np.int64)
    mask = np.arange(ids.shape[1])[None, :] < lengths[:, None]
    return ids[mask]  # row-major: documents one after another


def cache_size_bytes(texts: TokenBatch, d_model: int, dtype: Any = "float32",
                     candidates: Optional[int] = None) -> int:
    """Bytes an activation cache of ``texts`` takes on disk: ``2 * N * d_model`` values of
    ``dtype`` (``z`` and ``h``; ``N`` real tokens) plus 8 bytes per token (ids) and per
    document (offsets), plus the ``.npy`` headers and the manifest (a few KB). With
    ``candidates=c`` (`fit_vocabulary`): ``z`` and ``c`` candidate ids (int32) and log-weights
    (float32) per token instead of ``z`` and ``h``."""
    n_tokens = int(document_lengths(texts).sum())
    itemsize = np.dtype(STORAGE_DTYPES[_storage_dtype(dtype)]).itemsize
    per_token = 2 * int(d_model) * itemsize if candidates is None else int(d_model) * itemsize + 8 * int(candidates)
    return n_tokens * per_token + 8 * n_tokens + 8 * (len(texts) + 1) + 6 * 128 + 4096


def _format_bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n} B"


def cache_identity(texts: TokenBatch, fingerprint: str, layer: int, dtype: str, d_model: int,
                   candidates: Optional[int] = None, candidate_seed: int = 0) -> dict[str, Any]:
    """What a cache is valid for: the tokenized corpus (sha256 of document lengths and real
    token ids), the model fingerprint, the layer, the storage dtype and ``d_model``; with
    ``candidates`` also their number and the seed of their draws."""
    lengths = document_lengths(texts)
    digest = hashlib.sha256(lengths.tobytes() + _real_tokens(texts, lengths).tobytes()).hexdigest()
    identity = {"tokens": digest, "model fingerprint": str(fingerprint), "layer": int(layer), "dtype": dtype,
                "d_model": int(d_model)}
    if candidates is not None:
        identity.update({"fit vocabulary": int(candidates), "candidate seed": int(candidate_seed)})
    return identity


def _identity_differences(stored: dict, current: dict) -> list[str]:
    out = []
    for key in current:
        if stored.get(key) != current[key]:
            if key == "tokens":
                out.append("tokenized corpus differs (hash %s in the cache vs %s now)"
                           % (str(stored.get(key))[:12], current[key][:12]))
            else:
                out.append(f"{key}: {stored.get(key)!r} in the cache vs {current[key]!r} now")
    return out


def use_activation_cache(setting: Any, placement: str, *, remote: bool = False, fit_rows: int = 0,
                         n_documents: int = 1, size_bytes: int = 0, free_bytes: Optional[int] = None
                         ) -> tuple[bool, str]:
    """Decide whether a fit uses an activation cache; returns ``(use, reason)``.

    ``setting``: ``True`` (use it; `ValueError` if it cannot be used), ``False`` (never) or
    ``"auto"`` (use it when it can be used and pays off). It can be used only for the
    ``"logits"`` placement of a local model. ``"auto"`` also needs the fit to read more rows
    than twice the corpus (``fit_rows = steps * rows per step`` > ``2 * n_documents``: building
    costs about one forward pass over the corpus) and the cache to fit in half the free disk
    (``free_bytes``; not checked when ``None``)."""
    if setting is False or setting is None:
        return False, "activation_cache=False"
    if setting not in (True, "auto"):
        raise ValueError(f"activation_cache must be True, False or 'auto', got {setting!r}")
    problem = None
    if placement not in ("logits", "head"):
        problem = (f"the {placement!r} placement edits the residual stream, so the blocks after it must run at "
                   "every step; only placement='logits' or 'head' can be cached")
    elif remote:
        problem = "the model runs remotely (remote=...); the cache needs the activations on this machine"
    if problem is not None:
        if setting is True:
            raise ValueError(f"activation_cache=True cannot be used: {problem}. Pass activation_cache='auto' or False")
        return False, problem
    if setting == "auto":
        if fit_rows <= 2 * int(n_documents):
            return False, f"the fit reads {fit_rows} rows, not more than twice the {n_documents} documents"
        if free_bytes is not None and size_bytes > free_bytes // 2:
            return False, (f"the cache needs {_format_bytes(size_bytes)}, more than half the "
                           f"{_format_bytes(free_bytes)} free on its disk")
    return True, "activation cache used"


def _write_batch(backend: Any, texts: TokenBatch, index: np.ndarray, layer: int, offsets: np.ndarray,
                 files: dict[str, np.ndarray], dtype: str, verify: Optional[Callable],
                 candidates: Optional[tuple[int, int]] = None) -> Optional[float]:
    """Run the frozen model on documents ``index`` and write their rows into the memory-mapped
    ``files`` (flushed): ``z`` and ``h``, or with ``candidates=(c, seed)`` ``z`` and each token's
    `vocabulary_candidates` (ids and log-weights, `operators.document_candidates`: seeded per
    document as the live fit's `operators.candidate_forward`). With ``verify`` (the head
    function) the batch first checks that the head rebuilds the model's logits (`verify_head`)
    and returns its difference."""
    batch = texts.rows(index).to(backend.device)
    z, h, logits = read_activations(backend, batch.input_ids, batch.attention_mask, layer)
    diff = verify_head(verify, h, logits, batch.attention_mask, backend.dtype) if verify is not None else None
    z_rows = to_storage(z, dtype)
    h_rows = to_storage(h, dtype) if candidates is None else None
    for row, doc in enumerate(index):
        lo, hi = int(offsets[doc]), int(offsets[doc + 1])
        files["z"][lo:hi] = z_rows[row, : hi - lo]
        if candidates is None:
            files["h"][lo:hi] = h_rows[row, : hi - lo]
            continue
        n_candidates, seed = candidates
        ids, logw = document_candidates(logits[row], batch.input_ids[row], hi - lo, doc, n_candidates, seed)
        files["cand_ids"][lo:hi] = ids.cpu().numpy().astype(np.int32)
        files["cand_logw"][lo:hi] = logw.cpu().numpy()
    for array in files.values():
        array.flush()
    return diff


def _data_arrays(manifest: dict) -> dict[str, tuple[tuple[int, ...], Any]]:
    """The per-token arrays of a cache: key -> (shape, numpy dtype): ``z`` and ``h``, or ``z`` and
    the candidates (`fit_vocabulary`)."""
    n_tokens, d = int(manifest["n_tokens"]), int(manifest["identity"]["d_model"])
    file_dtype = STORAGE_DTYPES[manifest["identity"]["dtype"]]
    width = manifest.get("candidate_width")
    if width is None:
        return {"z": ((n_tokens, d), file_dtype), "h": ((n_tokens, d), file_dtype)}
    return {"z": ((n_tokens, d), file_dtype), "cand_ids": ((n_tokens, int(width)), np.int32),
            "cand_logw": ((n_tokens, int(width)), np.float32)}


def _open_data(directory: Path, manifest: dict, writable: bool = False) -> dict[str, np.ndarray]:
    return {key: open_array(directory / ARRAY_FILES[key], shape, np_dtype, writable=writable)
            for key, (shape, np_dtype) in _data_arrays(manifest).items()}


def _candidates_setting(manifest: dict) -> Optional[tuple[int, int]]:
    """``(candidates per token, seed)`` of a cache built with `fit_vocabulary`, else ``None``."""
    if manifest.get("candidate_width") is None:
        return None
    return int(manifest["candidate_width"]), int(manifest["identity"]["candidate seed"])


class ActivationCache:
    """``z_l`` and the final hidden state ``h`` of every training document's real tokens,
    memory-mapped from ``directory``; build it with `ActivationCache.build`.

    Attributes: ``directory``, ``layer``, ``dtype`` (storage dtype name), ``d_model``,
    ``n_documents``, ``n_tokens``, ``lengths [n]`` / ``offsets [n + 1]`` (int64),
    ``size_bytes`` (on disk), ``identity`` (dict), ``head`` (`head_function` of the model, or
    ``None`` when opened without a backend), ``verified_diff`` (max |logit difference| found
    by `verify_head` when the cache was built).
    """

    def __init__(self, directory: str | os.PathLike, head: Optional[Callable[[Tensor], Tensor]] = None) -> None:
        """Open the complete cache in ``directory`` read-only (`ActivationCacheError` if there is
        none or it is incomplete). ``head``: `head_function` of the model, needed by
        `forward_for`."""
        self.directory = Path(directory)
        manifest = read_manifest(self.directory / MANIFEST_NAME)
        if manifest is None:
            raise ActivationCacheError(f"{self.directory} holds no activation cache ({MANIFEST_NAME} is missing): "
                                       "build one with ActivationCache.build(backend, texts, layer, cache_dir)")
        if manifest["done"] < manifest["n_documents"]:
            raise ActivationCacheError(
                f"the activation cache in {self.directory} is incomplete ({manifest['done']} of "
                f"{manifest['n_documents']} documents written): call ActivationCache.build(...) with the same "
                "corpus, model, layer and dtype to finish it")
        self.manifest = manifest
        self.identity = dict(manifest["identity"])
        self.layer = int(manifest["identity"]["layer"])
        self.dtype = str(manifest["identity"]["dtype"])
        self.d_model = int(manifest["identity"]["d_model"])
        self.n_documents = int(manifest["n_documents"])
        self.n_tokens = int(manifest["n_tokens"])
        self.size_bytes = int(manifest["size_bytes"])
        self.verified_diff = manifest.get("verified_diff")
        self.head = head
        d = self.directory
        self.offsets = np.array(open_array(d / ARRAY_FILES["offsets"], (self.n_documents + 1,), np.int64))
        self.lengths = np.diff(self.offsets)
        self._tokens = open_array(d / ARRAY_FILES["tokens"], (self.n_tokens,), np.int64)
        data = _open_data(d, manifest)
        self._z = data["z"]
        self._h = data.get("h")
        self._cand_ids, self._cand_logw = data.get("cand_ids"), data.get("cand_logw")
        #: ``fit_vocabulary`` entries per token the cache holds (``None``: it holds ``h`` instead)
        self.candidates: Optional[int] = (None if manifest.get("candidate_width") is None
                                          else int(manifest["identity"]["fit vocabulary"]))

    # ------------------------------------------------------------------------- build
    @classmethod
    def build(
        cls,
        backend: Any,
        texts: TokenBatch,
        layer: int,
        cache_dir: str | os.PathLike,
        *,
        fingerprint: Optional[str] = None,
        dtype: Any = "float32",
        batch_size: int = 32,
        overwrite: bool = False,
        progress: bool = True,
        candidates: Optional[int] = None,
        candidate_seed: int = 0,
    ) -> "ActivationCache":
        """Compute and write the cache (or finish / reuse the one in ``cache_dir``) and open it.

        Args:
            backend: nnsight or TransformerLens backend of the frozen model.
            texts: the tokenized training corpus (right-padded, as `inputs.encode_texts` makes it).
            layer: decoder block whose output ``z`` is stored (negative counts from the end).
            cache_dir: directory of the cache (created if needed; one cache per directory).
            fingerprint: the model's fingerprint (``backend.fingerprint()`` when ``None``).
            dtype: storage dtype, ``"float32"`` (default), ``"float16"`` or ``"bfloat16"``.
            batch_size: documents per forward pass (documents are processed longest first).
            overwrite: delete whatever cache ``cache_dir`` holds (also one of the same identity) and
                build anew, instead of raising on another identity / reusing the same one.
            progress: show a progress bar and the one-line size report.
            candidates: store, instead of ``h``, each token's ``candidates`` vocabulary entries
                (`operators.vocabulary_candidates`: ids and log-weights) for a fit with
                ``fit_vocabulary=candidates``; ``candidate_seed`` seeds their draws.

        A cache in ``cache_dir`` with the same identity (`cache_identity`) is reused if complete
        and continued if not (after a crash or Ctrl-C; the manifest records the documents done
        after each batch); one with another identity raises `ActivationCacheMismatchError`
        naming what differs. Before writing a new cache its size is reported (one line) and the
        free disk space checked. The first batch run in each call is verified (`verify_head`,
        `HeadMismatchError` if the head cannot be rebuilt).
        """
        layer = backend.check_layer(layer)
        dtype = _storage_dtype(dtype)
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size!r}")
        directory = Path(cache_dir)
        directory.mkdir(parents=True, exist_ok=True)
        head = head_function(backend)
        fingerprint = backend.fingerprint() if fingerprint is None else fingerprint
        identity = cache_identity(texts, fingerprint, layer, dtype, backend.d_model, candidates, candidate_seed)
        rank, world = distributed.rank_and_world()
        problem = None
        if rank == 0:  # under torch.distributed rank 0 checks or creates the files, the others wait
            try:
                manifest = cls._open_or_create(directory, texts, identity, backend.d_model, dtype, overwrite,
                                               progress, backend.vocab_size)
            except Exception as error:  # every rank raises it, none is left waiting
                problem = error
        if world > 1:
            problem = distributed.broadcast_object(problem)
        if problem is not None:
            raise problem
        if world > 1:
            manifest = read_manifest(directory / MANIFEST_NAME)
        if manifest["done"] < manifest["n_documents"]:
            if world > 1 or any(directory.glob("progress-rank*.npy")):  # a sharded build, or one to finish
                cls._fill_shared(backend, texts, layer, directory, manifest, head, int(batch_size), progress)
            else:
                cls._fill(backend, texts, layer, directory, manifest, head, int(batch_size), progress)
        return cls(directory, head=head)

    @classmethod
    def _open_or_create(cls, directory: Path, texts: TokenBatch, identity: dict, d_model: int, dtype: str,
                        overwrite: bool, progress: bool, vocab_size: int) -> dict:
        """The manifest of the cache in ``directory`` after checking its identity, or of a new,
        empty cache."""
        manifest = read_manifest(directory / MANIFEST_NAME) if not overwrite else None
        if manifest is not None:
            differences = _identity_differences(manifest["identity"], identity)
            if differences:
                raise ActivationCacheMismatchError(
                    f"the activation cache in {directory} was built for something else: {'; '.join(differences)}. "
                    "Use another cache_dir, or pass overwrite=True to delete it and build a new one")
            return manifest
        remove_files(directory)
        return cls._create(directory, texts, identity, d_model, dtype, progress, vocab_size)

    @staticmethod
    def _create(directory: Path, texts: TokenBatch, identity: dict, d_model: int, dtype: str,
                progress: bool, vocab_size: int) -> dict:
        """Report the size, check the disk, create the (empty) arrays and the manifest."""
        lengths = document_lengths(texts)
        n_tokens = int(lengths.sum())
        width = None if "fit vocabulary" not in identity else min(int(identity["fit vocabulary"]), int(vocab_size))
        size = cache_size_bytes(texts, d_model, dtype, width)
        line = (f"activation cache: {len(texts)} documents, {n_tokens} tokens, layer {identity['layer']}, {dtype}: "
                f"{_format_bytes(size)} to write in {directory}")
        logger.info(line)
        if progress:
            tqdm.write(line)
        free = shutil.disk_usage(directory).free
        if size > free:
            raise OSError(f"{line}, but only {_format_bytes(free)} are free there: free space, use another "
                          "cache_dir, a smaller dtype (dtype='float16' halves it) or fit without the cache")
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        manifest = {"kind": CACHE_KIND, "format": CACHE_FORMAT, "identity": identity, "n_documents": len(texts),
                    "n_tokens": n_tokens, "size_bytes": size, "done": 0, "verified_diff": None,
                    "candidate_width": width}
        arrays = [("offsets", (len(texts) + 1,), np.int64, offsets),
                  ("tokens", (n_tokens,), np.int64, _real_tokens(texts, lengths))]
        arrays += [(key, shape, np_dtype, None) for key, (shape, np_dtype) in _data_arrays(manifest).items()]
        for key, shape, np_dtype, values in arrays:
            array = create_array(directory / ARRAY_FILES[key], shape, np_dtype)
            if values is not None:
                array[:] = values
            array.flush()
            del array
        write_manifest(directory / MANIFEST_NAME, manifest)
        return manifest

    @staticmethod
    def processing_order(lengths: np.ndarray) -> np.ndarray:
        """Order in which documents are computed: longest first (stable), so batches hold
        documents of similar length (little padding) and memory peaks at the first batch."""
        return np.argsort(-np.asarray(lengths), kind="stable")

    @classmethod
    def _fill_shared(cls, backend: Any, texts: TokenBatch, layer: int, directory: Path, manifest: dict,
                     head: Callable, batch_size: int, progress: bool) -> None:
        """`_fill` split over the ranks of a torch.distributed group: batch ``b`` of the processing
        order goes to rank ``b % world``. Each rank marks its finished batches in its own progress
        file (``progress-rank<r>-bs<batch_size>.npy``, one byte per batch), so an interrupted build
        resumes with any number of processes; rank 0 completes the manifest when all are done."""
        rank, world = distributed.rank_and_world()
        n = manifest["n_documents"]
        n_batches = -(-n // batch_size)
        done = np.zeros(n_batches, dtype=bool)
        done[: int(manifest["done"]) // batch_size] = True  # a single-process build's finished prefix
        for path in directory.glob(f"progress-rank*-bs{batch_size}.npy"):
            done |= np.asarray(open_array(path, (n_batches,), np.uint8)).astype(bool)
        distributed.barrier()  # all ranks have read the progress before any writes to it
        mine = [b for b in range(n_batches) if b % world == rank and not done[b]]
        marks_path = directory / f"progress-rank{rank}-bs{batch_size}.npy"
        if marks_path.is_file():
            marks = open_array(marks_path, (n_batches,), np.uint8, writable=True)
        else:
            marks = create_array(marks_path, (n_batches,), np.uint8)
            marks[:] = 0
            marks.flush()
        cls._fill_batches(backend, texts, layer, directory, manifest, head, batch_size, progress and rank == 0,
                          [(b * batch_size, min(n, (b + 1) * batch_size)) for b in mine], marks, mine)
        distributed.barrier()
        if rank == 0:
            manifest["done"] = n
            write_manifest(directory / MANIFEST_NAME, manifest)
            storage.remove_files(directory, [path.name for path in directory.glob("progress-rank*.npy")])
        distributed.barrier()

    @classmethod
    def _fill_batches(cls, backend: Any, texts: TokenBatch, layer: int, directory: Path, manifest: dict,
                      head: Callable, batch_size: int, progress: bool, spans: list[tuple[int, int]],
                      marks: np.ndarray, batch_ids: list[int]) -> None:
        """Compute and write the documents at processing-order positions ``spans``, marking batch
        ``batch_ids[i]`` in ``marks`` once its rows are on disk."""
        n, dtype = manifest["n_documents"], manifest["identity"]["dtype"]
        offsets = np.array(open_array(directory / ARRAY_FILES["offsets"], (n + 1,), np.int64))
        order = cls.processing_order(np.diff(offsets))
        files = _open_data(directory, manifest, writable=True)
        bar = tqdm(total=sum(hi - lo for lo, hi in spans), disable=not progress, desc="caching activations",
                   unit="doc")
        try:
            for (lo_pos, hi_pos), b in zip(spans, batch_ids):
                index = order[lo_pos:hi_pos]
                candidates = _candidates_setting(manifest)  # (stored from the model's own logits: no head to verify)
                _write_batch(backend, texts, index, layer, offsets, files, dtype,
                             head if lo_pos == 0 and candidates is None else None, candidates)
                marks[b] = 1  # after the data: a crash redoes the batch
                marks.flush()
                bar.update(len(index))
        finally:
            bar.close()
            del files

    @classmethod
    def _fill(cls, backend: Any, texts: TokenBatch, layer: int, directory: Path, manifest: dict,
              head: Callable, batch_size: int, progress: bool) -> None:
        """Compute the documents not done yet, batch by batch, updating the manifest after each."""
        n, dtype = manifest["n_documents"], manifest["identity"]["dtype"]
        offsets = np.array(open_array(directory / ARRAY_FILES["offsets"], (n + 1,), np.int64))
        lengths = np.diff(offsets)
        order = cls.processing_order(lengths)
        files = _open_data(directory, manifest, writable=True)
        start = int(manifest["done"])
        if progress and start:
            tqdm.write(f"activation cache in {directory}: resuming at document {start} of {n}")
        bar = tqdm(total=n, initial=start, disable=not progress, desc="caching activations", unit="doc")
        candidates = _candidates_setting(manifest)
        verified = candidates is not None  # candidates come from the model's own logits: no head to verify
        try:
            while start < n:
                index = order[start: start + batch_size]
                diff = _write_batch(backend, texts, index, layer, offsets, files, dtype,
                                    None if verified else head, candidates)
                if not verified:
                    manifest["verified_diff"], verified = diff, True
                start += len(index)
                manifest["done"] = start
                write_manifest(directory / MANIFEST_NAME, manifest)  # after the data: a crash redoes a batch
                bar.update(len(index))
        finally:
            bar.close()
            del files

    # ------------------------------------------------------------------------- read
    def _check_index(self, index: Any) -> np.ndarray:
        index = np.asarray(torch.as_tensor(index, dtype=torch.long).cpu().numpy(), dtype=np.int64).reshape(-1)
        if len(index) and (index.min() < 0 or index.max() >= self.n_documents):
            raise IndexError(f"document index out of range [0, {self.n_documents}): "
                             f"{int(index.min())}..{int(index.max())}")
        return index

    def width(self, index: Any) -> int:
        """Padded width of rows ``index``: ``max(longest real length, 2)``, as `TokenBatch.rows`."""
        index = self._check_index(index)
        return max(int(self.lengths[index].max()), 2) if len(index) else 2

    def _padded(self, array: np.ndarray, docs: np.ndarray, width: int) -> Tensor:
        """``[len(docs), width, d]`` float32 CPU, zeros after each document's real tokens."""
        out = torch.zeros(len(docs), width, self.d_model)
        for row, doc in enumerate(docs):
            lo, hi = int(self.offsets[doc]), int(self.offsets[doc + 1])
            out[row, : hi - lo] = from_storage(array[lo:hi], self.dtype)
        return out

    def _padded_candidates(self, docs: np.ndarray, width: int) -> tuple[Tensor, Tensor]:
        """``(ids [len(docs), width, c] long, log_weights [..., c] float32)``, zeros after each
        document's real tokens."""
        c = self._cand_ids.shape[1]
        ids = torch.zeros(len(docs), width, c, dtype=torch.long)
        logw = torch.zeros(len(docs), width, c)
        for row, doc in enumerate(docs):
            lo, hi = int(self.offsets[doc]), int(self.offsets[doc + 1])
            ids[row, : hi - lo] = torch.from_numpy(np.asarray(self._cand_ids[lo:hi], dtype=np.int64))
            logw[row, : hi - lo] = torch.from_numpy(np.array(self._cand_logw[lo:hi], dtype=np.float32))
        return ids, logw

    def _require_h(self) -> None:
        if self._h is None:
            raise ActivationCacheError(
                f"the activation cache in {self.directory} holds each token's fit_vocabulary={self.candidates} "
                "candidates instead of the final hidden state h: it serves a logits-placement fit with that "
                "fit_vocabulary; build another cache (without candidates) for anything that needs h")

    def rows(self, index: Any, device: Any = None) -> tuple[Tensor, Tensor]:
        """``(z [b, T, d], h [b, T, d])`` float32 of documents ``index`` on ``device`` (CPU by
        default), padded with zeros to ``T = max(longest real length, 2)`` (the width of
        ``TokenBatch.rows(index)``). Each distinct document is read once."""
        self._require_h()
        index = self._check_index(index)
        width = self.width(index)
        docs, inverse = np.unique(index, return_inverse=True)
        inverse_t = torch.from_numpy(inverse.reshape(-1).astype(np.int64))
        z = self._padded(self._z, docs, width)[inverse_t]
        h = self._padded(self._h, docs, width)[inverse_t]
        device = torch.device("cpu") if device is None else torch.device(device)
        if device.type == "cuda":  # page-locked host memory: the copies to the GPU run asynchronously
            return z.pin_memory().to(device, non_blocking=True), h.pin_memory().to(device, non_blocking=True)
        return z.to(device), h.to(device)

    def tokens(self, index: Any) -> tuple[Tensor, Tensor]:
        """``(input_ids [b, T], attention_mask [b, T])`` int64 of documents ``index`` as cached
        (padding ids 0); the real tokens equal ``TokenBatch.rows(index)``'s."""
        index = self._check_index(index)
        width = self.width(index)
        ids = torch.zeros(len(index), width, dtype=torch.long)
        mask = torch.zeros(len(index), width, dtype=torch.long)
        for row, doc in enumerate(index):
            lo, hi = int(self.offsets[doc]), int(self.offsets[doc + 1])
            ids[row, : hi - lo] = torch.from_numpy(np.array(self._tokens[lo:hi]))
            mask[row, : hi - lo] = 1
        return ids, mask

    def forward_for(self, index: Any, device: Any = None) -> Callable[..., tuple[Tensor, Tensor]]:
        """A ``forward(input_ids, attention_mask, edit) -> (logits [b, T, V], z [b, T, d])`` for
        the rows ``index`` (documents, repeats allowed), to pass to ``operators.step_losses``
        in place of the model's forward (logits and head placements). ``positions=[b, m]``
        returns only those positions (``[b, m, V]``, ``[b, m, d]``; the head runs on ``b * m``
        vectors); ``head_input=True`` returns ``(h, z)``, the head's input instead of the logits
        (head placement).

        With ``edit=None`` it returns the model's final logits rebuilt from the cached ``h``
        (``head``) and the cached ``z`` (float32), on ``device`` (default: the head's device).
        The head runs once per *distinct* document and only on its real tokens (padding
        positions get logits 0, ``z`` 0; every STRIDE loss masks them out). The call checks that
        ``input_ids`` / ``attention_mask`` are exactly these documents' tokens (`ValueError`
        otherwise). ``edit`` other than ``None`` raises ``NotImplementedError``: the residual
        placement is not cached.

        A cache built with ``candidates`` (`fit_vocabulary`) serves ``forward(input_ids,
        attention_mask, None, candidates=True) -> (log_weights [b, T, c], z [b, T, d], ids [b, T,
        c])`` instead (no head is run; padding positions hold zeros), as
        `operators.candidate_forward` would compute them from the model's logits."""
        if self.candidates is not None:
            return self._candidate_forward_for(index, device)
        if self.head is None:
            raise ActivationCacheError("this ActivationCache was opened without the model's head: open it with "
                                       "ActivationCache(directory, head=head_function(backend)) or build() it")
        index = self._check_index(index)
        width = self.width(index)
        docs, inverse = np.unique(index, return_inverse=True)
        inverse_t = torch.from_numpy(inverse.reshape(-1).astype(np.int64))
        head = self.head
        target = torch.device(device) if device is not None else getattr(head, "device", torch.device("cpu"))

        def forward(input_ids: Tensor, attention_mask: Tensor, edit: Any = None,
                    positions: Optional[Tensor] = None, head_input: bool = False) -> tuple[Tensor, Tensor]:
            if edit is not None:
                raise NotImplementedError(
                    "the activation cache serves only unsteered forwards (edit=None) of the logits placement: a "
                    "residual-placement edit changes every block after the steered layer, which must then run; "
                    "fit the residual placement without the cache")
            self._check_tokens(index, width, input_ids, attention_mask)
            z_u = self._padded(self._z, docs, width)
            h_u = self._padded(self._h, docs, width)
            if head_input:  # the head placement: the head's input itself (it applies the head after its edit)
                inv = inverse_t
                if positions is None:
                    return h_u[inv].to(target), z_u[inv].to(target)
                rows, where = inv[:, None], positions.long().cpu()
                return h_u[rows, where].to(target), z_u[rows, where].to(target)
            if positions is not None:  # only the rows' chosen positions: the head runs on b * m vectors
                inv = inverse_t.to(positions.device)
                rows = inv[:, None]
                where = positions.long()
                with torch.no_grad():
                    h_p = h_u.to(positions.device)[rows, where]                                       # [b, m, d]
                    values = head(h_p.reshape(-1, h_p.shape[-1]).to(target))
                logits_p = values.reshape(h_p.shape[0], h_p.shape[1], -1)
                return logits_p.to(target), z_u.to(positions.device)[rows, where].to(target)
            real = torch.arange(width)[None, :] < torch.from_numpy(self.lengths[docs])[:, None]   # [u, T]
            with torch.no_grad():
                values = head(h_u[real].to(target))                                               # [P, V]
                logits_u = values.new_zeros(len(docs), width, values.shape[-1])
                logits_u[real.to(values.device)] = values
            inv = inverse_t.to(target)
            return logits_u.to(target)[inv], z_u.to(target)[inv]

        forward.accepts_positions = True  # type: ignore[attr-defined]
        return forward

    def _candidate_forward_for(self, index: Any, device: Any = None) -> Callable[..., tuple]:
        index = self._check_index(index)
        width = self.width(index)
        docs, inverse = np.unique(index, return_inverse=True)
        inverse_t = torch.from_numpy(inverse.reshape(-1).astype(np.int64))
        target = torch.device(device) if device is not None else torch.device("cpu")

        def forward(input_ids: Tensor, attention_mask: Tensor, edit: Any = None, candidates: bool = False,
                    **kwargs: Any) -> tuple[Tensor, Tensor, Tensor]:
            if edit is not None or not candidates or kwargs.get("head_input"):
                raise NotImplementedError(
                    f"this activation cache holds fit_vocabulary={self.candidates} candidates per token, not the "
                    "logits or the final hidden state: it serves only forward(..., candidates=True) of a "
                    "logits-placement fit with that fit_vocabulary")
            self._check_tokens(index, width, input_ids, attention_mask)
            z_u = self._padded(self._z, docs, width)
            ids_u, logw_u = self._padded_candidates(docs, width)
            return logw_u[inverse_t].to(target), z_u[inverse_t].to(target), ids_u[inverse_t].to(target)

        forward.candidates = True  # type: ignore[attr-defined]
        return forward

    def _check_tokens(self, index: np.ndarray, width: int, input_ids: Tensor, attention_mask: Tensor) -> None:
        ids, mask = self.tokens(index)
        if tuple(input_ids.shape) != (len(index), width) or tuple(attention_mask.shape) != (len(index), width):
            raise ValueError(
                f"the cached forward was made for {len(index)} rows of width {width} but got input_ids of shape "
                f"{tuple(input_ids.shape)}: pass the batch TokenBatch.rows(index) of the same index")
        got_mask = attention_mask.detach().cpu().long()
        got_ids = input_ids.detach().cpu().long() * mask
        if not torch.equal(got_mask, mask) or not torch.equal(got_ids, ids):
            raise ValueError("the rows passed to the cached forward are not the cached documents of its index "
                             "(token ids or attention mask differ): build forward_for(index) from the same index "
                             "as the batch, and the cache from the same tokenized corpus")

