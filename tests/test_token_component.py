"""``stride_nnsight.token_component``: the recovery's token component (diffuse influence carried by the
completion's tokens), unit-level on synthetic designs, and through ``Stride.attribute``."""

import warnings

import numpy as np
import pytest
import scipy.sparse as sp

from stride_nnsight.design import SubsetDesign
from stride_nnsight.recovery import recover
from stride_nnsight.token_component import (
    add_token_component,
    completion_tokens,
    token_component,
    token_presence,
    weigh_presence,
)


def test_token_presence_marks_scored_tokens_once():
    ids = np.array([[9, 3, 3, 4, 0], [9, 5, 0, 0, 0], [9, 0, 0, 0, 0]])
    mask = np.array([[0, 1, 1, 1, 0], [0, 1, 0, 0, 0], [0, 0, 0, 0, 0]])  # BOS (9) and padding are not scored
    P = token_presence(ids, mask, vocab_size=10, weights="presence")
    assert P.shape == (3, 10)
    assert P.toarray()[0].tolist() == [0, 0, 0, 1, 1, 0, 0, 0, 0, 0]  # 3 twice counts once; BOS absent
    assert P.toarray()[1].tolist() == [0, 0, 0, 0, 0, 1, 0, 0, 0, 0]
    assert P[2].nnz == 0
    # the default: a held token's entry is 1 / (the document's scored tokens), 3 of them in the first
    shares = token_presence(ids, mask, vocab_size=10)
    np.testing.assert_allclose(shares.toarray()[0], [0, 0, 0, 1 / 3, 1 / 3, 0, 0, 0, 0, 0])
    np.testing.assert_allclose(shares.toarray()[1], P.toarray()[1])  # one scored token: its share is 1
    assert shares[2].nnz == 0  # nothing scored: an empty row, no division by zero
    with pytest.raises(ValueError, match="weights must be one of"):
        token_presence(ids, mask, vocab_size=10, weights="counts")
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, 4\)"):
        token_presence(ids, mask, vocab_size=4)
    with pytest.raises(ValueError, match="both be \\[n, T\\]"):
        token_presence(ids, mask[:, :3], vocab_size=10)


def test_completion_tokens_are_distinct_scored_ids():
    ids = np.array([[1, 7, 8, 8, 2], [1, 6, 6, 0, 0]])
    mask = np.array([[0, 0, 1, 1, 1], [0, 1, 1, 0, 0]])
    got = completion_tokens(ids, mask)
    assert [g.tolist() for g in got] == [[2, 8], [6]]


def _synthetic(n=400, V=60, K=192, d=4, seed=0):
    rng = np.random.default_rng(seed)
    P = sp.csr_matrix((rng.random((n, V)) < 0.15).astype(float))
    M = SubsetDesign(n, K, d, seed=seed).membership
    return rng, P, M


def test_token_component_recovers_planted_token_coefficients():
    """Influence spread over every document holding two of a query's tokens (hundreds of
    documents, far more than K allows a sparse solve to hold) is recovered through the token
    coefficients; a token of the completion that carries nothing stays at 0."""
    rng, P, M = _synthetic()
    T = np.array([3, 11, 40])
    truth = np.asarray(P[:, [3, 11]] @ np.array([0.5, 0.2])).ravel()  # token 40: no influence
    y = np.asarray(M @ truth).ravel() + 0.05 * rng.standard_normal(M.shape[0]) + 1.0
    scores, coefs = token_component(y[None], M, P, [T])
    assert set(coefs[0]) <= {3, 11, 40}
    assert coefs[0][3] == pytest.approx(0.5, abs=0.05) and coefs[0][11] == pytest.approx(0.2, abs=0.05)
    assert coefs[0].get(40, 0.0) < 0.05
    dense = scores.toarray()[0]
    assert np.corrcoef(dense, truth)[0, 1] > 0.98
    # the Lasso alone on the same measurements cannot represent it as well
    lasso, _ = recover(y[None], M, "fraction", 0.3, True, progress=False)
    assert np.corrcoef(lasso[0], truth)[0, 1] < np.corrcoef(dense, truth)[0, 1] - 0.1


def test_token_component_is_empty_when_tokens_only_hurt_or_are_absent():
    rng, P, M = _synthetic(seed=1)
    harmful = -np.asarray(P[:, 5].todense()).ravel()  # documents holding token 5 raise the loss
    y = np.asarray(M @ harmful).ravel() + 0.01 * rng.standard_normal(M.shape[0])
    scores, coefs = token_component(np.stack([y, y]), M, P, [np.array([5]), np.array([999])])
    assert coefs == [{}, {}] and scores.nnz == 0 and scores.shape == (2, P.shape[0])


def test_add_token_component_fits_what_the_lasso_left():
    """A few strong documents (the Lasso's) plus a diffuse token effect: the sum recovers both,
    and the token coefficients are fitted to the Lasso's residual, not to the raw measurements."""
    rng, P, M = _synthetic(seed=2)
    n = P.shape[0]
    sparse_part = np.zeros(n)
    sparse_part[[7, 70]] = 3.0
    diffuse = np.asarray(P[:, 9].todense()).ravel() * 0.15
    y = np.asarray(M @ (sparse_part + diffuse)).ravel() + 0.05 * rng.standard_normal(M.shape[0])
    lasso, _ = recover(y[None], M, "fraction", 0.3, True, progress=False, sparse=True)
    both, coefs = add_token_component(y[None], M, lasso, P, [np.array([9])])
    dense = both.toarray()[0]
    assert set(np.argsort(-dense)[:2]) == {7, 70}
    assert np.corrcoef(dense, sparse_part + diffuse)[0, 1] > np.corrcoef(lasso.toarray()[0], sparse_part + diffuse)[0, 1]
    assert coefs[0][9] == pytest.approx(0.15, abs=0.05)
    # residual, not raw y: fitting the raw y would also credit token 9 with documents 7 and 70's effect
    raw, raw_coefs = token_component(y[None], M, P, [np.array([9])])
    assert raw_coefs[0][9] != pytest.approx(coefs[0][9], abs=1e-6)


def test_large_scores_warn_with_the_fix(monkeypatch):
    import stride_nnsight.token_component as tc

    rng, P, M = _synthetic(seed=3)
    y = np.asarray(M @ np.asarray(P[:, 2].todense()).ravel()).ravel()
    lasso = sp.csr_matrix((1, P.shape[0]), dtype=np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        add_token_component(y[None], M, lasso, P, [np.array([2])])  # small: no warning
    monkeypatch.setattr(tc, "WARN_BYTES", 100.0)
    with pytest.warns(UserWarning, match='non-zeros per query.*recovery="lasso"'):
        add_token_component(y[None], M, lasso, P, [np.array([2])])


def test_token_component_checks_shapes():
    _, P, M = _synthetic()
    with pytest.raises(ValueError, match="residual must be \\[q, K\\]"):
        token_component(np.zeros((1, 5)), M, P, [np.array([1])])
    with pytest.raises(ValueError, match="token lists"):
        token_component(np.zeros((2, M.shape[0])), M, P, [np.array([1])])
    with pytest.raises(ValueError, match="presence has"):
        token_component(np.zeros((1, M.shape[0])), M, P[:10], [np.array([1])])


# ---------------------------------------------------------------------------------- Stride.attribute
FAST = dict(n_subsets=16, subsets_per_example=2, rank=4, steps=12, batch_size=8, basis_hidden=8, max_length=32)


@pytest.fixture(scope="module")
def fitted(tiny_model, small_texts):
    from stride_nnsight import Stride

    return Stride(tiny_model, layer=1, seed=0, **FAST).fit(small_texts[:24], progress=False)


def test_attribute_adds_the_token_component_by_default(fitted):
    prompts, completions = ["the cat sat", "a dog"], [" on the mat.", " ran"]
    both = fitted.attribute(prompts, completions, progress=False, null_permutations=0)
    lasso = fitted.attribute(prompts, completions, progress=False, null_permutations=0, recovery="lasso")
    assert both.provenance["recovery"] == "lasso+tokens" and lasso.provenance["recovery"] == "lasso"
    assert lasso.provenance["token_coefficients"] is None
    coefs = both.provenance["token_coefficients"]
    assert len(coefs) == 2 and all(isinstance(c, dict) for c in coefs)
    # the same measurements; the difference is exactly the token component of the Lasso's residual
    np.testing.assert_array_equal(both.measurements.numpy(), lasso.measurements.numpy())
    expected, _ = add_token_component(lasso.measurements.numpy(), fitted.design.membership,
                                      sp.csr_matrix(lasso.scores.numpy()), fitted._token_presence(),
                                      completion_tokens(*[getattr(fitted.encode_queries(prompts, completions), a).numpy()
                                                          for a in ("input_ids", "loss_mask")]))
    np.testing.assert_allclose(both.scores.numpy(), expected.toarray(), rtol=1e-6, atol=1e-7)
    ids = fitted.backend.tokenizer(completions[0], add_special_tokens=False)["input_ids"]
    assert set(coefs[0]) <= {str(t) for t in ids}
    # a custom metric gets the Lasso alone (the token model is about the completion's loss)
    custom = fitted.attribute(prompts, completions, progress=False, null_permutations=0,
                              metric=lambda logits, batch: logits[:, -1, 0])
    assert custom.provenance["recovery"] == "lasso" and custom.provenance["token_coefficients"] is None


def test_presence_comes_from_the_fit_and_matches_a_fresh_encoding(fitted):
    """The fit keeps the presence of its own encoding (attribute does not encode the corpus again);
    without it (a loaded Stride) the texts are encoded again at the fit's length: the same matrix."""
    kept = fitted._presence[1]
    assert fitted._token_presence() is kept
    fitted._presence = None  # as a loaded Stride: nothing cached
    try:
        rebuilt = fitted._token_presence()
        assert rebuilt is not kept and rebuilt.shape == kept.shape and (rebuilt != kept).nnz == 0
    finally:
        fitted._presence = (fitted._presence[0], kept)


def test_a_lasso_fit_builds_the_presence_only_when_asked(tiny_model, small_texts, fitted):
    """recovery="lasso" skips the presence at fit time; asking for the token component later
    (`attribute(recovery="lasso+tokens")`) builds it then, and it equals the fit-time one."""
    from stride_nnsight import Stride

    lasso = Stride(tiny_model, layer=1, seed=0, recovery="lasso", **FAST).fit(small_texts[:24], progress=False)
    assert getattr(lasso, "_presence", None) is None
    out = lasso.attribute(["the cat sat"], [" on the mat."], progress=False, null_permutations=0,
                          recovery="lasso+tokens")
    assert out.provenance["recovery"] == "lasso+tokens" and lasso._presence is not None
    assert (lasso._presence[1] != fitted._presence[1]).nnz == 0


@pytest.mark.parametrize("name, default, bad, before", [("recovery", "lasso+tokens", "ridge", "lasso"),
                                                     ("token_weights", "per_document", "counts", "presence")])
def test_recovery_settings_are_validated_and_old_states_keep_their_form(name, default, bad, before):
    """A bad value is refused naming the setting; a state saved before the setting existed keeps
    the form it was fitted with (the Lasso alone; 1 per held token), not today's default."""
    from stride_nnsight import StrideArguments

    assert getattr(StrideArguments(), name) == default
    with pytest.raises(ValueError, match=f"{name} must be one of"):
        StrideArguments(**{name: bad})
    saved = StrideArguments().to_dict()
    del saved[name]  # a state written before the setting existed
    assert getattr(StrideArguments.from_saved(saved), name) == before


def test_token_weights_default_override_and_old_states(fitted):
    """``token_weights="per_document"`` (default) gives a held token ``1 / L`` of a document with
    ``L`` scored tokens; ``attribute(token_weights="presence")`` reproduces the older form (1 per
    held token) from the same measurements; the provenance says which; the presence is cached per
    weighting."""
    prompts, completions = ["the cat sat", "a dog"], [" on the mat.", " ran"]
    shares = fitted.attribute(prompts, completions, progress=False, null_permutations=0)
    ones = fitted.attribute(prompts, completions, progress=False, null_permutations=0, token_weights="presence")
    assert shares.provenance["token_weights"] == "per_document" and ones.provenance["token_weights"] == "presence"
    np.testing.assert_array_equal(shares.measurements.numpy(), ones.measurements.numpy())
    tokens = completion_tokens(*[getattr(fitted.encode_queries(prompts, completions), a).numpy()
                                 for a in ("input_ids", "loss_mask")])
    lasso = fitted.attribute(prompts, completions, progress=False, null_permutations=0, recovery="lasso")
    assert lasso.provenance["token_weights"] is None
    P_ones = fitted._token_presence(weights="presence")
    expected, _ = add_token_component(ones.measurements.numpy(), fitted.design.membership,
                                      sp.csr_matrix(lasso.scores.numpy()), P_ones, tokens)
    np.testing.assert_allclose(ones.scores.numpy(), expected.toarray(), rtol=1e-6, atol=1e-7)
    P_shares = fitted._token_presence()
    enc = fitted._encode_train()
    scored = enc.loss_mask.numpy().sum(1)
    np.testing.assert_allclose(P_shares.toarray(), P_ones.toarray() / scored[:, None])
    again = fitted.attribute(prompts, completions, progress=False, null_permutations=0)  # cache keyed by weights
    np.testing.assert_array_equal(again.scores.numpy(), shares.scores.numpy())


def test_switching_token_weights_does_not_encode_the_corpus_again(fitted, monkeypatch):
    """The other weighting is derived from the kept matrix and the scored-token counts: the same
    matrices as a fresh encoding gives, and no second tokenisation of the training texts."""
    import stride_nnsight.stride as stride_module

    fresh = {}
    for w in ("presence", "per_document"):  # each from its own encoding of the corpus
        fitted._presence, fitted._scored_counts = None, None
        fresh[w] = fitted._token_presence(weights=w)

    def no_encoding(*args, **kwargs):
        raise AssertionError("the corpus was encoded again")

    monkeypatch.setattr(stride_module, "encode_texts", no_encoding)
    for w in ("presence", "per_document", "presence"):
        got = fitted._token_presence(weights=w)
        assert got.shape == fresh[w].shape and abs(got - fresh[w]).max() < 1e-12
    with pytest.raises(ValueError, match="weights must be one of"):
        weigh_presence(fresh["presence"], np.ones(fresh["presence"].shape[0]), "counts")


def test_token_coefficients_follow_rows_through_selection_and_cat(fitted):
    """Per-query provenance: ``attr[rows]`` keeps the selected rows' token coefficients and ``cat``
    joins them; a part without them (the Lasso alone, or no noise floor) gives ``None`` rows."""
    from stride_nnsight import Attribution

    a = fitted.attribute(["the cat sat", "a dog"], [" on the mat.", " ran"], progress=False, null_permutations=0)
    b = fitted.attribute(["the bird"], [" flew away."], progress=False, null_permutations=0, query_ids=["b"],
                         recovery="lasso")
    coefs = a.provenance["token_coefficients"]
    assert a[[1]].provenance["token_coefficients"] == [coefs[1]]
    joined = Attribution.cat([a, b])
    assert joined.provenance["token_coefficients"] == coefs + [None]
    assert joined.provenance["noise_floor"] == [None, None, None]
    assert joined.provenance["recovery"] == ["lasso+tokens", "lasso+tokens", "lasso"]
