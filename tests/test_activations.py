"""Activation cache (stride_nnsight.activations): what it serves equals the live frozen model.

* cached ``z`` and rebuilt logits equal a live forward for random row sets (repeats included),
  at the widths ``TokenBatch.rows`` gives, on nnsight and on a TransformerLens bridge;
* ``step_losses`` (and whole optimiser steps) with the cached forward equal the live ones;
* the head runs once per distinct document; residual edits are refused;
* an interrupted build resumes to a byte-identical cache; another corpus / model / layer /
  dtype is refused naming what differs; float16 / bfloat16 caches are close;
* verification refuses a head that does not reproduce the model's logits, and accepts the
  post-head transforms of Gemma 2 (soft-capping), Cohere (logit_scale), Granite (logits_scaling)
  on both toolkits;
* the cost benchmark's ``--quick`` run prints its table.
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from stride_nnsight import activations
from stride_nnsight.activations import (
    ActivationCache,
    ActivationCacheError,
    ActivationCacheMismatchError,
    HeadMismatchError,
    cache_size_bytes,
    head_function,
    read_activations,
    use_activation_cache,
)
from stride_nnsight.arguments import StrideArguments
from stride_nnsight.backends import resolve_backend
from stride_nnsight.inputs import TokenBatch, encode_texts
from stride_nnsight.operators import SteeringOperators, loss_candidates, step_losses

LAYER = 1
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def backend(tiny_model):
    b = resolve_backend(tiny_model)
    b.freeze()
    return b


@pytest.fixture(scope="module")
def texts(tiny_tokenizer, small_texts) -> TokenBatch:
    return encode_texts(tiny_tokenizer, small_texts, None)


@pytest.fixture(scope="module")
def cache(backend, texts, tmp_path_factory) -> ActivationCache:
    return ActivationCache.build(backend, texts, LAYER, tmp_path_factory.mktemp("acts"), batch_size=7,
                                 progress=False)


def live_forward(backend, layer=LAYER):
    def forward(input_ids, attention_mask, edit):
        return backend.forward(input_ids, attention_mask, layer, edit=edit)

    return forward


def random_index(n: int, seed: int, size: int = 9) -> np.ndarray:
    rng = np.random.default_rng(seed)
    index = rng.integers(0, n, size)
    return np.concatenate([index, np.full(5, index[0])])  # a repeated document, like the linearity probe


def assert_real_close(a, b, mask, tol=1e-5):
    m = mask.bool().to(a.device)
    torch.testing.assert_close(a[m].float(), b[m].float(), atol=tol, rtol=tol)


# ---------------------------------------------------------------------------- equivalence
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_cached_rows_and_logits_equal_live_model(backend, texts, cache, seed):
    index = random_index(len(texts), seed)
    batch = texts.rows(index)
    live_logits, live_z = backend.forward(batch.input_ids, batch.attention_mask, LAYER)
    z, h = cache.rows(index)
    assert z.shape == (len(index), batch.input_ids.shape[1], backend.d_model) and z.dtype == torch.float32
    assert h.shape == z.shape
    assert_real_close(z, live_z, batch.attention_mask)
    logits, z2 = cache.forward_for(index)(batch.input_ids, batch.attention_mask, None)
    assert logits.shape == live_logits.shape
    assert_real_close(logits, live_logits, batch.attention_mask)
    assert torch.equal(z2, z)
    pad = ~batch.attention_mask.bool()
    assert bool((z[pad] == 0).all()) and bool((logits[pad] == 0).all())


def test_widths_match_token_batch_rows(texts, cache):
    for index in ([0], [3, 3], list(range(len(texts))), [int(np.argmin(cache.lengths))]):
        assert cache.rows(index)[0].shape[1] == texts.rows(index).input_ids.shape[1]
        ids, mask = cache.tokens(index)
        batch = texts.rows(index)
        assert torch.equal(mask, batch.attention_mask)
        assert torch.equal(ids * mask, batch.input_ids * batch.attention_mask)


def test_read_activations_head_input_rebuilds_logits(backend, texts):
    batch = texts.rows([0, 1, 2])
    z, h, logits = read_activations(backend, batch.input_ids, batch.attention_mask, LAYER)
    live_logits, live_z = backend.forward(batch.input_ids, batch.attention_mask, LAYER)
    assert torch.equal(z, live_z) and torch.equal(logits, live_logits)
    assert h.shape == z.shape
    torch.testing.assert_close(head_function(backend)(h), logits, atol=1e-5, rtol=1e-5)


def _operators(backend, K=12, seed=0):
    torch.manual_seed(seed)
    ops = SteeringOperators(K, backend.d_model, 4, backend.vocab_size, placement="logits", layer=LAYER, hidden=8)
    with torch.no_grad():
        ops.coefficients.normal_(0, 0.3)
    return ops


def _step_rows(n: int, K: int, seed: int):
    rng = np.random.default_rng(seed)
    n_fid, n_stab, n_probe = 4, 4, 6
    examples = np.concatenate([rng.integers(0, n, n_fid + n_stab), np.full(n_probe, rng.integers(0, n))])
    op_ids = torch.from_numpy(np.concatenate([rng.integers(0, K, n_fid + n_stab), rng.permutation(K)[:n_probe]]))
    sketch = torch.from_numpy(rng.normal(size=(n_probe, 3)).astype(np.float32))
    return examples, op_ids, sketch, n_fid, n_stab


def _losses(forward, ops, batch, op_ids, sketch, n_fid, n_stab):
    return step_losses(forward, ops, batch.input_ids, batch.attention_mask, batch.loss_mask, op_ids, sketch,
                       n_fid, n_stab, (1.0, 1.0, 0.1), 1e-2)


@pytest.mark.parametrize("seed", [0, 1])
def test_step_losses_cached_equal_live(backend, texts, cache, seed):
    ops = _operators(backend)
    examples, op_ids, sketch, n_fid, n_stab = _step_rows(len(texts), ops.n_operators, seed)
    batch = texts.rows(examples)
    live = _losses(live_forward(backend), ops, batch, op_ids, sketch, n_fid, n_stab)
    live[0].backward()
    live_grads = [p.grad.clone() for p in ops.parameters()]
    ops.zero_grad()
    cached = _losses(cache.forward_for(examples), ops, batch, op_ids, sketch, n_fid, n_stab)
    cached[0].backward()
    for a, b in zip(cached, live):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert float(live[3].detach()) > 0 and float(live[2].detach().mean()) > 0  # the losses are not trivially zero
    for p, g in zip(ops.parameters(), live_grads):
        torch.testing.assert_close(p.grad, g, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("seed", [0, 1])
def test_step_losses_at_sampled_positions_cached_equal_live(backend, texts, cache, seed):
    """With loss_positions the cached forward runs the head on the chosen positions only and
    gives the live losses and gradients."""
    ops = _operators(backend)
    examples, op_ids, sketch, n_fid, n_stab = _step_rows(len(texts), ops.n_operators, seed)
    batch = texts.rows(examples)
    cand = loss_candidates(batch.input_ids, batch.attention_mask, batch.loss_mask, n_fid, n_stab)
    keys = torch.rand(cand.shape, generator=torch.Generator().manual_seed(seed))
    keys[~cand] = 2.0
    positions = keys.argsort(1)[:, :5]
    positions[n_fid + n_stab:] = positions[n_fid + n_stab]
    valid = cand.gather(1, positions)
    results = []
    for forward in (live_forward(backend), cache.forward_for(examples)):
        ops.zero_grad()
        out = step_losses(forward, ops, batch.input_ids, batch.attention_mask, batch.loss_mask, op_ids, sketch,
                          n_fid, n_stab, (1.0, 1.0, 0.1), 1e-2, positions, valid)
        out[0].backward()
        results.append((out, [p.grad.clone() for p in ops.parameters()]))
    (live, live_grads), (cached, cached_grads) = results
    for a, b in zip(cached, live):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    for a, b in zip(cached_grads, live_grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    seen = []
    counted = copy.copy(cache)
    counted.head = lambda h: seen.append(h.shape[0]) or cache.head(h)
    step_losses(counted.forward_for(examples), ops, batch.input_ids, batch.attention_mask, batch.loss_mask, op_ids,
                sketch, n_fid, n_stab, (1.0, 1.0, 0.1), 1e-2, positions, valid)
    assert seen == [positions.numel()]  # the head ran on b * m vectors, not on every token


def test_stride_fit_with_loss_positions_cached_matches_live(tiny_model, small_texts):
    cached = _stride(tiny_model, activation_cache=True, loss_positions=3).fit(small_texts, progress=False)
    live = _stride(tiny_model, activation_cache=False, loss_positions=3).fit(small_texts, progress=False)
    full = _stride(tiny_model, activation_cache=True).fit(small_texts, progress=False)
    assert cached.cache_used is True and live.cache_used is False
    for a, b in zip(cached.operators.state_dict().values(), live.operators.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert cached.history.total == pytest.approx(live.history.total, rel=1e-4)
    assert not torch.allclose(cached.operators.coefficients, full.operators.coefficients, rtol=1e-3, atol=1e-5)  # the setting does something


def test_optimiser_steps_cached_follow_live(backend, texts, cache):
    """Five AdamW steps as OperatorFitter.train_step runs them: same trajectory either way."""
    trained = []
    for use_cache in (False, True):
        ops = _operators(backend, seed=1)
        optimizer = torch.optim.AdamW(ops.parameters(), lr=1e-2)
        totals = []
        for step in range(5):
            examples, op_ids, sketch, n_fid, n_stab = _step_rows(len(texts), ops.n_operators, 10 + step)
            forward = cache.forward_for(examples) if use_cache else live_forward(backend)
            loss = _losses(forward, ops, texts.rows(examples), op_ids, sketch, n_fid, n_stab)[0]
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            totals.append(float(loss.detach()))
        trained.append((totals, [p.detach().clone() for p in ops.parameters()]))
    (live_totals, live_params), (cached_totals, cached_params) = trained
    np.testing.assert_allclose(cached_totals, live_totals, rtol=1e-4, atol=1e-5)
    for a, b in zip(cached_params, live_params):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-3)


def test_head_runs_once_per_distinct_document(texts, cache):
    seen = []
    head = cache.head

    def counting(h):
        seen.append(h.shape[0])
        return head(h)

    counted = copy.copy(cache)
    counted.head = counting
    index = [7] * 32 + [1, 2]
    batch = texts.rows(index)
    counted.forward_for(index)(batch.input_ids, batch.attention_mask, None)
    assert seen == [int(cache.lengths[[1, 2, 7]].sum())]  # one call, real tokens of 3 documents


def test_cached_forward_refuses_residual_edit_and_wrong_rows(texts, cache):
    batch = texts.rows([0, 1])
    forward = cache.forward_for([0, 1])
    with pytest.raises(NotImplementedError, match="residual-placement edit"):
        forward(batch.input_ids, batch.attention_mask, lambda z: z)
    other = texts.rows([1, 0])
    with pytest.raises(ValueError, match="not the cached documents"):
        forward(other.input_ids, other.attention_mask, None)
    with pytest.raises(ValueError, match="rows of width"):
        forward(batch.input_ids[:1], batch.attention_mask[:1], None)
    with pytest.raises(IndexError, match="out of range"):
        cache.rows([len(texts)])


# ---------------------------------------------------------------------------- files
def _arrays(directory):
    return {name: np.load(Path(directory) / file) for name, file in activations.ARRAY_FILES.items()
            if (Path(directory) / file).exists()}


def test_size_reported_before_writing_matches_files(backend, texts, tmp_path, capsys):
    expected = cache_size_bytes(texts, backend.d_model)
    built = ActivationCache.build(backend, texts, LAYER, tmp_path, batch_size=16, progress=True)
    out = capsys.readouterr()
    assert f"{len(texts)} documents" in out.out + out.err and "to write in" in out.out + out.err
    on_disk = sum(f.stat().st_size for f in tmp_path.iterdir())
    assert built.size_bytes == expected
    data = 2 * built.n_tokens * backend.d_model * 4
    assert data < on_disk <= expected < on_disk + 8192
    assert cache_size_bytes(texts, backend.d_model, "float16") - 8 * (built.n_tokens + len(texts) + 1) < data / 2 + 5000


def test_full_disk_refused_before_writing(backend, texts, tmp_path, monkeypatch):
    import shutil

    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(activations.shutil, "disk_usage", lambda p: usage._replace(free=1000))
    with pytest.raises(OSError, match="only 1.0 KB are free there.*dtype='float16'"):
        ActivationCache.build(backend, texts, LAYER, tmp_path, progress=False)
    assert not (tmp_path / "z.npy").exists()


def test_interrupted_build_resumes_to_identical_cache(backend, texts, tmp_path, monkeypatch, cache):
    real = activations.read_activations
    calls, interrupt = [], [True]

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3 and interrupt[0]:
            interrupt[0] = False
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(activations, "read_activations", interrupted)
    with pytest.raises(KeyboardInterrupt):
        ActivationCache.build(backend, texts, LAYER, tmp_path, batch_size=7, progress=False)
    manifest = json.loads((tmp_path / activations.MANIFEST_NAME).read_text())
    assert manifest["done"] == 14
    with pytest.raises(ActivationCacheError, match="incomplete .14 of 40 documents"):
        ActivationCache(tmp_path)
    calls.clear()
    resumed = ActivationCache.build(backend, texts, LAYER, tmp_path, batch_size=7, progress=False)
    assert len(calls) == 4  # only the 26 documents left, in batches of 7
    fresh = _arrays(cache.directory)
    for name, values in _arrays(tmp_path).items():
        assert np.array_equal(values, fresh[name]), name
    calls.clear()
    ActivationCache.build(backend, texts, LAYER, tmp_path, batch_size=7, progress=False)  # complete: reused
    assert calls == []
    assert resumed.n_documents == len(texts)


def test_sharded_build_left_half_done_is_finished_by_one_process(backend, texts, tmp_path, monkeypatch, cache):
    """Rank 1 of 2 writes its batches (b % 2 == 1) and is then gone; one process finishes the
    rest (its progress file says which) and the cache equals a single-process build."""
    from stride_nnsight import distributed

    real = activations.read_activations
    calls = []
    monkeypatch.setattr(activations, "read_activations", lambda *a, **k: calls.append(1) or real(*a, **k))
    ActivationCache._open_or_create(tmp_path, texts, activations.cache_identity(
        texts, backend.fingerprint(), LAYER, "float32", backend.d_model), backend.d_model, "float32", False, False,
        backend.vocab_size)
    with monkeypatch.context() as m:  # this process plays rank 1 of 2; collectives are no-ops
        m.setattr(distributed, "rank_and_world", lambda: (1, 2))
        m.setattr(distributed, "barrier", lambda: None)
        m.setattr(distributed, "broadcast_object", lambda obj, src=0: obj)
        with pytest.raises(ActivationCacheError, match="incomplete"):  # rank 0 would complete the manifest
            ActivationCache.build(backend, texts, LAYER, tmp_path, batch_size=7, progress=False)
    n_batches = -(-len(texts) // 7)
    assert len(calls) == n_batches // 2  # batches 1, 3, 5
    assert list(np.load(tmp_path / "progress-rank1-bs7.npy")) == [b % 2 for b in range(n_batches)]
    calls.clear()
    built = ActivationCache.build(backend, texts, LAYER, tmp_path, batch_size=7, progress=False)
    assert len(calls) == n_batches - n_batches // 2  # only the batches nobody wrote
    fresh = _arrays(cache.directory)
    for name, values in _arrays(tmp_path).items():
        assert np.array_equal(values, fresh[name]), name
    assert built.n_documents == len(texts) and not list(tmp_path.glob("progress-rank*"))


def test_identity_mismatch_names_what_differs(backend, texts, tiny_tokenizer, small_texts, tmp_path):
    ActivationCache.build(backend, texts, LAYER, tmp_path, progress=False)
    with pytest.raises(ActivationCacheMismatchError, match="layer: 1 in the cache vs 0 now"):
        ActivationCache.build(backend, texts, 0, tmp_path, progress=False)
    with pytest.raises(ActivationCacheMismatchError, match="model fingerprint: .* in the cache vs 'other' now"):
        ActivationCache.build(backend, texts, LAYER, tmp_path, fingerprint="other", progress=False)
    with pytest.raises(ActivationCacheMismatchError, match="dtype: 'float32' in the cache vs 'float16' now"):
        ActivationCache.build(backend, texts, LAYER, tmp_path, dtype="float16", progress=False)
    fewer = encode_texts(tiny_tokenizer, small_texts[:-1], None)
    with pytest.raises(ActivationCacheMismatchError, match="tokenized corpus differs.*overwrite=True"):
        ActivationCache.build(backend, fewer, LAYER, tmp_path, progress=False)
    rebuilt = ActivationCache.build(backend, fewer, LAYER, tmp_path, overwrite=True, progress=False)
    assert rebuilt.n_documents == len(small_texts) - 1


@pytest.mark.parametrize("dtype, tol", [("float16", 2e-3), ("bfloat16", 2e-2)])
def test_half_precision_cache_is_close(backend, texts, tmp_path, dtype, tol):
    half = ActivationCache.build(backend, texts, LAYER, tmp_path, dtype=dtype, progress=False)
    assert half.dtype == dtype and half._z.dtype.itemsize == 2
    index = random_index(len(texts), 5)
    batch = texts.rows(index)
    live_logits, live_z = backend.forward(batch.input_ids, batch.attention_mask, LAYER)
    logits, z = half.forward_for(index)(batch.input_ids, batch.attention_mask, None)
    m = batch.attention_mask.bool()
    assert 0 < float((z[m] - live_z[m]).abs().max()) <= tol * float(live_z.abs().max())
    assert float((logits[m] - live_logits[m]).abs().max()) <= tol * max(1.0, float(live_logits.abs().max()))


def test_reopen_damaged_and_headless(cache, texts, tmp_path):
    reopened = ActivationCache(cache.directory)  # read-only, no model needed for rows()
    z, _ = reopened.rows([4, 4])
    assert torch.equal(z, cache.rows([4, 4])[0])
    with pytest.raises(ActivationCacheError, match="opened without the model's head"):
        reopened.forward_for([4])
    with pytest.raises(ActivationCacheError, match="holds no activation cache"):
        ActivationCache(tmp_path)
    (tmp_path / activations.MANIFEST_NAME).write_text("{not json")
    with pytest.raises(ActivationCacheError, match="cannot be read.*overwrite=True"):
        ActivationCache(tmp_path)
    (tmp_path / activations.MANIFEST_NAME).write_text(json.dumps({"kind": activations.CACHE_KIND, "format": 1}))
    with pytest.raises(ActivationCacheError, match="lacks .*damaged"):
        ActivationCache(tmp_path)


def test_verification_refuses_a_wrong_head(backend, texts, tmp_path, monkeypatch):
    real = activations.post_head_transforms
    monkeypatch.setattr(activations, "post_head_transforms",
                        lambda b: real(b) + [("* 1.01", lambda x: x * 1.01)])
    with pytest.raises(HeadMismatchError, match="cache cannot be used for it.*activation_cache=False"):
        ActivationCache.build(backend, texts, LAYER, tmp_path, progress=False)
    assert json.loads((tmp_path / activations.MANIFEST_NAME).read_text())["done"] == 0
    # a candidate cache stores what the model's own logits give, and never runs the head: no check
    built = ActivationCache.build(backend, texts, LAYER, tmp_path / "cand", progress=False, candidates=8)
    assert built.candidates == 8 and built.verified_diff is None


def test_left_padded_corpus_refused(backend, texts, tmp_path):
    flipped = TokenBatch(texts.input_ids.flip(1), texts.attention_mask.flip(1), texts.loss_mask.flip(1))
    with pytest.raises(ValueError, match="is not right-padded"):
        ActivationCache.build(backend, flipped, LAYER, tmp_path, progress=False)


def test_use_activation_cache_decision():
    assert use_activation_cache("auto", "logits", fit_rows=1000, n_documents=100) == (True, "activation cache used")
    use, reason = use_activation_cache("auto", "residual", fit_rows=1000, n_documents=100)
    assert not use and "only placement='logits'" in reason
    with pytest.raises(ValueError, match="activation_cache=True cannot be used.*remote"):
        use_activation_cache(True, "logits", remote=True)
    assert not use_activation_cache("auto", "logits", fit_rows=150, n_documents=100)[0]
    use, reason = use_activation_cache("auto", "logits", fit_rows=10**6, n_documents=10, size_bytes=600,
                                       free_bytes=1000)
    assert not use and "half" in reason
    assert use_activation_cache(False, "logits") == (False, "activation_cache=False")
    with pytest.raises(ValueError, match="must be True, False or 'auto'"):
        use_activation_cache("yes", "logits")


# ---------------------------------------------------------------------------- architectures
LLAMA_LIKE = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64)
POST_HEAD = {
    "gemma2": ("Gemma2ForCausalLM", "Gemma2Config", dict(LLAMA_LIKE, head_dim=8, final_logit_softcapping=2.0),
               "softcap"),
    "cohere": ("CohereForCausalLM", "CohereConfig", dict(LLAMA_LIKE, logit_scale=0.25), "logit_scale"),
    "granite": ("GraniteForCausalLM", "GraniteConfig", dict(LLAMA_LIKE, logits_scaling=4.0), "logits_scaling"),
}


@pytest.mark.parametrize("toolkit", ["nnsight", "transformer_lens"])
@pytest.mark.parametrize("name", list(POST_HEAD))
def test_post_head_transforms_verified(name, toolkit, tiny_tokenizer, small_texts, tmp_path, monkeypatch):
    transformers = pytest.importorskip("transformers")
    model_class, config_class, settings, transform = POST_HEAD[name]
    special = tiny_tokenizer.pad_token_id
    config = getattr(transformers, config_class)(vocab_size=len(tiny_tokenizer), bos_token_id=special,
                                                 eos_token_id=special, pad_token_id=special, **settings)
    config.architectures = [model_class]  # the bridge picks its adapter from it
    torch.manual_seed(0)
    hf = getattr(transformers, model_class)(config).eval()
    if toolkit == "nnsight":
        from nnsight import TransformersModel

        model = TransformersModel(hf, tokenizer=tiny_tokenizer, task="text-generation")
    else:
        pytest.importorskip("transformer_lens")
        from stride_nnsight.backends.transformer_lens import bridge_from_hf

        model = bridge_from_hf(hf, tiny_tokenizer, device="cpu", tokenizer_dir=str(tmp_path / "tok"))
    backend = resolve_backend(model)
    backend.freeze()
    texts = encode_texts(tiny_tokenizer, small_texts[:10], None)
    assert transform in head_function(backend).description
    built = ActivationCache.build(backend, texts, 0, tmp_path / "ok", batch_size=4, progress=False)
    index = [2, 2, 5, 9]
    batch = texts.rows(index)
    live_logits, live_z = backend.forward(batch.input_ids, batch.attention_mask, 0)
    logits, z = built.forward_for(index)(batch.input_ids, batch.attention_mask, None)
    assert_real_close(logits, live_logits, batch.attention_mask)
    assert_real_close(z, live_z, batch.attention_mask)
    # without its transform the head does not reproduce the model: the build is refused
    monkeypatch.setattr(activations, "post_head_transforms", lambda b: [])
    with pytest.raises(HeadMismatchError, match="max |difference|"):
        ActivationCache.build(backend, texts, 0, tmp_path / "bad", batch_size=4, progress=False)


def test_transformer_lens_cache_equals_live_and_nnsight(tiny_hf_model, tiny_tokenizer, texts, cache, tmp_path):
    pytest.importorskip("transformer_lens")
    from stride_nnsight.backends.transformer_lens import bridge_from_hf

    bridge = bridge_from_hf(tiny_hf_model, tiny_tokenizer, copy_model=True, device="cpu",
                            tokenizer_dir=str(tmp_path / "tok"))
    backend = resolve_backend(bridge)
    backend.freeze()
    assert backend.fingerprint() == cache.identity["model fingerprint"]
    tl_cache = ActivationCache.build(backend, texts, LAYER, tmp_path / "tl", batch_size=16, progress=False)
    assert tl_cache.identity == cache.identity
    index = random_index(len(texts), 3)
    batch = texts.rows(index)
    live_logits, live_z = backend.forward(batch.input_ids, batch.attention_mask, LAYER)
    logits, z = tl_cache.forward_for(index)(batch.input_ids, batch.attention_mask, None)
    assert_real_close(logits, live_logits, batch.attention_mask)
    assert_real_close(z, live_z, batch.attention_mask)
    for name, values in _arrays(tl_cache.directory).items():
        np.testing.assert_allclose(values, _arrays(cache.directory)[name], atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------- benchmark
def test_fit_cost_quick_prints_table(tmp_path, capsys):
    if str(REPO) not in sys.path:  # `benchmarks` lives next to the package, not inside it
        sys.path.insert(0, str(REPO))
    from benchmarks import fit_cost

    result = fit_cost.main(["--quick", "--cache-dir", str(tmp_path)])
    out = capsys.readouterr().out
    for row in ("plain forward pass over the corpus", "building the activation cache", "fit step, uncached",
                "fit step, cached", "fit cost uncached", "fit cost cached", "speed-up (uncached / cached fit)",
                "same, sampling 'document'", "same, linearity loss on", "same, placement 'head'",
                "index-cost reference: TRAK featurisation, one model, projection k = 16"):
        assert row in out, (row, out)
    labels = [v["label"] for v in result["variants"]]
    assert (fit_cost.FULL_VOCABULARY[0] in labels) == (result["fit_vocabulary"] is not None)
    for v in result["variants"]:
        assert v["step"] > 0 and v["build"] > 0 and v["steps"] > 0, v
    head = next(v for v in result["variants"] if v["label"].startswith("placement 'head'"))
    assert head["candidates"] is None  # the head placement reads the whole vocabulary (a cache with h)
    assert "measuring all K operators, residual placement (1 queries)" in out
    qc = result["queries"]
    assert "  the same, first order (the default, measurement='auto')" in out
    for key in ("plain_per_query", "measure_logits_per_query", "measure_head_per_query",
                "measure_logits_first_order_per_query", "measure_head_first_order_per_query",
                "measure_residual_per_query", "recover_per_query"):
        assert qc[key] > 0, key
    assert set(qc["trak"]) == {8, 16} and min(qc["trak"].values()) > 0
    assert "not meaningful" in out  # --quick timings are labelled as smoke only
    for key in ("plain", "build", "step_uncached", "step_cached"):
        assert result[key] > 0, key
    assert result["steps_total"] == StrideArguments(n_subsets=16, subsets_per_example=2, batch_size=8).fit_steps(60)
    cache_dir = "full" if result["fit_vocabulary"] is None else f"candidates-{result['fit_vocabulary']}"
    assert (tmp_path / cache_dir / "activations.json").exists()


# ------------------------------------------------------------------ wired into Stride.fit
def _stride(tiny_model, **kw):
    from stride_nnsight import Stride

    # the whole vocabulary unless a test asks for candidates (their cached = live test is below): an
    # untrained model's near-tied logits can order the top candidates differently under rounding
    settings = dict(layer=LAYER, n_subsets=12, subsets_per_example=2, rank=4, steps=6, batch_size=8,
                    linearity_operators=4, linearity_weight=0.1, seed=0, fit_vocabulary=None)
    return Stride(tiny_model, **{**settings, **kw})


def test_stride_fit_uses_cache_and_matches_live_fit(tiny_model, small_texts, tmp_path):
    cached = _stride(tiny_model, activation_cache=True).fit(small_texts, progress=False, cache_dir=tmp_path / "c")
    live = _stride(tiny_model, activation_cache=False).fit(small_texts, progress=False)
    assert cached.cache_used is True and live.cache_used is False
    assert (tmp_path / "c" / activations.MANIFEST_NAME).exists()
    for a, b in zip(cached.operators.state_dict().values(), live.operators.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)  # float rounding only
    assert cached.history.total == pytest.approx(live.history.total, rel=1e-4)
    prov = cached.attribute(["the cat sat"], [" on the mat."], progress=False).provenance
    assert prov["activation_cache"] is True


def test_stride_cache_default_lives_under_checkpoint_dir_and_resume_reuses_it(tiny_model, small_texts, tmp_path,
                                                                               monkeypatch):
    first = _stride(tiny_model, steps=10).fit(small_texts, progress=False, checkpoint_dir=tmp_path)
    assert first.cache_used is True  # "auto": 10 steps x 12 rows > 2 x 40 documents
    assert (tmp_path / "activations" / activations.MANIFEST_NAME).exists()
    calls = []
    real = activations.read_activations
    monkeypatch.setattr(activations, "read_activations", lambda *a, **k: calls.append(1) or real(*a, **k))
    again = _stride(tiny_model, steps=12).fit(small_texts, progress=False, checkpoint_dir=tmp_path)
    assert calls == []  # the finished cache was reused, not rebuilt
    assert len(again.history) == 12


def test_stride_cache_mode_is_part_of_the_run_identity(tiny_model, small_texts, tmp_path):
    from stride_nnsight.fitting import CheckpointMismatchError

    _stride(tiny_model, activation_cache=True).fit(small_texts, progress=False, checkpoint_dir=tmp_path)
    with pytest.raises(CheckpointMismatchError, match="forward"):
        _stride(tiny_model, activation_cache=False, steps=8).fit(small_texts, progress=False,
                                                                 checkpoint_dir=tmp_path)


def test_residual_placement_and_bad_setting(tiny_model, small_texts):
    assert _stride(tiny_model, placement="residual").fit(small_texts, progress=False).cache_used is False
    with pytest.raises(ValueError, match="only placement='logits' or 'head' can be cached"):
        _stride(tiny_model, placement="residual", activation_cache=True).fit(small_texts, progress=False)
    with pytest.raises(ValueError, match="activation_cache must be"):
        _stride(tiny_model, activation_cache="yes")


def test_auto_cache_resume_with_more_steps_keeps_the_checkpoints_forward(tiny_model, small_texts, tmp_path):
    """'auto' decides by the fit's size, so a short fit runs live and a longer one would be cached;
    resuming the short fit with more steps keeps its live forward instead of refusing the checkpoint."""
    short = _stride(tiny_model, linearity_weight=0.0, steps=2).fit(small_texts[:24], progress=False,
                                                                    checkpoint_dir=tmp_path)
    assert short.cache_used is False  # 2 steps x 8 rows <= 2 x 24 documents
    fresh = _stride(tiny_model, linearity_weight=0.0, steps=10).fit(small_texts[:24], progress=False)
    assert fresh.cache_used is True  # 10 steps x 8 rows > 48
    resumed = _stride(tiny_model, linearity_weight=0.0, steps=10).fit(small_texts[:24], progress=False,
                                                                      checkpoint_dir=tmp_path)
    assert resumed.cache_used is False and len(resumed.history) == 10


# ------------------------------------------------------- fit_vocabulary: candidates in the cache
def test_candidate_cache_serves_what_the_live_model_gives(backend, texts, tmp_path):
    from stride_nnsight.operators import candidate_forward

    cache = ActivationCache.build(backend, texts, LAYER, tmp_path / "cand", batch_size=7, progress=False,
                                  candidates=16, candidate_seed=5)
    assert cache.candidates == 16 and cache._h is None
    files = sorted(p.name for p in (tmp_path / "cand").iterdir())
    assert "h_final.npy" not in files and "candidate_ids.npy" in files
    size = sum((tmp_path / "cand" / f).stat().st_size for f in files)
    assert abs(size - cache.size_bytes) < 4096 + 2048  # reported size (headers and manifest aside)
    index = random_index(len(texts), 3)
    batch = texts.rows(index)
    logw, z, ids = cache.forward_for(index)(batch.input_ids, batch.attention_mask, None, candidates=True)
    live = candidate_forward(live_forward(backend), torch.from_numpy(index), 16, 5)
    logw2, z2, ids2 = live(batch.input_ids, batch.attention_mask, None, candidates=True)
    real = batch.attention_mask.bool()
    # the same candidates (draws seeded per document); an untrained model's near-tied logits may
    # order a few differently under the two forwards' float rounding
    same = (ids[real] == ids2[real]).all(-1)
    assert same.float().mean() > 0.95
    torch.testing.assert_close(logw[real][same], logw2[real][same], atol=1e-4, rtol=1e-4)
    assert_real_close(z, z2, batch.attention_mask)
    # slot 0 is the next token wherever there is one; the weights sum to one in probability
    lengths = real.sum(1)
    for row in range(len(index)):
        n = int(lengths[row])
        assert torch.equal(ids[row, : n - 1, 0], batch.input_ids[row, 1:n])
    torch.testing.assert_close(logw[real].logsumexp(-1), torch.zeros(int(real.sum())), atol=1e-4, rtol=0)
    with pytest.raises(NotImplementedError, match="candidates=True"):
        cache.forward_for(index)(batch.input_ids, batch.attention_mask, None)
    with pytest.raises(ActivationCacheError, match="instead of the final hidden state"):
        cache.rows(index)
    with pytest.raises(ActivationCacheMismatchError, match="fit vocabulary"):
        ActivationCache.build(backend, texts, LAYER, tmp_path / "cand", candidates=32, candidate_seed=5,
                              progress=False)


def test_stride_fit_vocabulary_cached_matches_live_fit(tiny_model, small_texts, tmp_path):
    kw = dict(fit_vocabulary=24, linearity_weight=0.0)
    cached = _stride(tiny_model, activation_cache=True, **kw).fit(small_texts, progress=False,
                                                                  cache_dir=tmp_path / "c")
    live = _stride(tiny_model, activation_cache=False, **kw).fit(small_texts, progress=False)
    full = _stride(tiny_model, activation_cache=False, linearity_weight=0.0, fit_vocabulary=None).fit(small_texts,
                                                                                                   progress=False)
    assert ActivationCache(tmp_path / "c").candidates == 24
    for a, b in zip(cached.operators.state_dict().values(), live.operators.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)  # float rounding only
    assert cached.history.total == pytest.approx(live.history.total, rel=1e-4)
    # a different objective from the whole-vocabulary fit (24 of 301 entries per token) ...
    assert not torch.allclose(cached.operators.coefficients, full.operators.coefficients, rtol=1e-3, atol=1e-5)
    # ... and the same one at fit_vocabulary >= V (nothing drawn: exact)
    exact = _stride(tiny_model, activation_cache=False, fit_vocabulary=10_000,
                    linearity_weight=0.0).fit(small_texts, progress=False)
    assert exact.history.total == pytest.approx(full.history.total, rel=1e-4)
    for a, b in zip(exact.operators.state_dict().values(), full.operators.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_interrupted_candidate_build_resumes_to_identical_cache(backend, texts, tmp_path, monkeypatch):
    """The candidates' draws are seeded per document, so a resumed build (other batches) writes
    the same bytes as an uninterrupted one."""
    real = activations.read_activations
    calls = []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    whole = ActivationCache.build(backend, texts, LAYER, tmp_path / "whole", batch_size=7, progress=False,
                                  candidates=20, candidate_seed=3)
    monkeypatch.setattr(activations, "read_activations", interrupted)
    with pytest.raises(KeyboardInterrupt):
        ActivationCache.build(backend, texts, LAYER, tmp_path / "cut", batch_size=7, progress=False,
                              candidates=20, candidate_seed=3)
    monkeypatch.setattr(activations, "read_activations", real)
    ActivationCache.build(backend, texts, LAYER, tmp_path / "cut", batch_size=7, progress=False, candidates=20,
                          candidate_seed=3)
    fresh, resumed = _arrays(whole.directory), _arrays(tmp_path / "cut")
    assert set(fresh) == set(resumed) == {"z", "tokens", "offsets", "cand_ids", "cand_logw"}
    assert np.array_equal(fresh["cand_ids"], resumed["cand_ids"])
    assert np.array_equal(resumed["cand_logw"], fresh["cand_logw"])
