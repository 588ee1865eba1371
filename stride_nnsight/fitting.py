"""Training the steering operators (the base model stays frozen).

One optimiser step draws, for ``batch_size // 2`` random subsets, one member example
each (fidelity rows) and, for the other half, one example *outside* the drawn subset
(stability rows); all rows go through one steered forward pass, each row carrying its
own operator. A linearity probe adds ``linearity_operators`` rows: one random training
example under that many random operators. See docs/method.md for the reasoning.

Fitting is resumable: with a checkpoint directory, the operators, optimiser, sampler
state and loss curve are written every ``checkpoint_every`` steps and when the run is
interrupted (Ctrl-C); calling ``fit`` again picks up at the last written step.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from tqdm.auto import tqdm

from .arguments import StrideArguments
from .backends.base import ModelBackend
from .design import SubsetDesign
from .inputs import TokenBatch
from .operators import SteeringOperators, jl_projection, step_losses

__all__ = ["FitHistory", "OperatorFitter", "CHECKPOINT_NAME"]

CHECKPOINT_NAME = "fit_checkpoint.pt"


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


class OperatorFitter:
    """Trains ``operators`` on ``texts`` (already tokenized) under the STRIDE losses."""

    def __init__(
        self,
        backend: ModelBackend,
        operators: SteeringOperators,
        design: SubsetDesign,
        texts: TokenBatch,
        args: StrideArguments,
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
        projection = jl_projection(design.n_examples, args.sketch_dim, args.seed + 2).numpy()
        self.sketch = torch.from_numpy(np.asarray(membership @ projection, dtype=np.float32))  # [K, q]
        self.generator = torch.Generator().manual_seed(args.seed + 1)
        self.optimizer = torch.optim.AdamW(operators.parameters(), lr=args.lr, weight_decay=args.weight_decay)
        self.history = FitHistory()
        self.step = 0
        self.n_steps = args.fit_steps(design.n_examples)  # the target step count

    # ----------------------------------------------------------------- sampling
    def _randint(self, high: int, size: int) -> np.ndarray:
        return torch.randint(0, high, (size,), generator=self.generator).numpy()

    def sample_rows(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, int, np.ndarray]:
        """Draw one step's rows: (fidelity examples, their operators, stability examples,
        their operators, probe example, probe operators)."""
        K, n = self.design.n_subsets, self.design.n_examples
        n_fid = max(1, self.args.batch_size // 2)
        n_stab = self.args.batch_size - n_fid if n > 1 else 0
        fid_ops = self._randint(K, n_fid)
        fid_ex = np.array([m[self._randint(len(m), 1)[0]] for m in (self.subset_members[k] for k in fid_ops)],
                          dtype=np.int64)
        stab_ops = self._randint(K, n_stab)
        stab_ex = np.empty(n_stab, dtype=np.int64)
        for i, k in enumerate(stab_ops):
            for _ in range(100):
                j = int(self._randint(n, 1)[0])
                if k not in self.example_subsets[j]:
                    break
            stab_ex[i] = j
        probe = int(self._randint(n, 1)[0])
        n_probe = min(self.args.linearity_operators, K) if self.args.linearity_weight > 0 else 0
        probe_ops = torch.randperm(K, generator=self.generator)[:n_probe].numpy()
        return fid_ex, fid_ops, stab_ex, stab_ops, probe, probe_ops

    # --------------------------------------------------------------------- step
    def train_step(self) -> dict[str, float]:
        args, backend, ops = self.args, self.backend, self.operators
        fid_ex, fid_ops, stab_ex, stab_ops, probe, probe_ops = self.sample_rows()
        n_fid, n_stab, n_probe = len(fid_ex), len(stab_ex), len(probe_ops)
        examples = np.concatenate([fid_ex, stab_ex, np.full(n_probe, probe, dtype=np.int64)])
        op_ids = torch.from_numpy(np.concatenate([fid_ops, stab_ops, probe_ops]).astype(np.int64))
        batch = self.texts.rows(examples).to(backend.device)
        op_ids = op_ids.to(backend.device)
        ops.train()

        sketch = self.sketch[torch.from_numpy(probe_ops)] if n_probe else None

        def forward(input_ids, attention_mask, edit):
            return backend.forward(input_ids, attention_mask, ops.layer, edit=edit)

        loss, fidelity, stability, linearity = step_losses(
            forward, ops, batch.input_ids, batch.attention_mask, batch.loss_mask, op_ids, sketch,
            n_fid, n_stab, (args.fidelity_weight, args.stability_weight, args.linearity_weight), args.ridge)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.step += 1
        record = {
            "total": float(loss.detach()),
            "fidelity": float(fidelity.detach().mean()),
            "stability": float(stability.detach().mean()) if n_stab else 0.0,
            "linearity": float(linearity.detach()),
        }
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
        }

    def load_state_dict(self, state: dict) -> None:
        if state["design"] != self.design.to_dict():
            raise ValueError(
                "checkpoint was written for a different subset design "
                f"({state['design']} vs {self.design.to_dict()}); use another checkpoint_dir or delete it"
            )
        self.step = int(state["step"])
        self.operators.load_state_dict(state["operators"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.generator.set_state(state["generator"])
        self.history = FitHistory.from_dict(state["history"])

    def save_checkpoint(self, directory: Path) -> Path:
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / CHECKPOINT_NAME
        tmp = path.with_suffix(".tmp")
        torch.save(self.state_dict(), tmp)
        os.replace(tmp, path)
        return path

    # ---------------------------------------------------------------------- run
    def run(self, progress: bool = True, checkpoint_dir: Optional[str | os.PathLike] = None) -> FitHistory:
        """Train until ``n_steps`` (``args.fit_steps(n)``); resume from ``checkpoint_dir`` if it holds a checkpoint."""
        directory = Path(checkpoint_dir) if checkpoint_dir is not None else None
        if directory is not None and (directory / CHECKPOINT_NAME).exists():
            self.load_state_dict(torch.load(directory / CHECKPOINT_NAME, weights_only=False))
        initial = [p.detach().clone() for p in self.operators.parameters()]
        start = self.step
        bar = tqdm(total=self.n_steps, initial=self.step, disable=not progress, desc="fitting STRIDE operators")
        try:
            while self.step < self.n_steps:
                record = self.train_step()
                bar.update(1)
                bar.set_postfix(fid=f"{record['fidelity']:.3f}", stab=f"{record['stability']:.4f}")
                if directory is not None and self.step % self.args.checkpoint_every == 0:
                    self.save_checkpoint(directory)
        except KeyboardInterrupt:
            if directory is not None:
                self.save_checkpoint(directory)
                bar.write(f"interrupted at step {self.step}; progress saved to {directory}. Call fit() again to resume.")
            raise
        finally:
            bar.close()
        if directory is not None:
            self.save_checkpoint(directory)
        if self.step > start and not any(
                not torch.equal(a, b.detach()) for a, b in zip(initial, self.operators.parameters())):
            raise RuntimeError("fitting ran but no operator parameter changed: gradients are not reaching "
                               "the operators (is the edit applied inside the trace?)")
        self.operators.eval()
        return self.history
