"""``python -m benchmarks.token_weights``: measure the completion loss with rare tokens weighted up.

`benchmarks.measurement_overlap` found the dev twin's measurements following the *raw* overlap
of a completion's tokens with a subset's documents, not BM25's IDF-weighted overlap; the reading
then was that the retraining ground truth follows the latter on scripture (it does not:
`benchmarks.recovery_ceiling` finds raw completion overlap the better scorer there). This compares, from one default fit per
bench, the default metric (mean completion NLL) with the same NLL weighted per target token by
``idf(t) ** p`` (``idf = log((N + 1) / (df + 1)) + 1`` over the training documents, ``df`` the
number of documents holding token ``t``) as the metric the operators are measured with
(`Stride.attribute(metric=...)`); the ground truth stays the unweighted loss. Prints LDS by kind,
fact recall@10 and the paired CIs against the default metric. Dev benches only
(``--bench``, as in `benchmarks.compare_settings`).
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

from benchmarks.compare_settings import BENCHES, load_bench, report  # noqa: E402
from stride_nnsight.evaluation import fact_tracing, lds  # noqa: E402
from stride_nnsight.operators import token_nll  # noqa: E402


def idf_weights(tokenizer, documents, vocab_size: int) -> torch.Tensor:
    """``idf [V]`` over the training documents (smoothed: unseen tokens get the largest weight)."""
    df = np.zeros(vocab_size)
    for doc in documents:
        df[list(set(tokenizer(doc)["input_ids"]))] += 1
    return torch.tensor(np.log((len(documents) + 1) / (df + 1)) + 1.0, dtype=torch.float32)


def weighted_metric(weights: torch.Tensor, power: float):
    """``-sum_t w_t nll_t / sum_t w_t`` over the completion tokens, ``w_t = weights[target_t] ** power``."""
    def metric(logits, batch):
        # token_nll averages over a per-token mask; a weighted mask gives the weighted mean
        w = weights.to(batch.input_ids.device)[batch.input_ids] ** power * batch.loss_mask.float()
        return -token_nll(logits, batch.input_ids, w)
    metric.__name__ = f"idf^{power:g}_weighted_completion_loss"
    return metric


def main(argv=None) -> None:
    from nnsight import TransformersModel

    from stride_nnsight import Stride

    p = argparse.ArgumentParser(prog="python -m benchmarks.token_weights", description=__doc__.split("\n")[0])
    p.add_argument("--bench", choices=BENCHES, default="heldout-dev")
    p.add_argument("powers", nargs="*", type=float, default=[1.0, 2.0], help="exponents p of idf (0: unweighted)")
    a = p.parse_args(argv)
    print(f"load before: {os.getloadavg()}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}", flush=True)
    bench = load_bench(a.bench)
    lm = TransformersModel(bench["model"], tokenizer=copy.deepcopy(bench["tokenizer"]), task="text-generation")
    stride = Stride(lm, **bench["stride_kwargs"]).fit(bench["documents"], progress=False)
    weights = idf_weights(bench["tokenizer"], bench["documents"], stride.backend.vocab_size)
    kinds = np.asarray(bench["kinds"])
    rows = []
    for power in [None] + list(a.powers):
        metric = None if power is None else weighted_metric(weights, power)
        scores = stride.attribute(bench["prompts"], bench["completions"], metric=metric, progress=False,
                                  null_permutations=0).scores.numpy()
        per_query = np.nan_to_num(np.asarray(lds(scores, bench["truth"].masks, bench["truth"].losses).per_query))
        rows.append({"variant": "default metric" if power is None else f"idf^{power:g} weighted", "scores": scores,
                     "truth": bench["truth"], "per_query": per_query, "lds": float(per_query.mean()),
                     "by_kind": {k: float(per_query[kinds == k].mean()) for k in sorted(set(kinds.tolist()))},
                     "recall@10": fact_tracing(scores[kinds == "fact"], bench["sources"], ks=(10,))["recall@10"],
                     "fit_s": float("nan"), "rows_per_doc": float("nan"), "positions": stride.args.loss_positions})
        print(f"  {rows[-1]['variant']}: LDS {rows[-1]['lds']:.3f}", flush=True)
    print(f"bench {a.bench}: {len(bench['documents'])} documents, {len(bench['prompts'])} queries, "
          f"{bench['truth'].n_models} retrained models; one default fit, measured with each metric "
          f"(rows/doc and fit columns do not apply)")
    print(report(rows))
    print(f"load after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
