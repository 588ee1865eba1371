"""Command line: ``stride-nnsight demo`` runs STRIDE end to end on the bundled tiny setting."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import warnings
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

__all__ = ["main", "run_demo", "demo_stride"]


def _default_cache() -> Path:
    root = os.environ.get("STRIDE_NNSIGHT_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "stride-nnsight")
    return Path(root)


def sensible_threads(out=sys.stdout) -> int:
    """Use one torch thread when the machine is already busy: torch's default (one thread per
    core) thrashes when other processes compete for the cores, which made the demo 50x slower
    on a loaded 2-core machine. ``OMP_NUM_THREADS`` / ``torch.set_num_threads`` set by the user
    win. Returns the thread count in use."""
    import torch

    if "OMP_NUM_THREADS" in os.environ or torch.get_num_threads() <= 1 or not hasattr(os, "getloadavg"):
        return torch.get_num_threads()
    cores = os.cpu_count() or 1
    load = os.getloadavg()[0]
    if load >= cores - 0.5:
        torch.set_num_threads(1)
        print(f"      the machine is busy (load {load:.1f} on {cores} cores): using 1 torch thread "
              "(set OMP_NUM_THREADS to choose)", file=out)
    return torch.get_num_threads()


def run_demo(
    n_queries: int = 6,
    top: int = 5,
    cache_dir: Optional[Path] = None,
    steps: Optional[int] = None,
    placement: Optional[str] = None,
    seed: int = 0,
    refit: bool = False,
    out=sys.stdout,
) -> dict:
    """Train (or load) the toy model, fit (or load) STRIDE, attribute fact queries, print.

    Returns a dict with the measured ``recall@10`` over all fact queries and the
    random expectation, so callers (and tests) can check it.
    """
    import torch

    from .toy import toy_language_model

    cache_dir = Path(cache_dir) if cache_dir is not None else _default_cache()
    sensible_threads(out)
    t0 = time.perf_counter()
    print(f"[1/4] tiny GPT-2 on the bundled corpus (cache: {cache_dir})", file=out)
    model, corpus = toy_language_model(seed=seed, cache_dir=cache_dir)
    print(f"      {len(corpus)} documents, {len(corpus.facts)} planted facts, "
          f"{sum(p.numel() for p in model._module.parameters()) / 1e6:.2f}M parameters "
          f"({time.perf_counter() - t0:.1f}s)", file=out)

    settings = {k: v for k, v in {"steps": steps, "placement": placement}.items() if v is not None}
    t1 = time.perf_counter()
    stride, fitted_now, state_dir = demo_stride(model, corpus, cache_dir, seed=seed, refit=refit, **settings)
    if fitted_now:
        h = stride.history
        k = max(1, len(h) // 10)
        print(f"[2/4] fitted {stride}", file=out)
        print(f"      fidelity loss {sum(h.fidelity[:k]) / k:.3f} -> {sum(h.fidelity[-k:]) / k:.3f} nats; "
              f"saved to {state_dir} ({time.perf_counter() - t1:.1f}s)", file=out)
    else:
        print(f"[2/4] loaded fitted STRIDE operators from {state_dir}", file=out)

    t2 = time.perf_counter()
    facts = corpus.facts
    print(f"[3/4] attributing {len(facts)} fact queries", file=out)
    attr = stride.attribute([f.prompt for f in facts], [f.completion for f in facts],
                            query_ids=[f.id for f in facts], progress=False)
    per_query = time.perf_counter() - t2
    print(f"      {per_query:.2f}s ({1000 * per_query / len(facts):.0f} ms per query)", file=out)

    print(f"[4/4] top {top} training documents for {min(n_queries, len(facts))} queries "
          "(* = planted source of the fact)\n", file=out)
    for fact in facts[:n_queries]:
        print(f"  {fact.prompt!r} -> {fact.completion!r}", file=out)
        table = attr.top_k(top, query=fact.id)
        for row in table.itertuples():
            mark = "*" if row.train_index in fact.source_ids else " "
            text = " ".join(row.text.split())
            text = text if len(text) <= 70 else text[:67] + "..."
            print(f"   {mark} #{row.rank} doc {row.train_index:4d}  {row.score:+.4f}  {text}", file=out)
        print(file=out)

    hits = 0.0
    for q, fact in enumerate(facts):
        top10 = set(torch.topk(attr.scores[q], 10).indices.tolist())
        hits += len(top10 & set(fact.source_ids)) / len(fact.source_ids)
    recall = hits / len(facts)
    chance = 10 / len(corpus)
    print(f"recall@10 of planted sources over {len(facts)} queries: {recall:.3f} "
          f"(random ranking: {chance:.3f}); total {time.perf_counter() - t0:.1f}s", file=out)
    return {"recall@10": recall, "random": chance, "attribution": attr, "stride": stride}


def demo_stride(model, corpus, cache_dir: Path, seed: int = 0, refit: bool = False, progress: bool = True,
                **settings):
    """The demo's fitted ``Stride``: loaded from ``cache_dir`` when it was fitted before with
    the same settings, else fitted (resumably) and saved there. Returns
    ``(stride, fitted_now, state_dir)``."""
    from .stride import Stride, find_state_file

    from .arguments import StrideArguments

    # The directory is named after every setting (defaults included), so a change of the
    # library's defaults never reuses operators fitted under the old ones.
    args = StrideArguments(seed=seed).replace(**settings).to_dict()
    tag = hashlib.sha256(json.dumps(args, sort_keys=True).encode()).hexdigest()[:10]
    state_dir = Path(cache_dir) / f"stride-{tag}"
    if find_state_file(state_dir) is not None and not refit:
        try:
            return Stride.load(state_dir, model), False, state_dir
        except ValueError as err:  # fitted on an older toy model: refit below
            warnings.warn(f"ignoring cached STRIDE state in {state_dir}: {err}", stacklevel=2)
            shutil.rmtree(state_dir)
    stride = Stride(model, seed=seed, **settings)
    stride.fit(corpus.documents, checkpoint_dir=state_dir / "checkpoint", progress=progress)
    stride.save(state_dir)
    return stride, True, state_dir


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="stride-nnsight", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="end-to-end STRIDE demo on the bundled tiny model and corpus")
    demo.add_argument("--queries", type=int, default=6, help="fact queries to print (default 6)")
    demo.add_argument("--top", type=int, default=5, help="documents shown per query (default 5)")
    demo.add_argument("--cache-dir", type=Path, default=None,
                      help="where the toy model and fitted operators are kept (default ~/.cache/stride-nnsight)")
    demo.add_argument("--steps", type=int, default=None, help="fitting steps (default: library default)")
    demo.add_argument("--placement", choices=["residual", "logits"], default=None)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--refit", action="store_true", help="refit even if fitted operators are cached")
    args = parser.parse_args(argv)
    if args.command == "demo":
        run_demo(args.queries, args.top, args.cache_dir, args.steps, args.placement, args.seed, args.refit)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
