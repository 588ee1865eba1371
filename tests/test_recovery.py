import numpy as np
import pytest

from stride_nnsight.design import SubsetDesign
from stride_nnsight.recovery import lambda_max, recover, recover_one


def planted(n=400, K=128, d=8, k=5, noise=0.01, seed=0):
    rng = np.random.default_rng(seed)
    M = SubsetDesign(n, K, d, seed=seed).membership
    w = np.zeros(n)
    support = rng.choice(n, k, replace=False)
    w[support] = rng.choice([-1, 1], k) * rng.uniform(0.5, 1.5, k)
    y = M @ w + noise * rng.standard_normal(K) + 0.3  # plus a shift shared by all operators
    return M, w, support, y


def test_recovers_planted_sparse_vector():
    M, w, support, y = planted()
    w_hat, lam = recover_one(y, M, rule="fraction", fraction=0.02)
    top = np.argsort(-np.abs(w_hat))[: len(support)]
    assert set(top) == set(support)
    assert np.sign(w_hat[support]).tolist() == np.sign(w[support]).tolist()
    assert np.corrcoef(w_hat, w)[0, 1] > 0.95
    assert lam > 0


def test_cross_validated_rule_also_recovers():
    M, w, support, y = planted(seed=1)
    w_hat, lam = recover_one(y, M, rule="cv")
    assert set(np.argsort(-np.abs(w_hat))[: len(support)]) == set(support)


def test_lambda_max_zeroes_everything():
    M, _, _, y = planted(seed=2)
    lam = lambda_max(y, M)
    from sklearn.linear_model import Lasso

    assert np.all(Lasso(alpha=lam * 1.001).fit(M, y).coef_ == 0)
    assert np.any(Lasso(alpha=lam * 0.5).fit(M, y).coef_ != 0)


def test_random_measurements_give_no_strong_signal():
    M = SubsetDesign(300, 96, 6, seed=0).membership
    y = np.random.default_rng(0).standard_normal(96)
    w_hat, _ = recover_one(y, M, fraction=0.5)
    assert np.count_nonzero(w_hat) < 30


def test_batch_recover_and_errors():
    M, w, support, y = planted()
    scores, lambdas = recover(np.stack([y, -y]), M, fraction=0.02, progress=False)
    assert scores.shape == (2, 400) and scores.dtype == np.float32
    np.testing.assert_allclose(scores[0], -scores[1], atol=1e-4)
    with pytest.raises(ValueError, match="one value per subset"):
        recover_one(y[:-1], M)
    with pytest.raises(ValueError, match="lambda rule"):
        recover_one(y, M, rule="magic")
    zero, lam = recover_one(np.zeros(128), M)
    assert lam == 0 and not zero.any()


@pytest.mark.parametrize("n_queries", [1, 4])
def test_all_queries_at_once_match_one_query_at_a_time(n_queries):
    """recover() solves the fraction rule for all queries in one call (each query rescaled to
    lambda_max = 1); it must give each query's own Lasso solution, constant queries included."""
    M = planted()[0]
    ys = [planted(seed=s)[3] * scale for s, scale in zip(range(n_queries), (1.0, 30.0, 0.01, 2.0))]
    if n_queries > 1:
        ys[-1] = np.full(128, 0.7)  # lambda_max = 0: all-zero scores, lambda 0
    scores, lambdas = recover(np.stack(ys), M, fraction=0.1, progress=False)
    for i, y in enumerate(ys):
        w_one, lam_one = recover_one(y, M, fraction=0.1)
        assert lambdas[i] == pytest.approx(lam_one)
        np.testing.assert_allclose(scores[i], w_one, atol=1e-5 * max(1.0, np.abs(w_one).max()))
    assert np.abs(scores[0]).max() > 0
    with pytest.raises(ValueError, match="one per subset"):
        recover(np.stack(ys)[:, :-1], M, progress=False)
