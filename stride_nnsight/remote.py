"""Fitting and measuring on NDIF: ``Stride(model, ..., remote=True)``.

With ``remote`` set (``True``: the configured NDIF host; a URL string: another host;
``"local"``: nnsight's in-process simulation of the remote path), ``Stride.fit`` and
``Stride.measure`` run their work inside ``model.session(remote=...)``. What runs where:

* **Here (the client):** the subset design, the sampling of every step's rows (the same
  numpy/torch generator as a local fit, so the same seed gives the same rows), tokenization,
  the Lasso recovery, and this module's bookkeeping: cutting the work into *chunks*, one
  session each, sized to stay under ``session_budget_s``; writing a checkpoint after every
  finished chunk; turning a failure into an error that names the chunk.
* **On the server, inside the session:** the code of the ``with`` block below plus the
  functions and classes it calls from ``stride_nnsight.operators`` -- the only module that
  is shipped (by value: its source travels with the request, because NDIF does not have
  this package installed). The block creates the operators and the AdamW optimiser, loads
  the state sent in, runs the chunk's steps (or measurements) against the live model, which
  never moves, and saves detached CPU copies of the results.

What crosses the wire, per session:
  in:  operator state dict and AdamW state (fit only), the chunk's pre-sampled row indices
       ``[S, R]`` and operator ids ``[S, R]``, the sketch rows of the probe operators
       ``[S, p, q]``, and the token ids / masks of only the examples the chunk uses;
  out: the updated operator state, the AdamW state and the loss curve ``[S, 4]`` (fit), or
       ``y [q, K]`` and ``base [q]`` (measurement). Nothing else is saved.

Optimiser state: AdamW's moments are carried from session to session (sent in, saved out),
which makes a chunked remote fit step-for-step identical to an uninterrupted local one.
Recreating the optimiser fresh in every session would be cheaper on the wire (no moments)
but restarts Adam's bias correction and moment estimates at every chunk boundary, so the
result would depend on how the work was cut; we chose exactness.

Chunk sizes: the first session runs ``steps_per_session`` steps (``queries_per_session``
queries for a measurement). After each finished session, its wall time gives seconds per
unit (per step, or per query chunk); the next session gets as many units as fit in
``budget_fraction * session_budget_s``, never more than the cap and never fewer than one.
So chunks shrink when sessions are slow (or NDIF is queueing) and grow back when they are
fast. After a failed chunk, the retry runs half as many units (the usual causes -- the
session ran out of time or memory -- are cured by smaller chunks; results do not depend
on the chunking). A unit whose measured cost exceeds the whole budget stops the run with
an error that says what to lower. See docs/remote.md.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from . import operators as remote_module
from . import storage
from .fitting import FitHistory, OperatorFitter, interrupts_deferred, nonfinite_loss_error, optimizer_settings
from .inputs import TokenBatch
from .operators import SteeringOperators, block_device, cpu_state, measure_queries, run_training_steps

__all__ = [
    "RemoteSettings",
    "RemoteChunkError",
    "SessionBudgetError",
    "ChunkRecord",
    "check_remote",
    "fit_remote",
    "measure_remote",
    "plan_chunk_size",
    "shipped_by_value",
    "CHUNK_LOG",
    "MEASURE_PREFIX",
]

CHUNK_LOG = "remote_chunks.json"
MEASURE_PREFIX = "remote_measure-"
MEASURE_STATE = "measure_state.json"  # manifest + .safetensors beside it (stride_nnsight.storage)
LEGACY_MEASURE_STATE = "measure_state.pt"  # format 1 (stride-nnsight 0.1), read by storage without unpickling code
MEASURE_KIND = "remote_measure_state"
SETTING_PREFIX = "remote_"

_clock = time.monotonic  # replaced in tests to simulate slow sessions


# ------------------------------------------------------------------------------ settings
@dataclass
class RemoteSettings:
    """How remote work is cut into sessions. Given to ``Stride`` with a ``remote_`` prefix,
    e.g. ``Stride(model, remote=True, remote_session_budget_s=1800)``.

    Attributes:
        session_budget_s: the server's time limit for one session (NDIF: one hour).
        steps_per_session: most optimiser steps in one fitting session.
        queries_per_session: most queries in one measurement session (rounded down to whole
            query chunks of ``max(1, measure_batch_size // 4)``, at least one chunk).
        budget_fraction: share of the budget a session is planned to use; the rest is margin
            for queueing, upload and variation between sessions.
        checkpoint_dir: where finished chunks are kept so a rerun resumes: the default for
            ``fit(checkpoint_dir=...)``, and the only place measurements are resumed from.
        verbose: nnsight's verbose remote logging (payload and result sizes).
    """

    session_budget_s: float = 3600.0
    steps_per_session: int = 100
    queries_per_session: int = 64
    budget_fraction: float = 0.5
    checkpoint_dir: Optional[str] = None
    verbose: bool = False

    def __post_init__(self) -> None:
        for name in ("session_budget_s", "steps_per_session", "queries_per_session"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{SETTING_PREFIX}{name} must be a positive number, got {value!r}")
        for name in ("steps_per_session", "queries_per_session"):
            if int(getattr(self, name)) != getattr(self, name):
                raise ValueError(f"{SETTING_PREFIX}{name} must be an integer, got {getattr(self, name)!r}")
            setattr(self, name, int(getattr(self, name)))
        if not 0 < self.budget_fraction <= 1:
            raise ValueError(f"{SETTING_PREFIX}budget_fraction must lie in (0, 1], got {self.budget_fraction!r}")
        if self.checkpoint_dir is not None:
            self.checkpoint_dir = os.fspath(self.checkpoint_dir)

    @classmethod
    def pop_from(cls, settings: dict) -> "RemoteSettings":
        """Take the ``remote_<field>`` keys out of ``settings`` (in place) and build from them."""
        names = {f.name for f in fields(cls)}
        mine = {}
        for key in [k for k in settings if k.startswith(SETTING_PREFIX)]:
            name = key[len(SETTING_PREFIX):]
            if name not in names:
                raise TypeError(f"unknown remote setting {key!r}; known: "
                                f"{sorted(SETTING_PREFIX + n for n in names)}")
            mine[name] = settings.pop(key)
        return cls(**mine)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def check_remote(remote: Any) -> Any:
    """Validate ``Stride(remote=...)``: ``False``/``None`` (local), ``True`` (NDIF), ``"local"``
    (nnsight's simulation), a host URL string, or (advanced, e.g. tests) an nnsight ``Backend``
    instance that runs the session."""
    if remote is None or remote is False:
        return False
    if remote is True:
        return True
    if isinstance(remote, str):
        if remote == "local" or remote.startswith(("http://", "https://")):
            return remote
        raise ValueError(f"remote must be True, 'local' or a host URL like 'https://api.ndif.us', got {remote!r}")
    from nnsight.tracing.backend import Backend

    if isinstance(remote, Backend):
        return remote
    raise TypeError(f"remote must be a bool, 'local' or a host URL string, got {type(remote).__name__}")


def describe_remote(remote: Any) -> Any:
    """A JSON-friendly name of the remote target, for provenance and messages."""
    if isinstance(remote, (bool, str)):
        return remote
    return type(remote).__name__


# -------------------------------------------------------------------------------- errors
class RemoteChunkError(RuntimeError):
    """A chunk (one remote session) failed. ``chunk``, ``start``, ``stop`` (steps or queries,
    ``stop`` exclusive), ``kind`` (``"fit"`` or ``"measure"``) say which; ``__cause__`` is the
    original error. Finished chunks are kept in the checkpoint directory, when one was given."""

    def __init__(self, message: str, *, kind: str, chunk: int, start: int, stop: int) -> None:
        super().__init__(message)
        self.kind, self.chunk, self.start, self.stop = kind, chunk, start, stop


class SessionBudgetError(RuntimeError):
    """One unit of work (a step, or a query chunk) takes longer than the whole session budget."""


@dataclass
class ChunkRecord:
    """One session: which units it covered (``start``..``stop - 1``: steps for a fit, query
    chunks of ``max(1, measure_batch_size // 4)`` queries for a measurement), how long it
    took (client wall time, queueing and transfer included), how much came back."""

    chunk: int
    start: int
    stop: int
    status: str  # "done" or "failed"
    seconds: float
    bytes_back: int = 0
    error: str = ""
    unit: str = "step"

    @property
    def units(self) -> int:
        return self.stop - self.start


# ------------------------------------------------------------------------ chunk planning
def plan_chunk_size(log: Sequence[ChunkRecord], cap: int, remaining: int, settings: RemoteSettings,
                    what: str = "step") -> int:
    """Units for the next session (see the module docstring for the rule)."""
    size = max(1, min(cap, remaining))
    done = [r for r in log if r.status == "done" and r.units > 0]
    if done:
        per_unit = done[-1].seconds / done[-1].units
        if per_unit > settings.session_budget_s:
            raise SessionBudgetError(
                f"one {what} took about {per_unit:.0f} s in the last session (chunk {done[-1].chunk}), more than "
                f"the whole session budget of {settings.session_budget_s:.0f} s: lower batch_size / "
                "measure_batch_size (or raise remote_session_budget_s if the server allows longer sessions)"
            )
        if per_unit > 0:
            fits = int(settings.budget_fraction * settings.session_budget_s // per_unit)
            size = max(1, min(size, fits))
    if log and log[-1].status == "failed":
        size = max(1, min(size, log[-1].units // 2))
    return size


def _next_chunk_index(log: Sequence[ChunkRecord]) -> int:
    return sum(r.status == "done" for r in log)


# ------------------------------------------------------------------------ the session
@contextlib.contextmanager
def shipped_by_value() -> Iterator[None]:
    """Register ``stride_nnsight.operators`` for by-value pickling while a request is built.

    NDIF does not have this package installed; the session block calls functions and
    classes of that module, so their source must travel with the request. (nnsight's own
    ``pull_env`` only does this for modules that are *not* pip-installed, and its
    ``remote="local"`` simulation never hides a module whose name contains "nnsight", so
    without this a run could pass locally and fail on the server.)
    """
    from cloudpickle.cloudpickle import _PICKLE_BY_VALUE_MODULES
    from nnsight import register

    name = remote_module.__name__
    added = name not in _PICKLE_BY_VALUE_MODULES
    if added:
        register(remote_module)
    try:
        yield
    finally:
        if added:
            _PICKLE_BY_VALUE_MODULES.discard(name)


def _open_session(model: Any, remote: Any, verbose: bool):
    from nnsight.tracing.backend import Backend

    if isinstance(remote, Backend):
        return model.session(backend=remote)
    return model.session(remote=remote, verbose=verbose)


def _fit_session(model, remote, verbose, operator_settings, layers_path, operator_state, optimizer_state,
                 adamw_settings, input_ids, attention_mask, loss_mask, rows, operator_ids, sketches,
                 n_fidelity, n_stability, loss_weights, ridge, positions=None, valid=None) -> dict:
    """One fitting session. Everything inside the ``with`` runs on the server."""
    import nnsight

    with _open_session(model, remote, verbose):
        operators = SteeringOperators(**operator_settings)
        operators.to(block_device(model, layers_path, operator_settings["layer"]))
        operators.load_state_dict(operator_state)
        optimizer = torch.optim.AdamW(operators.parameters(), **adamw_settings)
        if optimizer_state is not None:
            optimizer.load_state_dict(optimizer_state)
        losses = run_training_steps(model, layers_path, operators, optimizer, input_ids, attention_mask, loss_mask,
                                    rows, operator_ids, sketches, n_fidelity, n_stability, loss_weights, ridge,
                                    positions, valid)
        result = nnsight.save(cpu_state({"operators": operators.state_dict(), "optimizer": optimizer.state_dict(),
                                         "losses": losses}))
    return result


def _measure_session(model, remote, verbose, operator_settings, layers_path, operator_state, input_ids,
                     attention_mask, loss_mask, batch_size, first_order=False) -> dict:
    """One measurement session. Everything inside the ``with`` runs on the server."""
    import nnsight

    with _open_session(model, remote, verbose):
        operators = SteeringOperators(**operator_settings)
        operators.to(block_device(model, layers_path, operator_settings["layer"]))
        operators.load_state_dict(operator_state)
        y, base = measure_queries(model, layers_path, operators, input_ids, attention_mask, loss_mask, batch_size,
                                  first_order)
        result = nnsight.save(cpu_state({"y": y, "base": base}))
    return result


# ------------------------------------------------------------------------------ helpers
def _require_nnsight(stride: Any) -> None:
    if stride.backend.name != "nnsight":
        raise TypeError(
            f"remote={describe_remote(stride.remote)!r} needs an nnsight model (TransformersModel / LanguageModel); "
            f"this Stride wraps a {stride.backend.name} model, which can only run locally: use remote=False"
        )


def _tensor_bytes(value: Any) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        return sum(_tensor_bytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(_tensor_bytes(v) for v in value)
    return 0


def _check_small(value: Any, where: str) -> None:
    """What came back must be detached CPU tensors (and plain values)."""
    if isinstance(value, torch.Tensor):
        if value.device.type != "cpu" or value.requires_grad:
            raise RuntimeError(f"remote session returned {where} on {value.device} (requires_grad="
                               f"{value.requires_grad}); expected a detached CPU tensor")
    elif isinstance(value, dict):
        for k, v in value.items():
            _check_small(v, f"{where}[{k!r}]")
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _check_small(v, f"{where}[{i}]")


def _layers_path(stride: Any) -> str:
    return stride.backend.layers_path


def _operator_settings(operators: SteeringOperators) -> dict:
    return operators.settings()


def _failure(kind: str, chunk: int, start: int, stop: int, total: int, remote: Any, error: BaseException,
             directory: Optional[Path]) -> RemoteChunkError:
    unit = "steps" if kind == "fit" else "queries"
    what = "fitting" if kind == "fit" else "measurement"
    head = (f"remote {what} failed in chunk {chunk} ({unit} {start}..{stop - 1} of {total}, "
            f"remote={describe_remote(remote)!r}): {type(error).__name__}: {error}")
    if directory is not None:
        again = "fit()" if kind == "fit" else "measure() / attribute()"
        checkpoint = f"the same checkpoint_dir ({directory})" if kind == "fit" else \
            f"the same remote_checkpoint_dir ({directory.parent})"
        tail = (f" Chunks 0..{chunk - 1} ({unit} 0..{start - 1}) are finished and saved; call {again} again with "
                f"{checkpoint} to resume at {unit[:-1] if kind == 'fit' else 'query'} {start}."
                if chunk > 0 else f" No chunk had finished; call {again} again with {checkpoint} to retry "
                                  "(the retry runs a smaller chunk).")
    else:
        tail = (" Nothing was saved to disk: pass checkpoint_dir=... to fit() (or remote_checkpoint_dir=... to "
                "Stride) to make remote work resumable.")
    return RemoteChunkError(head + "." + tail, kind=kind, chunk=chunk, start=start, stop=stop)


def _write_json_log(directory: Path, log: Sequence[ChunkRecord]) -> None:
    """The human-readable chunk log (atomic, through the library's storage module)."""
    storage.write_manifest(directory / CHUNK_LOG, [asdict(r) for r in log])


# -------------------------------------------------------------------------------- fitting
def _sample_chunk(fitter: OperatorFitter, steps: int) -> dict:
    """Draw ``steps`` steps' rows locally (advances the fitter's generator exactly as a local
    fit would) and pack what the session needs: only the examples these steps use."""
    examples, op_ids, sketches, positions, valid = [], [], [], [], []
    counts = None
    for _ in range(steps):
        fid_ex, fid_ops, stab_ex, stab_ops, probe, probe_ops = fitter.sample_rows()
        n_probe = len(probe_ops)
        step_counts = (len(fid_ex), len(stab_ex), n_probe)
        if counts is None:
            counts = step_counts
        elif counts != step_counts:  # pragma: no cover - sample_rows draws fixed counts
            raise RuntimeError(f"rows per step changed within a chunk: {counts} vs {step_counts}")
        examples.append(np.concatenate([fid_ex, stab_ex, np.full(n_probe, probe, dtype=np.int64)]))
        # the loss positions, drawn right after the rows exactly as OperatorFitter.train_step does
        step_positions, step_valid = fitter.sample_positions(fitter.texts.rows(examples[-1]), len(fid_ex),
                                                             len(stab_ex), n_probe)
        if step_positions is not None:
            positions.append(step_positions)
            valid.append(step_valid)
        op_ids.append(np.concatenate([fid_ops, stab_ops, probe_ops]).astype(np.int64))
        sketches.append(fitter.sketch[torch.from_numpy(np.asarray(probe_ops, dtype=np.int64))])
    examples = np.stack(examples)
    unique, inverse = np.unique(examples, return_inverse=True)
    tokens = fitter.texts.rows(unique)
    return {
        "input_ids": tokens.input_ids,
        "attention_mask": tokens.attention_mask,
        "loss_mask": tokens.loss_mask,
        "rows": torch.from_numpy(inverse.reshape(examples.shape).astype(np.int64)),
        "examples": examples,  # [S, R] training-example indices (stays here: error messages)
        "operator_ids": torch.from_numpy(np.stack(op_ids)),
        "sketches": torch.stack(sketches).float(),
        "n_fidelity": counts[0],
        "n_stability": counts[1],
        "positions": _padded_stack(positions, 0),  # [S, R, m] or None (every position)
        "valid": _padded_stack(valid, False),
    }


def _padded_stack(values: list, fill: Any) -> Optional[torch.Tensor]:
    """Stack ``[R, m_s]`` tensors into ``[S, R, max m_s]``, padding with ``fill``; ``None`` if empty."""
    if not values:
        return None
    width = max(int(v.shape[1]) for v in values)
    out = torch.full((len(values), values[0].shape[0], width), fill, dtype=values[0].dtype)
    for i, v in enumerate(values):
        out[i, :, : v.shape[1]] = v
    return out


def _nonfinite_chunk(losses: torch.Tensor, payload: dict, start: int) -> Optional[FloatingPointError]:
    """`nonfinite_loss_error` for the first step of a chunk whose losses ``[S, 4]`` (total,
    fidelity, stability, linearity: means over the step's rows) are not all finite."""
    finite = torch.isfinite(losses).all(1)
    if bool(finite.all()):
        return None
    s = int((~finite).nonzero()[0, 0])
    examples, n_fid, n_stab = payload["examples"][s], payload["n_fidelity"], payload["n_stability"]
    rows = {"total": examples, "fidelity": examples[:n_fid], "stability": examples[n_fid:n_fid + n_stab],
            "linearity": examples[n_fid + n_stab:][:1]}
    names = ("total", "fidelity", "stability", "linearity")
    return nonfinite_loss_error(start + s + 1, {name: losses[s, i] for i, name in enumerate(names)}, rows)


def _save_fit(directory: Optional[Path], fitter: OperatorFitter, log: list[ChunkRecord]) -> None:
    if directory is None:
        return
    # the local fitter's checkpoint (same run identity): a remote fit can be resumed locally and back
    fitter.save_checkpoint(directory, extra={"remote_chunks": [asdict(r) for r in log]})
    _write_json_log(directory, log)


def fit_remote(stride: Any, fitter: OperatorFitter, *, progress: bool = True,
               checkpoint_dir: Optional[str | os.PathLike] = None, overwrite: bool = False) -> FitHistory:
    """Train ``fitter.operators`` to ``fitter.n_steps`` in remote sessions; resume from
    ``checkpoint_dir`` (or ``remote_checkpoint_dir``) when it holds a checkpoint of the same
    run (``fitter.resume``: the run identity must match; ``overwrite=True`` starts over).

    ``fitter`` supplies the sampling (its generator), the tokenized texts, the sketch and a
    local copy of the operators and optimiser, which receive each finished chunk's state.
    Returns the loss history (one entry per step, as a local fit).
    """
    _require_nnsight(stride)
    settings: RemoteSettings = stride.remote_settings
    directory = checkpoint_dir if checkpoint_dir is not None else settings.checkpoint_dir
    directory = Path(directory) if directory is not None else None
    log: list[ChunkRecord] = []
    if overwrite and directory is not None:
        storage.remove_files(directory, [CHUNK_LOG])
    state = fitter.resume(directory, overwrite)
    if state is not None:
        log = [ChunkRecord(**r) for r in state.get("remote_chunks", [])]
    stride.remote_log = log  # grows as chunks finish (also readable after a failure)
    args = stride.args
    total = fitter.n_steps
    initial = [p.detach().clone() for p in fitter.operators.parameters()]
    start_step = fitter.step
    operator_settings = _operator_settings(fitter.operators)
    adamw_settings = optimizer_settings(args)
    loss_weights = (args.fidelity_weight, args.stability_weight, args.linearity_weight)
    bar = tqdm(total=total, initial=fitter.step, disable=not progress, desc="fitting STRIDE operators (remote)")
    try:
        while fitter.step < total:
            size = plan_chunk_size(log, settings.steps_per_session, total - fitter.step, settings, "step")
            chunk, start, stop = _next_chunk_index(log), fitter.step, fitter.step + size
            generator_state = fitter.generator.get_state()
            began = _clock()
            try:
                payload = _sample_chunk(fitter, size)
                has_moments = len(fitter.optimizer.state) > 0
                with shipped_by_value():
                    result = _fit_session(
                        stride.backend.model, stride.remote, settings.verbose, operator_settings, _layers_path(stride),
                        cpu_state(fitter.operators.state_dict()),
                        cpu_state(fitter.optimizer.state_dict()) if has_moments else None,
                        adamw_settings, payload["input_ids"], payload["attention_mask"], payload["loss_mask"],
                        payload["rows"], payload["operator_ids"], payload["sketches"], payload["n_fidelity"],
                        payload["n_stability"], loss_weights, args.ridge, payload["positions"], payload["valid"])
                _check_small(result, "result")
                losses = result["losses"]
                if tuple(losses.shape) != (size, 4):
                    raise RuntimeError(f"remote session returned losses of shape {tuple(losses.shape)}, "
                                       f"expected ({size}, 4)")
            except KeyboardInterrupt:
                fitter.generator.set_state(generator_state)
                raise
            except Exception as error:
                fitter.generator.set_state(generator_state)
                log.append(ChunkRecord(chunk, start, stop, "failed", _clock() - began,
                                       error=f"{type(error).__name__}: {error}"[:2000]))
                _save_fit(directory, fitter, log)
                raise _failure("fit", chunk, start, stop, total, stride.remote, error, directory) from error
            nonfinite = _nonfinite_chunk(losses, payload, start)
            if nonfinite is not None:  # keep the operators of the last finite chunk; nothing is saved
                fitter.generator.set_state(generator_state)
                raise nonfinite
            with interrupts_deferred():  # the chunk's state, steps, log and checkpoint change together
                fitter.operators.load_state_dict(result["operators"])
                fitter.optimizer.load_state_dict(result["optimizer"])
                for row in losses.tolist():
                    fitter.step += 1
                    fitter.history.append(fitter.step, *row)
                log.append(ChunkRecord(chunk, start, stop, "done", _clock() - began,
                                       bytes_back=_tensor_bytes(result)))
                _save_fit(directory, fitter, log)
            bar.update(size)
            bar.set_postfix(chunk=chunk, fid=f"{losses[-1, 1]:.3f}")
    finally:
        bar.close()
    if fitter.step > start_step and not any(
            not torch.equal(a, b.detach()) for a, b in zip(initial, fitter.operators.parameters())):
        raise RuntimeError("remote fitting ran but no operator parameter changed: gradients are not reaching "
                           "the operators (is the edit applied inside the trace?)")
    fitter.operators.eval()
    return fitter.history


# ---------------------------------------------------------------------------- measurement
def _measure_key(operators: SteeringOperators, queries: TokenBatch, batch_size: int,
                 first_order: bool = False) -> str:
    """Names a measurement's checkpoint folder: the operators (settings and weights), the queries'
    tokens, the chunking and the kind of measurement (first-order ones never resume exact ones)."""
    h = hashlib.sha256()
    what = {"settings": operators.settings(), "batch_size": batch_size}
    if first_order:  # absent for exact measurements, so their folders keep their earlier names
        what["first_order"] = True
    h.update(json.dumps(what, sort_keys=True).encode())
    for t in (queries.input_ids, queries.attention_mask, queries.loss_mask):
        h.update(str(tuple(t.shape)).encode())
        h.update(t.contiguous().numpy().tobytes())
    for name, t in operators.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def measure_remote(stride: Any, queries: TokenBatch, *, metric: Any = None,
                   progress: bool = True, first_order: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """All ``K`` measurements for every query, in remote sessions (default metric only);
    ``first_order``: their first-order part (`operators.completion_measurements`).

    Returns ``(y [q, K], base [q])`` as ``measurement.measure``. With ``remote_checkpoint_dir``
    set, finished chunks are kept under ``remote_measure-<key>/`` (key: a hash of the queries'
    tokens and the operators) and a rerun resumes.
    """
    _require_nnsight(stride)
    if metric is not None:
        raise NotImplementedError(
            "a custom metric cannot run remotely yet: the session computes the default metric (minus the mean "
            "completion NLL) on the server. Use remote=False for custom metrics."
        )
    settings: RemoteSettings = stride.remote_settings
    operators: SteeringOperators = stride.operators
    batch_size = stride.args.measure_batch_size
    n_q, K = len(queries), operators.n_operators
    q_chunk = max(1, batch_size // 4)  # the query chunk of measurement.measure: one unit
    n_units = math.ceil(n_q / q_chunk)
    cap = max(1, settings.queries_per_session // q_chunk)
    directory = None
    if settings.checkpoint_dir is not None:
        directory = Path(settings.checkpoint_dir) / \
            f"{MEASURE_PREFIX}{_measure_key(operators, queries, batch_size, first_order)}"
    y, base, done_units, log = torch.empty(n_q, K), torch.empty(n_q), 0, []
    found = storage.find(directory, MEASURE_STATE, LEGACY_MEASURE_STATE) if directory is not None else None
    if found is not None:
        state = storage.load(found, MEASURE_KIND, required=("y", "base", "done_units", "log"))
        if tuple(state["y"].shape) != (n_q, K) or tuple(state["base"].shape) != (n_q,):
            raise storage.StateFileError(
                f"{found}: holds measurements y {tuple(state['y'].shape)} / base {tuple(state['base'].shape)}, "
                f"expected ({n_q}, {K}) / ({n_q},). Delete {directory} to measure again")
        y, base, done_units = state["y"], state["base"], int(state["done_units"])
        log = [ChunkRecord(**r) for r in state["log"]]
    stride.remote_measure_log = log  # grows as chunks finish (also readable after a failure)
    operator_state = cpu_state(operators.state_dict())
    operator_settings = _operator_settings(operators)

    def save() -> None:
        if directory is not None:
            storage.save(directory / MEASURE_STATE, MEASURE_KIND,
                         {"y": y, "base": base, "done_units": done_units, "log": [asdict(r) for r in log]})
            _write_json_log(directory, log)

    bar = tqdm(total=n_q * K, initial=min(n_q, done_units * q_chunk) * K, disable=not progress,
               desc="measuring operators (remote)", unit="row")
    try:
        while done_units < n_units:
            units = plan_chunk_size(log, cap, n_units - done_units, settings, "query chunk")
            chunk = _next_chunk_index(log)
            start, stop = done_units * q_chunk, min(n_q, (done_units + units) * q_chunk)
            began = _clock()
            try:
                part = queries.rows(list(range(start, stop)))
                with shipped_by_value():
                    result = _measure_session(stride.backend.model, stride.remote, settings.verbose,
                                              operator_settings, _layers_path(stride), operator_state,
                                              part.input_ids, part.attention_mask, part.loss_mask, batch_size,
                                              first_order)
                _check_small(result, "result")
                if tuple(result["y"].shape) != (stop - start, K) or tuple(result["base"].shape) != (stop - start,):
                    raise RuntimeError(f"remote session returned y {tuple(result['y'].shape)} / base "
                                       f"{tuple(result['base'].shape)}, expected ({stop - start}, {K}) / "
                                       f"({stop - start},)")
            except KeyboardInterrupt:
                raise
            except Exception as error:
                log.append(ChunkRecord(chunk, done_units, done_units + units, "failed", _clock() - began,
                                       error=f"{type(error).__name__}: {error}"[:2000], unit="query chunk"))
                save()
                raise _failure("measure", chunk, start, stop, n_q, stride.remote, error, directory) from error
            y[start:stop] = result["y"]
            base[start:stop] = result["base"]
            done_units += units
            log.append(ChunkRecord(chunk, done_units - units, done_units, "done", _clock() - began,
                                   bytes_back=_tensor_bytes(result), unit="query chunk"))
            save()
            bar.update((stop - start) * K)
    finally:
        bar.close()
    if not torch.isfinite(y).all():
        bad = int((~torch.isfinite(y)).any(1).nonzero()[0, 0])
        raise FloatingPointError(f"non-finite measurement for query {bad}: check the metric and the inputs")
    return y, base
