"""The head placement: operators edit the final hidden state ``h`` (the output head's input) and
reach the logits through the frozen head, ``logits_k = head(h + B(z) a_k)``; state ``K x r x d``,
independent of the vocabulary.

Checked against independent computations (the Hugging Face model's own ``transformer`` and
``lm_head`` called directly), across nnsight and TransformerLens, cached and live, and through
``steer()`` in the user's own trace / hooks.
"""

from __future__ import annotations


import numpy as np
import pytest
import torch

from stride_nnsight import Stride
from stride_nnsight.activations import head_function
from stride_nnsight.backends import resolve_backend
from stride_nnsight.inputs import encode_queries, encode_texts
from stride_nnsight.operators import SteeringOperators, head_measurements, step_losses, token_nll

PROMPTS = ["the cat sat", "a dog ran over the", "blue", "the small bird sang while the"]
COMPLETIONS = [" on the mat.", " hill.", " sky and green grass", " sun rose."]
SETTINGS = dict(placement="head", layer=0, n_subsets=12, subsets_per_example=2, rank=4, steps=30, batch_size=8, lr=2e-2,
                basis_hidden=8, seed=0)


def _operators(d_model: int, K: int = 5, seed: int = 0) -> SteeringOperators:
    torch.manual_seed(seed)
    ops = SteeringOperators(K, d_model, 3, d_model, placement="head", layer=0, hidden=8)
    with torch.no_grad():
        ops.coefficients.normal_(0, 0.5)
    return ops.eval()


def _hf_parts(hf, ids, mask, layer):
    """z (block output), h (final hidden state) from the HF model itself."""
    with torch.no_grad():
        out = hf.transformer(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    return out.hidden_states[layer + 1], out.last_hidden_state


def test_state_does_not_grow_with_the_vocabulary():
    small = SteeringOperators(8, 16, 4, 16, placement="head", hidden=8)
    assert small.coefficients.shape == (8, 4, 16)
    per_operator = 4 * 16  # r * d_model values
    assert sum(p.numel() for p in small.parameters()) == 8 * per_operator + sum(
        p.numel() for p in small.basis.parameters())
    # the size: V = 128k, d_model = 4096, K = 256, r = 16, basis hidden 64 (float32)
    K, r, d, hidden, V = 256, 16, 4096, 64, 128_000
    head_bytes = 4 * (K * r * d + d * hidden + hidden + hidden * r + r)
    logits_bytes = 4 * (K * r * V + d * hidden + hidden + hidden * r + r)
    assert head_bytes <= 200e6 < logits_bytes  # 68 MB against 2.1 GB


def test_step_losses_against_the_hf_model_by_hand(tiny_hf_model, tiny_model, tiny_tokenizer, small_texts):
    backend = resolve_backend(tiny_model)
    backend.freeze()
    ops = _operators(backend.d_model)
    head = head_function(backend)
    batch = encode_texts(tiny_tokenizer, small_texts[:4], 32).rows([0, 1, 2, 3])
    op_ids = torch.tensor([0, 1, 2, 3])
    n_fid, n_stab = 2, 2

    def forward(ids, attn, edit, head_input=False):
        from stride_nnsight.activations import read_activations

        z, h, logits = read_activations(backend, ids, attn, 0)
        return (h, z) if head_input else (logits, z)

    _, fidelity, stability, _ = step_losses(forward, ops, batch.input_ids, batch.attention_mask, batch.loss_mask,
                                            op_ids, None, n_fid, n_stab, (1.0, 1.0, 0.0), 0.01, head=head)
    z, h = _hf_parts(tiny_hf_model, batch.input_ids, batch.attention_mask, 0)
    with torch.no_grad():
        steered = tiny_hf_model.lm_head(h + ops.delta(z, op_ids))
        base = tiny_hf_model.lm_head(h)
    expected_fid = token_nll(steered[:n_fid], batch.input_ids[:n_fid], batch.loss_mask[:n_fid])
    torch.testing.assert_close(fidelity.detach(), expected_fid, rtol=1e-5, atol=1e-6)
    lp, lq = torch.log_softmax(base[n_fid:], -1), torch.log_softmax(steered[n_fid:], -1)
    kl = (lp.exp() * (lp - lq)).sum(-1)
    m = batch.attention_mask[n_fid:].float()
    torch.testing.assert_close(stability.detach(), (kl * m).sum(-1) / m.sum(-1), rtol=1e-4, atol=1e-6)
    assert float(stability.detach().min()) > 1e-4


def _head_case(tiny_hf_model, tiny_model, tiny_tokenizer, K: int, seed: int):
    """Head-placement operators and the queries' ``z`` / ``h`` read from the HF model itself, and a
    ``measure(max_elements, first_order)`` of `head_measurements` on them."""
    backend = resolve_backend(tiny_model)
    ops = _operators(backend.d_model, K=K, seed=seed)
    queries = encode_queries(tiny_tokenizer, PROMPTS, COMPLETIONS, 64)
    z, h = _hf_parts(tiny_hf_model, queries.input_ids, queries.attention_mask, 0)

    def measure(max_elements: int, first_order: bool = False):
        return head_measurements(ops, head_function(backend), z, h, queries.input_ids, queries.loss_mask,
                                 max_elements=max_elements, first_order=first_order)

    return ops, queries, z, h, measure


def test_head_measurements_against_a_loop(tiny_hf_model, tiny_model, tiny_tokenizer):
    ops, queries, z, h, measure = _head_case(tiny_hf_model, tiny_model, tiny_tokenizer, K=6, seed=1)
    for max_elements in (1 << 20, 1):
        y, base = measure(max_elements)
        with torch.no_grad():
            expected_base = -token_nll(tiny_hf_model.lm_head(h), queries.input_ids, queries.loss_mask)
            expected = torch.stack([-token_nll(tiny_hf_model.lm_head(h + ops.delta(z, k)), queries.input_ids,
                                               queries.loss_mask) for k in range(6)], 1) - expected_base[:, None]
        torch.testing.assert_close(base, expected_base, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(y, expected, rtol=1e-4, atol=1e-5)
    assert float(y.abs().min()) > 1e-5


def test_first_order_head_measurements_are_the_derivative_along_each_edit(tiny_hf_model, tiny_model,
                                                                           tiny_tokenizer):
    ops, queries, z, h, measure = _head_case(tiny_hf_model, tiny_model, tiny_tokenizer, K=4, seed=2)
    for max_elements in (1 << 20, 1):
        y, base = measure(max_elements, first_order=True)
        expected_base = -token_nll(tiny_hf_model.lm_head(h), queries.input_ids, queries.loss_mask)
        torch.testing.assert_close(base, expected_base.detach(), rtol=1e-5, atol=1e-5)
        for k in range(4):  # autograd through the HF head: d/d alpha of the metric at h + alpha * edit_k
            alpha = torch.zeros((), requires_grad=True)
            metric = -token_nll(tiny_hf_model.lm_head(h + alpha * ops.delta(z, k).detach()), queries.input_ids,
                                queries.loss_mask)
            expected = torch.stack([torch.autograd.grad(metric[i], alpha, retain_graph=True)[0]
                                    for i in range(len(PROMPTS))])
            torch.testing.assert_close(y[:, k], expected, rtol=1e-4, atol=1e-5)
    assert float(y.abs().min()) > 1e-6


@pytest.fixture(scope="module")
def head_fits(tiny_model, small_texts):
    live = Stride(tiny_model, activation_cache=False, **SETTINGS).fit(small_texts[:24], progress=False)
    cached = Stride(tiny_model, activation_cache=True, **SETTINGS).fit(small_texts[:24], progress=False)
    return live, cached


def test_stride_fit_cached_equals_live_and_attributes(head_fits):
    live, cached = head_fits
    assert live.cache_used is False and cached.cache_used is True
    assert live.operators.coefficients.shape == (12, 4, live.backend.d_model)
    for a, b in zip(cached.operators.state_dict().values(), live.operators.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=2e-4)  # float rounding, compounded over 30 steps
    first, last = np.mean(live.history.fidelity[:5]), np.mean(live.history.fidelity[-5:])
    assert last < first  # the fit learns
    attr = live.attribute(PROMPTS, COMPLETIONS, progress=False)
    assert attr.scores.shape == (4, 24) and attr.provenance["placement"] == "head"
    assert bool(attr.measurements.abs().sum() > 0)


def test_custom_metric_path_equals_default(head_fits):
    live, _ = head_fits
    # a custom metric is measured exactly: the same numbers as the default metric's exact path
    y, base = live.measure(PROMPTS, COMPLETIONS, progress=False, measurement="exact")
    y2, base2 = live.measure(PROMPTS, COMPLETIONS, progress=False,
                             metric=lambda logits, batch: -token_nll(logits, batch.input_ids, batch.loss_mask))
    torch.testing.assert_close(y2, y, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(base2, base, rtol=1e-5, atol=1e-6)


def test_save_load_roundtrip(head_fits, tiny_model, tmp_path):
    live, _ = head_fits
    live.save(tmp_path / "s")
    loaded = Stride.load(tmp_path / "s", tiny_model)
    assert loaded.args.placement == "head"
    torch.testing.assert_close(loaded.attribute(PROMPTS, COMPLETIONS, progress=False).scores,
                               live.attribute(PROMPTS, COMPLETIONS, progress=False).scores)


def test_steer_in_a_user_trace_reproduces_the_measurement(head_fits, tiny_model, tiny_tokenizer):
    live, _ = head_fits
    y, base = live.measure(PROMPTS[:1], COMPLETIONS[:1], progress=False, measurement="exact")
    batch = encode_queries(tiny_tokenizer, PROMPTS[:1], COMPLETIONS[:1], 64)
    box = []
    with tiny_model.trace(input_ids=batch.input_ids, attention_mask=batch.attention_mask):
        live.steer(3)
        box.append(tiny_model.output.logits)
    metric = -token_nll(box[0], batch.input_ids, batch.loss_mask)
    assert float(metric - base[0]) == pytest.approx(float(y[0, 3]), rel=1e-4, abs=1e-5)


def test_transformer_lens_agrees_with_nnsight(head_fits, tiny_hf_model, tiny_tokenizer, small_texts, tmp_path):
    pytest.importorskip("transformer_lens")
    from stride_nnsight.backends.transformer_lens import bridge_from_hf

    live, _ = head_fits
    bridge = bridge_from_hf(tiny_hf_model, tiny_tokenizer, copy_model=True, device="cpu",
                            tokenizer_dir=str(tmp_path / "tok"))
    live.save(tmp_path / "s")
    tl = Stride.load(tmp_path / "s", bridge)
    y_nn, _ = live.measure(PROMPTS, COMPLETIONS, progress=False)
    y_tl, _ = tl.measure(PROMPTS, COMPLETIONS, progress=False)
    torch.testing.assert_close(y_tl, y_nn, rtol=1e-4, atol=1e-5)
    batch = encode_queries(tiny_tokenizer, PROMPTS[:1], COMPLETIONS[:1], 64)
    logits = bridge.run_with_hooks(batch.input_ids, fwd_hooks=tl.steer(3), attention_mask=batch.attention_mask,
                                   return_type="logits")
    y_exact, base = tl.measure(PROMPTS[:1], COMPLETIONS[:1], progress=False, measurement="exact")
    metric = -token_nll(logits, batch.input_ids, batch.loss_mask)
    assert float(metric - base[0]) == pytest.approx(float(y_exact[0, 3]), rel=1e-4, abs=1e-5)


def test_remote_is_refused_with_advice(tiny_model):
    with pytest.raises(ValueError, match="placement='head' runs on local models only"):
        Stride(tiny_model, remote="local", **SETTINGS)
