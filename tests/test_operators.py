import ast
from pathlib import Path

import pytest
import torch

import stride_nnsight.operators as ops_module
from stride_nnsight.operators import (
    SteeringOperators,
    completion_measurements,
    jl_projection,
    kl_to_base,
    linearity_penalty,
    token_nll,
)


def make_ops(placement="residual", K=6, d=8, r=3, out=None):
    torch.manual_seed(0)
    return SteeringOperators(K, d, r, out or d, placement=placement, layer=1, hidden=5)


def test_identity_at_zero():
    ops = make_ops()
    z = torch.randn(4, 7, 8)
    torch.testing.assert_close(ops(z, 2), z)
    torch.testing.assert_close(ops(z, torch.tensor([0, 1, 2, 3])), z)


def test_per_row_operators_and_no_steer_rows():
    ops = make_ops()
    with torch.no_grad():
        ops.coefficients.normal_()
    z = torch.randn(3, 5, 8)
    out = ops(z, torch.tensor([1, -1, 4]))
    torch.testing.assert_close(out[0], ops(z[:1], 1)[0])
    torch.testing.assert_close(out[1], z[1])  # -1: unsteered
    torch.testing.assert_close(out[2], ops(z[2:], 4)[0])
    assert not torch.allclose(out[0], z[0])


def test_mixing_weights_are_linear_in_coefficients():
    ops = make_ops()
    with torch.no_grad():
        ops.coefficients.normal_()
    z = torch.randn(2, 4, 8)
    w = torch.zeros(6)
    w[1], w[3] = 0.5, 2.0
    mixed = ops.delta(z, w)
    expected = 0.5 * ops.delta(z, 1) + 2.0 * ops.delta(z, 3)
    torch.testing.assert_close(mixed, expected, rtol=1e-5, atol=1e-6)


def test_logits_placement_all_deltas_match_single():
    ops = make_ops("logits", out=11)
    with torch.no_grad():
        ops.coefficients.normal_()
    z = torch.randn(5, 8)
    all_d = ops.all_logit_deltas(z)
    assert all_d.shape == (6, 5, 11)
    torch.testing.assert_close(all_d[4], ops.delta(z[None], 4)[0], rtol=1e-5, atol=1e-6)
    logits = torch.randn(1, 5, 11)
    torch.testing.assert_close(ops(z[None], 4, target=logits), logits + all_d[4][None], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("max_elements", [1 << 25, 1])  # all operators in one chunk / one per chunk
@pytest.mark.parametrize("scale", [1.0, 300.0])  # 300: edits that overflow the shared shift
def test_completion_measurements_match_one_operator_at_a_time(max_elements, scale):
    torch.manual_seed(1)
    K, d, V, b, t = 5, 8, 11, 3, 6
    ops = SteeringOperators(K, d, 3, V, placement="logits", layer=1, hidden=5)
    with torch.no_grad():
        ops.coefficients.normal_(0.0, scale)
    z, logits = torch.randn(b, t, d), torch.randn(b, t, V)
    ids = torch.randint(0, V, (b, t))
    loss_mask = torch.zeros(b, t, dtype=torch.long)
    loss_mask[0, 3:] = 1
    loss_mask[1, 1:3] = 1   # scored tokens in the middle, padding after
    loss_mask[2, 5] = 1     # one scored token
    y, base = completion_measurements(ops, z, logits, ids, loss_mask, max_elements=max_elements)
    torch.testing.assert_close(base, -token_nll(logits, ids, loss_mask))
    for k in range(K):
        expected = -token_nll(ops(z, k, target=logits), ids, loss_mask) - base
        torch.testing.assert_close(y[:, k], expected, rtol=1e-5, atol=1e-5 * scale)
    assert y.abs().min() > 0  # the operators do move the loss


def test_bad_operator_arguments():
    ops = make_ops()
    z = torch.randn(2, 3, 8)
    with pytest.raises(IndexError):
        ops(z, 6)
    with pytest.raises(IndexError):
        ops(z, torch.tensor([0, 9]))
    with pytest.raises(ValueError, match="shape"):
        ops(z, torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="mixing weights"):
        ops(z, torch.ones(2, 5))
    with pytest.raises(ValueError, match="placement"):
        SteeringOperators(2, 4, 2, 4, placement="attention")


def test_token_nll_matches_cross_entropy():
    logits = torch.randn(2, 5, 7)
    ids = torch.randint(0, 7, (2, 5))
    mask = torch.tensor([[0, 1, 1, 1, 0], [0, 0, 1, 1, 1]])
    got = token_nll(logits, ids, mask)
    for b in range(2):
        pos = [t for t in range(1, 5) if mask[b, t]]
        ce = torch.nn.functional.cross_entropy(logits[b, [t - 1 for t in pos]], ids[b, pos])
        torch.testing.assert_close(got[b], ce)


def test_kl_is_zero_for_equal_and_positive_otherwise():
    a = torch.randn(2, 4, 9)
    mask = torch.ones(2, 4)
    assert kl_to_base(a, a, mask).abs().max() < 1e-6
    assert (kl_to_base(a, a + torch.randn(2, 4, 9), mask) > 0).all()


def test_linearity_penalty_zero_in_span_positive_outside():
    torch.manual_seed(0)
    sketch = torch.randn(20, 4)
    y_in = sketch @ torch.randn(4)
    assert linearity_penalty(y_in, sketch, ridge=1e-6) < 1e-6
    y_out = torch.randn(20)
    assert linearity_penalty(y_out, sketch, ridge=1e-6) > 0.1
    r = jl_projection(50, 8, seed=0)
    assert r.shape == (50, 8)
    torch.testing.assert_close(r, jl_projection(50, 8, seed=0))


ALLOWED_REMOTE_IMPORTS = {"torch", "numpy", "einops", "math", "collections", "typing", "time"}


def test_operator_module_is_remote_safe():
    """operators.py runs inside NDIF sessions: whitelisted imports only, explicit super()."""
    tree = ast.parse(Path(ops_module.__file__).read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots = {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            roots = {(node.module or "").split(".")[0]}
            assert node.level == 0, "relative imports cannot be shipped to NDIF"
        else:
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "super":
                assert len(node.args) == 2, "use explicit super(Cls, self)"
            continue
        assert roots <= ALLOWED_REMOTE_IMPORTS, f"non-whitelisted import {roots}"


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_operators_keep_float32_master_weights(dtype):
    """operator_dtype: the edit is computed in half precision under autocast, the parameters
    (what AdamW updates) stay float32 and receive float32 gradients; the edit equals the
    float32 edit up to the half format's rounding."""
    torch.manual_seed(0)
    ops = SteeringOperators(4, 16, 3, 16, placement="residual", compute_dtype=dtype)
    ref = SteeringOperators(4, 16, 3, 16, placement="residual")
    ref.load_state_dict(ops.state_dict())
    coefficients = torch.randn(4, 3, 16)
    with torch.no_grad():
        for o in (ops, ref):
            o.coefficients.copy_(coefficients)
    z = torch.randn(2, 5, 16)
    ids = torch.tensor([1, 3])
    with torch.no_grad():
        half = ops.delta(z, ids)
        full = ref.delta(z, ids)
    assert half.dtype == getattr(torch, dtype) and full.dtype == torch.float32
    assert float((half.float() - full).abs().max()) <= 0.05 * float(full.abs().max())
    assert float((half.float() - full).abs().max()) > 0  # the half-precision path really ran
    out = ops(z, ids)
    assert out.dtype == torch.float32  # the edit is added in the activation's dtype
    out.square().sum().backward()
    assert all(p.dtype == torch.float32 and p.grad is not None and p.grad.dtype == torch.float32
               for p in ops.parameters())
    assert ops.settings()["compute_dtype"] == dtype
    with pytest.raises(ValueError, match="compute_dtype"):
        SteeringOperators(4, 16, 3, 16, compute_dtype="int8")


# ----------------------------------------------------- vocabulary candidates and shared columns
def test_vocabulary_candidates_support_and_weights():
    from stride_nnsight.operators import vocabulary_candidates

    torch.manual_seed(0)
    logits = torch.randn(6, 40) * 3
    nxt = torch.tensor([5, 6, 7, 8, 9, -1])
    ids, logw = vocabulary_candidates(logits, nxt, 9, torch.Generator().manual_seed(0))
    assert ids.shape == logw.shape == (6, 9)
    logp = torch.log_softmax(logits, -1)
    assert torch.equal(ids[:5, 0], nxt[:5]) and ids[5, 0] == logp[5].argmax()    # slot 0: the target
    for t in range(6):  # then the 4 most probable others, exactly, then 4 draws from the rest
        others = logp[t].clone()
        others[ids[t, 0]] = float("-inf")
        assert set(ids[t, 1:5].tolist()) == set(others.topk(4).indices.tolist())
        torch.testing.assert_close(logw[t, :5], logp[t, ids[t, :5]])
        assert not set(ids[t, 5:].tolist()) & set(ids[t, :5].tolist())
    torch.testing.assert_close(logw.logsumexp(-1), torch.zeros(6), atol=1e-5, rtol=0)
    again, _ = vocabulary_candidates(logits, nxt, 9, torch.Generator().manual_seed(0))
    assert torch.equal(ids, again)  # seeded draws
    exact, exact_w = vocabulary_candidates(logits, nxt, 100)  # c >= V: the whole distribution, nothing drawn
    assert exact.shape == (6, 40) and all(len(set(row.tolist())) == 40 for row in exact)
    torch.testing.assert_close(exact_w, logp.gather(1, exact))


@pytest.mark.parametrize("columns,rest", [(None, None), (7, "unedited"), (7, "shared")])
def test_candidate_deltas_equal_the_full_edit_at_those_ids(columns, rest):
    from stride_nnsight.operators import frequency_columns

    torch.manual_seed(2)
    ops = SteeringOperators(5, 8, 3, 20, placement="logits", layer=1, hidden=5, columns=columns)
    with torch.no_grad():
        ops.coefficients.normal_()
    if columns:  # tokens 0..6 most frequent; the rest unedited (zero edit) or sharing columns
        ops.column_of.copy_(frequency_columns(torch.arange(20).flip(0), columns, seed=1, rest=rest))
    z = torch.randn(3, 4, 8)
    op = torch.tensor([1, -1, 4])
    ids = torch.randint(0, 20, (3, 4, 6))
    full = ops.delta(z, op)                                   # [3, 4, 20]
    torch.testing.assert_close(ops.candidate_deltas(z, op, ids), full.gather(-1, ids), rtol=1e-5, atol=1e-6)
    # the gradient reaches the coefficients (added in place into .grad) as the full edit's would
    ops.candidate_deltas(z, op, ids).square().sum().backward()
    sparse_grad = ops.coefficients.grad.clone()
    ops.coefficients.grad = None
    ops.delta(z, op).gather(-1, ids).square().sum().backward()
    torch.testing.assert_close(sparse_grad, ops.coefficients.grad, rtol=1e-4, atol=1e-5)


def test_columns_by_frequency_rest_unedited_or_shared():
    import torch.nn.functional as F
    from stride_nnsight.operators import frequency_columns

    counts = torch.tensor([5, 0, 9, 1, 7, 0, 0, 3, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
                           0, 0, 0, 0, 0, 0, 0, 0, 0, 0])                          # V = 40
    column = frequency_columns(counts, 32)                    # the 32 most frequent own columns, 8 unedited
    assert torch.equal(column[[2, 4, 0, 7, 10, 3]], torch.arange(6))               # most frequent first
    assert sorted(set(column.tolist())) == list(range(33)) and int((column == 32).sum()) == 8
    assert torch.equal(column[32:], torch.full((8,), 32))      # ties by id: the highest ids are cut
    shared = frequency_columns(counts, 32, seed=0, rest="shared")                   # 30 own, 2 shared
    assert torch.equal(shared[[2, 4, 0, 7, 10, 3]], torch.arange(6))
    assert len(set(shared.tolist())) == 32 and shared.max() == 31 and (shared >= 30).sum() == 10
    assert torch.equal(frequency_columns(counts, 40), torch.arange(40))
    with pytest.raises(ValueError, match="unedited"):
        frequency_columns(counts, 32, rest="dropped")
    ops = SteeringOperators(4, 8, 3, 40, placement="logits", layer=1, hidden=5, columns=32)
    assert ops.coefficients.shape == (4, 3, 32) and "column_of" in ops.state_dict()
    ops.assign_columns(counts)
    assert torch.equal(ops.column_of, column) and torch.equal(ops.edited_tokens(), column < 32)
    with torch.no_grad():
        ops.coefficients.normal_()
    z = torch.randn(2, 5, 8)
    full = ops.delta(z, 2)                                                          # [2, 5, 40]
    torch.testing.assert_close(full, torch.einsum("btr,rv->btv", ops.basis(z),
                                                  F.pad(ops.coefficients[2], (0, 1))[:, column]))
    assert torch.equal(full[..., column == 32], torch.zeros(2, 5, 8))              # unedited: no edit at all
    assert bool((full[..., column < 32] != 0).all())
    torch.testing.assert_close(ops.all_logit_deltas(z[0])[2], full[0], rtol=1e-5, atol=1e-6)
    ops.column_of.copy_(shared)                               # a state saved with shared columns acts as saved
    full = ops.delta(z, 2)
    tied = (shared == shared[39]).nonzero().flatten()         # the rarest tokens share the last columns
    assert len(tied) > 1 and torch.allclose(full[..., tied[0]], full[..., tied[1]])
    assert bool(ops.edited_tokens().all())
    for other in ("residual", "head"):  # other placements ignore it
        assert SteeringOperators(4, 8, 3, 8, placement=other, columns=4).coefficients.shape == (4, 3, 8)


def _logits_case(seed: int, K: int, b: int, t: int, columns=None, d: int = 8, V: int = 30):
    """Random logits-placement operators (``columns``: that many shared coefficient columns) and a
    random batch ``(ops, z [b, t, d], logits [b, t, V], ids [b, t], loss_mask [b, t] all 0)``."""
    torch.manual_seed(seed)
    ops = SteeringOperators(K, d, 3, V, placement="logits", layer=1, hidden=5, columns=columns)
    if columns is not None:
        ops.assign_columns(torch.randint(0, 9, (V,)))
    with torch.no_grad():
        ops.coefficients.normal_()
    z, logits = torch.randn(b, t, d), torch.randn(b, t, V)
    return ops, z, logits, torch.randint(0, V, (b, t)), torch.zeros(b, t, dtype=torch.long)


@pytest.mark.parametrize("max_elements", [1 << 25, 1])
def test_completion_measurements_with_shared_columns(max_elements):
    K = 4
    ops, z, logits, ids, loss_mask = _logits_case(seed=3, K=K, b=2, t=5, columns=16)
    loss_mask[:, 2:] = 1
    y, base = completion_measurements(ops, z, logits, ids, loss_mask, max_elements=max_elements)
    for k in range(K):
        expected = -token_nll(ops(z, k, target=logits), ids, loss_mask) - base
        torch.testing.assert_close(y[:, k], expected, rtol=1e-5, atol=1e-5)


def _scaled_metric(ops, z, logits, ids, loss_mask, k, alpha):
    """Minus the completion NLL with operator ``k``'s edit scaled by ``alpha`` (a 0-d tensor)."""
    edit = ops(z, k, target=torch.zeros_like(logits))  # the edit alone: B(z) a_k
    return -token_nll(logits + alpha * edit, ids, loss_mask)


@pytest.mark.parametrize("max_elements", [1 << 25, 1])  # all operators in one chunk / one per chunk
@pytest.mark.parametrize("columns", [None, 16])       # one column per entry / shared columns
def test_first_order_measurements_are_the_derivative_along_each_edit(max_elements, columns):
    K, b = 5, 3
    ops, z, logits, ids, loss_mask = _logits_case(seed=4, K=K, b=b, t=6, columns=columns)
    loss_mask[0, 3:] = 1
    loss_mask[1, 1:3] = 1
    loss_mask[2, 5] = 1
    y, base = completion_measurements(ops, z, logits, ids, loss_mask, max_elements=max_elements, first_order=True)
    torch.testing.assert_close(base, -token_nll(logits, ids, loss_mask))
    for k in range(K):  # autograd: d/d alpha of the metric with alpha * edit_k, at alpha = 0
        alpha = torch.zeros((), requires_grad=True)
        expected = torch.stack([torch.autograd.grad(_scaled_metric(ops, z, logits, ids, loss_mask, k, alpha)[i],
                                                    alpha, retain_graph=True)[0] for i in range(b)])
        torch.testing.assert_close(y[:, k], expected.detach(), rtol=1e-4, atol=1e-5)
    # small edits: the exact measurement divided by the edit's scale tends to the first-order one
    exact, _ = completion_measurements(ops, z, logits, ids, loss_mask, max_elements=max_elements)
    with torch.no_grad():
        ops.coefficients.mul_(1e-3)
    small, _ = completion_measurements(ops, z, logits, ids, loss_mask, max_elements=max_elements)
    assert float((small / 1e-3 - y).abs().max()) < 1e-2 * float(y.abs().max())
    assert float((exact - y).abs().max()) > 1e-2  # at full scale the two differ: the curvature term
