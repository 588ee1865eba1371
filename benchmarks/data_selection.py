"""``python -m benchmarks.data_selection``: does choosing training data by attribution buy a
behaviour, measured by retraining?

On the public benchmark (`benchmarks.setting.FULL`): the **target** is the benchmark's 80 queries
(40 planted-fact queries, 40 held-out verse continuations): the behaviour to improve. Each method
attributes them, `stride_nnsight.apps.select_documents` keeps half of the corpus (1,000 of 2,000
documents) with the rule ``"total"`` (summed positive influence over the targets), and a model is
retrained from scratch on that half with the benchmark's recipe. Compared:

* **random**: a random half (a new half for every training seed);
* **STRIDE**: the library defaults (the benchmark's ``max_length``), and the ``"per_query"`` rule;
* **BM25** and **EK-FAC** (kronfluence): their scores through the same selection rule.

Reported per method, mean over training seeds: the target queries' loss (mean completion NLL,
nats) and the loss on the **held-out** set, the benchmark's 80 confirmation queries (40 other
planted facts and 40 other verses, none of them targeted): a selection must not buy the target by
wrecking everything else. Differences between methods are paired by training seed and query; the
95% CI resamples queries and training seeds (percentile bootstrap).

Cost: one STRIDE fit, one EK-FAC run and ``len(methods) x seeds`` retrains (~20 s each on one
thread). Retrains are cached by (selection, seed) under ``benchmarks/cache``. Writes
``benchmarks/RESULTS-data-selection.md``.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

OUT = Path(__file__).resolve().parent / "RESULTS-data-selection.md"


def paired_difference(a: np.ndarray, b: np.ndarray, n_boot: int = 1000, seed: int = 0,
                      confidence: float = 0.95) -> tuple[float, float, float]:
    """Mean of ``a - b`` over ``[seeds, queries]`` with a percentile-bootstrap CI that resamples
    training seeds and queries independently (both are random draws the result should hold over).
    Returns ``(mean, low, high)``."""
    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    if d.ndim != 2:
        raise ValueError(f"expected [seeds, queries] arrays, got shape {d.shape}")
    rng = np.random.default_rng(seed)
    s, q = d.shape
    means = np.empty(n_boot)
    for i in range(n_boot):
        rows = rng.integers(0, s, s)
        cols = rng.integers(0, q, q)
        means[i] = d[np.ix_(rows, cols)].mean()
    alpha = (1.0 - confidence) / 2.0
    return float(d.mean()), float(np.quantile(means, alpha)), float(np.quantile(means, 1 - alpha))


def _digest(indices: np.ndarray) -> str:
    return hashlib.sha256(np.sort(np.asarray(indices, dtype=np.int64)).tobytes()).hexdigest()[:12]


def retrain_losses(setting: Any, indices: np.ndarray, seed: int, eval_fns: dict[str, Callable],
                   cache: Path) -> dict[str, np.ndarray]:
    """Losses of a model retrained on ``indices`` with training seed ``seed`` (cached)."""
    path = cache / f"sel-{_digest(indices)}-s{seed}.npz"
    if path.is_file():
        with np.load(path) as f:
            if set(f.files) == set(eval_fns):
                return {k: f[k] for k in f.files}
    model = setting.train_fn(np.sort(indices), seed).eval()
    out = {name: np.asarray(fn(model), dtype=np.float64) for name, fn in eval_fns.items()}
    cache.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, **out)
    os.replace(tmp, path)
    return out


def selections(setting: Any, lm: Any, budget: int, methods: list[str], log=print) -> dict[str, Any]:
    """Per method: a function ``seed -> indices`` (random) or fixed indices (the others)."""
    from stride_nnsight import Stride, baselines
    from stride_nnsight.apps import select_documents

    docs, prompts, completions = setting.documents, setting.corpus.prompts, setting.corpus.completions
    n = len(docs)
    out: dict[str, Any] = {}
    stride_attr = None
    for name in methods:
        t0 = time.process_time()
        if name == "random":
            out[name] = lambda s: np.random.default_rng(10_000 + s).choice(n, budget, replace=False)
            continue
        if name.startswith("STRIDE"):
            if stride_attr is None:
                stride = Stride(lm, max_length=setting.config.max_length).fit(docs, progress=True)
                stride_attr = stride.attribute(prompts, completions, progress=False)
            rule = "per_query" if "per_query" in name else "total"
            out[name] = select_documents(stride_attr, budget, rule=rule).numpy()
        elif name == "BM25":
            out[name] = select_documents(baselines.bm25(docs, prompts, completions), budget).numpy()
        elif name == "EK-FAC":
            out[name] = select_documents(baselines.ekfac(lm, docs, prompts, completions), budget).numpy()
        else:
            raise ValueError(f"unknown method {name!r}")
        log(f"  {name}: selection in {time.process_time() - t0:.0f} s CPU")
    return out


def main(argv=None) -> str:
    from nnsight import TransformersModel

    from benchmarks.setting import add_script_arguments, query_losses, script_setting

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, default=4, help="training seeds per method")
    ap.add_argument("--methods", default="random,STRIDE,STRIDE per_query,BM25,EK-FAC")
    add_script_arguments(ap, OUT)
    a = ap.parse_args(argv)
    start = time.perf_counter()
    setting = script_setting(a)
    config = setting.config
    held = setting.confirmation().corpus
    ml = getattr(config, "query_max_length", 64)
    eval_fns = {
        "target": setting.eval_fn,
        "heldout": lambda m: query_losses(m, setting.tokenizer, held.prompts, held.completions, max_length=ml),
    }
    kinds = {"target": np.array([q.kind for q in setting.corpus.queries]),
             "heldout": np.array([q.kind for q in held.queries])}
    n = len(setting.documents)
    budget = n // 2
    methods = [m.strip() for m in a.methods.split(",") if m.strip()]
    lm = TransformersModel(setting.model, tokenizer=copy.deepcopy(setting.tokenizer), task="text-generation")
    chosen = selections(setting, lm, budget, methods)
    cache = setting.cache_dir / f"data-selection-{setting.key}"
    losses: dict[str, dict[str, np.ndarray]] = {}
    facts_kept = {}
    target_sources = [set(q.relevant) for q in setting.corpus.queries if q.kind == "fact"]
    for name in methods:
        per_seed = []
        kept = []
        for s in range(a.seeds):
            idx = chosen[name](s) if callable(chosen[name]) else chosen[name]
            t0 = time.perf_counter()
            per_seed.append(retrain_losses(setting, idx, 7_000 + s, eval_fns, cache))
            members = set(int(i) for i in idx)
            kept.append(np.mean([len(src & members) / len(src) for src in target_sources]))
            print(f"  {name} seed {s}: target {per_seed[-1]['target'].mean():.3f}, held-out "
                  f"{per_seed[-1]['heldout'].mean():.3f} ({time.perf_counter() - t0:.0f} s)", flush=True)
        losses[name] = {k: np.stack([p[k] for p in per_seed]) for k in eval_fns}
        facts_kept[name] = float(np.mean(kept))
    report = render(losses, kinds, facts_kept, methods, setting, a.seeds, budget, time.perf_counter() - start)
    print(report)
    print(f"load after: {os.getloadavg()}")
    if not a.quick:
        Path(a.out).write_text(report)
    return report


def _counts(kinds: np.ndarray) -> str:
    return f"{len(kinds)} (" + ", ".join(f"{int((kinds == k).sum())} {k}" for k in ("fact", "text")) + ")"


def render(losses, kinds, facts_kept, methods, setting, seeds, budget, wall) -> str:
    lines = [
        "# Data selection by attribution, measured by retraining",
        "",
        f"Generated by `OMP_NUM_THREADS=1 python -m benchmarks.data_selection` on {time.strftime('%Y-%m-%d')} "
        f"({wall / 60:.0f} min wall, load average {os.getloadavg()[0]:.2f} at the end). Setting: the public "
        f"benchmark ({len(setting.documents)} documents, its model recipe). Each method keeps {budget} documents "
        f"(half) chosen for the target queries; a model is retrained from scratch on them, {seeds} training "
        "seeds per method (random: a new half per seed). Losses: mean completion NLL in nats (lower is better).",
        "",
        f"* target: the benchmark's {_counts(kinds['target'])} queries (planted facts, held-out verse "
        "continuations), the behaviour the selection is for;",
        f"* held-out: the benchmark's {_counts(kinds['heldout'])} confirmation queries (other planted facts, "
        "other verses), targeted by nobody.",
        "",
        "| method | target loss | target facts | target verses | held-out loss | held-out facts | held-out verses "
        "| target facts' sources kept |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name in methods:
        row = [name]
        for split in ("target", "heldout"):
            L = losses[name][split]
            row.append(f"{L.mean():.3f}")
            for kind in ("fact", "text"):
                row.append(f"{L[:, kinds[split] == kind].mean():.3f}")
        row.append(f"{facts_kept[name]:.2f}")
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", "Paired differences in loss (method minus reference; negative = the method's selection gives "
              "lower loss), 95% CI over training seeds and queries:", "",
              "| method | reference | target | target facts | target verses | held-out | held-out facts | "
              "held-out verses |", "|---|---|---|---|---|---|---|---|"]
    refs = [r for r in ("random", "BM25", "EK-FAC") if r in methods]
    for name in methods:
        for ref in refs:
            if ref == name or (ref != "random" and not name.startswith("STRIDE")):
                continue
            cells = []
            for split in ("target", "heldout"):
                for kind in (None, "fact", "text"):
                    cols = slice(None) if kind is None else kinds[split] == kind
                    m, lo, hi = paired_difference(losses[name][split][:, cols], losses[ref][split][:, cols])
                    verdict = "lower" if hi < 0 else "higher" if lo > 0 else "level"
                    cells.append(f"{m:+.3f} [{lo:+.3f}, {hi:+.3f}] {verdict}")
            lines.append(f"| {name} | {ref} | " + " | ".join(cells) + " |")
    lines += ["", "Selections by BM25 and EK-FAC use the same rule (`select_documents(attr, budget, "
              "rule=\"total\")`) on their scores; EK-FAC runs with kronfluence's heuristic damping (no sweep). "
              "\"Target facts' sources kept\": the fraction of the target facts' planted source documents in the "
              "selection (random: 0.50 expected)."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
