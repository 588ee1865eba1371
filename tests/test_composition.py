"""Issue-4 behaviour: both toolkits agree end to end, steer() composes with the user's own
runs, custom metrics and patches are attributed, and multi-site results are keyed by hook."""

import pytest
import torch

from stride_nnsight import AttributionCache, Stride, attribute_layers
from stride_nnsight.backends.transformer_lens import bridge_from_hf
from stride_nnsight.inputs import encode_queries
from stride_nnsight.operators import token_nll

FAST = dict(n_subsets=12, subsets_per_example=2, rank=4, steps=10, batch_size=8, linearity_operators=6,
            sketch_dim=3, basis_hidden=8, max_length=32)
PROMPTS, COMPLETIONS = ["the cat sat on", "a dog ran in the"], [" the mat.", " park"]


@pytest.fixture(scope="module")
def bridge(tiny_hf_model, tiny_tokenizer):
    return bridge_from_hf(tiny_hf_model, tiny_tokenizer, copy_model=True)


@pytest.fixture(scope="module", params=["residual", "logits"])
def pair(request, tiny_model, bridge, small_texts, tmp_path_factory):
    """The same fitted operators, loaded under nnsight and under TransformerLens."""
    fitted = Stride(tiny_model, layer=1, placement=request.param, **FAST).fit(small_texts[:20], progress=False)
    path = fitted.save(tmp_path_factory.mktemp("state"))
    return fitted, Stride.load(path, bridge)  # strict: the fingerprint is toolkit-independent


def logit_diff(logits, batch):
    """Logit of token 5 minus token 6 at the last real position of each row."""
    last = batch.attention_mask.sum(1) - 1
    rows = torch.arange(logits.shape[0])
    return logits[rows, last, 5] - logits[rows, last, 6]


def test_backends_agree_on_measurements_and_scores(pair):
    nn_stride, tl_stride = pair
    assert tl_stride.backend.name == "transformer_lens" and nn_stride.backend.name == "nnsight"
    a = nn_stride.attribute(PROMPTS, COMPLETIONS, progress=False)
    b = tl_stride.attribute(PROMPTS, COMPLETIONS, progress=False)
    torch.testing.assert_close(a.measurements, b.measurements, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(a.scores, b.scores, atol=1e-3, rtol=1e-3)
    assert b.provenance["hook"] == "blocks.1.hook_resid_post"


def test_custom_metric_on_both_backends(pair, tiny_model, tiny_hf_model):
    nn_stride, tl_stride = pair
    a = nn_stride.attribute(PROMPTS, COMPLETIONS, metric=logit_diff, progress=False)
    b = tl_stride.attribute(PROMPTS, COMPLETIONS, metric=logit_diff, progress=False)
    torch.testing.assert_close(a.measurements, b.measurements, atol=1e-4, rtol=1e-4)
    assert a.provenance["metric"] == "logit_diff"
    # the custom metric's values by hand: logit_diff of the steered run minus that of the plain run,
    # each query alone (unpadded) through the plain HF model
    queries = encode_queries(tiny_model.tokenizer, PROMPTS, COMPLETIONS, 32)
    for q in range(len(PROMPTS)):
        ids = queries.input_ids[q: q + 1, : int(queries.attention_mask[q].sum())]
        plain = _hand_logit_diff(tiny_hf_model, nn_stride.operators, ids, None)
        for k in range(nn_stride.operators.n_operators):
            expected = _hand_logit_diff(tiny_hf_model, nn_stride.operators, ids, k) - plain
            assert float(a.measurements[q, k]) == pytest.approx(expected, rel=1e-3, abs=2e-6), (q, k)
    assert float(a.measurements.abs().max()) > 10 * 2e-6  # the operators do move the metric (10x the abs tolerance)


def _hand_logit_diff(hf_model, ops, ids, k):
    """Logit 5 minus logit 6 at the last token of one unpadded row ``ids [1, t]``, operator ``k``
    (``None``: none) applied by a forward hook on block ``ops.layer`` of the plain HF model."""
    seen = {}

    def hook(module, args, output):
        h = output[0] if isinstance(output, tuple) else output
        seen["z"] = h
        if k is None or ops.placement == "logits":
            return None
        h = h + ops.delta(h, k)
        return (h,) + tuple(output[1:]) if isinstance(output, tuple) else h

    handle = hf_model.transformer.h[ops.layer].register_forward_hook(hook)
    try:
        with torch.no_grad():
            logits = hf_model(input_ids=ids).logits
            if k is not None and ops.placement == "logits":
                logits = logits + ops.delta(seen["z"], k)
    finally:
        handle.remove()
    return float(logits[0, -1, 5] - logits[0, -1, 6])


def test_steer_inside_user_trace_matches_measurement(pair, tiny_model, bridge):
    nn_stride, tl_stride = pair
    batch = encode_queries(tiny_model.tokenizer, PROMPTS[:1], COMPLETIONS[:1], 32)
    k = 3
    with tiny_model.trace(input_ids=batch.input_ids, attention_mask=batch.attention_mask):
        nn_stride.steer(k)
        steered_nn = tiny_model.output.logits.save()
    with tiny_model.trace(input_ids=batch.input_ids, attention_mask=batch.attention_mask):
        nn_stride.steer(k, scale=0.0)
        unsteered = tiny_model.output.logits.save()
    y, base = nn_stride.measure(PROMPTS[:1], COMPLETIONS[:1], progress=False, measurement="exact")
    expected = -base[0] - token_nll(steered_nn, batch.input_ids, batch.loss_mask)[0]
    assert y[0, k] == pytest.approx(float(expected.detach()), abs=1e-4)
    assert float(-token_nll(unsteered, batch.input_ids, batch.loss_mask)[0]) == pytest.approx(float(base[0]), abs=1e-5)
    # the same operator as TransformerLens hooks gives the same logits
    steered_tl = bridge.run_with_hooks(batch.input_ids, fwd_hooks=tl_stride.steer(k),
                                       attention_mask=batch.attention_mask, return_type="logits")
    torch.testing.assert_close(steered_tl, steered_nn, atol=1e-4, rtol=1e-4)
    # a weighted mix of operators
    mix = torch.zeros(12)
    mix[k] = 1.0
    with bridge.hooks(fwd_hooks=tl_stride.steer(mix)):
        mixed = bridge(batch.input_ids, attention_mask=batch.attention_mask, return_type="logits")
    torch.testing.assert_close(mixed, steered_tl, atol=1e-5, rtol=1e-5)


def test_attribute_a_patched_run_on_both_backends(pair, tiny_model):
    """Activation patching composes: the user's patch runs in every measured forward."""
    nn_stride, tl_stride = pair

    def nn_patch(model):  # zero-ablate block 0's output at the last position
        out = model.transformer.h[0].output
        out[:, -1] = 0.0

    def tl_patch(activation, hook):
        activation = activation.clone()
        activation[:, -1] = 0.0
        return activation

    prompts, completions = PROMPTS[:1], COMPLETIONS[:1]  # one query: no padding, same last position
    plain = nn_stride.attribute(prompts, completions, metric=logit_diff, progress=False)
    a = nn_stride.attribute(prompts, completions, metric=logit_diff, intervention=nn_patch, progress=False)
    b = tl_stride.attribute(prompts, completions, metric=logit_diff,
                            intervention=[("blocks.0.hook_resid_post", tl_patch)], progress=False)
    assert a.provenance["patched"] and not plain.provenance["patched"]
    assert a.provenance["base_metric"] != pytest.approx(plain.provenance["base_metric"])
    torch.testing.assert_close(a.measurements, b.measurements, atol=1e-4, rtol=1e-4)
    with pytest.raises(TypeError, match="callable"):
        nn_stride.attribute(prompts, completions, intervention=[("x", tl_patch)], progress=False)


def test_attribute_layers_keys_by_hook(tiny_model, small_texts):
    strides = [Stride(tiny_model, layer=l, **FAST).fit(small_texts[:20], progress=False) for l in (0, 1)]
    cache = attribute_layers(strides, PROMPTS, COMPLETIONS, progress=False)
    assert isinstance(cache, AttributionCache)
    assert list(cache) == ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]
    assert cache.stack().shape == (2, 2, 20)
    torch.testing.assert_close(cache.mean().scores, cache.stack().mean(0))
    assert cache["blocks.1.hook_resid_post"].provenance["layer"] == 1
    with pytest.raises(ValueError, match="same site"):
        attribute_layers([strides[0], strides[0]], PROMPTS, COMPLETIONS, progress=False)
