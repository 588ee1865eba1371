"""``python -m benchmarks.shared_cv_cost [N ...]``: what ``lambda_rule="shared_cv"``'s selection costs.

For each ``n`` (default 1e5 and 1e6): a synthetic design (K=512, d=4, the scaling benchmark's
`planted_queries`: 64 queries, 10 planted sources each), one ``"fraction"`` recovery of the 64
queries (the default rule) and one `stride_nnsight.recovery.shared_fraction` on the same
measurements (its sample is those 64 queries), timed in the same process (wall seconds; run it
alone with OMP_NUM_THREADS=1). Prints the ratio, the chosen fraction and the peak RSS.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.scaling_recovery import planted_queries  # noqa: E402
from stride_nnsight.design import SubsetDesign  # noqa: E402
from stride_nnsight.recovery import SHARED_CV_QUERIES, recover, shared_fraction  # noqa: E402


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.shared_cv_cost", description=__doc__.split("\n")[0])
    p.add_argument("n", nargs="*", type=int, default=[100_000, 1_000_000])
    a = p.parse_args(argv)
    print(f"load before: {os.getloadavg()}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}", flush=True)
    for n in a.n:
        M = SubsetDesign(n, 512, 4, seed=0).membership
        y, _ = planted_queries(M, SHARED_CV_QUERIES, 10, 0.1, 1)
        t = time.perf_counter()
        recover(y, M, "fraction", 0.3, progress=False, sparse=True)
        base = time.perf_counter() - t
        t = time.perf_counter()
        fraction, _ = shared_fraction(y, M)
        selection = time.perf_counter() - t
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1e9 if sys.platform == "darwin" else 1e6)
        print(f"n={n}: fraction recovery of {len(y)} queries {base:.1f} s; shared_cv selection {selection:.1f} s "
              f"({selection / base:.0f}x) -> fraction {fraction}; peak RSS {rss:.2f} GB", flush=True)
    print(f"load after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
