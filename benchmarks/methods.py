"""Running one attribution method with its costs measured the same way for every method.

Every runner returns a `MethodResult`: the score matrix ``[n_queries, n_train]`` and

* ``index_s``: one-off work per training set that the method keeps and reuses for later
  queries (STRIDE: fitting the operators; stored gradients: computing them; TRAK: the
  projected training features and their kernel; EK-FAC: fitting the factors). Methods that
  keep nothing (BM25, representation similarity, gradient dot/cosine as
  ``stride_nnsight.baselines`` implements them) have ``index_s = 0`` and redo all their
  work inside every call, so it counts as query time.
* ``batch_s``: time to attribute all ``Q`` queries in one call, index excluded
  (``batch_s / Q`` is the amortised time per query);
* ``single_s``: time to attribute one new query (the first query) in a call of its own,
  index excluded: the latency a user waits for one question;
* ``peak_index_bytes`` / ``peak_query_bytes``: peak increase of the process's resident set
  size over its value at the start of the phase, sampled every 5 ms from
  ``/proc/self/statm`` by a background thread (`PeakRSS`). It sees torch, numpy and Python
  allocations alike (tracemalloc would miss torch's), but not memory the allocator had
  already reserved before the phase;
* ``state_bytes``: what the method must keep on disk to answer new queries.

For library calls that do everything at once (EK-FAC, TRAK), the index part is timed by
wrapping the function that computes it (kronfluence's ``Analyzer.fit_all_factors``; TRAK's
training-feature pass) for the duration of the call, and subtracted.
"""

from __future__ import annotations

import contextlib
import gc
import io
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch

__all__ = ["MethodResult", "PeakRSS", "run_baseline", "run_stride", "BASELINES", "dir_bytes"]

#: EK-FAC's damping chosen on the dev half of the public benchmark's queries
#: (`python -m benchmarks.ekfac_damping`, benchmarks/RESULTS-ekfac-damping.md)
EKFAC_TUNED_DAMPING = 1e-9
#: EK-FAC with every nn.Linear tracked, the output head (tied to the embedding) included; kronfluence's
#: heuristic damping was the best of the grid on the dev half with the head tracked
#: (`python -m benchmarks.ekfac_damping --head`, benchmarks/RESULTS-ekfac-head.md)
EKFAC_HEAD_MODULES = ("*",)
EKFAC_HEAD_DAMPING = None

BASELINES = ("random", "bm25", "bm25_completion", "representation", "gradient_dot", "gradient_cosine", "gradient_dot_store",
             "trak", "ekfac", "ekfac_tuned", "ekfac_head")


# ------------------------------------------------------------------------------ measuring


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):  # not Linux: fall back to the (monotone) high-water mark
        import resource

        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


class PeakRSS:
    """Context manager: ``.peak`` = peak RSS increase (bytes) over the value at entry, sampled every 5 ms."""

    def __init__(self, interval: float = 0.005) -> None:
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()

    def _watch(self) -> None:
        while not self._stop.is_set():
            self._max = max(self._max, _rss_bytes())
            self._stop.wait(self.interval)

    def __enter__(self) -> "PeakRSS":
        gc.collect()
        self.base = _rss_bytes()
        self._max = self.base
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._max = max(self._max, _rss_bytes())
        self.peak = max(0, self._max - self.base)


@contextlib.contextmanager
def _timed():
    box = {}
    t0 = time.perf_counter()
    try:
        yield box
    finally:
        box["s"] = time.perf_counter() - t0


@contextlib.contextmanager
def _time_calls(owner: Any, name: str, record: list, predicate: Optional[Callable[..., bool]] = None):
    """Temporarily wrap ``owner.name`` so that each call's duration is appended to ``record``
    (only calls for which ``predicate(*args, **kwargs)`` holds)."""
    original = getattr(owner, name)

    def wrapper(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            if predicate is None or predicate(*args, **kwargs):
                record.append(time.perf_counter() - t0)

    setattr(owner, name, wrapper)
    try:
        yield
    finally:
        setattr(owner, name, original)


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


@dataclass
class MethodResult:
    name: str
    scores: np.ndarray
    index_s: float = 0.0
    batch_s: float = float("nan")
    single_s: float = float("nan")
    peak_index_bytes: float = float("nan")
    peak_query_bytes: float = float("nan")
    state_bytes: float = float("nan")
    state_note: str = ""
    notes: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)
    load: list[float] = field(default_factory=list)  # 1-min load average at start and end

    def meta(self) -> dict[str, Any]:
        d = {k: v for k, v in self.__dict__.items() if k != "scores"}
        return d


def _load() -> float:
    try:
        return float(os.getloadavg()[0])
    except OSError:  # pragma: no cover
        return float("nan")


# ------------------------------------------------------------------------------ baselines


def run_baseline(name: str, setting, lm, single: bool = True, log=print) -> MethodResult:
    """Run baseline ``name`` (one of `BASELINES`) on the setting's queries."""
    from stride_nnsight import baselines

    docs = setting.documents
    prompts, completions = setting.corpus.prompts, setting.corpus.completions
    n, q = len(docs), len(prompts)
    n_params = setting.n_params()
    res = MethodResult(name=name, scores=np.zeros((q, n), dtype=np.float32), load=[_load()])

    def call(fn: Callable[[list[str], list[str]], Any]) -> tuple[np.ndarray, float, int]:
        with PeakRSS() as mem, _timed() as t:
            out = fn(prompts, completions)
        scores = out.scores.numpy() if hasattr(out, "scores") else np.asarray(out)
        return np.asarray(scores, dtype=np.float32), t["s"], mem.peak

    def single_call(fn) -> float:
        with _timed() as t:
            fn(prompts[:1], completions[:1])
        return t["s"]

    if name == "random":
        fn = lambda p, c: np.random.default_rng(0).standard_normal((len(p), n)).astype(np.float32)  # noqa: E731
        res.scores, res.batch_s, res.peak_query_bytes = call(fn)
        res.single_s = single_call(fn)
        res.state_bytes, res.state_note = 0, "none"
    elif name in ("bm25", "bm25_completion"):
        part = "completion" if name == "bm25_completion" else "prompt+completion"
        fn = lambda p, c: baselines.bm25(docs, p, c, query=part)  # noqa: E731
        res.scores, res.batch_s, res.peak_query_bytes = call(fn)
        res.single_s = single_call(fn) if single else float("nan")
        res.state_bytes, res.state_note = sum(len(d.encode()) for d in docs), "the corpus text (index rebuilt per call)"
        res.notes.append("BM25 index built inside every call (counted as query time)")
    elif name == "representation":
        fn = lambda p, c: baselines.representation_similarity(lm, docs, p, c, layer=-1)  # noqa: E731
        res.scores, res.batch_s, res.peak_query_bytes = call(fn)
        res.single_s = single_call(fn) if single else float("nan")
        d_model = setting.config.n_embd
        res.state_bytes, res.state_note = 4 * n * d_model, "n x d_model float32 (if stored; recomputed per call here)"
        res.notes.append("training representations recomputed inside every call (counted as query time)")
    elif name in ("gradient_dot", "gradient_cosine"):
        norm = name == "gradient_cosine"
        fn = lambda p, c: baselines.gradient_similarity(lm, docs, p, c, normalize=norm)  # noqa: E731
        res.scores, res.batch_s, res.peak_query_bytes = call(fn)
        res.single_s = single_call(fn) if single else float("nan")
        res.state_bytes, res.state_note = 0, "none (training gradients recomputed per call)"
        res.notes.append("no gradient store: all n training gradients are recomputed in every call")
    elif name == "gradient_dot_store":
        with PeakRSS() as mem, _timed() as t:
            g_train = baselines.example_gradients(lm, texts=docs)
        res.index_s, res.peak_index_bytes = t["s"], mem.peak
        fn = lambda p, c: baselines.example_gradients(lm, prompts=p, completions=c) @ g_train.T  # noqa: E731
        res.scores, res.batch_s, res.peak_query_bytes = call(fn)
        res.single_s = single_call(fn)
        res.state_bytes = 4 * g_train.shape[0] * g_train.shape[1]
        res.state_note = f"gradient store: n x P float32 = {g_train.shape[0]} x {g_train.shape[1]}"
        del g_train
    elif name == "trak":
        from stride_nnsight.baselines import gradients as G

        proj_dim = min(512, max(16, n_params))
        record: list[float] = []
        is_train = lambda *a, **k: (a[-1] if a else k.get("desc")) == "train gradients"  # noqa: E731
        with _time_calls(G, "_trak_features", record, is_train):
            fn = lambda p, c: baselines.trak(lm, docs, p, c, proj_dim=proj_dim)  # noqa: E731
            _run_indexed(res, fn, record, call, single_call if single else None)
        res.state_bytes = 4 * n * proj_dim
        res.state_note = f"projected training features n x {proj_dim} float32 (+ a seed for the projection)"
        res.notes.append("index = training-feature pass (timed inside the call and subtracted); projection "
                         "matrix generation and the kernel solve stay in the query time")
        res.extra["proj_dim"] = proj_dim
    elif name in ("ekfac", "ekfac_tuned", "ekfac_head"):
        from kronfluence.analyzer import Analyzer

        # None: kronfluence's heuristic damping
        damping = {"ekfac_tuned": EKFAC_TUNED_DAMPING, "ekfac_head": EKFAC_HEAD_DAMPING}.get(name)
        modules = list(EKFAC_HEAD_MODULES) if name == "ekfac_head" else None
        record = []
        with _time_calls(Analyzer, "fit_all_factors", record):
            fn = lambda p, c: baselines.ekfac(lm, docs, p, c, damping=damping, modules=modules)  # noqa: E731
            _run_indexed(res, fn, record, call, single_call if single else None)
        res.state_bytes = _ekfac_factor_bytes(setting.model, head=name == "ekfac_head")
        res.state_note = ("EK-FAC factors (eigenbases + eigenvalues of the tracked Linear layers"
                          + (", the output head included" if name == "ekfac_head" else "")
                          + "); query time still recomputes all n training gradients")
        res.notes.append("index = kronfluence fit_all_factors (timed inside the call and subtracted)")
    else:
        raise ValueError(f"unknown baseline {name!r}")
    res.load.append(_load())
    gc.collect()
    return res


def _ekfac_factor_bytes(model: torch.nn.Module, head: bool = False) -> int:
    """float32 bytes of EK-FAC factors for every nn.Linear/Conv1D (the output head only with
    ``head=True``): per layer ``in^2 + out^2`` (eigenbases) ``+ in*out`` (corrected eigenvalues)
    ``+ in + out``."""
    total = 0
    out_head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    skipped = None if head else out_head  # the module left out of the count (none when the head is tracked)
    for m in model.modules():
        if m is skipped:
            continue
        if type(m).__name__ == "Conv1D":
            i, o = m.weight.shape
        elif type(m) is torch.nn.Linear:
            o, i = m.weight.shape
        else:
            continue
        i += 1 if getattr(m, "bias", None) is not None else 0
        total += i * i + o * o + i * o + i + o
    return 4 * total


# ------------------------------------------------------------------------------ STRIDE


def stride_state_bytes(stride) -> tuple[int, int]:
    """(bytes of ``stride.save``'s file, bytes of operators + design alone)."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        stride.save(tmp)
        full = dir_bytes(Path(tmp))
    buf = io.BytesIO()
    torch.save({"operators": {k: v.detach().cpu() for k, v in stride.operators.state_dict().items()},
                "design": stride.design.to_dict()}, buf)
    return full, buf.getbuffer().nbytes


def run_stride(setting, lm, args, *, name: str = "stride", single: bool = True, checkpoint_dir=None,
               fit_seconds_before: float = 0.0, save_dir=None, fitted=None, log=print) -> tuple[MethodResult, Any]:
    """Fit STRIDE with ``args`` on the setting's documents and attribute its queries.

    ``save_dir``: also ``stride.save`` the fitted state there (not timed). ``fitted``: a
    ``Stride`` already fitted on these documents (e.g. loaded from an earlier ``save_dir``):
    no fit, ``index_s`` is NaN and only the queries are timed.
    Returns ``(result, stride)``; ``result.extra`` holds the raw measurements ``y [Q, K]``
    (for re-running the recovery under other lambda rules) and the fit's loss curve summary.
    """
    from stride_nnsight import Stride

    prompts, completions = setting.corpus.prompts, setting.corpus.completions
    res = MethodResult(name=name, scores=np.zeros((len(prompts), len(setting.documents)), np.float32),
                       load=[_load()])
    if fitted is not None:
        if list(fitted.train_texts) != list(setting.documents):
            raise ValueError("the fitted Stride was fitted on other documents than this setting's")
        stride, res.index_s = fitted, float("nan")
        res.notes.append("operators fitted earlier and loaded from disk (index time not re-measured)")
    else:
        stride = Stride(lm, args=args)
        with PeakRSS() as mem, _timed() as t:
            stride.fit(setting.documents, progress=False, checkpoint_dir=checkpoint_dir)
        res.index_s, res.peak_index_bytes = fit_seconds_before + t["s"], mem.peak
        if save_dir is not None:
            stride.save(save_dir)
    with PeakRSS() as mem, _timed() as t:
        attr = stride.attribute(prompts, completions, progress=False)
    res.batch_s, res.peak_query_bytes = t["s"], mem.peak
    res.scores = attr.scores.numpy().astype(np.float32)
    if single:
        with _timed() as t:
            stride.attribute(prompts[:1], completions[:1], progress=False)
        res.single_s = t["s"]
    full, core = stride_state_bytes(stride)
    res.state_bytes = core
    res.state_note = f"operators + design ({full / 1e6:.2f} MB with the saved training texts and loss curve)"
    h = stride.history
    k = max(1, len(h) // 10)
    res.extra.update({
        "measurements": attr.measurements.numpy().astype(np.float32) if attr.measurements is not None else None,
        "lambdas": attr.provenance.get("lambdas"),
        "fidelity_start": float(np.mean(h.fidelity[:k])), "fidelity_end": float(np.mean(h.fidelity[-k:])),
        "stability_end": float(np.mean(h.stability[-k:])), "linearity_end": float(np.mean(h.linearity[-k:])),
        "steps": len(h), "state_file_bytes": full, "args": stride.args.to_dict(),
        "nonzero_frac": float((res.scores != 0).mean()),
    })
    res.load.append(_load())
    return res, stride


def _run_indexed(res, fn, record: list, call, single_call) -> None:
    """Run ``fn`` on all queries (and once on a single query when ``single_call`` is given),
    splitting off the index time the method recorded in ``record`` during each call."""
    res.scores, total, res.peak_query_bytes = call(fn)
    res.index_s = record[-1]
    res.batch_s = total - res.index_s
    if single_call is not None:
        res.single_s = single_call(fn) - record[-1]
