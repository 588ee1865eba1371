"""``python -m benchmarks.measurement_overlap``: do the operators' measurements carry what BM25 sees?

A diagnostic for the text-query gap on the held-out benchmark's dev twin (``--bench heldout-dev``,
the default; never the held-out benchmark). One default fit; per query, the Spearman correlation
over the ``K`` operators of the measurement ``y_k`` with

* ``M bm25``: the sum of the query's BM25 scores over operator ``k``'s subset (what a purely
  lexical influence would make the operator measure);
* ``M overlap``: the same sum of ``overlap_j``, how many of the completion's token types document
  ``j`` contains (the lexical signal closest to the completion loss the operators measure);
* ``M w``: the Lasso fit's own prediction (how much of ``y`` the recovery explains);

and the Spearman correlation over documents of STRIDE's scores with BM25's. Averages by query
kind. BM25's scores come from the dev twin's saved report run (``python -m benchmarks.heldout
--dev``). If ``corr(y, M bm25)`` is high where STRIDE trails BM25, the measurements hold the
lexical signal and the loss is in the recovery; if low, the operators do not measure it.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
from pathlib import Path

import numpy as np
import scipy.sparse as sp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

from benchmarks.compare_settings import load_bench  # noqa: E402
from benchmarks.lambda_rules import _row_correlation  # noqa: E402


def main(argv=None) -> None:
    from nnsight import TransformersModel

    from benchmarks.heldout import HELDOUT_DEV, saved_results
    from stride_nnsight import Stride

    p = argparse.ArgumentParser(prog="python -m benchmarks.measurement_overlap", description=__doc__.split("\n")[0])
    p.parse_args(argv)
    print(f"load before: {os.getloadavg()}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}", flush=True)
    saved = saved_results(HELDOUT_DEV)
    if saved is None:
        raise SystemExit("no saved dev-twin results: run `python -m benchmarks.heldout --dev` first")
    bm25 = np.asarray(saved["methods"]["BM25"]["scores"], dtype=np.float64)
    bench = load_bench("heldout-dev")
    lm = TransformersModel(bench["model"], tokenizer=copy.deepcopy(bench["tokenizer"]), task="text-generation")
    stride = Stride(lm, **bench["stride_kwargs"]).fit(bench["documents"], progress=False)
    attr = stride.attribute(bench["prompts"], bench["completions"], progress=False, null_permutations=0)
    y = attr.measurements.numpy().astype(np.float64)
    M = sp.csr_matrix(stride.design.membership, dtype=np.float64)
    w = attr.scores.numpy().astype(np.float64)
    lexical = (M @ bm25.T).T
    fitted = (M @ w.T).T
    tok = bench["tokenizer"]
    doc_tokens = [set(tok(d)["input_ids"]) for d in bench["documents"]]
    overlap = np.array([[len(set(tok(c)["input_ids"]) & dt) for dt in doc_tokens] for c in bench["completions"]],
                       dtype=np.float64)
    rows = {"corr(y, M bm25)": _row_correlation(y, lexical, True),
            "corr(y, M overlap)": _row_correlation(y, (M @ overlap.T).T, True),
            "corr(y, M w)": _row_correlation(y, fitted, True),
            "corr(STRIDE, BM25) over documents": _row_correlation(w, bm25, True)}
    kinds = np.asarray(bench["kinds"])
    names = sorted(set(kinds.tolist()))
    print(f"dev twin: {len(bench['documents'])} documents, {len(y)} queries, K={y.shape[1]}; code version of the "
          f"BM25 scores: {saved['code_version']}")
    print("| Spearman (mean over queries) | all | " + " | ".join(names) + " |")
    print("|---|---|" + "---|" * len(names))
    for label, values in rows.items():
        print(f"| {label} | {values.mean():.3f} | " + " | ".join(f"{values[kinds == k].mean():.3f}" for k in names)
              + " |")
    print(f"load after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
