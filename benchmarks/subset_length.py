"""``python -m benchmarks.subset_length``: does a subset's length move every query's loss, and do the operators see it?

A diagnostic for the held-out recipe's shared retrain factor (docs/method.md, "How much the
held-out recipe's ground truth can show"), on dev benches only (``--bench``, several allowed; as in
`benchmarks.compare_settings`; never the held-out benchmark). Per bench:

* **retrains**: per query, the Pearson correlation over the retrained models between minus the
  query's loss and the number of training tokens in the model's subset (the documents' scored
  tokens as STRIDE encodes them); mean by query kind. Negative: the more text a retrain saw,
  the *higher* its loss on the query, whatever the query;
* **operators**: per query, the same correlation over STRIDE's ``K`` operators between the
  measurement ``y_k`` (one default fit) and the tokens of operator ``k``'s subset.

The benches' training recipe (`stride_nnsight.toy.train_causal_lm`) averages the loss over the
tokens of each batch, so a long document takes a larger share of every update than a short one;
STRIDE's fidelity loss weighs each document once, whatever its length.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

from benchmarks.compare_settings import BENCHES, load_bench  # noqa: E402
from benchmarks.lambda_rules import _row_correlation  # noqa: E402


def mean_correlation(values: np.ndarray, signal: np.ndarray) -> float:
    """Mean over rows of ``values [q, m]`` of the Pearson correlation with ``signal [m]``
    (a constant row counts 0)."""
    values = np.asarray(values, dtype=np.float64)
    return float(_row_correlation(values, np.broadcast_to(signal, values.shape), rank=False).mean())


def rows_for(bench: dict, stride) -> list[str]:
    """``| kind | queries | retrains | operators |`` rows for one fitted bench."""
    tokens = stride._encode_train().loss_mask.numpy().sum(1).astype(np.float64)  # scored tokens per document
    truth = bench["truth"]
    losses = np.asarray(truth.losses, dtype=np.float64)
    losses = losses.mean(1) if losses.ndim == 3 else losses
    retrain_tokens = truth.masks.astype(np.float64) @ tokens                       # [m]
    y = stride.attribute(bench["prompts"], bench["completions"], progress=False,
                         null_permutations=0).measurements.numpy().astype(np.float64)   # [q, K]
    operator_tokens = np.asarray(stride.design.membership @ tokens).ravel()         # [K]
    kinds = np.asarray(bench["kinds"])
    rows = []
    for kind in sorted(set(kinds.tolist())):
        sel = kinds == kind
        rows.append(f"| {kind} | {int(sel.sum())} | {mean_correlation(-losses[:, sel].T, retrain_tokens):+.3f} | "
                    f"{mean_correlation(y[sel], operator_tokens):+.3f} |")
    return rows


def main(argv=None) -> None:
    from nnsight import TransformersModel

    from stride_nnsight import Stride

    p = argparse.ArgumentParser(prog="python -m benchmarks.subset_length", description=__doc__.split("\n")[0])
    p.add_argument("--bench", nargs="+", default=["heldout-dev"], choices=BENCHES)
    a = p.parse_args(argv)
    print(f"load before: {os.getloadavg()}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}", flush=True)
    for name in a.bench:
        bench = load_bench(name)
        lm = TransformersModel(bench["model"], tokenizer=copy.deepcopy(bench["tokenizer"]), task="text-generation")
        stride = Stride(lm, **bench["stride_kwargs"]).fit(bench["documents"], progress=False)
        m = bench["truth"].masks.shape[0]
        print(f"\nbench {name}: {len(bench['documents'])} documents, {m} retrained models, K={stride.design.n_subsets}; "
              "mean Pearson correlation with the subset's training tokens")
        print("| queries | n | retrains: -loss | operators: y |\n|---|---|---|---|")
        print("\n".join(rows_for(bench, stride)), flush=True)
    print(f"\nload after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
