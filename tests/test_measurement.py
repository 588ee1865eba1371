import pytest
import torch

from stride_nnsight.backends import resolve_backend
from stride_nnsight.inputs import encode_queries
from stride_nnsight.measurement import measure
from stride_nnsight.operators import SteeringOperators, token_nll


@pytest.mark.parametrize("placement", ["residual", "logits"])
def test_measurement_matches_one_by_one(tiny_model, tiny_tokenizer, placement):
    backend = resolve_backend(tiny_model)
    backend.freeze()
    out = 32 if placement == "residual" else backend.vocab_size
    torch.manual_seed(0)
    ops = SteeringOperators(5, 32, 3, out, placement=placement, layer=1)
    with torch.no_grad():
        ops.coefficients.normal_(std=0.5)
    queries = encode_queries(tiny_tokenizer, ["the cat sat", "a dog ran over the"], [" on the mat.", " river"], 64)
    y, base = measure(backend, ops, queries, batch_size=3, progress=False)
    assert y.shape == (2, 5) and base.shape == (2,)
    for q in range(2):
        one = queries.rows([q])
        logits, z = backend.forward(one.input_ids, one.attention_mask, 1)
        base_loss = token_nll(logits, one.input_ids, one.loss_mask)[0]
        assert base[q] == pytest.approx(-float(base_loss), abs=1e-5)
        for k in range(5):
            if placement == "residual":
                steered, _ = backend.forward(one.input_ids, one.attention_mask, 1, edit=lambda h: ops(h, k))
            else:
                steered = ops(z, k, target=logits)
            expected = float(base_loss - token_nll(steered, one.input_ids, one.loss_mask)[0])
            assert y[q, k] == pytest.approx(expected, abs=1e-4)


def test_custom_metric_and_bad_metric(tiny_model, tiny_tokenizer):
    backend = resolve_backend(tiny_model)
    ops = SteeringOperators(3, 32, 2, 32, layer=0)
    queries = encode_queries(tiny_tokenizer, ["the cat"], [" sat"], 64)
    y, base = measure(backend, ops, queries, progress=False, metric=lambda logits, b: logits[:, -1, 5])
    torch.testing.assert_close(y, torch.zeros(1, 3))  # zero operators change nothing
    with pytest.raises(ValueError, match="one scalar per row"):
        measure(backend, ops, queries, progress=False, metric=lambda logits, b: logits.sum())


def test_first_order_measure_is_the_derivative_and_needs_logits_or_head(tiny_model, tiny_tokenizer):
    backend = resolve_backend(tiny_model)
    backend.freeze()
    torch.manual_seed(0)
    ops = SteeringOperators(4, 32, 3, backend.vocab_size, placement="logits", layer=1)
    with torch.no_grad():
        ops.coefficients.normal_(std=0.5)
    queries = encode_queries(tiny_tokenizer, ["the cat sat", "a dog ran over the"], [" on the mat.", " river"], 64)
    y, base = measure(backend, ops, queries, batch_size=3, progress=False, first_order=True)
    exact, base_exact = measure(backend, ops, queries, batch_size=3, progress=False)
    torch.testing.assert_close(base, base_exact)
    for q in range(2):
        one = queries.rows([q])
        logits, z = backend.forward(one.input_ids, one.attention_mask, 1)
        for k in range(4):
            alpha = torch.zeros((), requires_grad=True)
            edit = ops(z, k, target=torch.zeros_like(logits)).detach()
            metric = -token_nll(logits.detach() + alpha * edit, one.input_ids, one.loss_mask)[0]
            (expected,) = torch.autograd.grad(metric, alpha)
            assert y[q, k] == pytest.approx(float(expected), abs=1e-4)
    assert not torch.allclose(y, exact, atol=1e-3)  # a different quantity from the exact change
    residual = SteeringOperators(2, 32, 2, 32, placement="residual", layer=1)
    with pytest.raises(ValueError, match="first-order measurements need"):
        measure(backend, residual, queries, progress=False, first_order=True)
    with pytest.raises(ValueError, match="first-order measurements need"):
        measure(backend, ops, queries, progress=False, first_order=True, metric=lambda logits, b: logits[:, -1, 5])
