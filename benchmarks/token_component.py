"""``python -m benchmarks.token_component``: the recovery's token component against the Lasso alone.

For each dev bench (``--bench``, several allowed; as in `benchmarks.compare_settings`): one default
fit, one measurement of the queries, then both recoveries of the *same* measurements: the Lasso at
the default fraction (``recovery="lasso"``) and the Lasso plus the token component
(``"lasso+tokens"``, the library default: `stride_nnsight.token_component`). Prints LDS overall and
by kind, fact recall@10, non-zeros per query and the paired 95% CIs of each row minus the Lasso
(queries; then queries and retrained models), with BM25 of the completion alone (the strongest
lexical baseline on these benches, ``baselines.bm25(..., query="completion")``) as a reference row.
These are dev benches: the held-out benchmark (`benchmarks.heldout`) is where the default is judged.
``--bench heldout`` runs the same two rows on the held-out benchmark: only to split a held-out
report's change into its parts *after* the default was chosen and reported (nothing is chosen
from it).
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

from benchmarks.compare_settings import BENCHES, load_bench  # noqa: E402
from benchmarks.recovery_ceiling import _row, report  # noqa: E402
from stride_nnsight.token_component import add_token_component, completion_tokens  # noqa: E402


def rows_for(bench: dict[str, Any], stride: Any) -> list[dict[str, Any]]:
    """The Lasso, Lasso + token component (same measurements) and completion-only BM25 rows of a
    fitted ``stride`` on ``bench`` (the form `benchmarks.compare_settings.load_bench` returns)."""
    from stride_nnsight import baselines

    prompts, completions = bench["prompts"], bench["completions"]
    lasso = stride.attribute(prompts, completions, progress=False, null_permutations=0, recovery="lasso")
    queries = stride.encode_queries(prompts, completions)
    both, _ = add_token_component(lasso.measurements.numpy(), stride.design.membership,
                                  sp.csr_matrix(lasso.scores.numpy()), stride._token_presence(),
                                  completion_tokens(queries.input_ids.numpy(), queries.loss_mask.numpy()))
    bm25 = baselines.bm25(bench["documents"], prompts, completions, query="completion").scores.numpy()
    return [_row("Lasso 0.3 alone (`recovery=\"lasso\"`)", lasso.scores.numpy().astype(np.float64), bench),
            _row("Lasso 0.3 + token component (`\"lasso+tokens\"`, default)", both.toarray().astype(np.float64), bench),
            _row("BM25, completion only (reference)", bm25.astype(np.float64), bench)]


def heldout_bench() -> dict[str, Any]:
    """The held-out benchmark (`benchmarks.heldout.HELDOUT`) in the form `rows_for` reads."""
    from benchmarks.compare_settings import _setting_bench
    from benchmarks.heldout import HELDOUT, build_heldout
    from benchmarks.setting import ground_truth

    setting = build_heldout(HELDOUT, log=lambda m: print(m, flush=True))
    return _setting_bench(setting, ground_truth(setting, progress=False), {})


def main(argv=None) -> None:
    from nnsight import TransformersModel

    from stride_nnsight import Stride

    p = argparse.ArgumentParser(prog="python -m benchmarks.token_component", description=__doc__.split("\n")[0])
    p.add_argument("--bench", choices=BENCHES + ("heldout",), nargs="+", default=["heldout-dev"])
    a = p.parse_args(argv)
    print(f"load before: {os.getloadavg()}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}", flush=True)
    for name in a.bench:
        bench = heldout_bench() if name == "heldout" else load_bench(name)
        lm = TransformersModel(bench["model"], tokenizer=copy.deepcopy(bench["tokenizer"]), task="text-generation")
        stride = Stride(lm, **bench["stride_kwargs"]).fit(bench["documents"], progress=False)
        rows = rows_for(bench, stride)
        print(f"\nbench {name}: {len(bench['documents'])} documents, {len(bench['prompts'])} queries, "
              f"{bench['truth'].n_models} retrained models, K={stride.args.n_subsets}; one default fit")
        print(report(rows, rows[0], bench["truth"]))
    print(f"load after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
