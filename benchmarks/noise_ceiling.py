"""``python -m benchmarks.noise_ceiling``: how much of the LDS a benchmark's ground truth can show.

A benchmark's LDS ground truth retrains the model once per subset (one training seed).
This script retrains the same subsets with a second training seed (the first seed's retrains are
reused from the benchmark cache, hard-linked; only the second seed is trained) and reports:

* the seed-to-seed correlation ``rho`` per query (`stride_nnsight.evaluation.seed_to_seed_lds`):
  the reliability of a single-seed target, and the LDS ceilings it implies (``sqrt(rho)`` against
  one seed, ``sqrt(2 rho / (1 + rho))`` against the two-seed mean);
* the *shared retrain factor*: the first principal component of the retrains' per-query losses
  (each query standardised over retrains), its share of the variance, and how well it repeats
  from one seed to the other (Pearson over subsets). A large share that does not repeat is
  training-seed noise common to every query of a retrain: it moves all queries' LDS together,
  so a query kind's mean LDS is then close to one noisy number;
* with ``--stride``: STRIDE at the library defaults (the public benchmark: its ``max_length``), and
  BM25 (``prompt + completion`` and completion only), their LDS by query kind against the first
  seed and against the two-seed mean, each with a 95% CI that resamples queries only and one that
  resamples queries *and* retrained models (`stride_nnsight.evaluation.lds_replicates`).

``--bench``: ``public`` (default; writes ``benchmarks/RESULTS-noise-ceiling.md``), ``heldout-dev``
or ``heldout-narrative`` (the held-out benchmark's dev twins, ``benchmarks.heldout``; writes
``benchmarks/RESULTS-noise-ceiling-<bench>.md``). The held-out benchmark itself is not offered: its
ground truth is judged only through the report of ``benchmarks.heldout``. Cost: one more retrain per subset (~20 s each
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


def two_seed_folders(setting: Any, n_models: Optional[int] = None) -> list[tuple[int, Path, Path]]:
    """Where `two_seed_truth` keeps ``setting``'s two-seed retrains: ``(subsets, folder, reused
    folder)`` in the order it builds them: the benchmark's subsets (reusing the single-seed cache),
    then, for ``n_models`` above them, all ``n_models`` (reusing the first). Subset ``i``'s
    retrain with seed ``r`` lives in the first folder whose count exceeds ``i``."""
    from benchmarks.setting import ground_truth_folder

    c = setting.config
    n_models = int(n_models or c.n_models)
    if n_models < c.n_models:
        raise ValueError(f"n_models={n_models} is below the benchmark's {c.n_models} subsets; pass at least that")
    single = ground_truth_folder(setting)
    two = single.parent / f"{single.name}-seeds2"
    folders = [(int(c.n_models), two, single)]
    if n_models > c.n_models:
        more = ground_truth_folder(setting, n_models)
        folders.append((n_models, more.parent / f"{more.name}-seeds2", two))
    return folders


def two_seed_truth(setting: Any, progress: bool = True, n_models: Optional[int] = None):
    """The benchmark's ground truth with a second training seed per subset (cached beside the
    first; its seed-0 files are hard links to the single-seed cache).

    ``n_models`` above the benchmark's own count adds subsets: the masks are drawn one after the
    other from the same seed, so the first ``config.n_models`` are the benchmark's and their retrains
    (both seeds) are reused from the two-seed cache; only the new subsets are trained (two seeds each).
    Trains one retrain at a time; `benchmarks.run.stage_two_seed_truth` trains them in parallel first.
    """
    from benchmarks.setting import ground_truth, retrain_extra

    folders = two_seed_folders(setting, n_models)  # checks n_models
    c = setting.config
    ground_truth(setting, progress=progress)  # make sure the single-seed retrains exist
    truth = None
    for m, folder, reuse in folders:
        truth = retrain_ground_truth(
            setting.train_fn, setting.eval_fn, n_train=len(setting.documents), n_models=m, fraction=c.fraction,
            seed=c.gt_seed, cache_dir=folder, progress=progress, n_seeds=2, reuse_dir=reuse,
            extra=retrain_extra(setting))
    return truth


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


def shared_factor(losses: np.ndarray) -> tuple[float, np.ndarray]:
    """``losses [n_models, n_queries]`` -> (share of variance of the first principal component of
    the per-query standardised losses, its scores over the models ``[n_models]``)."""
    loss = np.asarray(losses, dtype=np.float64)
    z = (loss - loss.mean(0)) / np.where(loss.std(0) > 0, loss.std(0), 1.0)
    u, s, _ = np.linalg.svd(z, full_matrices=False)
    return float(s[0] ** 2 / (s ** 2).sum()), u[:, 0] * s[0]


def shared_factor_rows(truth: Any, kinds: np.ndarray) -> list[str]:
    """The shared retrain factor of each seed, its seed-to-seed repeat, and the mean correlation
    between queries of each kind over retrains (seed 0)."""
    share0, f0 = shared_factor(truth.losses[:, 0])
    share1, f1 = shared_factor(truth.losses[:, 1])
    repeat = abs(float(np.corrcoef(f0, f1)[0, 1]))
    corr = np.corrcoef(np.asarray(truth.losses[:, 0], dtype=np.float64).T)
    rows = [f"Shared retrain factor (first principal component of the standardised per-query losses): "
            f"{share0:.0%} of the variance with seed 0, {share1:.0%} with seed 1; |Pearson| between the two "
            f"seeds' factor scores over the {truth.n_models} subsets: {repeat:.2f} (1: set by the subset; about 0: "
            "training-seed noise shared by every query of a retrain).", "",
            "| queries | mean correlation over retrains between two queries of the kind (seed 0) |", "|---|---|"]
    for k in sorted(set(kinds.tolist())):
        idx = np.flatnonzero(kinds == k)
        sub = corr[np.ix_(idx, idx)]
        off = (np.nansum(sub) - np.trace(sub)) / max(len(idx) ** 2 - len(idx), 1)
        rows.append(f"| {k} | {off:.2f} |")
    return rows


def stride_rows(setting: Any, truth: Any, pinned: dict[str, Any]) -> list[str]:
    from nnsight import TransformersModel

    from stride_nnsight import Stride, baselines

    lm = TransformersModel(setting.model, tokenizer=setting.tokenizer, task="text-generation")
    stride = Stride(lm, **pinned).fit(setting.documents, progress=False)
    queries = setting.corpus.queries
    prompts, completions = [q.prompt for q in queries], [q.completion for q in queries]
    kinds = np.asarray([q.kind for q in queries])
    methods = {"STRIDE (defaults)": stride.attribute(prompts, completions, progress=False).scores,
               "BM25": baselines.bm25(setting.documents, prompts, completions).scores,
               "BM25, completion only": baselines.bm25(setting.documents, prompts, completions,
                                                       query="completion").scores}
    names = sorted(set(kinds.tolist()))
    rows = ["| method | target | LDS | " + " | ".join(f"LDS {k}" for k in names)
            + " | 95% CI, queries resampled | 95% CI, queries and retrained models resampled |",
            "|---|---|---|" + "---|" * len(names) + "---|---|"]
    for method, scores in methods.items():
        for name, losses in (("seed 0 (what the benchmark reports)", truth.losses[:, 0]),
                             ("mean of seeds 0 and 1", truth.losses)):
            result = lds(scores, truth.masks, losses)
            per = np.nan_to_num(np.asarray(result.per_query, dtype=np.float64))
            reps = lds_replicates([scores], truth.masks, losses, n_boot=1000, seed=0)[:, 0]
            lo, hi = np.quantile(reps, [0.025, 0.975])
            rows.append(f"| {method} | {name} | {result.mean_nan_as_zero:.3f} | "
                        + " | ".join(f"{per[kinds == k].mean():.3f}" for k in names)
                        + f" | [{result.ci_low:.3f}, {result.ci_high:.3f}] | [{lo:.3f}, {hi:.3f}] |")
    rows.append("")
    rows.append(f"STRIDE settings: library defaults{' with ' + str(pinned) + ' (the benchmark document length, as in `benchmarks.compare_settings --bench public`)' if pinned else ''}. "
                "LDS counts nan queries as 0.")
    return rows


def main(argv: Optional[list[str]] = None) -> int:
    from benchmarks.setting import FULL, build_setting, quick_config

    p = argparse.ArgumentParser(prog="python -m benchmarks.noise_ceiling", description=__doc__.split("\n")[0])
    p.add_argument("--stride", action="store_true", help="also fit STRIDE and report its LDS against both targets")
    p.add_argument("--quick", action="store_true", help="the benchmark's quick configuration (a smoke test)")
    p.add_argument("--bench", choices=("public", "heldout-dev", "heldout-narrative"), default="public",
                   help="public (default) or one of the held-out benchmark's dev twins")
    p.add_argument("--out", type=Path, default=None, help=f"default {OUT} (--quick: not written)")
    p.add_argument("--cache-dir", type=Path, default=None)
    a = p.parse_args(argv)
    start = time.time()
    load_before = os.getloadavg()
    kwargs = {"cache_dir": a.cache_dir} if a.cache_dir is not None else {}
    if a.bench == "public":
        config = quick_config() if a.quick else FULL
        setting = build_setting(config, log=lambda m: print(m, flush=True), **kwargs)
        title, pinned = "the public benchmark", {"max_length": config.max_length}
    else:
        from benchmarks.heldout import HELDOUT_DEV, HELDOUT_NARRATIVE, HELDOUT_QUICK, build_heldout

        config = HELDOUT_QUICK if a.quick else HELDOUT_DEV if a.bench == "heldout-dev" else HELDOUT_NARRATIVE
        setting = build_heldout(config, log=lambda m: print(m, flush=True), **kwargs)
        title, pinned = f"the held-out benchmark's dev twin `{config.name}`", {}
    truth = two_seed_truth(setting, progress=not a.quick)
    rho = seed_to_seed_lds(truth.losses).per_query
    kinds = np.asarray([q.kind for q in setting.corpus.queries])
    flags = (f"{' --bench ' + a.bench if a.bench != 'public' else ''}{' --stride' if a.stride else ''}"
             f"{' --quick' if a.quick else ''}")
    lines = [f"# Noise ceiling of {title}'s ground truth", "",
             f"Generated by `OMP_NUM_THREADS=1 python -m benchmarks.noise_ceiling{flags}` on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; load before "
             f"{tuple(round(x, 2) for x in load_before)}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}.", "",
             f"{truth.n_models} subsets of {truth.n_train} documents (fraction {config.fraction}), each retrained with "
             "two training seeds; seed 0 is the benchmark's ground truth. rho = per-query Spearman correlation "
             "over subsets between the two seeds' losses (the reliability of a one-seed target); the ceilings are "
             "what a perfect predictor of the subset's effect would reach (Spearman-Brown from the mean rho, "
             "approximate for rank correlations).", ""]
    lines += ceiling_rows(rho, kinds)
    lines += [""] + shared_factor_rows(truth, kinds)
    if a.stride:
        lines += ["", "## STRIDE and BM25 against one seed and against the two-seed mean", ""] \
            + stride_rows(setting, truth, pinned)
    lines += ["", f"Wall time {time.time() - start:.0f} s; load after {tuple(round(x, 2) for x in os.getloadavg())}."]
    text = "\n".join(lines) + "\n"
    print(text)
    default = OUT if a.bench == "public" else OUT.with_name(f"RESULTS-noise-ceiling-{a.bench}.md")
    out = a.out if a.out is not None else (None if a.quick else default)
    if out is not None:
        out.write_text(text)
        print(f"written to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
