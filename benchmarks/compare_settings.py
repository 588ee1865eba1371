"""``python -m benchmarks.compare_settings``: STRIDE settings side by side, with paired CIs.

Fits STRIDE once per variant (the library defaults, then each variant's changes on top of them)
on one dev benchmark and prints, per variant: fact recall@10, LDS (nan queries counted as 0),
the paired 95% bootstrap CI of its per-query LDS difference against the first variant (resampling
queries; a second interval resamples queries and retrained models together), the fit's
CPU seconds (``time.process_time``; meaningful only when run alone with OMP_NUM_THREADS=1) and
the forward rows it read per training document (distinct documents per step with
``sampling="document"``, rows per step otherwise; times the steps, over n).

``--seeds S`` fits every variant with ``seed = 0 .. S-1`` (the seed draws the subset design, the
operators' initialisation and the fit's sampling) and reports seed-averaged figures: seed ``s``
of a variant is paired with seed ``s`` of the first variant, and a third interval resamples the
fit seeds as well as the queries. Use it for any setting whose effect is not far larger than
the fit-seed spread: on the held-out benchmark's dev twins, the defaults with seed 1 or 2
instead of 0 differ by -0.06 to +0.03 LDS, with paired query intervals that can exclude 0
(RESULTS-dev-comparisons.md), so a single-seed comparison can crown a seed, not a setting.

``--two-seeds`` scores against the mean of two training seeds per retrained subset instead of one
(public and held-out dev benches): on the held-out recipe one retrain's seed-to-seed correlation is
only 0.27-0.29 (RESULTS-noise-ceiling-heldout-dev.md), so a one-seed target adds its own noise to
every difference. ``--save F.npz`` keeps every fit's scores (`save_scores`) for rescoring later.

Benchmarks (``--bench``):

* ``gate``: the suite's quality-gate corpus (``tests/test_quality_gate.py``: 150 planted-fact
  documents of 65-122 tokens, 24 fact queries, LDS from 8 retrained models); ``gate1`` is the
  same recipe with corpus seed 1.
* ``heldout-dev``: the held-out benchmark's dev twin (``benchmarks.heldout.HELDOUT_DEV``: 520
  documents of scripture, docstrings and planted facts from other books and modules than the
  held-out benchmark, a 4-layer width-128 GPT-2, 56 queries, LDS from 20 retrained models);
  build its retrains first with ``python -m benchmarks.heldout --dev --ground-truth-only``.
* ``heldout-narrative``: a second dev twin (``benchmarks.heldout.HELDOUT_NARRATIVE``) whose
  scripture is mostly narrative (Chronicles, Ruth, Esther, Ezra, Nehemiah, Daniel, ...), as the
  held-out corpus's histories are; retrains: ``python -m benchmarks.heldout --narrative --ground-truth-only``.
* ``public``: the bundled public benchmark (``benchmarks.setting.FULL``: 2,000 documents, 80 fact
  and text queries, LDS from 32 retrained models), its model and ground truth from the
  benchmark cache (built on first use: slow).
* ``public-half``: the same recipe at half the corpus (``benchmarks.setting.HALF``: 840 real-text
  documents instead of 1,840, the same 80 planted facts and query recipe: 1,000 documents), with
  its own model and 32 retrains: the public benchmark at a second corpus size, for how K, d and
  the steps should grow with n.

Besides ``StrideArguments`` settings a variant may set ``model_dtype`` (``"bfloat16"`` or
``"float16"``): the frozen model is a copy cast to that dtype (the operators stay float32),
e.g. ``"model_dtype='bfloat16'"`` for the half-precision check of a large-model run.

These are *dev* benchmarks: settings chosen with this script are judged elsewhere on data they
were not chosen on. Example::

    OMP_NUM_THREADS=1 python -m benchmarks.compare_settings --bench gate \\
        "linearity_weight=0" "loss_positions=16" "linearity_weight=0,loss_positions=16"
"""

from __future__ import annotations

import argparse
import ast
import copy
import os
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

from stride_nnsight import Stride  # noqa: E402
from stride_nnsight.evaluation import bootstrap_ci, fact_tracing, lds, lds_replicates  # noqa: E402


def parse_variant(text: str) -> dict[str, Any]:
    """``"a=1,b=None"`` -> ``{"a": 1, "b": None}`` (values are Python literals); ``""`` -> defaults."""
    out: dict[str, Any] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, _, value = part.partition("=")
        if not _:
            raise SystemExit(f"a variant is key=value[,key=value...]; got {part!r}")
        out[key.strip()] = ast.literal_eval(value.strip())
    return out


def gate_bench(seed: int) -> dict[str, Any]:
    import test_quality_gate as gate
    from stride_nnsight.evaluation import retrain_ground_truth
    from stride_nnsight.toy import train_tokenizer

    corpus = gate.make_planted_corpus(seed=seed)
    tokenizer = train_tokenizer(corpus.documents, vocab_size=500)
    model = gate._train(corpus, tokenizer, range(len(corpus.documents)), seed=0)
    truth = retrain_ground_truth(
        lambda idx, s: gate._train(corpus, tokenizer, idx, s), lambda m: gate._fact_losses(m, tokenizer, corpus),
        n_train=len(corpus.documents), n_models=gate.N_RETRAINS, fraction=0.5, seed=1, progress=False)
    return {"model": model, "tokenizer": tokenizer, "documents": corpus.documents, "prompts": corpus.prompts,
            "completions": corpus.completions, "truth": truth, "kinds": ["fact"] * len(corpus.prompts),
            "sources": corpus.sources, "stride_kwargs": {}}


def _truth(setting, two_seeds: bool):
    """The setting's retrained ground truth: one training seed per subset, or (``two_seeds``) the
    mean of two (`benchmarks.noise_ceiling.two_seed_truth`; the second seed's retrains are built
    on first use, as long again as the first seed's)."""
    from benchmarks.setting import ground_truth

    if two_seeds:
        from benchmarks.noise_ceiling import two_seed_truth

        return two_seed_truth(setting, progress=True)
    return ground_truth(setting, progress=True)


def public_bench(half: bool = False, two_seeds: bool = False) -> dict[str, Any]:
    """The public benchmark (``FULL``), or with ``half`` the same recipe at 1,000 documents (``HALF``)."""
    from benchmarks.setting import FULL, HALF, build_setting

    config = HALF if half else FULL
    setting = build_setting(config, log=lambda m: print(m, flush=True))
    return _setting_bench(setting, _truth(setting, two_seeds), {"max_length": config.max_length})


def _setting_bench(setting, truth, stride_kwargs: dict[str, Any]) -> dict[str, Any]:
    """A benchmark setting (`benchmarks.setting.BenchSetting`) in the form `compare` reads."""
    queries = setting.corpus.queries
    return {"model": setting.model, "tokenizer": setting.tokenizer, "documents": setting.documents,
            "prompts": [q.prompt for q in queries], "completions": [q.completion for q in queries],
            "truth": truth, "kinds": [q.kind for q in queries],
            "sources": [list(q.relevant) for q in queries if q.kind == "fact"], "stride_kwargs": stride_kwargs}


def heldout_dev_bench(narrative: bool = False, two_seeds: bool = False) -> dict[str, Any]:
    """The held-out benchmark's dev twin (``narrative``: its narrative twin) in the form `run` reads."""
    from benchmarks.heldout import HELDOUT_DEV, HELDOUT_NARRATIVE, build_heldout

    setting = build_heldout(HELDOUT_NARRATIVE if narrative else HELDOUT_DEV, log=lambda m: print(m, flush=True))
    return _setting_bench(setting, _truth(setting, two_seeds), {})


def public_script(argv, doc: str, out: Path) -> tuple[Any, dict[str, Any], Any]:
    """Shared start of the public-benchmark diagnostic scripts: parse ``--out``, print the load,
    build the bench. Returns ``(args, bench, model)`` with ``model`` an nnsight wrapper of it."""
    from nnsight import TransformersModel

    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    ap.add_argument("--out", default=str(out))
    args = ap.parse_args(argv)
    print(f"load before: {os.getloadavg()}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}", flush=True)
    bench = public_bench()
    lm = TransformersModel(bench["model"], tokenizer=copy.deepcopy(bench["tokenizer"]), task="text-generation")
    return args, bench, lm


#: settings `Stride.attribute` overrides on a fitted Stride: variants that differ only in these share
#: one fit (per seed) in `run`, and are measured and recovered from it
ATTRIBUTE_SETTINGS = ("lambda_rule", "lambda_fraction", "recovery", "token_weights", "measurement")


def _fit_key(changes: dict[str, Any]) -> str:
    """What identifies a fit among ``changes`` (settings and seed): all but `ATTRIBUTE_SETTINGS`."""
    return repr(sorted((k, v) for k, v in changes.items() if k not in ATTRIBUTE_SETTINGS))


def _fit_and_score(bench: dict[str, Any], changes: dict[str, Any], n_boot: int,
                   fits: dict[str, Any] | None = None) -> dict[str, Any]:
    """One STRIDE fit with ``changes`` on ``bench``: its scores, per-query LDS, recall and cost.
    ``fits`` (a dict kept across calls): a fit with the same settings apart from
    `ATTRIBUTE_SETTINGS` is reused (its fit CPU seconds reported again) and only measured and
    recovered with this call's attribute settings."""
    from nnsight import TransformersModel

    changes = dict(changes)
    overrides = {k: changes.pop(k) for k in ATTRIBUTE_SETTINGS if k in changes}
    key = _fit_key(changes)
    if fits is not None and key in fits:
        stride, fit_s = fits[key]
        return _score(bench, stride, fit_s, overrides, n_boot)
    model = bench["model"]
    dtype = changes.pop("model_dtype", None)
    if dtype is not None:
        import torch

        if dtype not in ("bfloat16", "float16"):
            raise ValueError(f"model_dtype must be 'bfloat16' or 'float16', got {dtype!r}")
        model = copy.deepcopy(model).to(getattr(torch, dtype))
    lm = TransformersModel(model, tokenizer=copy.deepcopy(bench["tokenizer"]), task="text-generation")
    start = time.process_time()
    stride = Stride(lm, **changes).fit(bench["documents"], progress=False)
    fit_s = time.process_time() - start
    if fits is not None:
        fits[key] = (stride, fit_s)
    return _score(bench, stride, fit_s, overrides, n_boot)


def _score(bench: dict[str, Any], stride: Any, fit_s: float, overrides: dict[str, Any], n_boot: int) -> dict[str, Any]:
    """`_fit_and_score`'s result for a fitted ``stride`` attributed with ``overrides``."""
    scores = stride.attribute(bench["prompts"], bench["completions"], progress=False, **overrides).scores.numpy()
    result = lds(scores, bench["truth"].masks, bench["truth"].losses, n_boot=n_boot)
    facts = np.asarray(bench["kinds"]) == "fact"
    args = stride.args
    n_rows = args.fit_steps(len(bench["documents"])) * stride_rows_per_step(args)
    return {"scores": scores, "per_query": np.nan_to_num(np.asarray(result.per_query, dtype=float)),
            "recall@10": fact_tracing(scores[facts], bench["sources"], ks=(10,))["recall@10"],
            "fit_s": fit_s, "rows_per_doc": n_rows / len(bench["documents"]), "positions": args.loss_positions}


def run(bench: dict[str, Any], variants: list[str], n_boot: int = 1000, seeds: int = 1) -> list[dict[str, Any]]:
    """Fit every variant (``seeds > 1``: once per ``seed = 0 .. seeds-1``) and score it on ``bench``.

    A row's ``per_query`` is the per-query LDS averaged over its seeds (``seed_per_query [S, q]``
    holds each seed's), ``scores`` the first seed's scores (``seed_scores`` every seed's), recall,
    fit CPU seconds and rows per document the seed means. Variants that differ only in
    `ATTRIBUTE_SETTINGS` are measured and recovered from one shared fit per seed."""
    if seeds < 1:
        raise ValueError(f"seeds must be >= 1, got {seeds}")
    rows = []
    kinds = np.asarray(bench["kinds"])
    plans = []
    for text in variants:
        changes = {**bench["stride_kwargs"], **parse_variant(text)}
        if seeds > 1 and "seed" in changes:
            raise SystemExit(f"variant {text!r} sets seed and --seeds {seeds} sets it too: drop one")
        plans.append((text, [{**changes, **({"seed": s} if seeds > 1 else {})} for s in range(seeds)]))
    # variants differing only in attribute settings share a fit; a fit is kept only while a later
    # variant still needs it (a fitted Stride holds its operators and activation cache)
    pending = Counter(_fit_key(c) for _, runs in plans for c in runs)
    fits: dict[str, Any] = {}
    for text, runs in plans:
        results = []
        for c in runs:
            key = _fit_key(c)
            pending[key] -= 1
            results.append(_fit_and_score(bench, c, n_boot, fits if pending[key] or key in fits else None))
            if not pending[key]:
                fits.pop(key, None)
        seed_per_query = np.stack([f["per_query"] for f in results])
        per_query = seed_per_query.mean(0)
        rows.append({"variant": text or "defaults", "recall@10": float(np.mean([f["recall@10"] for f in results])),
                     "lds": float(per_query.mean()), "scores": results[0]["scores"],
                     "seed_scores": [f["scores"] for f in results], "seed_per_query": seed_per_query,
                     "truth": bench["truth"], "per_query": per_query,
                     "by_kind": {k: float(per_query[kinds == k].mean()) for k in sorted(set(kinds.tolist()))},
                     "fit_s": float(np.mean([f["fit_s"] for f in results])),
                     "rows_per_doc": float(np.mean([f["rows_per_doc"] for f in results])),
                     "positions": results[0]["positions"]})
    return rows


def save_scores(rows: list[dict[str, Any]], path: str | Path) -> Path:
    """Every row's scores to ``path`` (.npz): ``variants [V]`` (str) and ``scores [V, S, q, n]``
    float32 (variant, fit seed, query, training document)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    scores = np.stack([np.stack([np.asarray(s, dtype=np.float32) for s in r["seed_scores"]]) for r in rows])
    np.savez_compressed(path, variants=np.array([r["variant"] for r in rows]), scores=scores)
    return path


def stride_rows_per_step(args) -> int:
    """Forward rows of one step: distinct documents (``sampling="document"``: one forward serves all
    of a document's rows) or rows (``"membership"``), plus the linearity probe."""
    n_probe = min(args.linearity_operators, args.n_subsets) if args.linearity_weight > 0 else 0
    if getattr(args, "sampling", "membership") == "document":
        return args.documents_per_step() + (1 if n_probe else 0)
    return args.batch_size + n_probe


def seed_query_ci(diff: np.ndarray, confidence: float = 0.95, n_boot: int = 1000,
                  seed: int = 0) -> tuple[float, float]:
    """Percentile-bootstrap interval of the mean of ``diff [S, q]`` (per fit seed and query),
    resampling fit seeds and queries together (two-way: a replicate draws ``S`` seeds and ``q``
    queries with replacement and averages the drawn block)."""
    diff = np.asarray(diff, dtype=float)
    if diff.ndim != 2:
        raise ValueError(f"diff must be [seeds, queries], got shape {diff.shape}")
    rng = np.random.default_rng(seed)
    S, q = diff.shape
    reps = np.array([diff[np.ix_(rng.integers(0, S, S), rng.integers(0, q, q))].mean() for _ in range(int(n_boot))])
    alpha = (1.0 - confidence) / 2.0
    low, high = np.quantile(reps, [alpha, 1.0 - alpha])
    return float(low), float(high)


def _models_ci(row: dict[str, Any], base: dict[str, Any], n_boot: int) -> str:
    """Paired interval of the seed-averaged LDS difference, resampling queries and retrains."""
    truth = row.get("truth")
    if truth is None or row is base:
        return "-"
    a = list(row.get("seed_scores", [row["scores"]]))
    b = list(base.get("seed_scores", [base["scores"]]))
    # one seed each: exactly `paired_lds_ci`'s interval (the same draws)
    reps = lds_replicates(a + b, truth.masks, truth.losses, n_boot=n_boot)
    lo, hi = np.quantile(reps[:, :len(a)].mean(1) - reps[:, len(a):].mean(1), [0.025, 0.975])
    return f"[{lo:+.3f}, {hi:+.3f}]"


def report(rows: list[dict[str, Any]], n_boot: int = 1000) -> str:
    kinds = list(rows[0]["by_kind"])
    n_seeds = len(rows[0].get("seed_per_query", [rows[0]["per_query"]]))
    seeded = n_seeds > 1
    head = ["variant", "recall@10", "LDS"] + [f"LDS {k}" for k in kinds] + \
        [f"LDS - {rows[0]['variant']} [95% CI]", "CI, queries + retrains resampled"] + \
        (["CI, queries + fit seeds resampled", "per seed: LDS - first variant"] if seeded else []) + \
        ["rows/doc", "positions/row", "fit CPU s"]
    lines = []
    if seeded:
        lines.append(f"Figures are means over fit seeds 0..{n_seeds - 1}; seed s of a variant is paired with seed s "
                     f"of {rows[0]['variant']!r}.")
        lines.append("")
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    base = rows[0]
    for r in rows:
        diff = r["per_query"] - base["per_query"]
        lo, hi = bootstrap_ci(diff, 0.95, n_boot, 0)
        cells = [r["variant"], f"{r['recall@10']:.3f}", f"{r['lds']:.3f}"] + \
            [f"{r['by_kind'][k]:.3f}" for k in kinds] + \
            [f"{diff.mean():+.3f} [{lo:+.3f}, {hi:+.3f}]", _models_ci(r, base, n_boot)]
        if seeded:
            seed_diff = r["seed_per_query"] - base["seed_per_query"]
            if r is base:
                cells += ["-", "-"]
            else:
                slo, shi = seed_query_ci(seed_diff, 0.95, n_boot, 0)
                cells += [f"[{slo:+.3f}, {shi:+.3f}]", " / ".join(f"{v:+.3f}" for v in seed_diff.mean(1))]
        cells += [f"{r['rows_per_doc']:.1f}", "all" if r["positions"] is None else str(r["positions"]),
                  f"{r['fit_s']:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


BENCHES = ("gate", "gate1", "public", "public-half", "heldout-dev", "heldout-narrative")


def load_bench(name: str, two_seeds: bool = False) -> dict[str, Any]:
    """The dev benchmark ``name`` (one of `BENCHES`, module docstring) in the form `run` reads;
    ``two_seeds``: its ground truth is the mean of two training seeds per retrained subset (not for
    the gate corpora, whose retrains are the suite's)."""
    import test_quality_gate as gate

    if name in ("public", "public-half"):
        return public_bench(half=name == "public-half", two_seeds=two_seeds)
    if name in ("heldout-dev", "heldout-narrative"):
        return heldout_dev_bench(narrative=name == "heldout-narrative", two_seeds=two_seeds)
    if name in ("gate", "gate1"):
        if two_seeds:
            raise ValueError(f"bench {name!r} has no two-seed ground truth (its retrains are the quality gate's, one "
                             "seed each): drop two_seeds / --two-seeds, or use a public or held-out dev bench")
        return gate_bench(gate.CORPUS_SEED + (name == "gate1"))
    raise ValueError(f"unknown bench {name!r}: use one of {BENCHES}")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.compare_settings", description=__doc__.split("\n")[0])
    p.add_argument("--bench", choices=BENCHES, default="gate")
    p.add_argument("--seeds", type=int, default=1,
                   help="fit every variant with seed 0..SEEDS-1 and report seed means (default 1: seed 0 only)")
    p.add_argument("--two-seeds", action="store_true",
                   help="score against the mean of two training seeds per retrained subset (public and held-out dev "
                        "benches; the second seed's retrains are built on first use)")
    p.add_argument("--save", default=None, metavar="NPZ",
                   help="also write every variant's scores (each fit seed) to this .npz, to rescore them later")
    p.add_argument("variants", nargs="*", help="key=value[,key=value] changes to the defaults, one per variant")
    a = p.parse_args(argv)
    if a.seeds < 1:
        p.error(f"--seeds must be >= 1, got {a.seeds}")
    print(f"load before: {os.getloadavg()}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}", flush=True)
    try:
        bench = load_bench(a.bench, two_seeds=a.two_seeds)
    except ValueError as error:  # e.g. --two-seeds on a gate corpus: load_bench's message names the fix
        p.error(str(error))
    rows = run(bench, [""] + list(a.variants), seeds=a.seeds)
    if a.save:
        save_scores(rows, a.save)
    target = "the mean of 2 training seeds each" if a.two_seeds else "1 training seed each"
    print(f"bench {a.bench}: {len(bench['documents'])} documents, {len(bench['prompts'])} queries, "
          f"{bench['truth'].n_models} retrained models ({target})")
    print(report(rows))
    print(f"load after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
