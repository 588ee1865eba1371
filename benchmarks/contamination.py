"""``python -m benchmarks.contamination``: which evaluation items did the training corpus contain?

Built on the public benchmark (`benchmarks.setting.FULL`). Its 80 planted facts are the
evaluation items (``prompt -> answer``), split by fact id into three groups:

* **verbatim**: both of the fact's source documents state it word for word (as in the benchmark);
* **paraphrased**: both sources state it in other words (a hand-written paraphrase per relation,
  for example "The capital of X is Y" -> "Y is the capital city of X"); the item's wording is in
  no document;
* **absent**: the statement is removed from both sources (each keeps its filler sentence), so
  nothing in the corpus states the item.

A model is trained from scratch on this corpus with the benchmark's recipe; then every method
scores the 80 items (higher = more likely contained) and is judged by AUROC (contained = positive)
and TPR at 5% FPR, for verbatim vs absent, paraphrased vs absent, and both vs absent; 95% CIs by a
stratified bootstrap over items. Methods:

* **STRIDE**: `stride_nnsight.apps.contamination_scores` (the item's largest score over its noise
  floor) from a default fit (the benchmark's ``max_length``) on this corpus and model;
* **loss**, **Min-K% prob** (k = 20%), **zlib ratio**: from the model's token probabilities of
  ``prompt + answer`` (`stride_nnsight.baselines.membership_scores`), no corpus access;
* **BM25**: the item's best BM25 match in the corpus (reads the corpus, no model).

Writes ``benchmarks/RESULTS-contamination.md``. Cost: one training run of the benchmark model
(~2 min, cached) and one STRIDE fit (~4 min) on one thread.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import re
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

OUT = Path(__file__).resolve().parent / "RESULTS-contamination.md"
GROUPS = ("verbatim", "paraphrased", "absent")

#: one paraphrase per relation of the planted facts: ``{s}`` the subject, ``{o}`` the answer
PARAPHRASES = {
    "capital": "{o} is the capital city of {s}",
    "founder": "{o} founded {s}",
    "river": "{s} is crossed by the {o}",
    "animal": "In {s} the {o} is the animal of the nation",
    "inventor": "{o} made the first {s}",
    "birthplace": "The village of {o} is where {s} was born",
    "language": "In {s} people speak {o}",
    "mountain": "Mount {o} is the highest peak of {s}",
}


def tpr_at_fpr(labels: np.ndarray, scores: np.ndarray, fpr: float = 0.05) -> float:
    """True-positive rate at the largest threshold whose false-positive rate is <= ``fpr``."""
    from sklearn.metrics import roc_curve

    f, t, _ = roc_curve(labels, scores)
    return float(t[f <= fpr].max()) if (f <= fpr).any() else 0.0


def _stratified_draws(labels: np.ndarray, n_boot: int,
                      seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(pos, neg, wp [n_boot, |pos|], wn [n_boot, |neg|])``: the positive and negative items and
    how often each is drawn in each resample (positives and negatives resampled separately, in the
    order ``rng.choice(pos)``, ``rng.choice(neg)`` per resample)."""
    pos, neg = np.flatnonzero(labels == 1), np.flatnonzero(labels == 0)
    rng = np.random.default_rng(seed)
    wp, wn = np.zeros((n_boot, len(pos))), np.zeros((n_boot, len(neg)))
    for b in range(n_boot):
        wp[b] = np.bincount(rng.choice(len(pos), len(pos)), minlength=len(pos))
        wn[b] = np.bincount(rng.choice(len(neg), len(neg)), minlength=len(neg))
    return pos, neg, wp, wn


def _auroc(scores: np.ndarray, pos: np.ndarray, neg: np.ndarray, wp: np.ndarray, wn: np.ndarray) -> np.ndarray:
    """AUROC of each weighted resample ``[B]``: the share of (positive, negative) pairs the score
    orders correctly, ties counting one half (the Mann-Whitney form of `sklearn.metrics.roc_auc_score`);
    a pair's weight is the product of its items' draw counts."""
    sp, sn = scores[pos][:, None], scores[neg][None, :]
    wins = (sp > sn) + 0.5 * (sp == sn)                                   # [|pos|, |neg|]
    return np.einsum("bp,pn,bn->b", wp, wins, wn) / (wp.sum(1) * wn.sum(1))


def auroc_ci(labels: np.ndarray, scores: np.ndarray, n_boot: int = 1000, seed: int = 0) -> tuple[float, float, float]:
    """AUROC and a 95% percentile-bootstrap CI that resamples positives and negatives separately."""
    pos, neg, wp, wn = _stratified_draws(labels, n_boot, seed)
    boots = _auroc(scores, pos, neg, wp, wn)
    point = _auroc(scores, pos, neg, np.ones((1, len(pos))), np.ones((1, len(neg))))[0]
    return float(point), float(np.quantile(boots, 0.025)), float(np.quantile(boots, 0.975))


def paired_auroc_difference(labels: np.ndarray, a: np.ndarray, b: np.ndarray, n_boot: int = 1000,
                            seed: int = 0) -> tuple[float, float, float]:
    """AUROC(a) - AUROC(b) on the same items, with a 95% CI from one stratified bootstrap of the
    items shared by both methods (paired)."""
    pos, neg, wp, wn = _stratified_draws(labels, n_boot, seed)
    diffs = _auroc(a, pos, neg, wp, wn) - _auroc(b, pos, neg, wp, wn)
    ones = np.ones((1, len(pos))), np.ones((1, len(neg)))
    point = _auroc(a, pos, neg, *ones)[0] - _auroc(b, pos, neg, *ones)[0]
    return float(point), float(np.quantile(diffs, 0.025)), float(np.quantile(diffs, 0.975))


def _subject(prompt: str, template: str) -> str:
    pattern = "^" + re.escape(template).replace(re.escape("{s}"), "(.+)") + "$"
    match = re.match(pattern, prompt)
    if match is None:
        raise ValueError(f"prompt {prompt!r} does not follow the template {template!r}")
    return match.group(1)


def contaminated_corpus(setting: Any) -> tuple[list[str], list[dict]]:
    """The benchmark's documents with each fact's statement kept, paraphrased or removed by group.
    Returns ``(documents, items)``; an item is ``{prompt, completion, relation, group}``."""
    from benchmarks.setting import _make_corpus_module

    templates = {rel: prompt_t for rel, prompt_t, *_ in _make_corpus_module().RELATIONS}
    docs = list(setting.documents)
    items = []
    for f in setting.corpus.facts:
        group = GROUPS[f["id"] % len(GROUPS)]
        stated = f["prompt"] + f["completion"]
        answer = f["completion"].strip()
        subject = _subject(f["prompt"], templates[f["relation"]])
        for i in f["source_ids"]:
            d = docs[i]
            if stated not in d:
                raise AssertionError(f"fact {f['id']} is not stated in its source {i}")
            if group == "paraphrased":
                docs[i] = d.replace(stated, PARAPHRASES[f["relation"]].format(s=subject, o=answer))
            elif group == "absent":  # keep the source's filler sentence only
                docs[i] = d[len(stated) + 2:] if d.startswith(stated + ". ") else d.split(" " + stated)[0]
        items.append({"prompt": f["prompt"], "completion": f["completion"], "relation": f["relation"],
                      "group": group})
    for item in items:
        stated = item["prompt"] + item["completion"]
        answer = item["completion"].strip()
        holders = [d for d in docs if answer in d]
        if item["group"] == "verbatim" and not any(stated in d for d in holders):
            raise AssertionError(f"verbatim item lost: {stated!r}")
        if item["group"] == "paraphrased" and (not holders or any(stated in d for d in docs)):
            raise AssertionError(f"paraphrased item not paraphrased: {stated!r}")
        if item["group"] == "absent" and holders:
            raise AssertionError(f"absent item still in the corpus: {stated!r}")
    return docs, items


def train_model(setting: Any, docs: list[str], log=print):
    """The benchmark's model recipe trained on ``docs`` (cached by the documents' digest)."""
    from transformers import GPT2LMHeadModel

    digest = hashlib.sha256("\0".join(docs).encode()).hexdigest()[:12]
    path = setting.cache_dir / f"contamination-model-{setting.key}-{digest}"
    if (path / "bench_meta.json").is_file():
        log(f"  loaded the contaminated-corpus model from {path}")
        return GPT2LMHeadModel.from_pretrained(path, local_files_only=True).eval(), \
            json.loads((path / "bench_meta.json").read_text())["train_seconds"]
    modified = replace(setting, corpus=replace(setting.corpus, documents=docs))
    t0 = time.perf_counter()
    model = modified.train_fn(np.arange(len(docs)), setting.config.model_seed).eval()
    seconds = time.perf_counter() - t0
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    (path / "bench_meta.json").write_text(json.dumps({"train_seconds": seconds}))
    log(f"  trained on the contaminated corpus in {seconds:.0f} s")
    return model, seconds


def main(argv=None) -> str:
    from nnsight import TransformersModel

    from benchmarks.setting import add_script_arguments, script_setting
    from stride_nnsight import Stride, baselines
    from stride_nnsight.apps import contamination_scores

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_script_arguments(ap, OUT)
    a = ap.parse_args(argv)
    start = time.perf_counter()
    setting = script_setting(a)
    config = setting.config
    docs, items = contaminated_corpus(setting)
    model, train_s = train_model(setting, docs)
    lm = TransformersModel(model, tokenizer=copy.deepcopy(setting.tokenizer), task="text-generation")
    prompts, completions = [i["prompt"] for i in items], [i["completion"] for i in items]
    t0 = time.process_time()
    stride = Stride(lm, max_length=config.max_length).fit(docs, progress=False)
    attr = stride.attribute(prompts, completions, progress=False)
    stride_s = time.process_time() - t0
    scores = {"STRIDE (top score / noise floor)": contamination_scores(attr).numpy()}
    member = baselines.membership_scores(lm, [p + c for p, c in zip(prompts, completions)], k=0.2)
    scores["loss (minus mean NLL)"] = member["loss"].numpy()
    scores["Min-K% prob (k = 20%)"] = member["min_k"].numpy()
    scores["zlib ratio"] = member["zlib"].numpy()
    scores["BM25 (best match in the corpus)"] = baselines.bm25(docs, prompts, completions).scores.numpy().max(axis=1)
    groups = np.array([i["group"] for i in items])
    report = render(scores, groups, len(docs), train_s, stride_s, time.perf_counter() - start)
    print(report)
    print(f"load after: {os.getloadavg()}")
    if not a.quick:
        Path(a.out).write_text(report)
    return report


def render(scores: dict[str, np.ndarray], groups: np.ndarray, n_docs: int, train_s: float, stride_s: float,
           wall: float) -> str:
    counts = ", ".join(f"{int((groups == g).sum())} {g}" for g in GROUPS)
    lines = [
        "# Contamination detection on the public benchmark",
        "",
        f"Generated by `OMP_NUM_THREADS=1 python -m benchmarks.contamination` on {time.strftime('%Y-%m-%d')} "
        f"({wall / 60:.0f} min wall; load average {os.getloadavg()[0]:.2f} at the end). Items: the public "
        f"benchmark's planted facts ({counts}); corpus: its {n_docs} documents with each fact's two sources kept, "
        f"paraphrased or stripped of the statement by group; model: the benchmark's recipe trained on that "
        f"corpus ({train_s:.0f} s). STRIDE: library defaults (the benchmark's `max_length`), fit and "
        f"attribution {stride_s:.0f} s CPU. Scores: higher = more likely contained.",
        "",
        "| method | AUROC verbatim vs absent | AUROC paraphrased vs absent | AUROC both vs absent | "
        "TPR at 5% FPR (both) |",
        "|---|---|---|---|---|",
    ]
    for name, s in scores.items():
        s = np.nan_to_num(np.asarray(s, dtype=float), posinf=1e9, neginf=-1e9)
        cells = []
        for positive in (("verbatim",), ("paraphrased",), ("verbatim", "paraphrased")):
            keep = np.isin(groups, positive + ("absent",))
            labels = np.isin(groups[keep], positive).astype(int)
            auc, lo, hi = auroc_ci(labels, s[keep])
            cells.append(f"{auc:.3f} [{lo:.3f}, {hi:.3f}]")
        labels = (groups != "absent").astype(int)
        cells.append(f"{tpr_at_fpr(labels, s):.3f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    clean = {k: np.nan_to_num(np.asarray(v, dtype=float), posinf=1e9, neginf=-1e9) for k, v in scores.items()}
    first = next(iter(clean))
    lines += ["", f"Paired AUROC differences, {first.split(' (')[0]} minus each baseline (95% CI, stratified "
              "bootstrap of the items; verdict only when the CI excludes 0):", "",
              "| baseline | verbatim vs absent | paraphrased vs absent | both vs absent |", "|---|---|---|---|"]
    for name in list(clean)[1:]:
        cells = []
        for positive in (("verbatim",), ("paraphrased",), ("verbatim", "paraphrased")):
            keep = np.isin(groups, positive + ("absent",))
            labels = np.isin(groups[keep], positive).astype(int)
            d, lo, hi = paired_auroc_difference(labels, clean[first][keep], clean[name][keep])
            verdict = "better" if lo > 0 else "worse" if hi < 0 else "level"
            cells.append(f"{d:+.3f} [{lo:+.3f}, {hi:+.3f}] {verdict}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "AUROC 0.5 = chance. CIs: 95% percentile bootstrap resampling contained and absent items "
              "separately (1000 resamples). The absent items' invented names occur nowhere in the corpus, while "
              "their template words do (in the other facts' documents). The model-only baselines (loss, Min-K%, "
              "zlib) read no corpus; BM25 reads the corpus and no model; STRIDE reads both, through operators "
              "fitted on the corpus."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
