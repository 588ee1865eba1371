"""``python -m benchmarks.recovery_variants``: is STRIDE's sparse recovery too sparse for diffuse influence?

A hypothesis for the held-out benchmark's weak scripture queries (docs/method.md, "How the
defaults hold on data nobody tuned on") was that their influence is spread over many passages,
which the Lasso (at most K non-zeros, in practice ~50 per query) cannot express. This script tests
it on the public (dev) benchmark, whose text queries are verse continuations: one default fit,
its measurements ``y [q, K]`` kept, and recoveries of different density from the *same* ``y``:

* the Lasso at other penalty fractions (denser: 0.1, 0.2; sparser: 0.5);
* dense estimators: ridge regression (alpha 1, 10, 100) and the subset average (each document's
  mean centred measurement over the subsets holding it);
* the Lasso plus a small dense ridge component (``0.01`` or ``0.1`` of the row's largest Lasso
  score times the ridge row scaled to a maximum of 1), which only ranks the documents the Lasso
  left at zero;
* the elastic net (l1 ratio 0.5 and 0.1, penalty ``0.3 lambda_max / l1_ratio``).

LDS per variant with the paired 95% CI of its difference to the default Lasso (resampling queries
and retrained models), for all queries and for the text queries alone, and fact recall@10; the
library's whole default recovery (the Lasso, then the token component: ``recovery="lasso+tokens"``)
is the second row. Writes
``benchmarks/RESULTS-recovery-variants.md``. Cost: one default fit (~4 min on one thread).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

OUT = Path(__file__).resolve().parent / "RESULTS-recovery-variants.md"


def ridge_rows(y: np.ndarray, membership, alpha: float) -> np.ndarray:
    """Per query, ``argmin_w ||y_c - M_c w||^2 + alpha ||w||^2`` (centred over the K subsets):
    ``w = M_c^T (M_c M_c^T + alpha I)^-1 y_c``. Returns ``[q, n]``."""
    M = np.asarray(membership.toarray(), dtype=np.float64)
    Mc = M - M.mean(0, keepdims=True)
    yc = y - y.mean(1, keepdims=True)
    G = Mc @ Mc.T
    return np.linalg.solve(G + alpha * np.eye(G.shape[0]), yc.T).T @ Mc


def subset_average(y: np.ndarray, membership) -> np.ndarray:
    """Each document's mean centred measurement over the subsets that hold it. ``[q, n]``."""
    M = np.asarray(membership.toarray(), dtype=np.float64)
    return ((y - y.mean(1, keepdims=True)) @ M) / M.sum(0)


def elastic_net_rows(y: np.ndarray, membership, l1_ratio: float, fraction: float = 0.3) -> np.ndarray:
    from sklearn.linear_model import ElasticNet

    from stride_nnsight.recovery import lambda_max

    X = np.asarray(membership.toarray(), dtype=np.float64)
    rows = []
    for row in y:
        alpha = fraction * lambda_max(row, membership) / l1_ratio
        rows.append(ElasticNet(alpha=alpha, l1_ratio=l1_ratio, fit_intercept=True, max_iter=5000).fit(X, row).coef_)
    return np.asarray(rows)


def variants(y: np.ndarray, membership, lasso: np.ndarray) -> dict[str, Callable[[], np.ndarray]]:
    from stride_nnsight.recovery import recover

    def fraction(f: float) -> Callable[[], np.ndarray]:
        return lambda: np.asarray(recover(y, membership, "fraction", f, True, progress=False)[0])

    def lasso_plus(alpha: float, eps: float) -> Callable[[], np.ndarray]:
        def make() -> np.ndarray:
            w = ridge_rows(y, membership, alpha)
            w = w / np.maximum(np.abs(w).max(1, keepdims=True), 1e-12)
            return lasso + eps * np.abs(lasso).max(1, keepdims=True) * w
        return make

    out: dict[str, Callable[[], np.ndarray]] = {}
    for f in (0.1, 0.2, 0.5):
        out[f"Lasso, fraction {f}"] = fraction(f)
    out["subset average (dense)"] = lambda: subset_average(y, membership)
    for alpha in (1.0, 10.0, 100.0):
        out[f"ridge, alpha {alpha:g} (dense)"] = (lambda a: lambda: ridge_rows(y, membership, a))(alpha)
    for eps in (0.01, 0.1):
        out[f"Lasso + {eps:g} x ridge (alpha 10)"] = lasso_plus(10.0, eps)
    for l1 in (0.5, 0.1):
        out[f"elastic net, l1 ratio {l1}"] = (lambda r: lambda: elastic_net_rows(y, membership, r))(l1)
    return out


def main(argv=None) -> str:
    from benchmarks.compare_settings import public_script
    from stride_nnsight import Stride
    from stride_nnsight.evaluation import fact_tracing, lds, paired_lds_ci
    from stride_nnsight.recovery import recover

    start = time.perf_counter()
    a, b, lm = public_script(argv, __doc__, OUT)
    stride = Stride(lm, **b["stride_kwargs"]).fit(b["documents"], progress=False)
    y = stride.measure(b["prompts"], b["completions"], progress=False)[0].numpy().astype(np.float64)
    membership = stride.design.membership
    kinds = np.asarray(b["kinds"])
    truth = b["truth"]
    base = np.asarray(recover(y, membership, stride.args.lambda_rule, stride.args.lambda_fraction, True,
                              progress=False)[0])
    # the library's whole default recovery (the Lasso, then the token component when the default has it)
    library = stride.attribute(b["prompts"], b["completions"], progress=False).scores.numpy().astype(np.float64)

    def row(name: str, scores: np.ndarray) -> str:
        r = lds(scores, truth.masks, truth.losses, n_boot=200)
        pq = np.nan_to_num(np.asarray(r.per_query, dtype=float))
        recall = fact_tracing(scores[kinds == "fact"], b["sources"], ks=(10,))["recall@10"]
        nonzero = float((scores != 0).sum(1).mean())
        cells = [name, f"{pq.mean():.3f}", f"{pq[kinds == 'fact'].mean():.3f}", f"{pq[kinds == 'text'].mean():.3f}",
                 f"{recall:.3f}", f"{nonzero:.0f}"]
        if scores is base:
            cells += ["–", "–"]
        else:
            for keep in (np.ones(len(kinds), bool), kinds == "text"):
                d, lo, hi = paired_lds_ci(scores[keep], base[keep], truth.masks,
                                          np.asarray(truth.losses)[..., keep], n_boot=1000)
                cells.append(f"{d:+.3f} [{lo:+.3f}, {hi:+.3f}]")
        return "| " + " | ".join(cells) + " |"

    lines = [
        "# Recovery variants on the same measurements (public benchmark)",
        "",
        f"Generated by `OMP_NUM_THREADS=1 python -m benchmarks.recovery_variants` on {time.strftime('%Y-%m-%d')}. "
        f"One default fit of the public benchmark ({len(b['documents'])} documents, {len(kinds)} queries: "
        f"{int((kinds == 'fact').sum())} planted facts, {int((kinds == 'text').sum())} verse continuations; LDS from "
        f"{truth.n_models} retrained models); every row recovers scores from the same measurements `y [q, K]`. "
        "Differences: paired 95% CI against the first row (the default Lasso, which the library's default "
        "recovery then adds its token component to: second row), resampling queries and retrained models.",
        "",
        "| recovery | LDS | LDS fact | LDS text | recall@10 | non-zeros / query | LDS - Lasso | "
        "LDS text - Lasso |",
        "|---|---|---|---|---|---|---|---|",
        row(f"Lasso, fraction {stride.args.lambda_fraction} (the default recovery's first stage)", base),
    ]
    if stride.args.recovery != "lasso":
        lines.append(row(f"library default (recovery={stride.args.recovery!r})", library))
    for name, make in variants(y, membership, base).items():
        lines.append(row(name, make()))
        print(lines[-1], flush=True)
    lines += ["", f"Wall time {time.perf_counter() - start:.0f} s; load average after: {os.getloadavg()[0]:.2f}."]
    report = "\n".join(lines) + "\n"
    print(report)
    Path(a.out).write_text(report)
    return report


if __name__ == "__main__":
    main()
