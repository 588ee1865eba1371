"""``python -m benchmarks.scaling_recovery``: how the Lasso recovery scales with the number of training examples.

For each ``n`` (default 1e3, 1e4, 1e5, 1e6) and each ``K`` (``--K`` when given, else the
library's default for that ``n``, ``StrideArguments.auto_subsets(n, d)``; and
``design.recommended_n_subsets(n, k)``), one row:

* a `SubsetDesign` ``(n, K, d)`` (its build time is reported);
* ``q`` synthetic queries: a planted ``k``-sparse influence vector each (random support, signs
  +-1, magnitudes uniform in [0.5, 1.5]), measurements ``y = M w + noise * N(0, 1) + shift``;
* the working-set solver (`stride_nnsight.recovery`, ``solver="working_set"``, sparse output,
  ``--jobs`` threads) on all ``q`` queries: wall time, time per query, peak RSS, precision@k
  of the recovered support (the k largest ``|score|`` against the planted support);
* the scikit-learn reference (``solver="reference"``, the pre-existing path) on the first
  ``--ref-queries`` queries when ``n <= --ref-max-n``, and the working-set solver again on the
  same queries with one thread: both times per query and their ratio (same process, same
  queries), the objective ``1/(2K)||y - M w - c||^2 + lambda ||w||_1`` (optimal intercept) of
  both, as the relative difference ``(ws - ref) / ref`` (negative: the working set is lower),
  and the reference's precision@k.

Each row runs in a fresh process (``--in-process`` to skip), so its peak RSS is its own:
``RSS base`` is the peak after the imports (torch included), ``RSS ws`` after the design,
the queries and the working-set run, ``RSS all`` after the reference too.
The machine load (``os.getloadavg``) and the thread settings are printed beside the table:
timings mean something only on an otherwise idle machine.

``--quick``: tiny sizes (seconds), the smoke test of this script, not a measurement.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import math
import multiprocessing as mp
import os
import platform
import resource
import sys
import time
from dataclasses import asdict, dataclass
from typing import Optional

import numpy as np

DEFAULT_NS = (1_000, 10_000, 100_000, 1_000_000)
QUICK_NS = (300, 3_000)

COLUMNS = [
    ("n", "n"), ("K", "K"), ("q", "q"), ("base_rss_gb", "RSS base GB"), ("design_s", "design s"),
    ("ws_wall_s", "ws wall s"), ("ws_ms_per_query", "ws ms/query"), ("ws_rss_gb", "RSS ws GB"),
    ("ws_precision", "ws prec@k"), ("ws_nnz_per_query", "ws nnz/query"), ("ws_not_converged", "ws not conv."),
    ("ref_q", "ref q"), ("ref_ms_per_query", "ref ms/query"),
    ("ws_same_ms_per_query", "ws ms/query (same q, 1 thread)"),
    ("speedup", "ref / ws"), ("obj_rel_min", "obj (ws-ref)/ref min"), ("obj_rel_max", "obj (ws-ref)/ref max"),
    ("ref_precision", "ref prec@k"), ("rss_all_gb", "RSS all GB"),
]


@dataclass
class Row:
    n: int
    K: int
    q: int
    base_rss_gb: float = math.nan
    design_s: float = math.nan
    ws_wall_s: float = math.nan
    ws_ms_per_query: float = math.nan
    ws_rss_gb: float = math.nan
    ws_precision: float = math.nan
    ws_nnz_per_query: float = math.nan
    ws_not_converged: int = 0
    ref_q: int = 0
    ref_ms_per_query: float = math.nan
    ws_same_ms_per_query: float = math.nan
    speedup: float = math.nan
    obj_rel_min: float = math.nan
    obj_rel_max: float = math.nan
    ref_precision: float = math.nan
    rss_all_gb: float = math.nan


@dataclass(frozen=True)
class Config:
    ns: tuple[int, ...]
    K: int
    k: int
    d: int
    q: int
    ref_queries: int
    ref_max_n: int
    noise: float
    fraction: float
    jobs: int
    seed: int


def _peak_rss_gb() -> float:
    """Peak resident set size of this process so far, GB (``ru_maxrss`` is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1e9 if sys.platform == "darwin" else 1e6)


def planted_queries(membership, q: int, k: int, noise: float, seed: int):
    """``y [q, K]`` and the planted supports ``[q, k]`` (int64) for a design ``M [K, n]``."""
    rng = np.random.default_rng(seed)
    K, n = membership.shape
    k = min(k, n)
    supports = np.stack([rng.choice(n, k, replace=False) for _ in range(q)]) if q else np.zeros((0, k), np.int64)
    values = rng.choice([-1.0, 1.0], (q, k)) * rng.uniform(0.5, 1.5, (q, k))
    M = membership.tocsc().astype(np.float64)
    y = np.stack([M[:, supports[i]] @ values[i] for i in range(q)]) if q else np.zeros((0, K))
    y += noise * rng.standard_normal((q, K)) + rng.normal(0.0, 1.0, (q, 1))  # plus a shift per query
    return y, supports


def precision_at_k(scores, supports: np.ndarray) -> float:
    """Mean over queries of |top-k by |score|  and  planted support| / k (``scores`` dense or CSR)."""
    import scipy.sparse as sp

    k = supports.shape[1]
    hits = []
    for i in range(supports.shape[0]):
        if sp.issparse(scores):
            row = scores.getrow(i)
            idx, vals = row.indices, np.abs(row.data)
        else:
            idx = np.flatnonzero(scores[i])
            vals = np.abs(scores[i][idx])
        top = idx[np.argsort(-vals, kind="stable")[:k]]
        hits.append(len(set(top.tolist()) & set(supports[i].tolist())) / k)
    return float(np.mean(hits)) if hits else math.nan


def run_row(n: int, K: int, cfg: Config) -> Row:
    """One row of the table (in the current process)."""
    import warnings

    from sklearn.exceptions import ConvergenceWarning

    from stride_nnsight.design import SubsetDesign
    from stride_nnsight.recovery import lasso_objective, recover

    row = Row(n=n, K=K, q=cfg.q, base_rss_gb=_peak_rss_gb())
    t0 = time.perf_counter()
    membership = SubsetDesign(n, K, cfg.d, seed=cfg.seed).membership
    row.design_s = time.perf_counter() - t0
    y, supports = planted_queries(membership, cfg.q, cfg.k, cfg.noise, cfg.seed + 1)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        t0 = time.perf_counter()
        scores, lambdas = recover(y, membership, "fraction", cfg.fraction, progress=False, sparse=True,
                                  solver="working_set", n_jobs=cfg.jobs)
        row.ws_wall_s = time.perf_counter() - t0
    row.ws_rss_gb = _peak_rss_gb()
    row.ws_not_converged = sum(_count_not_converged(str(w.message)) for w in caught)
    row.ws_ms_per_query = 1e3 * row.ws_wall_s / max(cfg.q, 1)
    row.ws_precision = precision_at_k(scores, supports)
    row.ws_nnz_per_query = scores.nnz / max(cfg.q, 1)

    ref_q = min(cfg.ref_queries, cfg.q) if n <= cfg.ref_max_n else 0
    row.ref_q = ref_q
    if ref_q:
        y_ref = y[:ref_q]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            t0 = time.perf_counter()
            same, same_lambdas = recover(y_ref, membership, "fraction", cfg.fraction, progress=False, sparse=True,
                                         solver="working_set", n_jobs=1)
            ws_same = time.perf_counter() - t0
            t0 = time.perf_counter()
            ref, ref_lambdas = recover(y_ref, membership, "fraction", cfg.fraction, progress=False,
                                       solver="reference")
            ref_s = time.perf_counter() - t0
        row.ref_ms_per_query = 1e3 * ref_s / ref_q
        row.ws_same_ms_per_query = 1e3 * ws_same / ref_q
        row.speedup = ref_s / ws_same if ws_same > 0 else math.nan
        rel = []
        for i in range(ref_q):
            p_ref = lasso_objective(y_ref[i], membership, ref[i], ref_lambdas[i])
            p_ws = lasso_objective(y_ref[i], membership, same.getrow(i), same_lambdas[i])
            rel.append((p_ws - p_ref) / p_ref if p_ref > 0 else 0.0)
        row.obj_rel_min, row.obj_rel_max = float(min(rel)), float(max(rel))
        row.ref_precision = precision_at_k(ref, supports[:ref_q])
    row.rss_all_gb = _peak_rss_gb()
    return row


def _count_not_converged(message: str) -> int:
    """The query count in the working-set solver's convergence warning ('N of q queries ...')."""
    head = message.split(" of ", 1)[0].rsplit(" ", 1)[-1]
    return int(head) if head.isdigit() else 0


def _run_row_job(args: tuple[int, int, dict]) -> dict:
    n, K, cfg = args
    return asdict(run_row(n, K, Config(**cfg)))


def rows_to_run(cfg: Config) -> list[tuple[int, int]]:
    """``(n, K)`` pairs: for each ``n``, the fixed ``K`` (``cfg.K == 0``: the library default for
    ``n``, `StrideArguments.auto_subsets`) and ``recommended_n_subsets(n, k)`` (deduplicated)."""
    from stride_nnsight.arguments import StrideArguments
    from stride_nnsight.design import recommended_n_subsets

    pairs = []
    for n in cfg.ns:
        fixed = cfg.K if cfg.K else StrideArguments.auto_subsets(n, cfg.d)
        for K in sorted({fixed, recommended_n_subsets(n, cfg.k)}):
            pairs.append((n, max(K, cfg.d)))
    return pairs


def environment() -> dict:
    """Machine load and thread settings, printed beside the table."""
    info = {
        "load_avg_1_5_15": tuple(round(x, 2) for x in os.getloadavg()),
        "cpu_count": os.cpu_count(),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "unset"),
        "python": platform.python_version(),
    }
    try:
        import torch

        info["torch_threads"] = torch.get_num_threads()
    except ImportError:  # torch is a dependency of the package, but this script does not need it
        info["torch_threads"] = "torch not installed"
    try:
        from threadpoolctl import threadpool_info

        info["blas_threads"] = sorted({(p.get("internal_api"), p.get("num_threads")) for p in threadpool_info()})
    except ImportError:
        info["blas_threads"] = "threadpoolctl not installed"
    return info


def format_table(rows: list[Row]) -> str:
    """The markdown table of ``rows``."""
    def cell(key: str, value) -> str:
        if isinstance(value, float):
            if math.isnan(value):
                return "-"
            if key.startswith("obj_rel"):
                return f"{value:+.1e}"
            return f"{value:.3g}" if abs(value) < 1e4 else f"{value:.0f}"
        return str(value)

    lines = ["| " + " | ".join(title for _, title in COLUMNS) + " |",
             "|" + "|".join("---" for _ in COLUMNS) + "|"]
    for row in rows:
        values = asdict(row)
        lines.append("| " + " | ".join(cell(key, values[key]) for key, _ in COLUMNS) + " |")
    return "\n".join(lines)


def parse_args(argv: Optional[list[str]]) -> tuple[Config, argparse.Namespace]:
    p = argparse.ArgumentParser(prog="python -m benchmarks.scaling_recovery", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes (smoke test, seconds)")
    p.add_argument("--n", type=int, nargs="+", default=None, help=f"training-set sizes (default {DEFAULT_NS})")
    p.add_argument("--K", type=int, default=None,
                   help="the fixed number of subsets (default: the library default for each n; --quick 64)")
    p.add_argument("--k", type=int, default=10, help="planted influential examples per query (default 10)")
    p.add_argument("--d", type=int, default=4, help="subsets per example (default 4)")
    p.add_argument("--queries", type=int, default=None, help="queries per row (default 1000; --quick 6)")
    p.add_argument("--ref-queries", type=int, default=None,
                   help="queries solved by the reference too (default 20; --quick 3)")
    p.add_argument("--ref-max-n", type=int, default=100_000, help="largest n with a reference run (default 1e5)")
    p.add_argument("--noise", type=float, default=0.1, help="noise std of the measurements (default 0.1)")
    p.add_argument("--fraction", type=float, default=0.3, help="lambda = fraction * lambda_max (default 0.3)")
    p.add_argument("--jobs", type=int, default=1, help="threads of the working-set solver on the q queries")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--in-process", action="store_true", help="run the rows in this process (peak RSS cumulative)")
    p.add_argument("--out", default=None, help="also write the report (markdown) to this file")
    a = p.parse_args(argv)
    cfg = Config(
        ns=tuple(a.n) if a.n else (QUICK_NS if a.quick else DEFAULT_NS),
        K=a.K if a.K is not None else (64 if a.quick else 0),
        k=a.k if not a.quick else min(a.k, 5),
        d=a.d,
        q=a.queries if a.queries is not None else (6 if a.quick else 1000),
        ref_queries=a.ref_queries if a.ref_queries is not None else (3 if a.quick else 20),
        ref_max_n=a.ref_max_n,
        noise=a.noise,
        fraction=a.fraction,
        jobs=a.jobs,
        seed=a.seed,
    )
    return cfg, a


def main(argv: Optional[list[str]] = None) -> list[Row]:
    """Run the rows, print (and optionally write) the report; returns the rows."""
    cfg, a = parse_args(argv)
    env_before = environment()
    print(f"recovery scaling: {cfg}", flush=True)
    print(f"environment before: {env_before}", flush=True)
    rows = []
    for n, K in rows_to_run(cfg):
        t0 = time.perf_counter()
        if a.in_process:
            row = run_row(n, K, cfg)
        else:  # a fresh process per row: its own peak RSS, nothing cached from earlier rows
            with cf.ProcessPoolExecutor(max_workers=1, mp_context=mp.get_context("spawn")) as pool:
                row = Row(**pool.submit(_run_row_job, (n, K, asdict(cfg))).result())
        rows.append(row)
        print(f"  n={n} K={K}: {time.perf_counter() - t0:.1f} s (load {os.getloadavg()[0]:.2f})", flush=True)
    table = format_table(rows)
    env_after = environment()
    report = "\n".join([
        "# Recovery scaling", "",
        f"Settings: {cfg}", "",
        f"Environment before: {env_before}", "",
        f"Environment after: {env_after}", "",
        table, "",
    ])
    print(report, flush=True)
    if a.out:
        with open(a.out, "w") as fh:
            fh.write(report)
    return rows


if __name__ == "__main__":
    main()
