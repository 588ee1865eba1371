"""``python -m benchmarks.cache_vs_live``: is a fit from the activation cache as good as a live fit?

On the quality-gate corpus of the test suite (150 planted-fact documents of 65-122 tokens, a
tiny GPT-2 trained here, LDS from 8 retrained models; see ``tests/test_quality_gate.py``), fits
STRIDE with every default twice, once from the activation cache and once running the model at
every step, and prints fact recall@10, LDS and the paired 95% bootstrap CI of the per-query LDS
difference, with the CPU time of each fit (``time.process_time``, run with OMP_NUM_THREADS=1 on
an otherwise idle machine). Not the public benchmark: a small, quick check.
"""

from __future__ import annotations

import copy
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

import test_quality_gate as gate  # noqa: E402
from stride_nnsight import Stride  # noqa: E402
from stride_nnsight.evaluation import bootstrap_ci, fact_tracing, lds, retrain_ground_truth  # noqa: E402
from stride_nnsight.toy import train_tokenizer  # noqa: E402


def main() -> None:
    from nnsight import TransformersModel

    print(f"load before: {os.getloadavg()}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}")
    corpus = gate.make_planted_corpus()
    tokenizer = train_tokenizer(corpus.documents, vocab_size=500)
    model = gate._train(corpus, tokenizer, range(len(corpus.documents)), seed=0)
    truth = retrain_ground_truth(
        lambda idx, seed: gate._train(corpus, tokenizer, idx, seed),
        lambda m: gate._fact_losses(m, tokenizer, corpus),
        n_train=len(corpus.documents), n_models=gate.N_RETRAINS, fraction=0.5, seed=1, progress=False)
    rows = {}
    for mode in (True, False):
        lm = TransformersModel(model, tokenizer=copy.deepcopy(tokenizer), task="text-generation")
        start = time.process_time()
        stride = Stride(lm, activation_cache=mode).fit(corpus.documents, progress=False)
        fit_s = time.process_time() - start
        scores = stride.attribute(corpus.prompts, corpus.completions, progress=False).scores.numpy()
        result = lds(scores, truth.masks, truth.losses, n_boot=1000)
        recall = fact_tracing(scores, corpus.sources, ks=(10,))["recall@10"]
        rows["cached" if mode else "live"] = (recall, result, fit_s, stride.cache_used)
    print("| fit | cache used | recall@10 | LDS | fit CPU s |")
    print("|---|---|---|---|---|")
    for name, (recall, result, fit_s, used) in rows.items():
        print(f"| {name} | {used} | {recall:.3f} | {result.mean_nan_as_zero:.3f} | {fit_s:.1f} |")
    a = np.nan_to_num(np.asarray(rows["cached"][1].per_query, dtype=float))
    b = np.nan_to_num(np.asarray(rows["live"][1].per_query, dtype=float))
    lo, hi = bootstrap_ci(a - b, 0.95, 1000, 0)
    print(f"LDS difference cached - live: {np.mean(a - b):+.4f}, paired 95% CI [{lo:+.4f}, {hi:+.4f}] "
          f"over {len(a)} queries")
    print(f"load after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
