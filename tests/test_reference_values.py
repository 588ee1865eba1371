"""STRIDE's numbers checked against independent computations.

Every reference here is written out in the test with numpy (float64) or plain torch
tensor algebra, never by calling the library function under test or its helpers
(``token_nll``, ``kl_to_base``, ``SteeringOperators.forward`` ...): the losses, the
vectorised measurement, the residual measurement and the Lasso recovery are each
recomputed the slow, obvious way and compared value by value.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from stride_nnsight.backends import resolve_backend
from stride_nnsight.design import SubsetDesign
from stride_nnsight.inputs import encode_queries, encode_texts
from stride_nnsight.measurement import measure
from stride_nnsight.operators import (
    SteeringOperators,
    completion_measurements,
    kl_to_base,
    loss_candidates,
    linearity_penalty,
    step_losses,
    stride_loss,
    token_nll,
)
from stride_nnsight.recovery import recover

PROMPTS = ["the cat sat", "a dog ran over the", "blue", "the small bird sang while the"]
COMPLETIONS = [" on the mat.", " river", " house and tree.", " dog"]


# ------------------------------------------------------------------ plain numpy references


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def ref_nll(logits, ids, loss_mask) -> np.ndarray:
    """Mean NLL of the scored tokens per row: token t (mask 1) predicted from position t-1."""
    logits, ids, loss_mask = np.asarray(logits, np.float64), np.asarray(ids), np.asarray(loss_mask)
    out = np.zeros(len(ids))
    for b in range(len(ids)):
        terms = [-_log_softmax(logits[b, t - 1])[ids[b, t]] for t in range(1, ids.shape[1]) if loss_mask[b, t]]
        out[b] = np.mean(terms) if terms else 0.0
    return out


def ref_kl(base, steered, mask) -> np.ndarray:
    """Mean over masked tokens of sum_v p_base (log p_base - log p_steered), per row."""
    lp, lq = _log_softmax(base), _log_softmax(steered)
    kl = (np.exp(lp) * (lp - lq)).sum(-1)
    mask = np.asarray(mask, np.float64)
    return (kl * mask).sum(-1) / np.maximum(mask.sum(-1), 1.0)


def ref_linearity(y, S, gamma) -> float:
    y, S = np.asarray(y, np.float64), np.asarray(S, np.float64)
    coef = np.linalg.inv(S.T @ S + gamma * np.eye(S.shape[1])) @ (S.T @ y)
    return float(np.sum((S @ coef - y) ** 2) / len(y))


def ref_basis(ops: SteeringOperators, z: torch.Tensor) -> np.ndarray:
    """B(z) written out from the basis network's weights: layer norm, linear, exact GELU, linear."""
    z = np.asarray(z.detach(), np.float64)
    h = (z - z.mean(-1, keepdims=True)) / np.sqrt(z.var(-1, keepdims=True) + 1e-5)
    w1, b1 = ops.basis.inp.weight.detach().double().numpy(), ops.basis.inp.bias.detach().double().numpy()
    w2, b2 = ops.basis.out.weight.detach().double().numpy(), ops.basis.out.bias.detach().double().numpy()
    u = h @ w1.T + b1
    gelu = 0.5 * u * (1.0 + torch.erf(torch.from_numpy(u) / np.sqrt(2.0)).numpy())
    return gelu @ w2.T + b2


def random_operators(K: int, d: int, out: int, placement: str, seed: int = 0) -> SteeringOperators:
    torch.manual_seed(seed)
    ops = SteeringOperators(K, d, 3, out, placement=placement, layer=1, hidden=16)
    with torch.no_grad():
        ops.coefficients.copy_(torch.randn(ops.coefficients.shape) * 0.5)
    return ops.eval()


# ------------------------------------------------------------------ 1. the losses


def test_token_nll_against_hand_computed_values():
    # logits [2, 4, 5]: row 0 scores tokens 1 and 2, row 1 only token 3 (and token 0, which
    # has no prediction and must be ignored)
    logits = torch.tensor([
        [[2.0, 0.0, -1.0, 0.5, 0.0], [0.0, 3.0, 0.0, 0.0, -2.0], [1.0, 1.0, 1.0, 1.0, 1.0], [9.0, 0, 0, 0, 0]],
        [[0.0, 0.0, 0.0, 0.0, 0.0], [-1.0, 2.0, 0.5, 0.0, 1.0], [0.3, -0.7, 1.1, 2.2, -3.0], [0, 0, 0, 0, 9.0]],
    ])
    ids = torch.tensor([[0, 3, 1, 4], [2, 0, 1, 3]])
    mask = torch.tensor([[0, 1, 1, 0], [1, 0, 0, 1]])
    # row 0: token 3 from logits[0, 0], token 1 from logits[0, 1]; row 1: token 3 from logits[1, 2]
    lse = lambda v: float(np.log(np.exp(v.double().numpy()).sum()))  # noqa: E731
    row0 = ((lse(logits[0, 0]) - 0.5) + (lse(logits[0, 1]) - 3.0)) / 2
    row1 = lse(logits[1, 2]) - 2.2
    got = token_nll(logits, ids, mask)
    np.testing.assert_allclose(got.double().numpy(), [row0, row1], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(got.double().numpy(), ref_nll(logits, ids, mask), rtol=1e-6, atol=1e-6)


def test_kl_to_base_against_numpy():
    g = torch.Generator().manual_seed(3)
    base, steered = torch.randn(3, 5, 7, generator=g), torch.randn(3, 5, 7, generator=g) * 2
    mask = torch.tensor([[1, 1, 1, 1, 1], [0, 1, 1, 0, 0], [0, 0, 0, 0, 1]])
    got = kl_to_base(base, steered, mask)
    np.testing.assert_allclose(got.double().numpy(), ref_kl(base, steered, mask), rtol=1e-5, atol=1e-6)
    # direction: KL(base || steered), not the reverse (different values here)
    assert not np.allclose(ref_kl(steered, base, mask), got.double().numpy(), rtol=1e-3)


def test_linearity_penalty_against_numpy_linalg():
    rng = np.random.default_rng(0)
    S, y = rng.standard_normal((7, 3)), rng.standard_normal(7)
    for gamma in (1e-3, 0.5, 10.0):
        got = linearity_penalty(torch.from_numpy(y), torch.from_numpy(S), gamma)
        assert float(got) == pytest.approx(ref_linearity(y, S, gamma), rel=1e-10)
    # float32 inputs, as in a fit
    got32 = linearity_penalty(torch.from_numpy(y).float(), torch.from_numpy(S).float(), 0.1)
    assert float(got32) == pytest.approx(ref_linearity(y, S, 0.1), rel=1e-5)


def test_stride_loss_weighting():
    fid, stab, lin = torch.tensor([1.0, 2.0, 4.0]), torch.tensor([0.5, 1.5]), torch.tensor(3.0)
    assert float(stride_loss(fid, stab, lin, (2.0, 0.5, 0.1))) == pytest.approx(2.0 * 7 / 3 + 0.5 * 1.0 + 0.1 * 3.0)
    assert float(stride_loss(fid, stab.new_zeros(0), lin, (2.0, 0.5, 0.1))) == pytest.approx(2.0 * 7 / 3 + 0.3)


def test_step_losses_logits_placement_by_hand(tiny_model, tiny_tokenizer, small_texts):
    """fidelity = NLL of base logits + B(z) a_k on the fidelity rows, stability = KL(base || steered)
    on the stability rows, linearity = ridge residual of the probe responses, each rebuilt from
    the unsteered forward and the operators' weights."""
    backend = resolve_backend(tiny_model)
    backend.freeze()
    V = backend.vocab_size
    ops = random_operators(6, 32, V, "logits", seed=2)
    n_fid, n_stab, n_probe = 3, 2, 4
    batch = encode_texts(tiny_tokenizer, small_texts[:5], 64)
    rows = [0, 1, 2, 3, 4] + [2] * n_probe  # the probe example (text 2) once per probe operator
    batch = batch.rows(rows)
    op_ids = torch.tensor([0, 1, 2, 3, 4, 0, 1, 5, 3])
    sketch = torch.tensor([[1.0, 0.5], [-0.3, 1.0], [0.8, -1.2], [0.1, 0.4]])
    weights, ridge = (1.0, 0.7, 0.3), 2.0  # a ridge comparable to S^T S: gamma matters

    def forward(ids, attn, edit):
        return backend.forward(ids, attn, ops.layer, edit=edit)

    total, fidelity, stability, linearity = step_losses(
        forward, ops, batch.input_ids, batch.attention_mask, batch.loss_mask, op_ids, sketch,
        n_fid, n_stab, weights, ridge)

    with torch.no_grad():
        logits, z = backend.forward(batch.input_ids, batch.attention_mask, ops.layer)
    a = ops.coefficients.detach().double().numpy()
    base = logits.double().numpy()
    steered = np.stack([base[i] + ref_basis(ops, z[i]) @ a[int(op_ids[i])] for i in range(len(rows))])
    ids, lmask, amask = batch.input_ids.numpy(), batch.loss_mask.numpy(), batch.attention_mask.numpy()
    nll = ref_nll(steered, ids, lmask)
    exp_fid = nll[:n_fid]
    exp_stab = ref_kl(base[n_fid:n_fid + n_stab], steered[n_fid:n_fid + n_stab], amask[n_fid:n_fid + n_stab])
    probe = n_fid + n_stab
    responses = ref_nll(base[probe:probe + 1], ids[probe:probe + 1], lmask[probe:probe + 1])[0] - nll[probe:]
    exp_lin = ref_linearity(responses, sketch.numpy(), ridge)
    exp_total = weights[0] * exp_fid.mean() + weights[1] * exp_stab.mean() + weights[2] * exp_lin

    np.testing.assert_allclose(fidelity.detach().double().numpy(), exp_fid, rtol=1e-5)
    np.testing.assert_allclose(stability.detach().double().numpy(), exp_stab, rtol=1e-4, atol=1e-7)
    assert float(linearity.detach()) == pytest.approx(exp_lin, rel=1e-4, abs=1e-8)
    assert float(total.detach()) == pytest.approx(exp_total, rel=1e-5)
    assert exp_stab.min() > 1e-4 and exp_lin > 1e-4 and np.ptp(responses) > 1e-3  # nothing trivially zero


@pytest.mark.parametrize("placement", ["logits", "residual"])
def test_step_losses_at_sampled_positions_by_hand(tiny_model, tiny_tokenizer, small_texts, placement):
    """With ``positions``/``valid`` (loss_positions), each row's loss is the mean over its chosen
    positions only: fidelity = NLL of the next token there, stability = KL there, probe responses
    on the probe's shared positions. Rebuilt from full-length references restricted by hand."""
    backend = resolve_backend(tiny_model)
    backend.freeze()
    V = backend.vocab_size
    out_dim = V if placement == "logits" else backend.d_model
    ops = random_operators(6, backend.d_model, out_dim, placement, seed=3)
    if placement == "residual":
        with torch.no_grad():
            ops.coefficients.mul_(0.2)
    n_fid, n_stab, n_probe = 3, 2, 4
    batch = encode_texts(tiny_tokenizer, small_texts[:5], 64).rows([0, 1, 2, 3, 4] + [2] * n_probe)
    op_ids = torch.tensor([0, 1, 2, 3, 4, 0, 1, 5, 3])
    sketch = torch.tensor([[1.0, 0.5], [-0.3, 1.0], [0.8, -1.2], [0.1, 0.4]])
    weights, ridge = (1.0, 0.7, 0.3), 2.0
    b, t = batch.input_ids.shape
    cand = loss_candidates(batch.input_ids, batch.attention_mask, batch.loss_mask, n_fid, n_stab)
    gen = torch.Generator().manual_seed(0)
    m = 3
    keys = torch.rand(b, t, generator=gen)
    keys[~cand] = 2.0
    positions = keys.argsort(1)[:, :m]
    positions[n_fid + n_stab:] = positions[n_fid + n_stab]
    valid = cand.gather(1, positions)
    valid[1, 2] = False  # a row that counts fewer positions

    def forward(ids, attn, edit):
        return backend.forward(ids, attn, ops.layer, edit=edit)

    total, fidelity, stability, linearity = step_losses(
        forward, ops, batch.input_ids, batch.attention_mask, batch.loss_mask, op_ids, sketch,
        n_fid, n_stab, weights, ridge, positions, valid)

    with torch.no_grad():
        logits, z = backend.forward(batch.input_ids, batch.attention_mask, ops.layer)
        if placement == "logits":
            a = ops.coefficients.detach().double().numpy()
            steered = np.stack([logits[i].double().numpy() + ref_basis(ops, z[i]) @ a[int(op_ids[i])]
                                for i in range(b)])
        else:
            steered_t, _ = backend.forward(batch.input_ids, batch.attention_mask, ops.layer,
                                           edit=lambda h: ops(h, op_ids))
            steered = steered_t.double().numpy()
    base = logits.double().numpy()
    ids = batch.input_ids.numpy()
    chosen = np.zeros((b, t), dtype=bool)  # logits positions that count
    for i in range(b):
        for j, ok in zip(positions[i].tolist(), valid[i].tolist()):
            chosen[i, j] = chosen[i, j] or ok
    target_mask = np.zeros((b, t), dtype=np.int64)  # token j + 1 is scored when position j counts
    target_mask[:, 1:] = chosen[:, :-1]
    nll = ref_nll(steered, ids, target_mask)
    stab = slice(n_fid, n_fid + n_stab)
    exp_stab = ref_kl(base[stab], steered[stab], chosen[stab])
    probe = n_fid + n_stab
    responses = ref_nll(base[probe:probe + 1], ids[probe:probe + 1], target_mask[probe:probe + 1])[0] - nll[probe:]
    exp_lin = ref_linearity(responses, sketch.numpy(), ridge)

    assert chosen[:n_fid].sum(1).tolist() == [3, 2, 3] and 0 < chosen.sum() < cand.sum()
    np.testing.assert_allclose(fidelity.detach().double().numpy(), nll[:n_fid], rtol=1e-5)
    np.testing.assert_allclose(stability.detach().double().numpy(), exp_stab, rtol=1e-4, atol=1e-7)
    assert float(linearity.detach()) == pytest.approx(exp_lin, rel=1e-4, abs=1e-8)
    exp_total = weights[0] * nll[:n_fid].mean() + weights[1] * exp_stab.mean() + weights[2] * exp_lin
    assert float(total.detach()) == pytest.approx(exp_total, rel=1e-5)
    # every candidate position chosen gives exactly the full-length losses
    every = torch.arange(t).expand(b, -1)
    full = step_losses(forward, ops, batch.input_ids, batch.attention_mask, batch.loss_mask, op_ids, sketch,
                       n_fid, n_stab, weights, ridge)
    same = step_losses(forward, ops, batch.input_ids, batch.attention_mask, batch.loss_mask, op_ids, sketch,
                       n_fid, n_stab, weights, ridge, every, cand)
    for x, y in zip(full, same):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-7)


# ------------------------------------------------------------------ 2. the vectorised measurement


@pytest.mark.parametrize("max_elements", [1 << 20, 1])  # all operators in one chunk / one per chunk
def test_completion_measurements_against_per_operator_loop(tiny_model, tiny_tokenizer, max_elements):
    backend = resolve_backend(tiny_model)
    backend.freeze()
    ops = random_operators(7, 32, backend.vocab_size, "logits", seed=4)
    queries = encode_queries(tiny_tokenizer, PROMPTS, COMPLETIONS, 64)
    assert len(set(queries.attention_mask.sum(1).tolist())) == len(PROMPTS)  # all lengths differ: padding
    with torch.no_grad():
        logits, z = backend.forward(queries.input_ids, queries.attention_mask, 1)
    y, base = completion_measurements(ops, z, logits, queries.input_ids, queries.loss_mask, max_elements=max_elements)

    ids, lmask = queries.input_ids.numpy(), queries.loss_mask.numpy()
    base_np = logits.double().numpy()
    expected_base = -ref_nll(base_np, ids, lmask)
    basis = [ref_basis(ops, z[i]) for i in range(len(PROMPTS))]            # [t, r] per query
    a = ops.coefficients.detach().double().numpy()
    expected = np.zeros((len(PROMPTS), ops.n_operators))
    for k in range(ops.n_operators):
        steered = np.stack([base_np[i] + basis[i] @ a[k] for i in range(len(PROMPTS))])
        expected[:, k] = -ref_nll(steered, ids, lmask) - expected_base
    np.testing.assert_allclose(base.double().numpy(), expected_base, rtol=1e-5)
    np.testing.assert_allclose(y.double().numpy(), expected, rtol=1e-4, atol=1e-5)
    assert np.abs(expected).min() > 1e-3  # every operator moves every query


# ------------------------------------------------------------------ 3. residual measurement


def test_residual_measure_against_plain_hf_hook(tiny_model, tiny_hf_model, tiny_tokenizer):
    """measure() (chunked, padded, several queries per forward) against one unpadded forward per
    (query, operator) of the plain Hugging Face model with a forward hook adding B(z) a_k to
    block 1's output, and the completion NLL in numpy."""
    backend = resolve_backend(tiny_model)
    backend.freeze()
    ops = random_operators(5, 32, 32, "residual", seed=5)
    queries = encode_queries(tiny_tokenizer, PROMPTS, COMPLETIONS, 64)
    y, base = measure(backend, ops, queries, batch_size=7, progress=False)  # chunks straddle queries

    a = ops.coefficients.detach()
    state = {}

    def hook(module, args, output):
        h = output[0] if isinstance(output, tuple) else output
        k = state.get("k")
        if k is not None:
            b = torch.from_numpy(ref_basis(ops, h)).to(h.dtype)
            h = h + b @ a[k]
        return (h,) + tuple(output[1:]) if isinstance(output, tuple) else h

    handle = tiny_hf_model.transformer.h[1].register_forward_hook(hook)
    try:
        for q in range(len(PROMPTS)):
            n = int(queries.attention_mask[q].sum())
            ids, lmask = queries.input_ids[q:q + 1, :n], queries.loss_mask[q:q + 1, :n].numpy()
            with torch.no_grad():
                state["k"] = None
                f_base = -ref_nll(tiny_hf_model(input_ids=ids).logits, ids.numpy(), lmask)[0]
                assert float(base[q]) == pytest.approx(f_base, abs=1e-5)
                for k in range(ops.n_operators):
                    state["k"] = k
                    f_k = -ref_nll(tiny_hf_model(input_ids=ids).logits, ids.numpy(), lmask)[0]
                    assert float(y[q, k]) == pytest.approx(f_k - f_base, abs=1e-4), (q, k)
    finally:
        handle.remove()
    assert float(y.abs().min()) > 1e-3  # the operators do move the loss


# ------------------------------------------------------------------ 4. recovery


def ref_lasso_cd(X: np.ndarray, y: np.ndarray, lam: float, epochs: int = 5000, tol: float = 1e-12) -> np.ndarray:
    """Cyclic coordinate descent for 1/(2K) ||yc - Xc w||^2 + lam ||w||_1 on the centred
    problem (the optimal intercept is then mean(y - X w)); numpy, dense."""
    Xc, yc = X - X.mean(0), y - y.mean()
    K = len(y)
    norms = (Xc ** 2).sum(0) / K
    w, r = np.zeros(X.shape[1]), yc.copy()
    for _ in range(epochs):
        biggest = 0.0
        for j in np.flatnonzero(norms > 0):
            rho = Xc[:, j] @ r / K + norms[j] * w[j]
            new = np.sign(rho) * max(abs(rho) - lam, 0.0) / norms[j]
            if new != w[j]:
                r -= Xc[:, j] * (new - w[j])
                biggest = max(biggest, abs(new - w[j]))
                w[j] = new
        if biggest < tol:
            break
    return w


def ref_objective(X: np.ndarray, y: np.ndarray, w: np.ndarray, lam: float) -> float:
    r = y - X @ w
    r = r - r.mean()
    return float(r @ r / (2 * len(y)) + lam * np.abs(w).sum())


@pytest.mark.parametrize("solver", ["reference", "working_set"])
def test_recover_against_independent_coordinate_descent(solver):
    """recover()'s lambda rule, objective and support against a numpy coordinate descent on the
    dense, centred design (planted 4-sparse influence, a shift shared by all operators)."""
    n, K = 120, 64
    rng = np.random.default_rng(11)
    X = SubsetDesign(n, K, 4, seed=11).membership.toarray().astype(np.float64)
    support = rng.choice(n, 4, replace=False)
    w_true = np.zeros(n)
    w_true[support] = [1.5, -1.0, 0.8, 1.2]
    y = X @ w_true + 0.05 * rng.standard_normal(K) + 0.4
    fraction = 0.1
    lam = fraction * np.abs((X - X.mean(0)).T @ (y - y.mean())).max() / K   # lambda_max by hand

    scores, lambdas = recover(y[None], SubsetDesign(n, K, 4, seed=11).membership, fraction=fraction,
                              progress=False, solver=solver)
    w_lib = np.asarray(scores[0], np.float64).ravel()
    w_ref = ref_lasso_cd(X, y, lam)
    assert lambdas[0] == pytest.approx(lam, rel=1e-10)
    p_ref = ref_objective(X, y, w_ref, lam)
    assert ref_objective(X, y, w_lib, lam) == pytest.approx(p_ref, rel=1e-5)
    assert set(np.flatnonzero(np.abs(w_lib) > 1e-4)) == set(np.flatnonzero(np.abs(w_ref) > 1e-4))
    np.testing.assert_allclose(w_lib, w_ref, atol=1e-3)
    assert set(np.argsort(-np.abs(w_ref))[:4]) == set(support)  # the reference itself finds the plant


def test_step_losses_on_vocabulary_candidates_by_hand():
    """fit_vocabulary: fidelity = -log softmax(log_weights + e)[slot 0] and stability = KL between
    the compressed base distribution and the compressed steered one, e = B(z) a_k at the ids."""
    torch.manual_seed(5)
    b, t, c, d, V, K, r = 3, 5, 6, 8, 30, 4, 2
    ops = SteeringOperators(K, d, r, V, placement="logits", layer=0, hidden=4)
    with torch.no_grad():
        ops.coefficients.normal_()
    z = torch.randn(b, t, d)
    ids = torch.randint(0, V, (b, t, c))
    logw = torch.log_softmax(torch.randn(b, t, c), -1)
    input_ids = torch.randint(0, V, (b, t))
    mask = torch.ones(b, t, dtype=torch.long)
    op_ids = torch.tensor([1, 3, 0])  # 2 fidelity rows, 1 stability row

    def forward(input_ids, attention_mask, edit=None, candidates=False):
        assert candidates and edit is None
        return logw, z, ids

    forward.candidates = True
    _, fidelity, stability, _ = step_losses(forward, ops, input_ids, mask, mask, op_ids, None, 2, 1, (1.0, 1.0, 0.0),
                                            0.01)
    basis = ops.basis(z).detach().double().numpy()                      # [b, t, r]
    a = ops.coefficients.detach().double().numpy()                      # [K, r, V]
    lw = logw.double().numpy()
    for row in range(b):
        e = np.einsum("tr,rtc->tc", basis[row], a[int(op_ids[row])][:, ids[row].numpy()])
        steered = _log_softmax(lw[row] + e)                             # [t, c]
        if row < 2:  # fidelity: positions 0..t-2 predict a loss target (loss_mask[j + 1] == 1)
            expected = -steered[: t - 1, 0].mean()
            assert float(fidelity[row].detach()) == pytest.approx(expected, rel=1e-5)
        else:        # stability: every real token
            base = _log_softmax(lw[row])
            expected = (np.exp(base) * (base - steered)).sum(-1).mean()
            assert float(stability[0].detach()) == pytest.approx(expected, rel=1e-4, abs=1e-7)
