"""``python -m benchmarks.noise_ceiling``: how much of the LDS the public benchmark's ground truth can show.

The public benchmark's LDS ground truth retrains the model once per subset (one training seed).
This script retrains the same subsets with a second training seed (the first seed's retrains are
reused from the benchmark cache, hard-linked; only the second seed is trained) and reports:

* the seed-to-seed correlation ``rho`` per query (`stride_nnsight.evaluation.seed_to_seed_lds`):
  the reliability of a single-seed target, and the LDS ceilings it implies (``sqrt(rho)`` against
  one seed, ``sqrt(2 rho / (1 + rho))`` against the two-seed mean);
* with ``--stride``: STRIDE at the library defaults (the benchmark's ``max_length``), its LDS against the
  first seed and against the two-seed mean, each with a 95% CI that resamples queries only and
  one that resamples queries *and* retrained models (`stride_nnsight.evaluation.lds_replicates`).

Writes ``benchmarks/RESULTS-noise-ceiling.md``. Cost: one more retrain per subset (~20 s each
for the public benchmark's model on one thread), plus one STRIDE fit with ``--stride``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from stride_nnsight.evaluation import (bootstrap_ci, lds, lds_replicates, retrain_ground_truth,  # noqa: E402
                                       seed_to_seed_lds)

OUT = Path(__file__).resolve().parent / "RESULTS-noise-ceiling.md"


def two_seed_truth(setting: Any, progress: bool = True):
    """The benchmark's ground truth with a second training seed per subset (cached beside the
    first; its seed-0 files are hard links to the single-seed cache)."""
    from benchmarks.setting import ground_truth, ground_truth_folder

    c = setting.config
    ground_truth(setting, progress=progress)  # make sure the single-seed retrains exist
    single = ground_truth_folder(setting)
    return retrain_ground_truth(
        setting.train_fn, setting.eval_fn, n_train=len(setting.documents), n_models=c.n_models,
        fraction=c.fraction, seed=c.gt_seed, cache_dir=single.parent / f"{single.name}-seeds2",
        progress=progress, n_seeds=2, reuse_dir=single,
        extra={"setting": setting.key, "corpus": setting.corpus.fingerprint(), "config": c.to_dict()})


def ceiling_rows(rho: np.ndarray, kinds: np.ndarray) -> list[str]:
    rows = ["| queries | n | seed-to-seed rho [95% CI] | ceiling vs one seed sqrt(rho) | ceiling vs two-seed mean |",
            "|---|---|---|---|---|"]
    for name, sel in [("all", np.ones(len(rho), bool))] + [(k, kinds == k) for k in sorted(set(kinds.tolist()))]:
        values = rho[sel]
        finite = values[np.isfinite(values)]
        mean = float(finite.mean()) if finite.size else float("nan")
        lo, hi = bootstrap_ci(values, 0.95, 1000, 0)
        pos = max(mean, 0.0)
        rows.append(f"| {name} | {int(sel.sum())} | {mean:.3f} [{lo:.3f}, {hi:.3f}] | {np.sqrt(pos):.3f} | "
                    f"{np.sqrt(2 * pos / (1 + pos)):.3f} |")
    return rows


def stride_rows(setting: Any, truth: Any) -> list[str]:
    from nnsight import TransformersModel

    from stride_nnsight import Stride

    pinned = {"max_length": setting.config.max_length}  # as benchmarks.compare_settings --bench public
    lm = TransformersModel(setting.model, tokenizer=setting.tokenizer, task="text-generation")
    stride = Stride(lm, **pinned).fit(setting.documents, progress=False)
    queries = setting.corpus.queries
    scores = stride.attribute([q.prompt for q in queries], [q.completion for q in queries], progress=False).scores
    rows = ["| target | LDS | 95% CI, queries resampled | 95% CI, queries and retrained models resampled |",
            "|---|---|---|---|"]
    for name, losses in (("seed 0 (what the benchmark reports)", truth.losses[:, 0]),
                         ("mean of seeds 0 and 1", truth.losses)):
        result = lds(scores, truth.masks, losses)
        reps = lds_replicates([scores], truth.masks, losses, n_boot=1000, seed=0)[:, 0]
        lo, hi = np.quantile(reps, [0.025, 0.975])
        rows.append(f"| {name} | {result.mean_nan_as_zero:.3f} | [{result.ci_low:.3f}, {result.ci_high:.3f}] | "
                    f"[{lo:.3f}, {hi:.3f}] |")
    rows.append("")
    rows.append(f"STRIDE settings: library defaults with {pinned} (the benchmark's document length), as in "
                "`benchmarks.compare_settings --bench public`. LDS counts nan queries as 0.")
    return rows


def main(argv: Optional[list[str]] = None) -> int:
    from benchmarks.setting import FULL, build_setting, quick_config

    p = argparse.ArgumentParser(prog="python -m benchmarks.noise_ceiling", description=__doc__.split("\n")[0])
    p.add_argument("--stride", action="store_true", help="also fit STRIDE and report its LDS against both targets")
    p.add_argument("--quick", action="store_true", help="the benchmark's quick configuration (a smoke test)")
    p.add_argument("--out", type=Path, default=None, help=f"default {OUT} (--quick: not written)")
    p.add_argument("--cache-dir", type=Path, default=None)
    a = p.parse_args(argv)
    start = time.time()
    load_before = os.getloadavg()
    config = quick_config() if a.quick else FULL
    kwargs = {"cache_dir": a.cache_dir} if a.cache_dir is not None else {}
    setting = build_setting(config, log=lambda m: print(m, flush=True), **kwargs)
    truth = two_seed_truth(setting, progress=not a.quick)
    rho = seed_to_seed_lds(truth.losses).per_query
    kinds = np.asarray([q.kind for q in setting.corpus.queries])
    lines = ["# Noise ceiling of the public benchmark's ground truth", "",
             f"Generated by `OMP_NUM_THREADS=1 python -m benchmarks.noise_ceiling{' --stride' if a.stride else ''}"
             f"{' --quick' if a.quick else ''}` on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; load before "
             f"{tuple(round(x, 2) for x in load_before)}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}.", "",
             f"{truth.n_models} subsets of {truth.n_train} documents (fraction {config.fraction}), each retrained with "
             "two training seeds; seed 0 is the benchmark's ground truth. rho = per-query Spearman correlation "
             "over subsets between the two seeds' losses (the reliability of a one-seed target); the ceilings are "
             "what a perfect predictor of the subset's effect would reach (Spearman-Brown from the mean rho, "
             "approximate for rank correlations).", ""]
    lines += ceiling_rows(rho, kinds)
    if a.stride:
        lines += ["", "## STRIDE against one seed and against the two-seed mean", ""] + stride_rows(setting, truth)
    lines += ["", f"Wall time {time.time() - start:.0f} s; load after {tuple(round(x, 2) for x in os.getloadavg())}."]
    text = "\n".join(lines) + "\n"
    print(text)
    out = a.out if a.out is not None else (None if a.quick else OUT)
    if out is not None:
        out.write_text(text)
        print(f"written to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
