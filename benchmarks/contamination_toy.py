"""``python -m benchmarks.contamination_toy``: does STRIDE's contamination score tell contained
evaluation items from absent ones, on the bundled toy setting? A first, small check.

Contained items: the toy corpus's 40 planted facts (each stated in 2 training documents, so the
model saw them). Absent items: 40 facts of the same templates whose entity and answer are
swapped to another fact's, so every word is in the vocabulary but the statement is in no
document. Scores compared by AUROC (contained = positive) and TPR at 5% FPR:

* STRIDE: `stride_nnsight.apps.contamination_scores` (largest score over the noise floor);
* loss: minus the item's completion loss under the model (the standard membership baseline);
* BM25: the largest BM25 score of the item's text against the training documents.

Only a smoke-scale check on a toy corpus: the public-benchmark measurement with verbatim,
paraphrased and absent items and the Min-K% / zlib baselines is ``python -m
benchmarks.contamination`` (`benchmarks/RESULTS-contamination.md`).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def tpr_at_fpr(labels: np.ndarray, scores: np.ndarray, fpr: float = 0.05) -> float:
    from sklearn.metrics import roc_curve

    f, t, _ = roc_curve(labels, scores)
    return float(t[f <= fpr].max()) if (f <= fpr).any() else 0.0


def main() -> dict:
    from sklearn.metrics import roc_auc_score

    from stride_nnsight.apps import contamination_scores
    from stride_nnsight.baselines import bm25
    from stride_nnsight.cli import _default_cache, demo_stride
    from stride_nnsight.toy import toy_language_model

    print(f"load before: {os.getloadavg()}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}")
    cache = _default_cache()
    model, corpus = toy_language_model(seed=0, cache_dir=cache)
    stride, _, _ = demo_stride(model, corpus, cache, seed=0, progress=False)
    facts = corpus.facts
    present = [(f.prompt, f.completion) for f in facts]
    rng = np.random.default_rng(0)
    by_template: dict[str, list] = {}
    for f in facts:
        by_template.setdefault(f.prompt.split()[0] + f.prompt.split()[-1], []).append(f)
    absent = []
    for f in facts:  # same template, another fact's answer: every word known, the statement never seen
        others = [g for g in by_template[f.prompt.split()[0] + f.prompt.split()[-1]] if g is not f] or \
            [g for g in facts if g is not f]
        absent.append((f.prompt, others[int(rng.integers(len(others)))].completion))
    items = present + absent
    labels = np.array([1] * len(present) + [0] * len(absent))
    attr = stride.attribute([p for p, _ in items], [c for _, c in items], progress=False)
    methods = {
        "STRIDE (top score / noise floor)": contamination_scores(attr).numpy(),
        "loss (minus completion NLL)": np.asarray(attr.provenance["base_metric"], dtype=float),
        "BM25 (best match in the corpus)": bm25(corpus.documents, [p for p, _ in items],
                                                [c for _, c in items]).scores.numpy().max(axis=1),
    }
    print(f"toy setting: {len(corpus.documents)} documents, {len(present)} contained and {len(absent)} absent items")
    print("| method | AUROC | TPR at 5% FPR |\n|---|---|---|")
    out = {}
    for name, s in methods.items():
        s = np.nan_to_num(np.asarray(s, dtype=float), posinf=1e9)
        out[name] = (float(roc_auc_score(labels, s)), tpr_at_fpr(labels, s))
        print(f"| {name} | {out[name][0]:.3f} | {out[name][1]:.3f} |")
    print(f"load after: {os.getloadavg()}")
    return out


if __name__ == "__main__":
    main()
