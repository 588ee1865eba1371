"""Remote fitting / measurement (``Stride(..., remote=...)``), run offline.

``remote="local"`` is nnsight's own simulation of the remote path (serialize, deserialize
with user modules hidden, run). It does not hide this package (its filter keeps every module
whose name contains "nnsight") and it runs the *original* code after checking that the
request deserializes, so ``ServerEmulation`` below goes further: it hides and blocks
``stride_nnsight`` completely and executes the deserialized request, i.e. the session block
and the functions/classes of ``stride_nnsight.operators`` rebuilt from their shipped source,
then sends back only the saved values through ``torch.save`` as a server would.
"""

from __future__ import annotations

import io
import json
import linecache
import sys

import numpy as np
import pytest
import torch

import stride_nnsight.remote as remote_mod
from stride_nnsight import storage
from stride_nnsight import Stride
from stride_nnsight.fitting import CHECKPOINT_NAME
from stride_nnsight.remote import (
    CHUNK_LOG,
    ChunkRecord,
    RemoteChunkError,
    RemoteSettings,
    SessionBudgetError,
    plan_chunk_size,
)

SETTINGS = dict(placement="residual", layer=1, n_subsets=8, subsets_per_example=2, rank=4, seed=0, steps=6,
                batch_size=6, linearity_operators=4, linearity_weight=0.1, sketch_dim=3, basis_hidden=8, max_length=32, measure_batch_size=8,
                fit_vocabulary=None)  # remote fits read the whole vocabulary: the local references must too
PROMPTS = ["the cat sat", "a dog ran", "the bird", "small red"]
COMPLETIONS = [" on the mat.", " in the park.", " sang.", " house."]


def train(texts):
    return texts[:16]


# ----------------------------------------------------------------------- server emulation
class _Blocker:
    def __init__(self, roots):
        self.roots = roots

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in self.roots:
            raise ModuleNotFoundError(f"No module named {name!r} (not installed on the simulated server)")
        return None


def _server_emulation_cls():
    from nnsight.intervention.backends.local import LocalSimulationBackend
    from nnsight.tracing.backend import Backend

    class ServerEmulation(Backend):
        """Deserialize AND execute a session request with ``stride_nnsight`` unavailable."""

        def __init__(self, model, roots=("stride_nnsight",)):
            self.model, self.roots = model, roots
            self.requests = 0
            self.seen_operator_classes = []

        def __call__(self, tracer):
            from nnsight.ndif import pull_env
            from nnsight.schema.request import RequestModel
            from nnsight.tracing.tracer import _saves, save
            from nnsight.tracing.util import push

            pull_env()
            blob = RequestModel.serialize(tracer)
            self.requests += 1
            persistent = self.model._remoteable_persistent_objects()
            sim = LocalSimulationBackend(self.model)
            hidden = sim._hide_local_modules()
            for name in list(sys.modules):
                if name.split(".")[0] in self.roots:
                    hidden["modules"][name] = sys.modules.pop(name)
            blocker = _Blocker(self.roots)
            sys.meta_path.insert(0, blocker)
            filename = tracer.info.frame.f_code.co_filename
            saved_line = linecache.cache.get(filename)
            try:
                restored = RequestModel.deserialize(blob, persistent)
                cls = restored.info.frame.f_globals.get("SteeringOperators")
                self.seen_operator_classes.append(cls)
                restored.execute(restored.info.code)
                assert "stride_nnsight.operators" not in sys.modules
                result = {k: v for k, v in restored.info.frame.f_locals.items() if id(v) in _saves()}
                buffer = io.BytesIO()
                torch.save(result, buffer)  # the wire back
                buffer.seek(0)
                result = torch.load(buffer, weights_only=True)  # plain tensors / containers only
            finally:
                sys.meta_path.remove(blocker)
                sim._restore(hidden)
                if saved_line is not None:
                    linecache.cache[filename] = saved_line
                else:
                    linecache.cache.pop(filename, None)
            for value in result.values():
                save(value)
            push(tracer.info.frame, result)

    return ServerEmulation


# ------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def local_fits(tiny_model, small_texts):
    """Local reference fits (residual and logits placements), fitted once."""
    out = {}
    for placement in ("residual", "logits"):
        stride = Stride(tiny_model, **{**SETTINGS, "placement": placement}).fit(train(small_texts), progress=False)
        y, base = stride.measure(PROMPTS, COMPLETIONS, progress=False)
        out[placement] = (stride, y, base)
    return out


def assert_same_operators(a, b, atol=1e-6):
    for (name, x), (name2, z) in zip(a.operators.state_dict().items(), b.operators.state_dict().items()):
        assert name == name2
        torch.testing.assert_close(x, z, rtol=1e-5, atol=atol, msg=name)


def record_calls(monkeypatch, name):
    """Wrap remote.<name> (a session function); return the list of (args, result) per call."""
    calls = []
    original = getattr(remote_mod, name)

    def wrapper(*args, **kwargs):
        result = original(*args, **kwargs)
        calls.append((args, result))
        return result

    monkeypatch.setattr(remote_mod, name, wrapper)
    return calls


# --------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("placement", ["residual", "logits"])
def test_remote_local_fit_and_attribute_match_local(tiny_model, small_texts, local_fits, placement):
    local, y_local, base_local = local_fits[placement]
    stride = Stride(tiny_model, remote="local", remote_steps_per_session=2, **{**SETTINGS, "placement": placement})
    stride.fit(train(small_texts), progress=False)
    assert [(r.start, r.stop, r.status) for r in stride.remote_log] == [(0, 2, "done"), (2, 4, "done"), (4, 6, "done")]
    assert stride.history.step == local.history.step
    np.testing.assert_allclose(stride.history.total, local.history.total, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(stride.history.linearity, local.history.linearity, rtol=1e-5, atol=1e-6)
    assert_same_operators(stride, local)

    a_remote = stride.attribute(PROMPTS, COMPLETIONS, progress=False)
    torch.testing.assert_close(a_remote.measurements, y_local, rtol=1e-5, atol=1e-6)
    a_local = local.attribute(PROMPTS, COMPLETIONS, progress=False)
    torch.testing.assert_close(a_remote.scores, a_local.scores, rtol=1e-4, atol=1e-6)
    assert a_remote.provenance["remote"] == "local" and a_local.provenance["remote"] is False


def test_remote_fit_with_document_sampling_matches_local(tiny_model, small_texts):
    settings = {**SETTINGS, "placement": "logits", "sampling": "document", "activation_cache": False}
    local = Stride(tiny_model, **settings).fit(train(small_texts), progress=False)
    stride = Stride(tiny_model, remote="local", remote_steps_per_session=2, **settings)
    stride.fit(train(small_texts), progress=False)
    np.testing.assert_allclose(stride.history.total, local.history.total, rtol=1e-5, atol=1e-6)
    # The losses agree exactly, but the logits coefficients only to float rounding from the second
    # session on (with membership sampling they agree exactly; the cause of the rounding difference
    # was not pinned down; it is not the shared forward). AdamW turns a rounding-level difference in
    # a near-zero gradient into up to ~lr * |g| / (|g| + eps) of parameter change, so entries for
    # vocabulary items with ~0 gradient agree to ~0.03 * lr; the measurements agree to 1e-5.
    assert_same_operators(stride, local, atol=0.03 * stride.args.lr)
    y_remote, _ = stride.measure(PROMPTS, COMPLETIONS, progress=False)
    y_local, _ = local.measure(PROMPTS, COMPLETIONS, progress=False)
    torch.testing.assert_close(y_remote, y_local, rtol=1e-5, atol=1e-6)


def test_remote_fit_with_loss_positions_matches_local(tiny_model, small_texts):
    settings = {**SETTINGS, "placement": "logits", "loss_positions": 3, "activation_cache": False}
    local = Stride(tiny_model, **settings).fit(train(small_texts), progress=False)
    stride = Stride(tiny_model, remote="local", remote_steps_per_session=4, **settings)
    stride.fit(train(small_texts), progress=False)
    np.testing.assert_allclose(stride.history.total, local.history.total, rtol=1e-5, atol=1e-6)
    assert_same_operators(stride, local)


def test_server_emulation_runs_shipped_code_and_returns_only_small_cpu_tensors(
        tiny_model, small_texts, local_fits, monkeypatch):
    server = _server_emulation_cls()(tiny_model)
    fits = record_calls(monkeypatch, "_fit_session")
    measures = record_calls(monkeypatch, "_measure_session")
    stride = Stride(tiny_model, remote=server, remote_steps_per_session=3, remote_queries_per_session=2, **SETTINGS)
    stride.fit(train(small_texts), progress=False)
    y, base = stride.measure(PROMPTS, COMPLETIONS, progress=False)

    local, y_local, base_local = local_fits["residual"]
    assert_same_operators(stride, local)
    torch.testing.assert_close(y, y_local, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(base, base_local, rtol=1e-5, atol=1e-6)
    # two fitting sessions of 3 steps, two measurement sessions of one query chunk (2 queries)
    assert server.requests == 4 and len(fits) == 2 and len(measures) == 2
    # the server ran the operator class rebuilt from source, not this process's class
    from stride_nnsight.operators import SteeringOperators
    assert all(c is not None and c is not SteeringOperators and c.__name__ == "SteeringOperators"
               for c in server.seen_operator_classes)

    def tensors(value):
        if isinstance(value, torch.Tensor):
            yield value
        elif isinstance(value, dict):
            for v in value.values():
                yield from tensors(v)
        elif isinstance(value, (list, tuple)):
            for v in value:
                yield from tensors(v)

    shapes = {k: v.shape for k, v in stride.operators.state_dict().items()}
    n_params = sum(v.numel() for v in stride.operators.state_dict().values())
    for _, result in fits:
        assert set(result) == {"operators", "optimizer", "losses"}
        assert {k: v.shape for k, v in result["operators"].items()} == shapes
        assert result["losses"].shape == (3, 4)
        moments = [t for t in tensors(result["optimizer"]) if t.dim() > 0]
        assert sorted(t.numel() for t in moments) == sorted(2 * [v.numel() for v in stride.operators.parameters()])
        assert all(t.device.type == "cpu" and not t.requires_grad for t in tensors(result))
        # operator state + Adam moments (2x) + step counters + losses: nothing else came back
        assert sum(t.numel() for t in tensors(result)) <= 3 * n_params + len(shapes) + 3 * 4
    for _, result in measures:
        assert set(result) == {"y", "base"}
        assert result["y"].shape == (2, 8) and result["base"].shape == (2,)
        assert all(t.device.type == "cpu" and not t.requires_grad for t in tensors(result))
    assert all(r.bytes_back <= 4 * (3 * n_params + len(shapes)) + 8 * 3 * 4 for r in stride.remote_log)


def test_failure_names_chunk_and_rerun_resumes_without_redoing_finished_chunks(
        tiny_model, small_texts, local_fits, monkeypatch, tmp_path):
    original_sample = remote_mod._sample_chunk
    drawn = {"n": 0}

    def corrupt_third_chunk(fitter, steps):
        payload = original_sample(fitter, steps)
        drawn["n"] += 1
        if drawn["n"] == 3:  # chunk index 2: an operator id that does not exist -> IndexError on the server
            payload["operator_ids"][0, 0] = 10_000
        return payload

    monkeypatch.setattr(remote_mod, "_sample_chunk", corrupt_third_chunk)
    stride = Stride(tiny_model, remote="local", remote_steps_per_session=2, **SETTINGS)
    with pytest.raises(RemoteChunkError) as info:
        stride.fit(train(small_texts), progress=False, checkpoint_dir=tmp_path)
    err = info.value
    assert (err.kind, err.chunk, err.start, err.stop) == ("fit", 2, 4, 6)
    message = str(err)
    assert "chunk 2 (steps 4..5 of 6" in message and "IndexError" in message
    assert "resume at step 4" in message and str(tmp_path) in message
    assert isinstance(err.__cause__, IndexError)
    checkpoint = storage.load(tmp_path / CHECKPOINT_NAME, "fit_checkpoint")
    assert checkpoint["step"] == 4
    log = json.loads((tmp_path / CHUNK_LOG).read_text())
    assert [(r["chunk"], r["start"], r["stop"], r["status"]) for r in log] == \
        [(0, 0, 2, "done"), (1, 2, 4, "done"), (2, 4, 6, "failed")]

    monkeypatch.setattr(remote_mod, "_sample_chunk", original_sample)
    sessions = record_calls(monkeypatch, "_fit_session")
    again = Stride(tiny_model, remote="local", remote_steps_per_session=2, **SETTINGS)
    again.fit(train(small_texts), progress=False, checkpoint_dir=tmp_path)
    # only steps 4 and 5 ran (the retry after a failure runs half the failed chunk's size)
    assert [args[11].shape[0] for args, _ in sessions] == [1, 1]
    assert [(r.chunk, r.start, r.stop, r.status) for r in again.remote_log][-2:] == \
        [(2, 4, 5, "done"), (3, 5, 6, "done")]
    assert again.history.step == list(range(1, 7))
    assert_same_operators(again, local_fits["residual"][0])


def test_bad_layer_index_fails_in_chunk_zero_with_a_clear_message(tiny_model, small_texts):
    stride = Stride(tiny_model, remote="local", remote_steps_per_session=2, **SETTINGS)
    stride.layer = 5  # the model has 2 blocks; the server-side lookup fails
    expected = r"chunk 0 \(steps 0\.\.1 of 6.*IndexError: layer 5 is out of range"
    with pytest.raises(RemoteChunkError, match=expected) as info:
        stride.fit(train(small_texts), progress=False)
    assert "checkpoint_dir" in str(info.value)


def test_chunks_shrink_when_sessions_run_long(tiny_model, small_texts, local_fits, monkeypatch):
    clock = {"t": 0.0}
    monkeypatch.setattr(remote_mod, "_clock", lambda: clock["t"])
    original = remote_mod._fit_session

    def slow_session(*args, **kwargs):
        clock["t"] += 20.0 * args[11].shape[0]  # 20 simulated seconds per step
        return original(*args, **kwargs)

    monkeypatch.setattr(remote_mod, "_fit_session", slow_session)
    stride = Stride(tiny_model, remote="local", remote_steps_per_session=4, remote_session_budget_s=100,
                    remote_budget_fraction=0.5, **SETTINGS)
    stride.fit(train(small_texts), progress=False)
    # 4 steps took 80 s = 20 s/step; half the 100 s budget fits 2 steps
    assert [(r.start, r.stop) for r in stride.remote_log] == [(0, 4), (4, 6)]
    assert [r.seconds for r in stride.remote_log] == [80.0, 40.0]
    assert_same_operators(stride, local_fits["residual"][0])  # the chunking does not change the result


def test_plan_chunk_size_rule():
    s = RemoteSettings(session_budget_s=100, steps_per_session=10, budget_fraction=0.5)
    assert plan_chunk_size([], 10, 50, s) == 10  # no timing yet: the cap
    assert plan_chunk_size([], 10, 3, s) == 3  # never more than what is left
    slow = [ChunkRecord(0, 0, 10, "done", seconds=200.0)]  # 20 s per step -> 50 s fit 2 steps
    assert plan_chunk_size(slow, 10, 50, s) == 2
    fast = slow + [ChunkRecord(1, 10, 12, "done", seconds=2.0)]  # 1 s per step -> back to the cap
    assert plan_chunk_size(fast, 10, 50, s) == 10
    failed = fast + [ChunkRecord(2, 12, 22, "failed", seconds=5.0)]  # retry at half the failed size
    assert plan_chunk_size(failed, 10, 50, s) == 5
    very_slow = [ChunkRecord(0, 0, 1, "done", seconds=90.0)]  # 90 s per step: 1 step per session
    assert plan_chunk_size(very_slow, 10, 50, s) == 1
    hopeless = [ChunkRecord(0, 0, 2, "done", seconds=400.0)]  # 200 s per step > the 100 s budget
    with pytest.raises(SessionBudgetError, match="more than the whole session budget"):
        plan_chunk_size(hopeless, 10, 50, s)


def test_measurement_failure_and_resume(tiny_model, small_texts, local_fits, monkeypatch, tmp_path):
    local, y_local, base_local = local_fits["residual"]
    stride = Stride(tiny_model, remote="local", remote_queries_per_session=2, remote_checkpoint_dir=str(tmp_path),
                    **SETTINGS)
    stride.design, stride.operators = local.design, local.operators
    stride.train_texts, stride.train_ids = local.train_texts, local.train_ids
    original = remote_mod._measure_session
    calls = []

    def broken_second(*args, **kwargs):
        calls.append(args[6].shape[0])
        if len(calls) == 2:  # token ids beyond the vocabulary: the embedding fails on the server
            args = list(args)
            args[6] = args[6] + 10_000
        return original(*args, **kwargs)

    monkeypatch.setattr(remote_mod, "_measure_session", broken_second)
    with pytest.raises(RemoteChunkError, match=r"measurement failed in chunk 1 \(queries 2\.\.3 of 4") as info:
        stride.measure(PROMPTS, COMPLETIONS, progress=False)
    assert (info.value.kind, info.value.chunk, info.value.start) == ("measure", 1, 2)
    calls.clear()
    monkeypatch.setattr(remote_mod, "_measure_session",
                        lambda *a, **k: (calls.append(a[6].shape[0]), original(*a, **k))[1])
    y, base = stride.measure(PROMPTS, COMPLETIONS, progress=False)
    assert calls == [2]  # queries 2-3 only; queries 0-1 came from disk
    torch.testing.assert_close(y, y_local, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(base, base_local, rtol=1e-5, atol=1e-6)


def test_remote_exact_measurement_matches_local_and_keeps_its_own_checkpoint(tiny_model, local_fits, tmp_path):
    """``measurement="exact"`` in a remote session gives the local exact measurements; its
    checkpoint folder differs from the first-order one (the logits placement's default), so neither
    resumes the other."""
    local, y_local, base_local = local_fits["logits"]
    stride = Stride(tiny_model, remote="local", remote_checkpoint_dir=str(tmp_path),
                    **{**SETTINGS, "placement": "logits"})
    stride.design, stride.operators = local.design, local.operators
    stride.train_texts, stride.train_ids = local.train_texts, local.train_ids
    y_exact_local, _ = local.measure(PROMPTS, COMPLETIONS, progress=False, measurement="exact")
    y_exact, base = stride.measure(PROMPTS, COMPLETIONS, progress=False, measurement="exact")
    torch.testing.assert_close(y_exact, y_exact_local, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(base, base_local, rtol=1e-5, atol=1e-6)
    y_first, _ = stride.measure(PROMPTS, COMPLETIONS, progress=False)
    torch.testing.assert_close(y_first, y_local, rtol=1e-5, atol=1e-6)  # first-order (the default)
    assert not torch.allclose(y_first, y_exact, atol=1e-6)
    assert len([p for p in tmp_path.iterdir() if p.name.startswith(remote_mod.MEASURE_PREFIX)]) == 2


def test_remote_argument_checks(tiny_model):
    with pytest.raises(ValueError, match="host URL"):
        Stride(tiny_model, remote="ndif", **SETTINGS)
    with pytest.raises(TypeError, match="unknown remote setting"):
        Stride(tiny_model, remote=True, remote_budget=3, **SETTINGS)
    with pytest.raises(ValueError, match="remote_budget_fraction"):
        Stride(tiny_model, remote=True, remote_budget_fraction=2.0, **SETTINGS)
    stride = Stride(tiny_model, remote="https://example.org", remote_steps_per_session=7, **SETTINGS)
    assert stride.remote == "https://example.org" and stride.remote_settings.steps_per_session == 7
    assert stride.provenance()["remote"] == "https://example.org"
    assert Stride(tiny_model, **SETTINGS).remote is False


def test_custom_metric_is_refused_remotely(tiny_model, local_fits):
    local = local_fits["residual"][0]
    stride = Stride(tiny_model, remote="local", **SETTINGS)
    stride.design, stride.operators = local.design, local.operators
    with pytest.raises(NotImplementedError, match="custom metric"):
        stride.measure(PROMPTS, COMPLETIONS, metric=lambda logits, batch: logits[:, -1, 0], progress=False)


def test_works_when_the_whole_package_is_registered_by_value(tiny_model, small_texts, local_fits):
    """A checkout run without installing: nnsight's pull_env registers all of stride_nnsight by name."""
    from cloudpickle.cloudpickle import _PICKLE_BY_VALUE_MODULES

    import nnsight

    added = "stride_nnsight" not in _PICKLE_BY_VALUE_MODULES
    nnsight.register("stride_nnsight")
    try:
        server = _server_emulation_cls()(tiny_model)
        stride = Stride(tiny_model, remote=server, remote_steps_per_session=1, **{**SETTINGS, "steps": 2})
        stride.fit(train(small_texts), progress=False)
    finally:
        if added:
            _PICKLE_BY_VALUE_MODULES.discard("stride_nnsight")
    assert server.requests == 2
    np.testing.assert_allclose(stride.history.total, local_fits["residual"][0].history.total[:2], rtol=1e-5, atol=1e-6)
    assert "stride_nnsight.operators" not in _PICKLE_BY_VALUE_MODULES  # the driver cleans up after itself


def test_remote_fit_chooses_the_default_subsets_from_the_corpus(tiny_model, small_texts):
    settings = {k: v for k, v in SETTINGS.items() if k != "n_subsets"}  # n_subsets=None: K from the corpus
    stride = Stride(tiny_model, remote="local", remote_steps_per_session=3, **settings).fit(small_texts[:10],
                                                                                           progress=False)
    assert stride.args.n_subsets == 10 == stride.operators.n_operators  # min(512, 10 x d=2 // 2)
    attr = stride.attribute(PROMPTS[:1], COMPLETIONS[:1], progress=False)
    assert attr.measurements.shape == (1, 10) and attr.provenance["n_subsets"] == 10


def test_remote_fit_reads_the_whole_vocabulary_and_says_so(tiny_model, small_texts):
    """Vocabulary candidates (fit_vocabulary) are built from the logits on this machine: a remote
    fit reads the whole vocabulary, and its settings record fit_vocabulary=None."""
    stride = Stride(tiny_model, remote="local", remote_steps_per_session=3,
                    **{**SETTINGS, "placement": "logits", "fit_vocabulary": 32}).fit(small_texts[:10], progress=False)
    assert stride.args.fit_vocabulary is None


def test_remote_fit_within_the_state_cap_matches_local(tiny_model, small_texts):
    """The state cap resolves before any session: a remote fit whose logit columns the cap cuts
    ships the column map with the operators' state and matches the local fit."""
    from stride_nnsight.operators import state_bytes

    probe = Stride(tiny_model, **SETTINGS)
    V, d = probe.backend.vocab_size, probe.backend.d_model
    cap = state_bytes(8, 4, d, V, probe.args.basis_hidden) * 0.6 / 1e6       # rank 4 is explicit: columns give
    settings = {**SETTINGS, "placement": "logits", "fit_vocabulary": None, "activation_cache": False,
                "max_state_mb": cap}
    with pytest.warns(UserWarning, match="coefficient columns"):
        local = Stride(tiny_model, **settings).fit(train(small_texts), progress=False)
    stride = Stride(tiny_model, remote="local", remote_steps_per_session=3, **settings)
    with pytest.warns(UserWarning, match="coefficient columns"):
        stride.fit(train(small_texts), progress=False)
    assert stride.args.rank == 4 and stride.args.logit_columns == local.args.logit_columns < V
    assert torch.equal(stride.operators.column_of, local.operators.column_of)
    np.testing.assert_allclose(stride.history.total, local.history.total, rtol=1e-5, atol=1e-6)
    assert_same_operators(stride, local)
    y_remote, _ = stride.measure(PROMPTS, COMPLETIONS, progress=False)
    y_local, _ = local.measure(PROMPTS, COMPLETIONS, progress=False)
    torch.testing.assert_close(y_remote, y_local, rtol=1e-5, atol=1e-6)
