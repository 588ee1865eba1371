"""Training the steering operators (the base model stays frozen).

One optimiser step draws a few documents (``StrideArguments.documents_per_step``) and scores
each under all ``d`` operators of its subsets (fidelity rows) and under ``d`` operators of
subsets that leave it out (stability rows); a row is one (document, operator) pair. For the
logits and head placements one unsteered forward per *distinct* document serves all its rows
(`stride_nnsight.operators.shared_rows_forward`, or the activation cache). ``sampling=
"membership"`` draws one (subset, member) pair per fidelity row and one (subset, non-member)
pair per stability row instead. A linearity probe adds ``linearity_operators`` rows: one
random training example under that many random operators. See docs/method.md for the
reasoning.

Fitting is resumable: with a checkpoint directory, the operators, optimiser, sampler
state and loss curve are written every ``checkpoint_every`` steps and when the run is
interrupted (Ctrl-C); calling ``fit`` again picks up at the last written step. A checkpoint
always holds the state after a *completed* step (Ctrl-C is held back while a step's update is
applied, and a step cut short before its update leaves no trace, its sampling included), so
a resumed fit is bit-identical to an uninterrupted one. A checkpoint records the run's
identity (``OperatorFitter.run_identity``: settings, operator shapes, design, tokenized
corpus and, from ``Stride.fit``, the corpus and model fingerprint); it is resumed only by
the same run. Files are written through ``stride_nnsight.storage``.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Optional

import numpy as np
import torch
from tqdm.auto import tqdm

from . import distributed, storage
from .activations import ActivationCache, head_function, read_activations
from .arguments import StrideArguments
from .backends.base import ModelBackend
from .design import SubsetDesign
from .inputs import TokenBatch
from .operators import (READ_ONLY_PLACEMENTS, SteeringOperators, candidate_forward, jl_projection, loss_candidates,
                        module_device, shared_rows_forward, step_losses)

__all__ = ["FitHistory", "OperatorFitter", "CHECKPOINT_NAME", "CheckpointMismatchError", "NOT_IN_RUN_IDENTITY",
           "interrupts_deferred", "nonfinite_loss_error", "nonfinite_gradients", "optimizer_settings"]

CHECKPOINT_NAME = "fit_checkpoint.json"  # manifest; the tensors sit beside it (stride_nnsight.storage)
LEGACY_CHECKPOINT_NAME = "fit_checkpoint.pt"  # format 1 (stride-nnsight 0.1), read by storage without unpickling code
CHECKPOINT_KIND = "fit_checkpoint"
CHECKPOINT_KEYS = ("step", "operators", "optimizer", "generator", "history", "design")

#: ``StrideArguments`` fields left out of a fit's run identity: they do not change the fitted
#: operators. ``steps`` / ``fit_passes`` / ``min_operator_rows`` only say where to stop (a fit resumed with more steps
#: continues the same trajectory); the rest are used after fitting or only schedule I/O.
NOT_IN_RUN_IDENTITY: tuple[str, ...] = ("steps", "fit_passes", "min_operator_rows", "checkpoint_every", "measure_batch_size",
                                        "lambda_rule", "lambda_fraction", "fit_intercept",
                                        "activation_cache", "activation_cache_dtype")
# (whether the activation cache is used, and in which dtype, enters the identity as "forward":
# the mode actually used, not the setting)

#: identity entries that are hashes, with how to name them in an error
_HASHED_IDENTITY = {"corpus": "corpus (texts and ids)", "tokens": "tokenized corpus",
                    "model fingerprint": "model fingerprint"}
_START_OVER = ("use another checkpoint_dir, or fit(..., overwrite=True) to discard the checkpoint and start over")


class CheckpointMismatchError(ValueError):
    """A checkpoint in ``checkpoint_dir`` belongs to another run (corpus, model or settings
    differ) or cannot be checked; the message names what differs and how to start over."""


@contextlib.contextmanager
def interrupts_deferred() -> Iterator[None]:
    """Hold back Ctrl-C (SIGINT) until the block is done, so a state update is never half
    applied; the interrupt is raised when the block exits. A no-op outside the main thread
    (Python runs signal handlers only there)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[tuple[int, Any]] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: pending.append((signum, frame)))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if pending:
            if callable(previous):
                previous(*pending[0])  # signal.default_int_handler raises KeyboardInterrupt
            elif previous == signal.SIG_DFL:
                signal.raise_signal(signal.SIGINT)
            elif previous is None:
                raise KeyboardInterrupt


def tokens_hash(texts: TokenBatch) -> str:
    """sha256 of a tokenized corpus (ids and masks, with their shapes)."""
    h = hashlib.sha256()
    for t in (texts.input_ids, texts.attention_mask, texts.loss_mask):
        t = t.detach().cpu().contiguous()
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def identity_differences(stored: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """Human-readable differences between two run identities (empty when they match)."""
    out = []
    for key in list(current) + [k for k in stored if k not in current]:
        if key not in stored:
            out.append(f"{key}: not recorded in the checkpoint (written by another kind of run)")
        elif key not in current:
            out.append(f"{key}: recorded in the checkpoint but not part of this run")
        elif storage.json_safe(stored[key], key) != storage.json_safe(current[key], key):
            if key in _HASHED_IDENTITY:
                out.append(f"{_HASHED_IDENTITY[key]} differs (hash {str(stored[key])[:12]} in the checkpoint vs "
                           f"{str(current[key])[:12]} now)")
            else:
                out.append(f"{key}: {stored[key]!r} in the checkpoint vs {current[key]!r} now")
    return out


@dataclass
class FitHistory:
    """Loss curve of a fit: one entry per optimiser step (all in nats)."""

    step: list[int] = field(default_factory=list)
    total: list[float] = field(default_factory=list)
    fidelity: list[float] = field(default_factory=list)
    stability: list[float] = field(default_factory=list)
    linearity: list[float] = field(default_factory=list)

    def append(self, step: int, total: float, fidelity: float, stability: float, linearity: float) -> None:
        self.step.append(step)
        self.total.append(total)
        self.fidelity.append(fidelity)
        self.stability.append(stability)
        self.linearity.append(linearity)

    def to_dict(self) -> dict[str, list]:
        return {k: list(v) for k, v in self.__dict__.items()}

    @classmethod
    def from_dict(cls, data: dict) -> "FitHistory":
        return cls(**{k: list(v) for k, v in data.items()})

    def __len__(self) -> int:
        return len(self.step)


def nonfinite_loss_error(step: int, losses: Mapping[str, torch.Tensor],
                         rows: Mapping[str, Any]) -> Optional[FloatingPointError]:
    """The error for a fit step whose losses are not all finite, or ``None`` if they are.

    ``losses``: name -> the step's loss (a scalar, or one value per row); ``rows``: name ->
    the training-example indices of that loss's rows (for a scalar, all rows it covers). The
    message names the step, the non-finite losses, the examples of the offending rows and
    the likely fixes."""
    bad = [name for name, value in losses.items() if not bool(torch.isfinite(value.detach()).all())]
    if not bad:
        return None
    if len(bad) > 1 and "total" in bad:
        bad.remove("total")  # the weighted sum of the others: they name the rows more precisely
    parts, bad_examples = [], {}
    for name in bad:
        value = losses[name].detach().reshape(-1).cpu()
        examples = [int(i) for i in np.asarray(rows.get(name, []), dtype=np.int64).reshape(-1)]
        if value.numel() == len(examples) and value.numel() > 1:
            examples = [i for i, ok in zip(examples, torch.isfinite(value).tolist()) if not ok]
        shown = bad_examples[name] = sorted(set(examples))
        more = f" (+{len(shown) - 20} more)" if len(shown) > 20 else ""
        parts.append(f"{name} loss is {value[~torch.isfinite(value)][0].item()} for training examples "
                     f"{shown[:20]}{more}")
    error = FloatingPointError(
        f"non-finite loss at fit step {step}: " + "; ".join(parts) + ". The fit stopped before this step's "
        "update: the operators and any checkpoint hold only the finite steps before it. Likely causes: NaN/inf "
        "weights or logits in the model (check the model, e.g. run it on these training examples) or a learning "
        "rate too high for these operators (lower lr=...).")
    error.step = step  # the step that failed (1-based, as in FitHistory.step)
    error.examples = bad_examples  # loss name -> training-example indices of its non-finite rows
    return error


def nonfinite_gradients(module: torch.nn.Module) -> list[str]:
    """Names of the parameters whose gradient holds a NaN or an infinity. One reduction per
    parameter and one host sync in all: a gradient's sum is finite exactly when its entries are
    (barring a float32 overflow of the sum itself, which would be a broken fit too)."""
    named = [(name, p.grad) for name, p in module.named_parameters() if p.grad is not None]
    if not named:
        return []
    finite = torch.isfinite(torch.stack([g.sum().float() for _, g in named])).tolist()
    return [name for (name, _), ok in zip(named, finite) if not ok]


def optimizer_settings(args: StrideArguments) -> dict[str, Any]:
    """AdamW's settings for the operators, local and remote alike: ``lr``, ``weight_decay`` and
    ``fused=True`` (one kernel for the whole update instead of a dozen elementwise passes over the
    ``K x r x V`` coefficients; torch's fused AdamW runs on CPU and CUDA). With the one-reduction
    gradient check (`nonfinite_gradients`) it cut the default cached fit from 29.0 to 18.2 plain
    passes over the corpus (`benchmarks/RESULTS-fit-cost.md`, run 3, same process)."""
    return {"lr": args.lr, "weight_decay": args.weight_decay, "fused": True}


def _loss_rows(fid_ex: np.ndarray, stab_ex: np.ndarray, probe: int, n_probe: int) -> dict[str, Any]:
    """Training-example indices behind each loss of one step (see `nonfinite_loss_error`)."""
    probe_rows = [probe] if n_probe else []
    return {"fidelity": fid_ex, "stability": stab_ex, "linearity": probe_rows,
            "total": np.concatenate([fid_ex, stab_ex, np.asarray(probe_rows, dtype=np.int64)])}


def candidate_seed(args: StrideArguments) -> int:
    """Seed of the ``fit_vocabulary`` draws (`operators.candidate_forward`, the activation cache)."""
    return int(args.seed) + 3


def fit_candidates(args: StrideArguments) -> Optional[int]:
    """The ``fit_vocabulary`` a fit with ``args`` uses: the setting for the logits placement,
    ``None`` (the whole vocabulary) for the others."""
    return args.fit_vocabulary if args.placement == "logits" else None


class OperatorFitter:
    """Trains ``operators`` on ``texts`` (already tokenized) under the STRIDE losses."""

    def __init__(
        self,
        backend: ModelBackend,
        operators: SteeringOperators,
        design: SubsetDesign,
        texts: TokenBatch,
        args: StrideArguments,
        *,
        identity: Optional[Mapping[str, Any]] = None,
        activations: Optional[ActivationCache] = None,
        head: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
    ) -> None:
        if len(texts) != design.n_examples:
            raise ValueError(f"design is for {design.n_examples} examples but {len(texts)} texts were given")
        self.backend = backend
        self.operators = operators
        self.design = design
        self.texts = texts
        self.args = args
        membership = design.membership
        csc = membership.tocsc()
        self.example_subsets = np.stack(
            [csc.indices[csc.indptr[j]: csc.indptr[j + 1]] for j in range(design.n_examples)]
        )  # [n, d]
        self.subset_members = [membership.indices[membership.indptr[k]: membership.indptr[k + 1]]
                               for k in range(design.n_subsets)]
        # subsets that leave some example out (stability rows need one); None when all do
        open_subsets = np.array([k for k, m in enumerate(self.subset_members) if len(m) < design.n_examples],
                                dtype=np.int64)
        self.open_subsets = None if len(open_subsets) == design.n_subsets else open_subsets
        projection = jl_projection(design.n_examples, args.sketch_dim, args.seed + 2).numpy()
        self.sketch = torch.from_numpy(np.asarray(membership @ projection, dtype=np.float32))  # [K, q]
        self.generator = torch.Generator().manual_seed(args.seed + 1)
        self.candidate_seed = candidate_seed(args)
        self.sparse_gradients = fit_candidates(args) is not None
        self.optimizer = torch.optim.AdamW(operators.parameters(), **optimizer_settings(args))
        self.history = FitHistory()
        self.step = 0
        self.n_steps = args.fit_steps(design.n_examples)  # the target step count
        if activations is not None and (activations.layer != operators.layer
                                        or operators.placement not in READ_ONLY_PLACEMENTS):
            raise ValueError(f"the activation cache holds layer {activations.layer} for the logits and head "
                             f"placements; these operators are {operators.placement!r} at layer {operators.layer}")
        if activations is not None and activations.candidates is not None and (
                fit_candidates(args) != activations.candidates
                or activations.identity.get("candidate seed") != candidate_seed(args)):
            raise ValueError(f"the activation cache holds fit_vocabulary={activations.candidates} candidates (seed "
                             f"{activations.identity.get('candidate seed')}); this fit has fit_vocabulary="
                             f"{fit_candidates(args)} (seed {candidate_seed(args)}): build the cache with this "
                             "fit's settings")
        if operators.placement == "head" and head is None:
            head = activations.head if activations is not None else head_function(backend)
        self.head = head
        self.activations = activations
        self._identity_extra = {"forward": "live" if activations is None else f"activation cache {activations.dtype}",
                                **dict(identity or {})}
        self._identity: Optional[dict[str, Any]] = None

    def run_identity(self) -> dict[str, Any]:
        """What makes two fits the same run (a checkpoint resumes only on an exact match):
        every setting not in ``NOT_IN_RUN_IDENTITY``, the operators' shape settings, the
        subset design, a hash of the tokenized corpus, plus the ``identity`` entries given to
        the constructor (``Stride.fit``: corpus hash over texts and ids, model fingerprint)."""
        if self._identity is None:
            ident: dict[str, Any] = {f"setting {k}": v for k, v in self.args.to_dict().items()
                                     if k not in NOT_IN_RUN_IDENTITY}
            ident.update({f"operators {k}": v for k, v in self.operators.settings().items()})
            ident.update({f"design {k}": v for k, v in self.design.to_dict().items()})
            ident["tokens"] = tokens_hash(self.texts)
            ident.update(self._identity_extra)
            storage.json_safe(ident, "run identity")  # refuses values a checkpoint cannot hold
            self._identity = ident
        return self._identity

    # ----------------------------------------------------------------- sampling
    def _randint(self, high: int, size: int) -> np.ndarray:
        return torch.randint(0, high, (size,), generator=self.generator).numpy()

    def sample_rows(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, int, np.ndarray]:
        """Draw one step's rows: (fidelity examples, their operators, stability examples,
        their operators, probe example, probe operators).

        ``sampling="document"``: ``args.documents_per_step()`` distinct documents, each repeated
        ``d`` times as fidelity rows (under each of its subsets' operators) and ``d`` times as
        stability rows (under operators drawn uniformly, with replacement, among the subsets
        that leave it out; none when every subset holds it); ``"membership"``: see
        `_sample_memberships`."""
        if self.args.sampling == "membership":
            return self._sample_memberships()
        K, n, d = self.design.n_subsets, self.design.n_examples, self.design.subsets_per_example
        docs = torch.randperm(n, generator=self.generator)[: self.args.documents_per_step()].numpy().astype(np.int64)
        fid_ex = np.repeat(docs, d)
        fid_ops = self.example_subsets[docs].reshape(-1).astype(np.int64)
        stab_ex_parts, stab_ops_parts = [], []
        if d < K:
            for j in docs:
                outside = np.setdiff1d(np.arange(K), self.example_subsets[j], assume_unique=True)
                stab_ops_parts.append(outside[self._randint(len(outside), d)])
                stab_ex_parts.append(np.full(d, j, dtype=np.int64))
        stab_ex = np.concatenate(stab_ex_parts) if stab_ex_parts else np.empty(0, dtype=np.int64)
        stab_ops = np.concatenate(stab_ops_parts).astype(np.int64) if stab_ops_parts else np.empty(0, dtype=np.int64)
        probe, probe_ops = self._sample_probe()
        return fid_ex, fid_ops, stab_ex, stab_ops, probe, probe_ops

    def _sample_probe(self) -> tuple[int, np.ndarray]:
        """The linearity probe: one random example and ``linearity_operators`` distinct operators
        (none when the linearity loss is off)."""
        K, n = self.design.n_subsets, self.design.n_examples
        probe = int(self._randint(n, 1)[0])
        n_probe = min(self.args.linearity_operators, K) if self.args.linearity_weight > 0 else 0
        probe_ops = torch.randperm(K, generator=self.generator)[:n_probe].numpy()
        return probe, probe_ops

    def _sample_memberships(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, int, np.ndarray]:
        """``sampling="membership"``: ``batch_size // 2`` fidelity rows, each a random subset and
        one random member; the other half stability rows, each a random subset (among those that
        leave some example out) and one random non-member."""
        K, n = self.design.n_subsets, self.design.n_examples
        n_fid = max(1, self.args.batch_size // 2)
        open_subsets = self.open_subsets
        n_stab = self.args.batch_size - n_fid if n > 1 and (open_subsets is None or len(open_subsets)) else 0
        fid_ops = self._randint(K, n_fid)
        fid_ex = np.array([m[self._randint(len(m), 1)[0]] for m in (self.subset_members[k] for k in fid_ops)],
                          dtype=np.int64)
        if open_subsets is None:
            stab_ops = self._randint(K, n_stab)
        elif n_stab == 0:  # d == K: every subset holds every example, no stability rows
            stab_ops = np.empty(0, dtype=np.int64)
        else:  # some subset holds every example: draw stability operators among the others
            stab_ops = open_subsets[self._randint(len(open_subsets), n_stab)]
        stab_ex = np.empty(n_stab, dtype=np.int64)
        for i, k in enumerate(stab_ops):
            for _ in range(100):
                j = int(self._randint(n, 1)[0])
                if k not in self.example_subsets[j]:
                    break
            else:  # a nearly full subset: draw among its non-members directly
                outside = np.setdiff1d(np.arange(n), self.subset_members[k])
                j = int(outside[self._randint(len(outside), 1)[0]])
            stab_ex[i] = j
        probe, probe_ops = self._sample_probe()
        return fid_ex, fid_ops, stab_ex, stab_ops, probe, probe_ops

    def sample_positions(self, batch: TokenBatch, n_fidelity: int, n_stability: int,
                         n_probe: int) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        """The logits positions each row's losses read this step: ``(positions [b, m] long,
        valid [b, m] bool)`` with ``m = min(loss_positions, t)``, or ``(None, None)`` (every
        position) when ``loss_positions`` is ``None``.

        Each row draws ``loss_positions`` of its candidate positions (`loss_candidates`: the
        positions predicting a loss target; for stability rows every real token) uniformly
        without replacement from the fit's generator; a row with fewer candidates keeps them
        all. The probe rows (one example under several operators) share one draw, so their
        responses are compared on the same tokens."""
        m = self.args.loss_positions
        if m is None:
            return None, None
        cand = loss_candidates(batch.input_ids, batch.attention_mask, batch.loss_mask, n_fidelity, n_stability)
        cand = cand.cpu()
        b, t = cand.shape
        m = min(int(m), t)
        keys = torch.rand(b, t, generator=self.generator)
        keys[~cand] = 2.0  # candidates first, in random order
        positions = keys.argsort(dim=1, stable=True)[:, :m]
        valid = cand.gather(1, positions)
        if n_probe:
            probe = n_fidelity + n_stability
            positions[probe:] = positions[probe]
            valid[probe:] = valid[probe]
        return positions, valid

    # --------------------------------------------------------------------- step
    def _local_rows(self, n_fid: int, n_stab: int, n_probe: int) -> tuple[np.ndarray, int, int, int]:
        """This rank's share of a step's rows (positions in the step's row order) and its counts
        of fidelity, stability and probe rows: a strided slice of the fidelity and of the
        stability rows; the probe rows (one loss over all of them) stay together on rank 0."""
        rank, world = distributed.rank_and_world()
        if world == 1:
            return np.arange(n_fid + n_stab + n_probe), n_fid, n_stab, n_probe
        if n_fid < world:
            raise ValueError(f"a fit step has {n_fid} fidelity rows, fewer than the {world} processes: raise "
                             "batch_size (it must give every process at least one row) or use fewer processes")
        fid = np.arange(rank, n_fid, world)
        stab = n_fid + np.arange(rank, n_stab, world)
        probe = n_fid + n_stab + np.arange(n_probe) if rank == 0 else np.empty(0, dtype=np.int64)
        return np.concatenate([fid, stab, probe]).astype(np.int64), len(fid), len(stab), len(probe)

    def train_step(self) -> dict[str, float]:
        args, backend, ops = self.args, self.backend, self.operators
        fid_ex, fid_ops, stab_ex, stab_ops, probe, probe_ops = self.sample_rows()
        n_fid, n_stab, n_probe = len(fid_ex), len(stab_ex), len(probe_ops)
        examples = np.concatenate([fid_ex, stab_ex, np.full(n_probe, probe, dtype=np.int64)])
        op_ids = torch.from_numpy(np.concatenate([fid_ops, stab_ops, probe_ops]).astype(np.int64))
        batch = self.texts.rows(examples)
        positions, valid = self.sample_positions(batch, n_fid, n_stab, n_probe)
        # data parallel (torch.distributed): every rank drew the same rows; it keeps its share
        world = distributed.rank_and_world()[1]
        all_counts = (n_fid, n_stab, n_probe)
        if world > 1:
            keep, n_fid, n_stab, n_probe = self._local_rows(n_fid, n_stab, n_probe)
            examples, op_ids = examples[keep], op_ids[torch.from_numpy(keep)]
            probe_ops = probe_ops[:n_probe]
            fid_ex, stab_ex = fid_ex[keep[:n_fid]], stab_ex[keep[n_fid: n_fid + n_stab] - all_counts[0]]
            batch = self.texts.rows(examples)
            if positions is not None:
                positions, valid = positions[torch.from_numpy(keep)], valid[torch.from_numpy(keep)]
        batch = batch.to(backend.device)                 # the model's input device
        op_device = module_device(ops)                   # the steered block's device
        op_ids = op_ids.to(op_device)
        ops.train()

        sketch = self.sketch[torch.from_numpy(probe_ops)] if n_probe else None

        if self.activations is not None:  # the frozen model's activations, read from disk
            forward = self.activations.forward_for(examples, device=op_device)
        else:
            def live(input_ids, attention_mask, edit, head_input=False):
                if head_input:  # head placement: the output head's input, read in the same single forward
                    z, h, _ = read_activations(backend, input_ids, attention_mask, ops.layer)
                    return h, z
                return backend.forward(input_ids, attention_mask, ops.layer, edit=edit)

            forward = shared_rows_forward(live, torch.from_numpy(examples))  # one forward per distinct document
        if fit_candidates(args) is not None and not getattr(forward, "candidates", False):
            # the losses on each token's candidates (a cache built with them serves them directly)
            forward = candidate_forward(forward, torch.from_numpy(examples), args.fit_vocabulary,
                                        self.candidate_seed)

        loss, fidelity, stability, linearity = step_losses(
            forward, ops, batch.input_ids, batch.attention_mask, batch.loss_mask, op_ids, sketch,
            n_fid, n_stab, (args.fidelity_weight, args.stability_weight, args.linearity_weight), args.ridge,
            positions, valid, self.head)
        error = nonfinite_loss_error(self.step + 1, {"total": loss, "fidelity": fidelity, "stability": stability,
                                                     "linearity": linearity},
                                     _loss_rows(fid_ex, stab_ex, probe, n_probe))
        if world > 1:
            # this rank's part of the single-process loss: row sums over the whole step's counts
            w_f, w_s, w_l = args.fidelity_weight, args.stability_weight, args.linearity_weight
            loss = w_f * fidelity.sum() / all_counts[0]
            if all_counts[1]:
                loss = loss + w_s * stability.sum() / all_counts[1]
            if n_probe:
                loss = loss + w_l * linearity
            failed = distributed.all_reduce_sum(torch.tensor([float(error is not None)], device=loss.device))
            if error is None and float(failed[0]) > 0:
                error = FloatingPointError(f"non-finite STRIDE loss at fit step {self.step + 1} on another process; "
                                           "the fit stopped before this step's update (see that process's error)")
        if error is not None:
            raise error
        if self.sparse_gradients:
            # candidate fits: dense .grad buffers kept and zeroed in place; the coefficients' sparse
            # gradient (operators.GatherColumns) is added into them, no K x r x V gradient allocated
            for p in ops.parameters():
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
            self.optimizer.zero_grad(set_to_none=False)
        else:
            self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if world > 1:
            distributed.all_reduce_gradients(ops.parameters())
        bad = nonfinite_gradients(ops)
        if bad:
            raise FloatingPointError(
                f"non-finite gradient at fit step {self.step + 1} (operator parameters {', '.join(bad)}) although the "
                "losses are finite; the fit stopped before this step's update. Lower lr=..., or check the model's "
                "logits for overflow (e.g. fp16)")
        if world > 1:  # the whole step's losses, as one process would record them
            sums = distributed.all_reduce_sum(torch.stack([  # on the loss's device (NCCL needs GPU tensors)
                loss.detach().float(), fidelity.detach().float().sum(), stability.detach().float().sum(),
                linearity.detach().float() if n_probe else loss.new_zeros((), dtype=torch.float32)]))
            record = {"total": float(sums[0]), "fidelity": float(sums[1]) / all_counts[0],
                      "stability": float(sums[2]) / all_counts[1] if all_counts[1] else 0.0,
                      "linearity": float(sums[3])}
        else:
            record = {
                "total": float(loss.detach()),
                "fidelity": float(fidelity.detach().mean()),
                "stability": float(stability.detach().mean()) if n_stab else 0.0,
                "linearity": float(linearity.detach()),
            }
        with interrupts_deferred():  # update, step count and loss curve change together or not at all
            self.optimizer.step()
            self.step += 1
            self.history.append(self.step, **record)
        return record

    # --------------------------------------------------------------- checkpoint
    def state_dict(self) -> dict:
        return {
            "step": self.step,
            "operators": self.operators.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "generator": self.generator.get_state(),
            "history": self.history.to_dict(),
            "args": self.args.to_dict(),
            "design": self.design.to_dict(),
            "identity": self.run_identity(),
            "n_steps": self.n_steps,
        }

    def check_state(self, state: Mapping[str, Any], source: Any = None) -> None:
        """Raise ``CheckpointMismatchError`` unless ``state`` (a ``state_dict``) belongs to
        this run (same ``run_identity``) and is not beyond this fit's ``n_steps``."""
        where = f"the checkpoint {source}" if source is not None else "the checkpoint"
        stored = state.get("identity")
        if not isinstance(stored, Mapping):
            raise CheckpointMismatchError(
                f"{where} has no run identity (it was written by an older stride-nnsight), so it cannot be checked "
                f"against this run's corpus, model and settings: {_START_OVER}")
        differences = identity_differences(stored, self.run_identity())
        if differences:
            raise CheckpointMismatchError(
                f"{where} belongs to a different run: {'; '.join(differences)}. Resuming would mix two runs: "
                f"{_START_OVER}")
        step = int(state["step"])
        if step > self.n_steps:
            raise CheckpointMismatchError(
                f"{where} is at step {step}, beyond the {self.n_steps} steps this fit plans: set steps >= {step} "
                f"to continue it, or {_START_OVER}")

    def load_state_dict(self, state: Mapping[str, Any], source: Any = None) -> None:
        """Restore a ``state_dict`` after ``check_state`` (same run identity)."""
        self.check_state(state, source)
        self.operators.load_state_dict(state["operators"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.generator.set_state(state["generator"])
        self.history = FitHistory.from_dict(state["history"])
        self.step = int(state["step"])

    def save_checkpoint(self, directory: Path, extra: Optional[Mapping[str, Any]] = None) -> Path:
        """Write ``state_dict()`` (plus ``extra`` entries) to ``directory`` (atomic)."""
        state = self.state_dict()
        state.update(extra or {})
        return storage.save(Path(directory) / CHECKPOINT_NAME, CHECKPOINT_KIND, state)

    def resume(self, directory: Optional[Path], overwrite: bool = False) -> Optional[dict[str, Any]]:
        """Load the checkpoint in ``directory`` if there is one (returns its content), after
        checking it belongs to this run. ``overwrite=True`` deletes it instead (start over)."""
        if directory is None:
            return None
        if overwrite:
            self.discard_checkpoint(directory)
            return None
        path = storage.find(directory, CHECKPOINT_NAME, LEGACY_CHECKPOINT_NAME)
        if path is None:
            return None
        state = storage.load(path, CHECKPOINT_KIND, required=CHECKPOINT_KEYS)
        self.load_state_dict(state, source=path)
        return state

    @staticmethod
    def checkpoint_forward(directory: Path) -> Optional[str]:
        """The forward (``"live"`` or ``"activation cache <dtype>"``) recorded by the checkpoint in
        ``directory``, or ``None`` when there is none or it cannot be read (the resume then
        reports the problem)."""
        path = storage.find(directory, CHECKPOINT_NAME, LEGACY_CHECKPOINT_NAME)
        if path is None:
            return None
        try:
            identity = storage.load(path, CHECKPOINT_KIND).get("identity")
        except Exception:
            return None
        forward = identity.get("forward") if isinstance(identity, Mapping) else None
        return forward if isinstance(forward, str) else None

    @staticmethod
    def discard_checkpoint(directory: Path) -> None:
        storage.remove(Path(directory) / CHECKPOINT_NAME)
        storage.remove_files(Path(directory), [LEGACY_CHECKPOINT_NAME])

    # ---------------------------------------------------------------------- run
    def run(self, progress: bool = True, checkpoint_dir: Optional[str | os.PathLike] = None, *,
            overwrite: bool = False) -> FitHistory:
        """Train until ``n_steps`` (``args.fit_steps(n)``); resume from ``checkpoint_dir`` if it
        holds a checkpoint of the same run (``CheckpointMismatchError`` if it holds another
        run's; ``overwrite=True`` discards it and starts over)."""
        directory = Path(checkpoint_dir) if checkpoint_dir is not None else None
        main = distributed.is_main_process()
        if overwrite and directory is not None:
            if main:
                self.discard_checkpoint(directory)
            distributed.barrier()
        self.resume(directory, overwrite=False)
        writes = directory if main else None  # under torch.distributed only rank 0 writes checkpoints
        initial = [p.detach().clone() for p in self.operators.parameters()]
        start = self.step
        bar = tqdm(total=self.n_steps, initial=self.step, disable=not (progress and main),
                   desc="fitting STRIDE operators")
        try:
            while self.step < self.n_steps:
                before, sampler = self.step, self.generator.get_state()
                try:
                    record = self.train_step()
                except BaseException:
                    if self.step == before:  # the step did not happen: undo its sampling too
                        self.generator.set_state(sampler)
                    raise
                bar.update(1)
                bar.set_postfix(fid=f"{record['fidelity']:.3f}", stab=f"{record['stability']:.4f}")
                if writes is not None and self.step % self.args.checkpoint_every == 0:
                    self.save_checkpoint(writes)
        except KeyboardInterrupt:
            if writes is not None:
                self.save_checkpoint(writes)
                bar.write(f"interrupted at step {self.step}; progress saved to {writes}. Call fit() again to resume.")
            raise
        finally:
            bar.close()
        if writes is not None:
            self.save_checkpoint(writes)
        distributed.barrier()  # every rank returns once the final checkpoint is written
        if self.step > start and not any(
                not torch.equal(a, b.detach()) for a, b in zip(initial, self.operators.parameters())):
            raise RuntimeError("fitting ran but no operator parameter changed: gradients are not reaching "
                               "the operators (is the edit applied inside the trace?)")
        self.operators.eval()
        return self.history
