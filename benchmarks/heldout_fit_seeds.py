"""``python -m benchmarks.heldout_fit_seeds``: how much of the held-out verdict is the fit's seed.

The held-out report (``benchmarks.heldout``) fits STRIDE once, with the library's default
``seed=0``; that seed draws the subset design, the operators' initialisation and the fit's
sampling. On the held-out recipe's dev twins the same defaults with seed 1 or 2 instead of 0
moved LDS by -0.06 to +0.03 (``benchmarks/RESULTS-dev-comparisons.md``), as much as many of the
differences between methods. This script refits STRIDE with the library defaults and seeds
``1 .. S-1`` (seed 0's scores are the saved report's own, not refitted), judges every seed and the
baselines' saved scores against the same two-seed ground truth as the two-seed report
(``--subsets`` random halves, each retrained with two training seeds), and writes

* each fit seed's LDS per selection (all, facts, text, scripture, docs), and the seed mean;
* STRIDE minus each baseline, per seed and for the seed mean (what a user's fit gets in
  expectation), with the paired 95% interval resampling queries and retrained models together
  (the seeds are fixed); and the spread of the per-seed differences.

Nothing is tuned here: every fit uses ``StrideArguments(seed=s)``, the defaults otherwise. Each
seed's scores are cached (``heldout-fit-seed-<bench key>-code<version>-s<seed>.npz``) so an
interrupted run resumes without refitting. Cost: one STRIDE fit and attribution per extra seed
(about 70 s each on one thread for the held-out benchmark).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np

from stride_nnsight import storage

from .heldout import (HELDOUT, HELDOUT_DEV, HELDOUT_NARRATIVE, HELDOUT_QUICK, SELECTION_TITLES, TWO_SEED_SELECTIONS,
                      HeldoutConfig, _corpus_only_setting, _report_identity, _verdict, build_heldout, saved_results,
                      selection, selection_means)
from .setting import CACHE_DIR, environment, write_report

STRIDE_LABEL = "STRIDE (defaults)"


def seed_scores_path(setting: Any, code_version: str, seed: int) -> Path:
    """Where the scores of the default fit with ``seed`` on ``setting`` are cached."""
    return Path(setting.cache_dir) / f"heldout-fit-seed-{setting.key}-code{code_version}-s{seed}.npz"


def summary_path(setting: Any, code_version: str) -> Path:
    """Where `fit_seed_report` saves its summary (read by `fit_seed_summary`)."""
    return Path(setting.cache_dir) / f"heldout-fit-seeds-{setting.key}-code{code_version}.json"


def fit_seed_summary(config: HeldoutConfig = HELDOUT, cache_dir: Path = CACHE_DIR,
                     code_version: Optional[str] = None, confirm: bool = False) -> Optional[dict[str, Any]]:
    """The saved summary of the last `fit_seed_report` for scores of ``code_version`` (STRIDE's LDS
    per seed and selection, seed mean and SD, the seed mean's paired differences against each
    baseline; ``confirm``: on the confirmation queries); ``None`` when there is none. Reads no model
    and trains nothing."""
    if code_version is None:
        return None
    setting = _corpus_only_setting(config, cache_dir)
    path = summary_path(setting.confirmation() if confirm else setting, code_version)
    return storage.read_json(path) if path.exists() else None


def fit_seed_scores(setting: Any, seed: int, code_version: str, args_for: Optional[Callable[[int], Any]] = None,
                    log=print) -> np.ndarray:
    """STRIDE's scores ``[q, n]`` on ``setting`` with the defaults and ``seed`` (cached per seed and
    code version). ``args_for(seed)`` builds the arguments (default ``StrideArguments(seed=seed)``)."""
    from stride_nnsight.arguments import StrideArguments

    from .methods import run_stride

    path = seed_scores_path(setting, code_version, seed)
    if path.exists():
        log(f"  seed {seed}: cached scores {path.name}")
        return storage.read_arrays(path, ["scores"])["scores"]
    args = args_for(seed) if args_for is not None else StrideArguments(seed=seed)
    log(f"  seed {seed}: fitting STRIDE (defaults, seed={seed}) ...")
    res, _ = run_stride(setting, setting.language_model(), args, single=False, log=log)
    storage.write_arrays(path, scores=np.asarray(res.scores, dtype=np.float32),
                         index_s=np.float64(res.index_s))
    return np.asarray(res.scores, dtype=np.float32)


def seed_differences(stride_scores: Sequence[np.ndarray], baseline: np.ndarray, masks: Any, losses: np.ndarray,
                     n_boot: int = 1000, seed: int = 0) -> dict[str, Any]:
    """STRIDE (one score matrix per fit seed) minus one baseline, on one selection of queries.

    Returns ``{"per_seed": [(difference, low, high)] per seed, "mean": (difference, low, high)}``:
    the LDS difference of each seed and of the seed mean (mean over seeds of each seed's LDS) with
    paired percentile intervals from one set of bootstrap draws that resample queries and retrained
    models together (`stride_nnsight.evaluation.lds_replicates`; nan queries count as 0)."""
    from stride_nnsight.evaluation import lds_replicates

    mats = [np.asarray(s) for s in stride_scores] + [np.asarray(baseline)]
    point = lds_replicates(mats, masks, losses, n_boot=1, resample_models=False, resample_queries=False)[0]
    reps = lds_replicates(mats, masks, losses, n_boot=n_boot, seed=seed)
    S = len(stride_scores)

    def interval(values: np.ndarray) -> tuple[float, float]:
        lo, hi = np.quantile(values, [0.025, 0.975])
        return float(lo), float(hi)

    per_seed = [(float(point[s] - point[S]), *interval(reps[:, s] - reps[:, S])) for s in range(S)]
    mean = (float(point[:S].mean() - point[S]), *interval(reps[:, :S].mean(1) - reps[:, S]))
    return {"per_seed": per_seed, "mean": mean}


def fit_seed_report(config: HeldoutConfig = HELDOUT, cache_dir: Path = CACHE_DIR, seeds: int = 3,
                    n_models: Optional[int] = None, n_boot: Optional[int] = None, log=print,
                    args_for: Optional[Callable[[int], Any]] = None, confirm: bool = False) -> str:
    """The markdown report (module docstring): seeds ``0 .. seeds-1``, seed 0 from the saved results;
    ``n_boot`` bootstrap resamples per interval (default: the config's, 1000 on the real benchmarks).
    ``confirm``: on the confirmation queries (``benchmarks.heldout --confirm``'s saved results; their
    seed 0 is the main run's fit, the other seeds are fitted on the same documents and attributed to
    the confirmation queries)."""
    from stride_nnsight.evaluation import lds

    from .noise_ceiling import two_seed_truth
    from .setting import code_version

    if seeds < 2:
        raise ValueError(f"seeds must be >= 2 (seed 0 is the saved report's fit), got {seeds}")
    n_boot = config.n_boot if n_boot is None else n_boot
    out = saved_results(config, cache_dir, confirm=confirm)
    if out is None:
        raise FileNotFoundError("no saved held-out results for this bench: run `python -m benchmarks.heldout"
                                f"{' --confirm' if confirm else ''}` (with the same --dev / --narrative / --quick "
                                "flag) first")
    version = code_version()
    if out["code_version"] != version:
        raise RuntimeError(f"the saved results are of code version {out['code_version']}, the library is now "
                           f"{version}: rerun `python -m benchmarks.heldout` first, so that seed 0 and the other "
                           "seeds are fitted by the same code")
    setting = build_heldout(config, cache_dir, log=log)
    setting = setting.confirmation() if confirm else setting
    truth = two_seed_truth(setting, progress=True, n_models=n_models)
    losses = np.asarray(truth.losses, dtype=np.float64)  # [m, 2, q]
    kinds = np.asarray(out["kinds"])
    stride = [np.asarray(out["methods"][STRIDE_LABEL]["scores"])]
    for s in range(1, seeds):
        stride.append(fit_seed_scores(setting, s, version, args_for, log=log))
    sels = tuple(k for k in TWO_SEED_SELECTIONS if selection(kinds, k).any())
    titles = " | ".join(SELECTION_TITLES[k] for k in sels)
    m = int(truth.masks.shape[0])
    flags = f"--seeds {seeds}" + ("" if n_models is None else f" --subsets {n_models}") + \
        (" --confirm" if confirm else "")
    lines = [f"# {_report_identity(config, confirm)[0]}: STRIDE's fit seed", "",
             f"Generated by `OMP_NUM_THREADS=1 python -m benchmarks.heldout_fit_seeds {flags}` on "
             f"{time.strftime('%Y-%m-%d')}, code version "
             f"{version} (load average {os.getloadavg()[0]:.2f} at the end; {environment()}). STRIDE with the library "
             "defaults and "
             f"`seed` = 0 .. {seeds - 1} (the seed draws the subset design, the operators' initialisation and the "
             "fit's sampling; seed 0 is the held-out report's own fit, not refitted"
             + (", its operators applied to the confirmation queries" if confirm else "") + "); the baselines' scores "
             f"are the report's{' on the confirmation queries' if confirm else ''}. Target: the mean of two training "
             f"seeds' retrains of {m} random halves (as the two-seed report). Intervals: paired 95% bootstrap "
             "resampling queries and retrained models together; the fit seeds are fixed, so a seed-mean interval "
             "says how well these seeds are measured, the per-seed rows how much one user's fit can differ.", "",
             "## STRIDE's LDS per fit seed", "", f"| fit | {titles} |", "|---|" + "---|" * len(sels)]
    per_seed_lds = []
    for s, scores in enumerate(stride):
        per = np.nan_to_num(np.asarray(lds(scores, truth.masks, losses).per_query, dtype=float))
        per_seed_lds.append(per)
        means = selection_means(per, kinds, sels)
        lines.append(f"| seed {s}{' (reported)' if s == 0 else ''} | "
                     + " | ".join(f"{means[k]:.3f}" for k in sels) + " |")
    stacked = np.stack(per_seed_lds)
    summary: dict[str, Any] = {
        "code_version": version, "seeds": seeds, "n_models": m, "selections": list(sels),
        "per_seed": [selection_means(per, kinds, sels) for per in per_seed_lds],
        "mean": selection_means(stacked, kinds, sels),
        "sd": {k: float(stacked[:, selection(kinds, k)].mean(1).std(ddof=1)) for k in sels}, "paired": {}}
    lines.append(f"| mean of {seeds} seeds | " + " | ".join(f"{summary['mean'][k]:.3f}" for k in sels) + " |")
    lines.append(f"| seed-to-seed SD | " + " | ".join(f"{stacked[:, selection(kinds, k)].mean(1).std(ddof=1):.3f}"
                                                     for k in sels) + " |")
    for name, m_out in out["methods"].items():
        if name == STRIDE_LABEL:
            continue
        per = np.nan_to_num(np.asarray(lds(m_out["scores"], truth.masks, losses).per_query, dtype=float))
        means = selection_means(per, kinds, sels)
        lines.append(f"| {name} | " + " | ".join(f"{means[k]:.3f}" for k in sels) + " |")
    lines += ["", "## STRIDE minus each baseline", "",
              "Seed mean first (difference [95% CI] verdict), then each seed's difference.", "",
              f"| baseline | fit | {titles} |", "|---|---|" + "---|" * len(sels)]
    for name, m_out in out["methods"].items():
        if name == STRIDE_LABEL:
            continue
        cells = {k: seed_differences([s[selection(kinds, k)] for s in stride], m_out["scores"][selection(kinds, k)],
                                     truth.masks, losses[..., selection(kinds, k)], n_boot=n_boot) for k in sels}
        summary["paired"][name] = {k: list(cells[k]["mean"]) for k in sels}
        lines.append(f"| {name} | mean of {seeds} seeds | " + " | ".join(
            f"{d:+.3f} [{lo:+.3f}, {hi:+.3f}] {_verdict(lo, hi)}" for d, lo, hi in (cells[k]["mean"] for k in sels))
            + " |")
        lines.append(f"| | per seed | " + " | ".join(
            " / ".join(f"{d:+.3f}" for d, _, _ in cells[k]["per_seed"]) for k in sels) + " |")
    storage.write_text(summary_path(setting, version), json.dumps(summary, indent=1))
    return "\n".join(lines) + "\n"


def main(argv: Optional[list[str]] = None) -> int:
    from .run import _set_threads

    p = argparse.ArgumentParser(prog="python -m benchmarks.heldout_fit_seeds", description=__doc__.split("\n")[0])
    p.add_argument("--seeds", type=int, default=3, help="fit seeds 0..SEEDS-1 (seed 0 from the saved report)")
    p.add_argument("--subsets", type=int, default=None, help="subsets of the two-seed target (default the bench's)")
    p.add_argument("--dev", action="store_true", help="the dev twin")
    p.add_argument("--narrative", action="store_true", help="the narrative dev twin")
    p.add_argument("--quick", action="store_true", help="the tiny smoke-test bench (needs --cache-dir)")
    p.add_argument("--cache-dir", type=Path, default=None)
    p.add_argument("--confirm", action="store_true", help="on the confirmation queries (after `python -m "
                   "benchmarks.heldout --confirm`; default report benchmarks/RESULTS-heldout-confirm-fit-seeds.md)")
    p.add_argument("--out", type=Path, default=None, help="default benchmarks/RESULTS-heldout-fit-seeds[-<bench>].md")
    a = p.parse_args(argv)
    if a.seeds < 2:
        p.error(f"--seeds must be >= 2, got {a.seeds}")
    if a.quick and a.cache_dir is None:
        p.error("--quick needs --cache-dir (the folder of a `python -m benchmarks.heldout --quick` run)")
    _set_threads(1)
    config = HELDOUT_QUICK if a.quick else HELDOUT_DEV if a.dev else HELDOUT_NARRATIVE if a.narrative else HELDOUT
    print(f"load before: {os.getloadavg()}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}", flush=True)
    args_for = None
    if a.quick:  # as `benchmarks.heldout --quick`: 40 documents cannot hold the default K (a smoke test)
        from stride_nnsight.arguments import StrideArguments

        def args_for(seed: int) -> Any:
            return StrideArguments(n_subsets=32, seed=seed)
    text = fit_seed_report(config, a.cache_dir or CACHE_DIR, seeds=a.seeds, n_models=a.subsets, args_for=args_for,
                           confirm=a.confirm)
    suffix = "" if config is HELDOUT else f"-{config.name}"
    folder = a.cache_dir if a.quick else Path(__file__).resolve().parent
    return write_report(a.out or folder / f"RESULTS-heldout{'-confirm' if a.confirm else ''}-fit-seeds{suffix}.md",
                        text)


if __name__ == "__main__":
    raise SystemExit(main())
