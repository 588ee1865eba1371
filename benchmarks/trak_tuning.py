"""``python -m benchmarks.trak_tuning``: TRAK tuned like STRIDE was, on a dev split of queries.

The benchmark's TRAK row is one model, 512 projections and damping 1e-3, none of them tuned.
Here TRAK gets an ensemble (the benchmark's model plus 3 more trained on the whole corpus with
other seeds, the same recipe), a projection-size sweep and a damping sweep, chosen on the dev
half of the public benchmark's queries (every other query of each kind, as
`benchmarks.ekfac_damping`) and judged on the other half, next to the untuned TRAK row and
STRIDE's defaults (paired CIs resampling queries and retrained models).

One feature pass per model at the largest projection serves every smaller size: the first
``k`` columns of a Gaussian projection are a ``k``-dimensional Gaussian projection
(`stride_nnsight.baselines.trak_features`); the widest features are two passes of 4096
columns with different seeds side by side, and they are cached in ``benchmarks/cache``.
Writes ``benchmarks/RESULTS-trak-tuning.md``. Cost: 3 extra model trainings (~1 min each,
cached), two gradient + projection passes per model (~4 min per model on one thread, cached)
and one STRIDE fit.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

OUT = Path(__file__).resolve().parent / "RESULTS-trak-tuning.md"
PROJ_DIMS = (512, 1024, 2048, 4096, 8192)
DAMPINGS = (1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)
#: one projection pass is at most this wide (the projection matrix of every parameter in float32
#: is 4 P x width bytes); wider features concatenate passes with different seeds (i.i.d. columns)
PASS_WIDTH = 4096
EXTRA_SEEDS = (1, 2, 3)
UNTUNED = (1, 512, 1e-3)  # (models, proj_dim, damping) of the benchmark's TRAK row


def extra_model(setting, seed: int, log=print):
    """The setting's model trained again on the whole corpus with training seed ``seed``
    (cached beside the main model, in safetensors)."""
    from transformers import GPT2LMHeadModel

    path = setting.cache_dir / f"model-{setting.key}-seed{seed}"
    if (path / "config.json").is_file():
        return GPT2LMHeadModel.from_pretrained(path, local_files_only=True).eval()
    log(f"  training an extra model, seed {seed} ...")
    model = setting.train_fn(np.arange(len(setting.documents)), seed).eval()
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    return model


def features(setting, model, m: int, b: dict) -> tuple:
    """TRAK features ``(phi_q [q, W], phi [n, W], CPU s)`` of model ``m``, ``W = max(PROJ_DIMS)``:
    passes of `PASS_WIDTH` columns with seeds ``1000 * pass + m``, cached (float64 .npy)."""
    import torch

    from stride_nnsight import baselines

    width = max(PROJ_DIMS)
    path = setting.cache_dir / f"trak-features-{setting.key}-model{m}-w{width}.npz"
    if path.is_file():
        with np.load(path, allow_pickle=False) as data:
            return torch.from_numpy(data["phi_q"]), torch.from_numpy(data["phi"]), float(data["seconds"])
    t0 = time.process_time()
    parts_q, parts = [], []
    for p in range(-(-width // PASS_WIDTH)):
        k = min(PASS_WIDTH, width - p * PASS_WIDTH)
        parts_q.append(baselines.trak_features(model, prompts=b["prompts"], completions=b["completions"],
                                               proj_dim=k, seed=1000 * p + m))
        parts.append(baselines.trak_features(model, texts=b["documents"], proj_dim=k, seed=1000 * p + m))
    phi_q, phi = torch.cat(parts_q, dim=1), torch.cat(parts, dim=1)
    seconds = time.process_time() - t0
    np.savez(path, phi_q=phi_q.numpy(), phi=phi.numpy(), seconds=np.float64(seconds))
    return phi_q, phi, seconds


def main(argv=None) -> str:
    import copy

    from nnsight import TransformersModel

    from benchmarks.compare_settings import public_script
    from benchmarks.ekfac_damping import dev_split
    from benchmarks.setting import FULL, build_setting
    from stride_nnsight import Stride, baselines
    from stride_nnsight.evaluation import lds, paired_lds_ci

    start = time.perf_counter()
    a, b, lm = public_script(argv, __doc__, OUT)
    setting = build_setting(FULL, log=lambda m: None)
    truth, kinds = b["truth"], np.asarray(b["kinds"])
    dev, ev = dev_split(kinds), ~dev_split(kinds)
    losses = np.asarray(truth.losses)

    def per_query(scores: np.ndarray) -> np.ndarray:
        return np.nan_to_num(np.asarray(lds(scores, truth.masks, losses, n_boot=10).per_query, dtype=float))

    models = [lm] + [TransformersModel(extra_model(setting, s), tokenizer=copy.deepcopy(b["tokenizer"]),
                                       task="text-generation") for s in EXTRA_SEEDS]
    feats, feature_s = [], []
    for m, model in enumerate(models):
        phi_q, phi, secs = features(setting, model, m, b)
        feats.append((phi_q, phi))
        feature_s.append(secs)
        print(f"  model {m}: features in {secs:.0f} CPU s", flush=True)

    runs = {}
    for n_models in (1, len(models)):
        for k in PROJ_DIMS:
            for damping in DAMPINGS:
                total = None
                for phi_q, phi in feats[:n_models]:
                    s, _ = baselines.trak_scores(phi_q[:, :k], phi[:, :k], damping)
                    total = s if total is None else total + s
                scores = (total / n_models).float().numpy()
                runs[(n_models, k, damping)] = (scores, per_query(scores))
        best = max((key for key in runs if key[0] == n_models), key=lambda key: runs[key][1][dev].mean())
        print(f"  {n_models} model(s): best on dev {best} LDS {runs[best][1][dev].mean():.3f}", flush=True)
    chosen = max(runs, key=lambda key: runs[key][1][dev].mean())
    chosen_one = max((key for key in runs if key[0] == 1), key=lambda key: runs[key][1][dev].mean())
    # the untuned row's settings, projected exactly as baselines.trak does (512 own columns, seed 0)
    untuned = baselines.trak(lm, b["documents"], b["prompts"], b["completions"], proj_dim=512,
                             damping=1e-3, seed=0).scores.numpy()
    runs["untuned"] = (untuned, per_query(untuned))
    stride = Stride(lm, **b["stride_kwargs"]).fit(b["documents"], progress=False)
    s_scores = stride.attribute(b["prompts"], b["completions"], progress=False).scores.numpy()
    s_pq = per_query(s_scores)

    def row(label: str, pq: np.ndarray) -> str:
        return (f"| {label} | {pq[dev].mean():.3f} | {pq[ev].mean():.3f} | {pq[ev & (kinds == 'fact')].mean():.3f} | "
                f"{pq[ev & (kinds == 'text')].mean():.3f} |")

    lines = [
        "# TRAK: ensemble, projection size and damping chosen on dev queries, judged on the others (public benchmark)",
        "",
        f"Generated by `OMP_NUM_THREADS=1 python -m benchmarks.trak_tuning` on {time.strftime('%Y-%m-%d')} "
        f"({(time.perf_counter() - start) / 60:.0f} min wall; load average {os.getloadavg()[0]:.2f} at the end). "
        f"Dev queries: {int(dev.sum())} (every other query of each kind); evaluation queries: {int(ev.sum())}. "
        f"LDS from {truth.n_models} retrained models. Ensemble: the benchmark's model plus {len(EXTRA_SEEDS)} "
        f"trained on the whole corpus with training seeds {', '.join(map(str, EXTRA_SEEDS))} (same recipe). "
        f"Grid: 1 or {len(models)} models x projection {', '.join(map(str, PROJ_DIMS))} x relative damping "
        f"{', '.join(f'{d:g}' for d in DAMPINGS)} (smaller projections are the first columns of the "
        f"{max(PROJ_DIMS)}-column one). Loss gradients of every parameter, as the benchmark's TRAK row.",
        "",
        "Feature pass (per-example gradients of queries and documents, projected to "
        f"{max(PROJ_DIMS)} columns in passes of {PASS_WIDTH}): {', '.join(f'{s:.0f}' for s in feature_s)} CPU s "
        "per model (as first computed; cached since).",
        "",
        "Best settings per ensemble size on dev, and the untuned row:",
        "",
        "| TRAK | LDS dev | LDS evaluation | LDS evaluation, facts | LDS evaluation, text |",
        "|---|---|---|---|---|",
        row("untuned (1 model, 512, damping 1e-3; the benchmark's row)", runs["untuned"][1]),
    ]
    for key in sorted({chosen_one, chosen}):
        mark = " (chosen on dev)" if key == chosen else ""
        lines.append(row(f"{key[0]} model(s), {key[1]}, damping {key[2]:g}{mark}", runs[key][1]))
    lines.append(row("STRIDE (defaults)", s_pq))
    lines += ["", f"Dev LDS over the whole grid ({len(models)} models):", "",
              "| projection | " + " | ".join(f"damping {d:g}" for d in DAMPINGS) + " |",
              "|---|" + "---|" * len(DAMPINGS)]
    for k in PROJ_DIMS:
        lines.append(f"| {k} | " + " | ".join(f"{runs[(len(models), k, d)][1][dev].mean():.3f}" for d in DAMPINGS)
                     + " |")
    lines += ["", "Paired differences on the evaluation queries (95% CI, resampling queries and retrained models):", ""]
    pairs = (("tuned TRAK minus untuned TRAK", runs[chosen][0], untuned),
             ("STRIDE minus untuned TRAK", s_scores, untuned),
             ("STRIDE minus tuned TRAK", s_scores, runs[chosen][0]))
    for label, x, y in pairs:
        d, lo, hi = paired_lds_ci(x[ev], y[ev], truth.masks, losses[..., ev], n_boot=1000)
        verdict = "above" if lo > 0 else "below" if hi < 0 else "level"
        lines.append(f"- {label}: {d:+.3f} [{lo:+.3f}, {hi:+.3f}] ({verdict}).")
    lines += ["", "STRIDE's defaults were chosen on all of this benchmark's queries, the evaluation half included; "
              "TRAK's settings only on the dev half. The held-out benchmark (`benchmarks/RESULTS-heldout.md`) is "
              "where neither was tuned.", ""]
    report = "\n".join(lines)
    print(report)
    Path(a.out).write_text(report)
    return report


if __name__ == "__main__":
    main()
