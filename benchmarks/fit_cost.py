"""``python -m benchmarks.fit_cost``: what a STRIDE fit costs, with and without the activation cache.

Builds a random-init GPT-2 (default: 6 layers, d_model 256, vocabulary 4096, BPE tokenizer
trained here on generated text) and a corpus of generated documents (default: 2,000 of about
90 tokens), then measures with ``time.process_time`` in this one process:

(a) one plain forward pass over the corpus (length-sorted batches of ``--batch-docs``
    documents, the frozen model's forward as fitting calls it, no gradients);
(b) building the activation cache the default fit reads (`stride_nnsight.activations.ActivationCache.build`;
    with the default ``fit_vocabulary`` it holds each token's vocabulary candidates);
(c) ``--steps`` fit steps without and with the cache: the library's ``OperatorFitter.train_step``
    itself (its sampler, ``operators.step_losses``, finite checks, backward, AdamW), the fitter
    built without and with ``activations=`` the cache (same settings: the uncached fit computes
    the same candidates from the live logits);
(d) the same for variants (the whole vocabulary, document sampling, the linearity loss, the head
    placement), each with the cache it reads, built and timed once;
(e) per-query costs (measurement per placement, exact and, for the logits and head placements,
    first order as the default measures; recovery) and the index-cost references: EK-FAC
    (kronfluence) and TRAK's featurisation (a projected gradient per document, timed on the first
    ``trak_documents`` documents at two projection widths and scaled to the corpus).

It prints the fit's cost in *plain forward passes over the corpus*, ``steps_total *
time_per_step / time_plain_pass`` (``steps_total`` = the library default's step count for this
corpus, ``StrideArguments.fit_steps``), without the cache and with it (its build included),
and their ratio. CPU time covers every thread of the process: run with ``OMP_NUM_THREADS=1``
on an otherwise idle machine for comparable numbers.

``--quick`` is a tiny smoke configuration (a few seconds): its timings are not meaningful.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch

if __package__ in (None, ""):  # run as a script: make `stride_nnsight` importable from the checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stride_nnsight.activations import ActivationCache  # noqa: E402
from stride_nnsight.arguments import StrideArguments  # noqa: E402
from stride_nnsight.backends import resolve_backend  # noqa: E402
from stride_nnsight.design import SubsetDesign  # noqa: E402
from stride_nnsight.fitting import OperatorFitter  # noqa: E402
from stride_nnsight.inputs import TokenBatch, encode_texts  # noqa: E402
from stride_nnsight.operators import SteeringOperators, edit_width  # noqa: E402
from stride_nnsight.toy import tiny_gpt2_config, train_tokenizer  # noqa: E402


@dataclass
class CostConfig:
    n_documents: int = 2000
    mean_tokens: int = 90
    n_layer: int = 6
    d_model: int = 256
    n_head: int = 8
    vocab: int = 4096
    steps: int = 20            # fit steps timed per variant (after one untimed warm-up step each)
    batch_docs: int = 32       # documents per forward in the plain pass and the cache build
    dtype: str = "float32"     # cache storage dtype
    toolkit: str = "nnsight"
    seed: int = 0
    quick: bool = False
    # fit settings: the library defaults unless --quick (n_subsets None: StrideArguments.subsets_for(n))
    n_subsets: Optional[int] = None
    subsets_per_example: int = 4
    batch_size: int = 32
    linearity_operators: int = 32
    # per-query cost: queries made of the first documents (last quarter of each scored)
    n_queries: int = 64
    residual_queries: int = 2  # the residual placement runs K full forwards per query
    ekfac: bool = True  # EK-FAC (kronfluence) on the same model and corpus as the index-cost reference
    trak: bool = True   # TRAK's featurisation (projected per-document gradients) as a second reference
    trak_documents: int = 200           # documents featurised (the cost is linear in them; scaled to the corpus)
    trak_proj_dims: tuple = (64, 128)   # projection widths timed (the dense projection is P x k floats)


def quick_config(**changes: Any) -> CostConfig:
    """The tiny smoke configuration (timings not meaningful)."""
    settings = dict(n_documents=60, mean_tokens=20, n_layer=2, d_model=32, n_head=2, vocab=400, steps=3,
                    batch_docs=16, quick=True, n_subsets=16, subsets_per_example=2, batch_size=8,
                    linearity_operators=8, n_queries=4, residual_queries=1, trak_documents=8,
                    trak_proj_dims=(8, 16))
    settings.update(changes)
    return CostConfig(**settings)


# ------------------------------------------------------------------------------ setting
def _lexicon(rng: np.random.Generator, n_words: int) -> list[str]:
    onsets = ["b", "c", "d", "f", "g", "h", "k", "l", "m", "n", "p", "r", "s", "t", "v", "w", "z", "br", "st",
              "tr", "pl", "gr", "sh", "ch", "th"]
    vowels = ["a", "e", "i", "o", "u", "ai", "ou", "ea", "io"]
    codas = ["", "", "n", "r", "s", "l", "th", "nd", "st", "m"]
    words: set[str] = set()
    while len(words) < n_words:
        syllables = int(rng.integers(1, 4))
        words.add("".join(rng.choice(onsets) + rng.choice(vowels) + rng.choice(codas) for _ in range(syllables)))
    return sorted(words)


def _documents(rng: np.random.Generator, lexicon: list[str], word_counts: Sequence[int]) -> list[str]:
    ranks = np.arange(1, len(lexicon) + 1)
    p = 1.0 / ranks
    p /= p.sum()  # Zipf-like word frequencies
    docs = []
    for count in word_counts:
        words = rng.choice(len(lexicon), size=int(count), p=p)
        docs.append(" ".join(lexicon[w] for w in words) + ".")
    return docs


def build_setting(cfg: CostConfig, with_texts: bool = False) -> tuple[Any, ...]:
    """(backend, tokenizer, tokenized corpus[, texts]): documents of about ``cfg.mean_tokens``
    tokens (uniform in [2/3, 4/3] of it), a tokenizer trained on them, a random-init GPT-2."""
    rng = np.random.default_rng(cfg.seed)
    lexicon = _lexicon(rng, max(200, 2 * cfg.vocab))
    draft = _documents(rng, lexicon, [cfg.mean_tokens] * cfg.n_documents)
    tokenizer = train_tokenizer(draft, vocab_size=cfg.vocab)
    sample = draft[: min(200, len(draft))]
    tokens_per_word = np.mean([len(tokenizer(d)["input_ids"]) for d in sample]) / cfg.mean_tokens
    targets = rng.uniform(2 / 3, 4 / 3, cfg.n_documents) * cfg.mean_tokens
    texts = _documents(rng, lexicon, np.maximum(1, np.round((targets - 1) / tokens_per_word)).astype(int))
    torch.manual_seed(cfg.seed)
    from transformers import GPT2LMHeadModel

    config = tiny_gpt2_config(tokenizer, n_layer=cfg.n_layer, n_embd=cfg.d_model, n_head=cfg.n_head,
                              n_positions=max(64, 4 * cfg.mean_tokens))
    hf_model = GPT2LMHeadModel(config).eval()
    if cfg.toolkit == "nnsight":
        from nnsight import TransformersModel

        model = TransformersModel(hf_model, tokenizer=tokenizer, task="text-generation")
    else:
        from stride_nnsight.backends.transformer_lens import bridge_from_hf

        model = bridge_from_hf(hf_model, tokenizer, device="cpu")
    backend = resolve_backend(model)
    backend.freeze()
    batch = encode_texts(tokenizer, texts, config.n_positions, context_length=config.n_positions)
    return (backend, tokenizer, batch, texts) if with_texts else (backend, tokenizer, batch)


# ------------------------------------------------------------------------------ timings
def plain_pass(backend: Any, texts: TokenBatch, layer: int, batch_docs: int) -> None:
    """One forward pass of the frozen model over the whole corpus (no gradients)."""
    order = ActivationCache.processing_order(texts.attention_mask.sum(1).numpy())
    with torch.no_grad():
        for start in range(0, len(texts), batch_docs):
            batch = texts.rows(order[start: start + batch_docs]).to(backend.device)
            backend.forward(batch.input_ids, batch.attention_mask, layer)


def make_fitter(backend: Any, texts: TokenBatch, cfg: CostConfig, cache: Optional[ActivationCache] = None,
                **changes: Any) -> OperatorFitter:
    """The library's own fitter for this setting (library defaults plus ``changes``, e.g.
    ``placement="head"`` or ``linearity_weight=0.1``); with ``cache`` its steps read the activations."""
    args = StrideArguments(n_subsets=cfg.n_subsets, subsets_per_example=cfg.subsets_per_example,
                           batch_size=cfg.batch_size, linearity_operators=cfg.linearity_operators,
                           seed=cfg.seed, layer=-2, **changes)
    args = args.replace(n_subsets=args.subsets_for(len(texts)))
    out_dim = edit_width(args.placement, backend.d_model, backend.vocab_size)
    args = args.capped_state(args.n_subsets, backend.d_model, out_dim)  # rank (and columns) as Stride.fit sets them
    layer = backend.check_layer(args.layer)
    design = SubsetDesign(len(texts), args.n_subsets, args.subsets_per_example, args.seed)
    torch.manual_seed(args.seed)
    operators = SteeringOperators(args.n_subsets, backend.d_model, args.rank, out_dim,
                                  placement=args.placement, layer=layer, hidden=args.basis_hidden,
                                  columns=args.logit_columns)
    return OperatorFitter(backend, operators.to(backend.device), design, texts, args, activations=cache)


def rows_per_step(args: StrideArguments) -> int:
    return args.batch_size + (min(args.linearity_operators, args.n_subsets) if args.linearity_weight > 0 else 0)


def _clocked(fn: Callable[..., Any], clock: dict) -> Callable[..., Any]:
    """``fn`` that adds the CPU seconds it spends to ``clock["forward"]`` (its attributes, e.g.
    ``candidates``, carried over)."""
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        start = time.process_time()
        try:
            return fn(*args, **kwargs)
        finally:
            clock["forward"] += time.process_time() - start
    return wrapper


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    start = time.process_time()
    out = fn()
    return time.process_time() - start, out


def time_steps(fitter: OperatorFitter, steps: int) -> tuple[float, float]:
    """Mean CPU seconds per ``OperatorFitter.train_step`` and the fraction of it spent in the
    frozen forward (the model's, or the cache's when the fitter has one), after one untimed
    warm-up step. The forward is clocked by wrapping it on the instance for the duration."""
    clock = {"forward": 0.0}
    if fitter.activations is not None:
        cache, serve = fitter.activations, fitter.activations.forward_for
        cache.forward_for = lambda index, device=None: _clocked(serve(index, device=device), clock)
        restore = lambda: delattr(cache, "forward_for")  # noqa: E731
    else:
        backend = fitter.backend
        backend.forward = _clocked(type(backend).forward.__get__(backend), clock)
        restore = lambda: delattr(backend, "forward")  # noqa: E731
    try:
        fitter.train_step()
        clock["forward"] = 0.0
        seconds, _ = timed(lambda: [fitter.train_step() for _ in range(steps)])
    finally:
        restore()
    return seconds / steps, clock["forward"] / max(seconds, 1e-12)


def query_batch(texts: TokenBatch, n_queries: int, completion_fraction: float = 0.25) -> TokenBatch:
    """``n_queries`` queries made of the first training documents: the last quarter of each
    document's tokens is the scored completion, the rest the prompt."""
    batch = texts.rows(list(range(min(n_queries, len(texts)))))
    loss_mask = torch.zeros_like(batch.loss_mask)
    lengths = batch.attention_mask.sum(1)
    for i, length in enumerate(lengths.tolist()):
        start = max(1, int(round(length * (1 - completion_fraction))))
        loss_mask[i, start:length] = 1
    return TokenBatch(batch.input_ids, batch.attention_mask, loss_mask)


def query_costs(backend: Any, texts: TokenBatch, cfg: CostConfig) -> dict[str, Any]:
    """CPU seconds per query of a plain forward, of measuring all ``K`` operators (logits,
    head and residual placements; operators at their untrained init: the cost does not depend
    on their values) and of recovery, on the same queries."""
    from stride_nnsight.activations import head_function
    from stride_nnsight.measurement import measure
    from stride_nnsight.recovery import recover
    from stride_nnsight.token_component import add_token_component, completion_tokens, token_presence

    queries = query_batch(texts, cfg.n_queries)
    layer = backend.check_layer(-2)
    chunks = [queries.rows(list(range(i, min(i + 16, len(queries))))) for i in range(0, len(queries), 16)]
    plain, _ = timed(lambda: [backend.forward(c.input_ids, c.attention_mask, layer) for c in chunks])
    out: dict[str, Any] = {"n_queries": len(queries), "plain_per_query": plain / len(queries),
                           "query_tokens": float(queries.attention_mask.sum()) / len(queries)}
    args = make_fitter(backend, texts, cfg).args  # the library defaults' K and rank for this corpus
    design = SubsetDesign(len(texts), args.n_subsets, cfg.subsets_per_example, cfg.seed)
    out.update({"n_subsets": args.n_subsets, "rank": args.rank})
    for placement, n_q in (("logits", len(queries)), ("head", len(queries)), ("residual", cfg.residual_queries)):
        torch.manual_seed(cfg.seed)
        out_dim = edit_width(placement, backend.d_model, backend.vocab_size)
        ops = SteeringOperators(args.n_subsets, backend.d_model, args.rank, out_dim, placement=placement, layer=layer,
                                hidden=args.basis_hidden, columns=args.logit_columns)
        with torch.no_grad():  # small non-zero coefficients, so nothing is special-cased as zero
            ops.coefficients.normal_(0, 1e-3)
        head = head_function(backend) if placement == "head" else None
        part = queries.rows(list(range(n_q)))
        seconds, (y, _) = timed(lambda: measure(backend, ops, part, progress=False, head=head))
        out[f"measure_{placement}_per_query"] = seconds / n_q
        out[f"measure_{placement}_queries"] = n_q
        if placement != "residual":  # the default measurement there ("auto"): first order
            first, _ = timed(lambda: measure(backend, ops, part, progress=False, head=head, first_order=True))
            out[f"measure_{placement}_first_order_per_query"] = first / n_q
        if placement == "logits":
            rec, (lasso, _) = timed(lambda: recover(y.numpy(), design.membership, "fraction", 0.3, True,
                                                    progress=False, sparse=True))
            out["recover_per_query"] = rec / n_q
            # the default recovery's token component (stride_nnsight.token_component): the corpus's token
            # presence once, then the non-negative token fit of what the Lasso left, per query
            build, presence = timed(lambda: token_presence(texts.input_ids.numpy(), texts.loss_mask.numpy(),
                                                           backend.vocab_size))
            tokens = completion_tokens(part.input_ids.numpy(), part.loss_mask.numpy())
            extra, (both, _) = timed(lambda: add_token_component(y.numpy(), design.membership, lasso, presence,
                                                                 tokens))
            out.update({"token_presence_s": build, "token_component_per_query": extra / n_q,
                        "token_component_nnz": both.nnz / n_q, "lasso_nnz": lasso.nnz / n_q})
    return out


def ekfac_cost(backend: Any, raw_texts: Sequence[str], texts: TokenBatch, cfg: CostConfig) -> dict[str, Any]:
    """CPU seconds of EK-FAC (kronfluence, library wrapper `stride_nnsight.baselines.ekfac`) on
    the same model and corpus, scoring one query: factor fit (covariances, eigendecomposition,
    eigenvalue correction) plus one pass of preconditioned per-document gradients, i.e. EK-FAC's
    index and one query together."""
    from stride_nnsight.baselines import ekfac

    queries = query_batch(texts, 1)
    ids = queries.input_ids[0][queries.attention_mask[0].bool()].tolist()
    start = int(queries.loss_mask[0].nonzero()[0])
    tok = backend.tokenizer
    prompt, completion = tok.decode(ids[1:start]), tok.decode(ids[start:])
    length = int(texts.attention_mask.sum(1).max())
    seconds, _ = timed(lambda: ekfac(backend.model, list(raw_texts), [prompt], [completion], max_length=length,
                                     batch_size=cfg.batch_docs, progress=False))
    return {"ekfac_one_query": seconds}


# ------------------------------------------------------------------------------ report
#: variants timed besides the defaults: (label, StrideArguments changes); "whole vocabulary" is
#: shown when the defaults read candidates, "fit_vocabulary=128" when they read the whole vocabulary
FULL_VOCABULARY = ("whole vocabulary (fit_vocabulary=None)", {"fit_vocabulary": None})
CANDIDATES = ("fit_vocabulary=128", {"fit_vocabulary": 128})
OTHER_VARIANTS = [("sampling 'document'", {"sampling": "document"}),
                  ("linearity loss on (the default before 2026-12-02)", {"linearity_weight": 0.1}),
                  ("placement 'head' (state K x r x d_model)", {"placement": "head"})]


def run(cfg: CostConfig, cache_dir: str) -> dict[str, Any]:
    """Measure everything; returns the numbers (CPU seconds) and the settings behind them."""
    from stride_nnsight.fitting import candidate_seed, fit_candidates

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1") or 1))
    backend, _, texts, raw_texts = build_setting(cfg, with_texts=True)
    fitter = make_fitter(backend, texts, cfg)
    layer = fitter.operators.layer
    fingerprint = backend.fingerprint()
    t_plain, _ = timed(lambda: plain_pass(backend, texts, layer, cfg.batch_docs))
    builds: dict[Optional[int], tuple[float, ActivationCache]] = {}

    def cache_for(args: StrideArguments) -> tuple[float, ActivationCache]:
        """The cache a fit with ``args`` reads (with its candidates, if any), built once, timed."""
        c = fit_candidates(args)
        if c not in builds:
            directory = Path(cache_dir) / ("full" if c is None else f"candidates-{c}")
            builds[c] = timed(lambda: ActivationCache.build(
                backend, texts, layer, directory, fingerprint=fingerprint, dtype=cfg.dtype,
                batch_size=cfg.batch_docs, progress=False, overwrite=True, candidates=c,
                candidate_seed=candidate_seed(args)))
        return builds[c]

    t_build, cache = cache_for(fitter.args)
    t_uncached, fwd_uncached = time_steps(make_fitter(backend, texts, cfg), cfg.steps)
    t_cached, fwd_cached = time_steps(make_fitter(backend, texts, cfg, cache), cfg.steps)
    variants = []
    for label, changes in [FULL_VOCABULARY if fitter.args.fit_vocabulary is not None else CANDIDATES,
                           *OTHER_VARIANTS]:
        probe = make_fitter(backend, texts, cfg, **changes)
        build, variant_cache = cache_for(probe.args)
        step, _ = time_steps(make_fitter(backend, texts, cfg, variant_cache, **changes), cfg.steps)
        variants.append({"label": label, "changes": changes, "build": build, "step": step,
                         "steps": probe.n_steps, "rows_per_step": rows_per_step(probe.args),
                         "cache_bytes": variant_cache.size_bytes,
                         "candidates": fit_candidates(probe.args)})
    queries = query_costs(backend, texts, cfg)
    if cfg.ekfac:
        queries.update(ekfac_cost(backend, raw_texts, texts, cfg))
    if cfg.trak:
        queries.update(trak_cost(backend, raw_texts, cfg))
    return {"queries": queries, "cfg": cfg, "layer": layer, "n_tokens": int(texts.attention_mask.sum()),
            "steps_total": fitter.n_steps, "rows_per_step": rows_per_step(fitter.args),
            "n_subsets": fitter.args.n_subsets, "rank": fitter.args.rank,
            "fit_vocabulary": fitter.args.fit_vocabulary, "cache_bytes": cache.size_bytes, "plain": t_plain,
            "build": t_build, "step_uncached": t_uncached, "step_cached": t_cached,
            "forward_share_uncached": fwd_uncached, "forward_share_cached": fwd_cached, "variants": variants,
            "sampling": fitter.args.sampling, "linearity_weight": fitter.args.linearity_weight}


def report(r: dict[str, Any]) -> str:
    cfg: CostConfig = r["cfg"]
    plain, n = r["plain"], r["steps_total"]
    uncached = n * r["step_uncached"]
    cached = r["build"] + n * r["step_cached"]
    passes = (lambda seconds: seconds / plain) if plain > 0 else (lambda seconds: float("nan"))
    vocabulary = "whole vocabulary" if r["fit_vocabulary"] is None else f"fit_vocabulary {r['fit_vocabulary']}"
    lines = [
        f"fit cost: random-init GPT-2 ({cfg.n_layer} layers, d_model {cfg.d_model}, vocabulary {cfg.vocab}, "
        f"{cfg.toolkit}); {cfg.n_documents} documents, {r['n_tokens'] / cfg.n_documents:.1f} tokens on average; "
        f"layer {r['layer']}, library defaults (K {r['n_subsets']}, rank {r['rank']}, placement 'logits', "
        f"{vocabulary}, sampling '{r['sampling']}', linearity_weight {r['linearity_weight']:g}); {n} fit steps of "
        f"{r['rows_per_step']} rows (StrideArguments.fit_steps); {cfg.steps} steps timed per variant",
        "CPU time (time.process_time, this process, every thread); cost unit: one plain forward pass over the corpus",
    ]
    if cfg.quick:
        lines.append("--quick: tiny smoke configuration, these timings are not meaningful")
    rows = [
        ("plain forward pass over the corpus", plain, passes(plain)),
        (f"building the activation cache ({cfg.dtype}, {r['cache_bytes'] / 1e6:.1f} MB)", r["build"],
         passes(r["build"])),
        (f"fit step, uncached (frozen forward {100 * r['forward_share_uncached']:.0f}% of it)", r["step_uncached"],
         passes(r["step_uncached"])),
        (f"fit step, cached (cache read {100 * r['forward_share_cached']:.0f}% of it)", r["step_cached"],
         passes(r["step_cached"])),
        (f"fit cost uncached ({n} steps)", uncached, passes(uncached)),
        (f"fit cost cached ({n} steps + building the cache)", cached, passes(cached)),
    ]
    for v in r["variants"]:
        total = v["build"] + v["steps"] * v["step"]
        cache = "whole-vocabulary cache" if v["candidates"] is None else f"cache of {v['candidates']} candidates"
        rows.append((f"  same, {v['label']}: {v['steps']} steps + {cache} ({v['cache_bytes'] / 1e6:.1f} MB)",
                     total, passes(total)))
    width = max(len(name) for name, _, _ in rows)
    lines.append(f"{'measurement':<{width}}  {'CPU s':>10}  {'plain passes':>12}")
    for name, seconds, in_passes in rows:
        lines.append(f"{name:<{width}}  {seconds:>10.3f}  {in_passes:>12.2f}")
    ratio = uncached / cached if cached > 0 else float("nan")
    lines.append(f"{'speed-up (uncached / cached fit)':<{width}}  {'':>10}  {ratio:>11.2f}x")
    if "queries" in r:
        lines += ["", query_report(r["queries"])]
        extra = index_reference_report(r)
        if extra:
            lines += ["", extra]
    return "\n".join(lines)


def query_report(qc: dict[str, Any]) -> str:
    """Per-query costs in plain forwards of the same queries."""
    plain = qc["plain_per_query"]
    unit = (lambda seconds: seconds / plain) if plain > 0 else (lambda seconds: float("nan"))
    lines = [f"per-query cost (K {qc.get('n_subsets')}, rank {qc.get('rank')}): {qc['n_queries']} queries of "
             f"{qc['query_tokens']:.1f} tokens on average (the first "
             "documents, last quarter scored); cost unit: one plain forward of the same query",
             f"{'measurement':<58}  {'CPU ms/query':>12}  {'plain forwards':>14}"]
    rows = [("plain forward", plain)]
    for placement in ("logits", "head", "residual"):
        rows.append((f"measuring all K operators, {placement} placement ({qc[f'measure_{placement}_queries']} queries)",
                     qc[f"measure_{placement}_per_query"]))
        if f"measure_{placement}_first_order_per_query" in qc:
            rows.append(("  the same, first order (the default, measurement='auto')",
                         qc[f"measure_{placement}_first_order_per_query"]))
    rows.append(("recovery (working-set Lasso, n = corpus)", qc["recover_per_query"]))
    if "token_component_per_query" in qc:
        rows.append(("  + token component (the default recovery's second part)", qc["token_component_per_query"]))
    for name, seconds in rows:
        lines.append(f"{name:<58}  {1000 * seconds:>12.1f}  {unit(seconds):>14.2f}")
    if "token_presence_s" in qc:
        lines.append(f"token presence of the corpus (once per fitted corpus, not per query): {qc['token_presence_s']:.3f} "
                     f"CPU s; non-zero scores per query: {qc['lasso_nnz']:.0f} (Lasso) -> "
                     f"{qc['token_component_nnz']:.0f} (with the token component; operators at their random init)")
    return "\n".join(lines)


def trak_cost(backend: Any, raw_texts: Sequence[str], cfg: CostConfig) -> dict[str, Any]:
    """CPU seconds of TRAK's featurisation (`stride_nnsight.baselines.trak_features`: one loss
    gradient per document, every parameter, projected by a dense Gaussian ``P x k`` matrix) of
    the first ``cfg.trak_documents`` documents, at each width in ``cfg.trak_proj_dims`` (building
    the projection included)."""
    from stride_nnsight.baselines.gradients import trak_features

    docs = list(raw_texts[: cfg.trak_documents])
    n_params = sum(p.numel() for p in backend.torch_module.parameters())
    out: dict[str, Any] = {"trak_documents": len(docs), "trak_params": int(n_params), "trak": {}}
    for k in cfg.trak_proj_dims:
        seconds, _ = timed(lambda: trak_features(backend.model, texts=docs, proj_dim=int(k), max_length=4 * cfg.mean_tokens,
                                                 batch_size=cfg.batch_docs, tokenizer=backend.tokenizer))
        out["trak"][int(k)] = seconds
    return out


def index_reference_report(r: dict[str, Any]) -> str:
    """EK-FAC's and TRAK's index costs next to STRIDE's fit, in plain passes over the corpus."""
    qc, plain = r["queries"], r["plain"]
    cached = r["build"] + r["steps_total"] * r["step_cached"]
    lines = []
    if "ekfac_one_query" in qc:
        seconds = qc["ekfac_one_query"]
        lines.append(
            f"index-cost reference: EK-FAC (kronfluence, every nn.Linear but the head, heuristic damping) on the same "
            f"model and corpus, factors + scores of one query: {seconds:.1f} CPU s = {seconds / plain:.2f} plain passes "
            f"over the corpus (STRIDE's default fit: {cached / plain:.2f}; STRIDE / EK-FAC {cached / seconds:.2f}x).")
    if qc.get("trak"):
        n_docs, n = qc["trak_documents"], r["cfg"].n_documents
        for k, seconds in sorted(qc["trak"].items()):
            corpus = seconds * n / n_docs
            lines.append(
                f"index-cost reference: TRAK featurisation, one model, projection k = {k} ({qc['trak_params']:,} "
                f"parameters, dense Gaussian projection), measured on {n_docs} documents: {seconds:.1f} CPU s; scaled "
                f"to the {n} documents (linear in them): {corpus:.1f} CPU s = {corpus / plain:.2f} plain passes "
                f"(STRIDE / TRAK {cached / corpus:.2f}x).")
        if len(qc["trak"]) > 1:
            (k0, s0), (k1, s1) = sorted(qc["trak"].items())[:2]
            slope = (s1 - s0) / (k1 - k0) * n / n_docs
            lines.append(f"  TRAK's cost grows with k (projection): {slope / plain:.3f} plain passes per unit of k from "
                         f"these two widths; the tuned setting of benchmarks/RESULTS-trak-tuning.md (4 models, k = 8192) "
                         f"would be about {4 * (s0 * n / n_docs + slope * (8192 - k0)) / plain:.0f} plain passes "
                         "(extrapolated, not measured; its projection alone would need "
                         f"{4 * qc['trak_params'] * 8192 / 1e9:.0f} GB).")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny smoke run (timings not meaningful)")
    parser.add_argument("--documents", type=int, help="training documents (default 2000)")
    parser.add_argument("--tokens", type=int, help="mean tokens per document (default 90)")
    parser.add_argument("--steps", type=int, help="fit steps timed per variant (default 20)")
    parser.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], help="cache storage dtype")
    parser.add_argument("--toolkit", choices=["nnsight", "transformer_lens"], help="default nnsight")
    parser.add_argument("--cache-dir", help="where the cache is written (default: a temporary directory)")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--no-ekfac", action="store_true", help="skip the EK-FAC index-cost reference (~17 min)")
    parser.add_argument("--no-trak", action="store_true", help="skip the TRAK featurisation reference")
    ns = parser.parse_args(argv)
    changes = {k: v for k, v in {"n_documents": ns.documents, "mean_tokens": ns.tokens, "steps": ns.steps,
                                 "dtype": ns.dtype, "toolkit": ns.toolkit, "seed": ns.seed}.items() if v is not None}
    if ns.no_ekfac:
        changes["ekfac"] = False
    if ns.no_trak:
        changes["trak"] = False
    cfg = quick_config(**changes) if ns.quick else CostConfig(**changes)
    if ns.cache_dir:
        result = run(cfg, ns.cache_dir)
    else:
        with tempfile.TemporaryDirectory(prefix="stride_fit_cost_") as tmp:
            result = run(cfg, tmp)
    print(report(result), flush=True)
    return result


if __name__ == "__main__":
    main()
