"""``python -m benchmarks.recovery_ceiling``: is the text-query gap in the measurements or in the recovery?

On text queries STRIDE trails BM25 (held-out benchmark's dev twin, scripture). Two questions, from
one default fit per bench (``--bench``, as in `benchmarks.compare_settings`; dev benches only):

1. **Which lexical signal does the retraining ground truth follow?** LDS of text scorers that need
   no model: BM25 of the whole query (the library's `stride_nnsight.baselines.bm25`), BM25 of the
   completion alone, and ``overlap_j`` (how many of the completion's word types document ``j``
   holds; lowercase ``\\w+`` words as BM25 reads them), raw and IDF-weighted.
2. **What does the recovery make of a perfect measurement of it?** An *oracle* measurement
   ``y_k = sum_{j in subset k} overlap_j`` (the subset sums of the best model-free signal, no
   noise) is recovered exactly like STRIDE's own measurements: the Lasso at several fractions of
   ``lambda_max`` (the library's `recover`) and a dense ridge (``alpha = 10`` on the centred design).
   (A row of BM25 cut to its top 20 documents shows how much of the lexical signal is in a few.)
   If the oracle, through the default recovery, lands where STRIDE does, the recovery is what
   limits those queries, not what the operators measure.
3. **Does a dense component added to the default Lasso help?** ``lasso + c * ridge``, each
   query's two score vectors first scaled to unit L1 norm (``c`` = 0.3 and 1).

Prints LDS overall and by kind, fact recall@10 and non-zeros per query for every row, and the
paired 95% CIs against the first STRIDE row (the library default: Lasso at 0.3).
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import scipy.sparse as sp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

from benchmarks.compare_settings import BENCHES, load_bench  # noqa: E402
from benchmarks.lambda_rules import recover_fractions  # noqa: E402
from benchmarks.recovery_variants import ridge_rows  # noqa: E402
from stride_nnsight.baselines.lexical import word_tokenize  # noqa: E402
from stride_nnsight.evaluation import bootstrap_ci, fact_tracing, lds, paired_lds_ci  # noqa: E402

FRACTIONS = (0.1, 0.3, 0.5)
RIDGE_ALPHA = 10.0
HYBRID_WEIGHTS = (0.3, 1.0)
TOP_K = 20


def completion_overlap(completions: Sequence[str], documents: Sequence[str], idf: bool = False) -> np.ndarray:
    """``[q, n]``: how many of completion ``i``'s word types document ``j`` holds (``idf``: each
    shared word weighted by BM25's ``log((n - df + 0.5) / (df + 0.5) + 1)``)."""
    doc_words = [set(word_tokenize(d)) for d in documents]
    n = len(documents)
    df: dict[str, int] = {}
    for words in doc_words:
        for w in words:
            df[w] = df.get(w, 0) + 1
    out = np.zeros((len(completions), n))
    for i, c in enumerate(completions):
        for w in set(word_tokenize(c)):
            weight = np.log((n - df.get(w, 0) + 0.5) / (df.get(w, 0) + 0.5) + 1.0) if idf else 1.0
            for j, words in enumerate(doc_words):
                if w in words:
                    out[i, j] += weight
    return out


def top_only(scores: np.ndarray, k: int) -> np.ndarray:
    """``scores [q, n]`` with all but each row's ``k`` largest set to 0 (how much of a dense
    scorer's LDS its top documents carry)."""
    out = np.zeros_like(scores)
    top = np.argsort(-scores, axis=1)[:, :k]
    np.put_along_axis(out, top, np.take_along_axis(scores, top, 1), 1)
    return out


def subset_sums(membership: sp.spmatrix, signal: np.ndarray) -> np.ndarray:
    """The oracle measurements ``y [q, K]`` of a per-document signal ``[q, n]``: its sum over each subset."""
    return np.asarray((sp.csr_matrix(membership, dtype=np.float64) @ np.asarray(signal, dtype=np.float64).T).T)


def hybrid_scores(lasso: np.ndarray, ridge: np.ndarray, weight: float) -> np.ndarray:
    """``lasso + weight * ridge``, each row of both first scaled to unit L1 norm ``[q, n]``."""
    def unit(a):
        return a / np.maximum(np.abs(a).sum(1, keepdims=True), 1e-300)
    return unit(lasso) + weight * unit(ridge)


def _row(label: str, scores: np.ndarray, bench: dict[str, Any]) -> dict[str, Any]:
    truth, kinds = bench["truth"], np.asarray(bench["kinds"])
    per_query = np.nan_to_num(np.asarray(lds(scores, truth.masks, truth.losses).per_query, dtype=float))
    facts = kinds == "fact"
    return {"label": label, "scores": scores, "per_query": per_query,
            "by_kind": {k: float(per_query[kinds == k].mean()) for k in sorted(set(kinds.tolist()))},
            "recall@10": fact_tracing(scores[facts], bench["sources"], ks=(10,))["recall@10"] if facts.any()
            else float("nan"), "nnz": float((scores != 0).sum(1).mean())}


def report(rows: list[dict[str, Any]], reference: dict[str, Any], truth: Any, n_boot: int = 1000) -> str:
    kinds = list(rows[0]["by_kind"])
    head = ["scores", "LDS"] + [f"LDS {k}" for k in kinds] + \
        ["fact recall@10", "non-zeros/query", f"LDS - {reference['label']} [95% CI]", "CI, queries + retrains"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        diff = r["per_query"] - reference["per_query"]
        if r is reference:
            ci, model_ci = "-", "-"
        else:
            lo, hi = bootstrap_ci(diff, 0.95, n_boot, 0)
            _, mlo, mhi = paired_lds_ci(r["scores"], reference["scores"], truth.masks, truth.losses, n_boot=n_boot)
            ci, model_ci = f"{diff.mean():+.3f} [{lo:+.3f}, {hi:+.3f}]", f"[{mlo:+.3f}, {mhi:+.3f}]"
        cells = [r["label"], f"{r['per_query'].mean():.3f}"] + [f"{r['by_kind'][k]:.3f}" for k in kinds] + \
            [f"{r['recall@10']:.3f}", f"{r['nnz']:.0f}", ci, model_ci]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> None:
    from nnsight import TransformersModel

    from stride_nnsight import Stride, baselines

    p = argparse.ArgumentParser(prog="python -m benchmarks.recovery_ceiling", description=__doc__.split("\n")[0])
    p.add_argument("--bench", choices=BENCHES, default="heldout-dev")
    a = p.parse_args(argv)
    print(f"load before: {os.getloadavg()}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}", flush=True)
    bench = load_bench(a.bench)
    docs, prompts, completions = bench["documents"], bench["prompts"], bench["completions"]
    overlap = completion_overlap(completions, docs)
    library_bm25 = baselines.bm25(docs, prompts, completions).scores.numpy().astype(np.float64)
    rows = [_row("BM25, prompt + completion (library baseline)", library_bm25, bench),
            _row(f"BM25, prompt + completion, its top {TOP_K} documents only", top_only(library_bm25, TOP_K), bench),
            _row("BM25, completion only (`query=\"completion\"`)",
                 baselines.bm25(docs, prompts, completions, query="completion").scores.numpy().astype(np.float64),
                 bench),
            _row("completion word overlap", overlap, bench),
            _row("completion word overlap, IDF-weighted", completion_overlap(completions, docs, idf=True), bench)]
    lm = TransformersModel(bench["model"], tokenizer=copy.deepcopy(bench["tokenizer"]), task="text-generation")
    stride = Stride(lm, **bench["stride_kwargs"]).fit(bench["documents"], progress=False)
    attr = stride.attribute(prompts, completions, progress=False, null_permutations=0)
    M = stride.design.membership
    sources = {"STRIDE measurements": attr.measurements.numpy().astype(np.float64),
               "oracle M overlap": subset_sums(M, overlap)}
    reference = None
    for name, y in sources.items():
        for f in FRACTIONS:
            rows.append(_row(f"{name}, Lasso {f:g}" + (" (default)" if f == 0.3 and reference is None else ""),
                             recover_fractions(y, M, np.full(len(y), f)), bench))
            if f == 0.3 and reference is None:
                reference = rows[-1]
        ridge = ridge_rows(y, M, RIDGE_ALPHA)
        rows.append(_row(f"{name}, ridge {RIDGE_ALPHA:g}", ridge, bench))
        if name == "STRIDE measurements":
            for c in HYBRID_WEIGHTS:
                rows.append(_row(f"{name}, Lasso 0.3 + {c:g} x ridge (unit L1 each)",
                                 hybrid_scores(reference["scores"], ridge, c), bench))
    print(f"bench {a.bench}: {len(docs)} documents, {len(prompts)} queries, {bench['truth'].n_models} retrained "
          f"models, K={M.shape[0]}; one default fit; the oracle is noise-free")
    print(report(rows, reference, bench["truth"]))
    print(f"load after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
