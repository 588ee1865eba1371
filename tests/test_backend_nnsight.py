import pytest
import torch

from stride_nnsight.backends import resolve_backend
from stride_nnsight.backends.nnsight import NNsightBackend, find_layers_path
from stride_nnsight.inputs import encode_texts
from stride_nnsight.operators import SteeringOperators


@pytest.fixture(scope="module")
def backend(tiny_model):
    b = resolve_backend(tiny_model)
    b.freeze()
    return b


def test_resolves_and_reads_shapes(backend, tiny_hf_model):
    assert isinstance(backend, NNsightBackend)
    assert backend.n_layers == 2 and backend.d_model == 32
    assert backend.vocab_size == tiny_hf_model.config.vocab_size
    assert backend.layers_path == "transformer.h"
    assert find_layers_path(tiny_hf_model) == "transformer.h"


def test_forward_matches_plain_model(backend, tiny_hf_model, tiny_tokenizer, small_texts):
    batch = encode_texts(tiny_tokenizer, small_texts[:3], 64)
    logits, z = backend.forward(batch.input_ids, batch.attention_mask, layer=1)
    ref = tiny_hf_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, output_hidden_states=True)
    torch.testing.assert_close(logits, ref.logits)
    assert z.shape == (3, batch.input_ids.shape[1], 32)


def test_edit_changes_output_only_through_the_layer(backend, tiny_hf_model, tiny_tokenizer, small_texts):
    batch = encode_texts(tiny_tokenizer, small_texts[:2], 64)
    ops = SteeringOperators(4, 32, 3, 32, layer=1)
    with torch.no_grad():
        ops.coefficients.normal_()
    base, z0 = backend.forward(batch.input_ids, batch.attention_mask, 0)
    steered, z_read = backend.forward(batch.input_ids, batch.attention_mask, 1, edit=lambda h: ops(h, 2))
    _, z1 = backend.forward(batch.input_ids, batch.attention_mask, 1)
    torch.testing.assert_close(z_read, z1)  # the read activation is the unsteered one
    # the steered logits by hand: the plain HF model with block 1's output + B(z) a_2 (a forward hook)
    def hook(module, args, output):
        h = output[0] if isinstance(output, tuple) else output
        h = h + ops.delta(h, 2)
        return (h,) + tuple(output[1:]) if isinstance(output, tuple) else h

    handle = tiny_hf_model.transformer.h[1].register_forward_hook(hook)
    try:
        with torch.no_grad():
            expected = tiny_hf_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    finally:
        handle.remove()
    torch.testing.assert_close(steered.detach(), expected)
    assert (steered - base).abs().max() > 1e-2  # the edit does move the logits
    # an edit at layer 1 cannot touch layer 0's output
    with torch.no_grad():
        _, z0_after = backend.forward(batch.input_ids, batch.attention_mask, 0)
    torch.testing.assert_close(z0, z0_after)
    zero = SteeringOperators(4, 32, 3, 32, layer=1)
    same, _ = backend.forward(batch.input_ids, batch.attention_mask, 1, edit=lambda h: zero(h, 1))
    torch.testing.assert_close(same, base)


def test_gradients_reach_operator_not_model(backend, tiny_tokenizer, small_texts, tiny_hf_model):
    batch = encode_texts(tiny_tokenizer, small_texts[:2], 64)
    ops = SteeringOperators(4, 32, 3, 32, layer=0)
    with torch.no_grad():
        ops.coefficients.normal_()
    logits, _ = backend.forward(batch.input_ids, batch.attention_mask, 0, edit=lambda h: ops(h, 1))
    logits.sum().backward()
    assert ops.coefficients.grad[1].abs().sum() > 0
    assert ops.coefficients.grad[0].abs().sum() == 0
    assert all(p.grad is None for p in tiny_hf_model.parameters())


def test_layer_checks(backend):
    assert backend.check_layer(-1) == 1
    with pytest.raises(ValueError, match="2 decoder blocks"):
        backend.check_layer(5)
    with pytest.raises(TypeError):
        backend.check_layer(1.0)


def test_bare_module_is_refused(tiny_hf_model):
    with pytest.raises(TypeError, match="TransformersModel"):
        resolve_backend(tiny_hf_model)
    with pytest.raises(TypeError, match="unsupported"):
        resolve_backend(object())
