"""``python -m benchmarks.scaling`` (``make scaling``): what STRIDE costs as the corpus, the model and
the vocabulary grow, measured in one run and written to ``benchmarks/SCALING.md``.

Three parts, each printed with the machine's load:

1. **Operator state vs vocabulary and width**, per placement: bytes of the fitted state
   (``SteeringOperators`` parameters, float32) from the shapes, for the default (capped at
   ``max_state_mb``) and the uncapped logits placement, checked against modules built at small
   sizes; the fit also holds gradients and two AdamW moments (3x more).
2. **Recovery** time and peak memory for n = 1e3 ... 1e6 on synthetic designs
   (`benchmarks.scaling_recovery`): 1000 queries per row, the working-set Lasso against the
   scikit-learn reference where it is affordable.
3. **Fit cost** in plain forward passes over the same corpus (`benchmarks.fit_cost`): the
   default fit with and without the activation cache, document sampling, the earlier default
   (linearity loss on) and the head placement, on a random-init 6-layer width-256 GPT-2,
   vocabulary 4096, 2,000 documents of about 90 tokens; then the **per-query cost** in plain
   forwards of the same queries (measurement per placement, recovery), and **EK-FAC**
   (kronfluence) and **TRAK's featurisation** on the same model and corpus as the index-cost
   references.

``--quick`` runs every part at toy sizes (the suite's smoke test; its timings mean nothing).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stride_nnsight.operators import SteeringOperators  # noqa: E402
from stride_nnsight.operators import state_bytes as operator_state_bytes  # noqa: E402

#: (label, d_model, vocabulary) of the state-size table: this repository's models, then
#: Llama-style shapes with 32k / 128k / 256k vocabularies.
SHAPES = [("fit-cost model", 256, 4096), ("7B-class, 32k vocab", 4096, 32_000),
          ("8B-class, 128k vocab", 4096, 128_256), ("large, 256k vocab", 8192, 256_000)]


def state_bytes(placement: str, K: int, r: int, d_model: int, vocab: int, hidden: int = 64,
                columns: Optional[int] = None) -> int:
    """Bytes of a fitted ``SteeringOperators`` from its shapes (`operators.state_bytes`): float32
    basis network plus ``K x r x out`` float32 coefficients (``out`` = ``d_model`` for the residual
    and head placements; for the logits placement ``min(V, columns)``, plus the int64
    ``column_of [V]`` map when ``columns < V``)."""
    out = vocab if placement == "logits" else d_model
    return operator_state_bytes(K, r, d_model, out, hidden, columns if placement == "logits" else None)


def check_state_bytes(K: int = 8, r: int = 4, d_model: int = 16, vocab: int = 50, hidden: int = 8) -> None:
    """The formula against real modules at a small size (raises if they disagree): every tensor
    of the state dict (parameters and buffers), with and without a cut in the logit columns."""
    for placement in ("residual", "logits", "head"):
        for columns in (None, vocab // 2):
            out = vocab if placement == "logits" else d_model
            ops = SteeringOperators(K, d_model, r, out, placement=placement, hidden=hidden, columns=columns)
            real = sum(t.numel() * t.element_size() for t in ops.state_dict().values())
            if real != state_bytes(placement, K, r, d_model, vocab, hidden, columns):
                raise AssertionError(f"state size formula wrong for {placement}, columns={columns}: {real} bytes")


def check_capped_state(K: int = 8, d_model: int = 16, vocab: int = 400, hidden: int = 8) -> None:
    """The default cap (`StrideArguments.capped_state`) checked on real modules at a small size:
    with a cap scaled to this size, the module built from the resolved settings stays within it
    (raises if not)."""
    from stride_nnsight.arguments import StrideArguments

    for cap_bytes in (4 * K * 8 * vocab, 4 * K * 2 * vocab, 4 * K * vocab // 2):
        args = StrideArguments(basis_hidden=hidden, max_state_mb=cap_bytes / 1e6).capped_state(K, d_model, vocab)
        ops = SteeringOperators(K, d_model, args.rank, vocab, placement="logits", hidden=hidden,
                                columns=args.logit_columns)
        real = sum(t.numel() * t.element_size() for t in ops.state_dict().values())
        if real > cap_bytes:
            raise AssertionError(f"capped state over its cap: {real} > {cap_bytes} bytes ({args.rank=}, "
                                 f"{args.logit_columns=})")


def state_table(Ks: tuple[int, ...] = (256, 512)) -> str:
    """Operator state per placement for each model shape and each K: the default logits placement
    (capped at ``max_state_mb``), the uncapped one (the default rank), and the head / residual
    placements (the default rank)."""
    from stride_nnsight.arguments import DEFAULT_RANK, StrideArguments

    check_state_bytes()
    check_capped_state()
    defaults = StrideArguments()
    cap, r = defaults.max_state_mb, DEFAULT_RANK
    lines = [f"Float32, basis hidden {defaults.basis_hidden}; K = {' and '.join(map(str, Ks))} (512: the default "
             f"from n = 256 on). The default logits placement is capped at `max_state_mb={cap:g}` (MB = 1e6 bytes, "
             f"`StrideArguments.capped_state`): rank {r} lowered (down to 1) while the state is over the cap, then, "
             "if rank 1 is still over, only the most frequent corpus tokens keep a coefficient column (`H` columns, "
             f"the rest unedited). `max_state_mb=None` gives the uncapped state at rank {r}. Both formulas checked "
             "against modules built at a small size. While fitting, gradients and two AdamW moments add 3x more.",
             "", "| model shape | d_model | V | K | logits placement (default, capped) | "
             f"logits, uncapped (rank {r}) | head / residual placement (rank {r}) |", "|---|---|---|---|---|---|---|"]
    for label, d, v in SHAPES:
        for K in Ks:
            a = defaults.capped_state(K, d, v)
            shape = f"rank {a.rank}" + ("" if a.logit_columns is None else f", H = {a.logit_columns:,}")
            lines.append(f"| {label} | {d} | {v:,} | {K} | "
                         f"{state_bytes('logits', K, a.rank, d, v, columns=a.logit_columns) / 1e6:,.1f} MB ({shape}) | "
                         f"{state_bytes('logits', K, r, d, v) / 1e6:,.1f} MB | "
                         f"{state_bytes('head', K, r, d, v) / 1e6:,.1f} MB |")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    from benchmarks import fit_cost, scaling_recovery

    p = argparse.ArgumentParser(prog="python -m benchmarks.scaling", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="toy sizes: a smoke test, timings mean nothing")
    p.add_argument("--out", type=Path, default=None, help="default benchmarks/SCALING.md (--quick: not written)")
    a = p.parse_args(argv)
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    parts = [f"# Scaling\n\nGenerated by `OMP_NUM_THREADS=1 python -m benchmarks.scaling{' --quick' if a.quick else ''}` "
             f"on {started}; load average before: {tuple(round(x, 2) for x in os.getloadavg())}, "
             f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}. Parts run one after another in this process "
             "(recovery rows in fresh processes)." + (" **--quick: toy sizes, timings mean nothing.**" if a.quick else "")]
    parts.append("## 1. Operator state vs vocabulary and width\n\n" + state_table())
    print(parts[-1], flush=True)
    # recovery first: its rows run in child processes, which inherit this process's peak RSS (Linux keeps
    # ru_maxrss across fork + exec), so they must start before the fit-cost part grows it
    out = Path(tempfile.mkdtemp(prefix="stride_scaling_rec_")) / "recovery.md"
    rec_args = ["--quick", "--in-process"] if a.quick else ["--jobs", "2"]
    scaling_recovery.main(rec_args + ["--out", str(out)])
    parts.append("## 2. Recovery time and memory vs n (synthetic designs, 1000 queries per row)\n\n" +
                 out.read_text().replace("# Recovery scaling\n\n", ""))
    with tempfile.TemporaryDirectory(prefix="stride_scaling_") as tmp:
        cfg = fit_cost.quick_config() if a.quick else fit_cost.CostConfig(steps=20)
        result = fit_cost.run(cfg, tmp)
    parts.append("## 3. Fit cost in plain forward passes over the corpus, per-query cost, EK-FAC and TRAK "
                 "references\n\n```\n" + fit_cost.report(result) +
                 f"\nload after: {tuple(round(x, 2) for x in os.getloadavg())}\n```")
    print(parts[-1], flush=True)
    parts.append("Not measured here: any model wider or with a larger vocabulary than the fit-cost model (a "
                 "`fit_vocabulary` step does not grow with V, but the AdamW update walks the `K r V` coefficients "
                 "every step and measurement computes `K P V` exponentials per query); TRAK at its tuned setting "
                 "(4 models, k = 8192: its dense projection alone would not fit in this machine's memory).")
    text = "\n\n".join(parts) + "\n"
    path = a.out if a.out is not None else (None if a.quick else Path(__file__).resolve().parent / "SCALING.md")
    if path is not None:
        path.write_text(text)
        print(f"written to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
