"""``python -m benchmarks.measurement_order``: exact against first-order measurements, same fits.

For a dev bench (``--bench``, as in `benchmarks.compare_settings`) and fit seeds ``0 .. S-1``: one
default fit per seed, then the queries measured and recovered twice from it, with each operator's
exact effect (``measurement="exact"``, the default) and with its first-order part
(``measurement="first_order"``: the metric's gradient w.r.t. the logits dotted with the edit, no
log-sum-exp per operator). Prints LDS overall and by kind, fact recall@10, the paired 95% CIs of
first-order minus exact (queries, then queries and retrained models, then queries and fit seeds when
``S > 1``), and the time to attribute all queries each way (wall seconds, the median of ``--repeats``
calls, measurement and recovery with the default noise floor; the same process and fit, so the
ratio is like for like). Run alone with ``OMP_NUM_THREADS=1`` for the times; the load is printed.
These are dev benches: nothing here is judged on the held-out benchmark.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

from benchmarks.compare_settings import BENCHES, load_bench, seed_query_ci  # noqa: E402
from stride_nnsight.evaluation import bootstrap_ci, fact_tracing, lds, lds_replicates  # noqa: E402

MEASUREMENTS = ("exact", "first_order")


def run(bench: dict[str, Any], seeds: int = 1, repeats: int = 3) -> dict[str, Any]:
    """Per measurement: per-query LDS ``[S, q]``, scores per seed, recall@10 and attribute seconds."""
    from nnsight import TransformersModel

    from stride_nnsight import Stride

    out: dict[str, Any] = {m: {"per_query": [], "scores": [], "recall": [], "seconds": []} for m in MEASUREMENTS}
    facts = np.asarray(bench["kinds"]) == "fact"
    for seed in range(seeds):
        lm = TransformersModel(bench["model"], tokenizer=copy.deepcopy(bench["tokenizer"]), task="text-generation")
        stride = Stride(lm, seed=seed, **bench["stride_kwargs"]).fit(bench["documents"], progress=False)
        for m in MEASUREMENTS:
            stride.attribute(bench["prompts"][:1], bench["completions"][:1], progress=False, measurement=m)  # warm
            times = []
            for _ in range(max(1, repeats)):
                start = time.perf_counter()
                attr = stride.attribute(bench["prompts"], bench["completions"], progress=False, measurement=m)
                times.append(time.perf_counter() - start)
            assert attr.provenance["measurement"] == m
            scores = attr.scores.numpy()
            result = lds(scores, bench["truth"].masks, bench["truth"].losses, n_boot=10)
            out[m]["per_query"].append(np.nan_to_num(np.asarray(result.per_query, dtype=float)))
            out[m]["scores"].append(scores)
            out[m]["recall"].append(fact_tracing(scores[facts], bench["sources"], ks=(10,))["recall@10"]
                                    if facts.any() else float("nan"))
            out[m]["seconds"].append(float(np.median(times)))
        del stride  # a fit holds its operators and activation cache: one at a time
    return out


def report(bench: dict[str, Any], out: dict[str, Any], n_boot: int = 1000) -> str:
    kinds = np.asarray(bench["kinds"])
    names = sorted(set(kinds.tolist()))
    base = np.stack(out["exact"]["per_query"])
    seeds = base.shape[0]
    head = ["measurement", "recall@10", "LDS"] + [f"LDS {k}" for k in names] + \
        ["- exact [CI queries]", "[queries + retrains]"] + (["[queries + fit seeds]"] if seeds > 1 else []) + \
        [f"attribute s ({len(bench['prompts'])} queries)", "exact / this"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    exact_s = float(np.mean(out["exact"]["seconds"]))
    for m in MEASUREMENTS:
        per = np.stack(out[m]["per_query"])
        diff = per - base
        lo, hi = bootstrap_ci(diff.mean(0), 0.95, n_boot, 0)
        if m == "exact":
            cis = ["-", "-"] + (["-"] if seeds > 1 else [])
        else:
            reps = lds_replicates(out[m]["scores"] + out["exact"]["scores"], bench["truth"].masks,
                                  bench["truth"].losses, n_boot=n_boot)
            mlo, mhi = np.quantile(reps[:, :seeds].mean(1) - reps[:, seeds:].mean(1), [0.025, 0.975])
            cis = [f"{diff.mean():+.3f} [{lo:+.3f}, {hi:+.3f}]", f"[{mlo:+.3f}, {mhi:+.3f}]"]
            if seeds > 1:
                slo, shi = seed_query_ci(diff, 0.95, n_boot, 0)
                cis.append(f"[{slo:+.3f}, {shi:+.3f}]")
        seconds = float(np.mean(out[m]["seconds"]))
        lines.append("| " + " | ".join([m, f"{np.nanmean(out[m]['recall']):.3f}", f"{per.mean():.3f}"] +
                                       [f"{per[:, kinds == k].mean():.3f}" for k in names] + cis +
                                       [f"{seconds:.2f}", f"{exact_s / seconds:.1f}x"]) + " |")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.measurement_order", description=__doc__.split("\n")[0])
    p.add_argument("--bench", choices=BENCHES, default="public")
    p.add_argument("--seeds", type=int, default=1, help="fit seeds 0..SEEDS-1 (default 1)")
    p.add_argument("--two-seeds", action="store_true", help="score against the mean of two training seeds per "
                                                             "retrained subset (public and held-out dev benches)")
    p.add_argument("--repeats", type=int, default=3, help="timed attribute calls per measurement (median)")
    a = p.parse_args(argv)
    if a.seeds < 1:
        p.error(f"--seeds must be >= 1, got {a.seeds}")
    print(f"load before: {os.getloadavg()}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}", flush=True)
    bench = load_bench(a.bench, two_seeds=a.two_seeds)
    out = run(bench, seeds=a.seeds, repeats=a.repeats)
    target = "the mean of 2 training seeds each" if a.two_seeds else "1 training seed each"
    print(f"bench {a.bench}: {len(bench['documents'])} documents, {len(bench['prompts'])} queries, "
          f"{bench['truth'].n_models} retrained models ({target}); fit seeds 0..{a.seeds - 1}")
    print(report(bench, out))
    print(f"load after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
