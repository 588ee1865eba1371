"""``python -m benchmarks.state_truncation``: how much of a trained logits-placement state LDS needs.

Fits STRIDE once on the public benchmark with ``rank=8`` (every column: ``max_state_mb=None``),
then replaces the ``[K r, V]`` coefficient matrix by its best rank-``m`` approximation (SVD) for
m = 64 ... 512 and re-measures LDS each time (paired 95% CI over queries against the untruncated
state). A factored parameterisation ``a_k = U_k P`` with a token basis ``P`` of width ``m``
shared by all operators can at best do what the truncation does, so this bounds that idea
without building it (docs/method.md, "State cap"). Prints the load; run it alone with
OMP_NUM_THREADS=1. No timings are reported.
"""

from __future__ import annotations

import copy
import os
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

from benchmarks.compare_settings import public_bench  # noqa: E402
from stride_nnsight import Stride  # noqa: E402
from stride_nnsight.evaluation import bootstrap_ci, lds  # noqa: E402

RANKS = (64, 128, 256, 512)


def truncation_basis(coefficients: torch.Tensor) -> tuple:
    """SVD of the ``[K, r, V]`` coefficients read as a ``[K r, V]`` matrix, in float64:
    ``(U, S, Vh, energy)`` with ``energy[m - 1]`` the share of the squared norm in the top ``m``."""
    K, r, V = coefficients.shape
    U, S, Vh = torch.linalg.svd(coefficients.reshape(K * r, V).double(), full_matrices=False)
    return U, S, Vh, (S ** 2).cumsum(0) / (S ** 2).sum()


def truncated(U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor, m: int, shape: tuple) -> torch.Tensor:
    """The best rank-``m`` approximation (Eckart-Young) of the matrix `truncation_basis` split,
    reshaped to the coefficients' ``shape``, float32."""
    return ((U[:, :m] * S[:m]) @ Vh[:m]).reshape(shape).float()


def main() -> None:
    from nnsight import TransformersModel

    print(f"load before: {os.getloadavg()}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}", flush=True)
    bench = public_bench()
    lm = TransformersModel(bench["model"], tokenizer=copy.deepcopy(bench["tokenizer"]), task="text-generation")
    stride = Stride(lm, rank=8, max_state_mb=None, **bench["stride_kwargs"]).fit(bench["documents"], progress=False)
    kinds = np.asarray(bench["kinds"])

    def per_query() -> np.ndarray:
        scores = stride.attribute(bench["prompts"], bench["completions"], progress=False).scores.numpy()
        result = lds(scores, bench["truth"].masks, bench["truth"].losses, n_boot=10)
        return np.nan_to_num(np.asarray(result.per_query, dtype=float))

    def line(label: str, pq: np.ndarray, base: np.ndarray) -> str:
        lo, hi = bootstrap_ci(pq - base, 0.95, 1000, 0)
        return (f"| {label} | {pq.mean():.3f} | {pq[kinds == 'fact'].mean():.3f} | {pq[kinds == 'text'].mean():.3f} | "
                f"{(pq - base).mean():+.3f} [{lo:+.3f}, {hi:+.3f}] |")

    full = stride.operators.coefficients.detach().clone()
    K, r, V = full.shape
    base = per_query()
    U, S, Vh, energy = truncation_basis(full)
    rows = ["| state | LDS | LDS fact | LDS text | LDS - full [95% CI, queries] |", "|---|---|---|---|---|",
            line(f"full (K={K}, r={r}, V={V}: matrix rank up to {min(K * r, V)})", base, base)]
    for m in RANKS:
        with torch.no_grad():
            stride.operators.coefficients.copy_(truncated(U, S, Vh, m, (K, r, V)))
        rows.append(line(f"best rank {m} (energy {float(energy[m - 1]):.3f})", per_query(), base))
    with torch.no_grad():
        stride.operators.coefficients.copy_(full)
    print("\n".join(rows))
    print(f"load after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
