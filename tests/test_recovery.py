import math
import sys
import tracemalloc
import warnings
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
from sklearn.exceptions import ConvergenceWarning

import stride_nnsight.recovery as recovery
from stride_nnsight.design import SubsetDesign, recommended_n_subsets
from stride_nnsight.recovery import lambda_max, lasso_objective, recover, recover_one, recover_sparse


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


# ------------------------------------------------------------------ scaling: the working-set solver


def planted_queries(n, K=256, d=4, q=4, k=10, noise=0.1, seed=0):
    """Design M [K, n] and q queries y [q, K] = M w_i + noise + shift, each w_i k-sparse."""
    rng = np.random.default_rng(seed)
    M = SubsetDesign(n, K, d, seed=seed).membership
    supports = np.stack([rng.choice(n, k, replace=False) for _ in range(q)])
    values = rng.choice([-1, 1], (q, k)) * rng.uniform(0.5, 1.5, (q, k))
    Mc = M.tocsc()
    y = np.stack([Mc[:, supports[i]] @ values[i] for i in range(q)])
    return M, y + noise * rng.standard_normal((q, K)) + rng.normal(size=(q, 1)), supports


@pytest.mark.parametrize("n", [2_000, 20_000])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_working_set_reaches_the_reference_objective(n, seed):
    """Same Lasso objective (optimal intercept) as the scikit-learn reference within 1e-6
    relative, same lambdas, same supports (unique optimum at the default fraction)."""
    M, y, _ = planted_queries(n, q=3, noise=(0.05, 0.3, 1.0)[seed], seed=seed)
    ref, lam_ref = recover(y, M, progress=False, solver="reference")
    ws, lam_ws = recover(y, M, progress=False, solver="working_set", sparse=True)
    np.testing.assert_allclose(lam_ws, lam_ref, rtol=1e-12)
    for i in range(len(y)):
        p_ref = lasso_objective(y[i], M, ref[i], lam_ref[i])
        p_ws = lasso_objective(y[i], M, ws.getrow(i), lam_ws[i])
        assert abs(p_ws - p_ref) <= 1e-6 * p_ref
        assert set(ws.getrow(i).indices) == set(np.flatnonzero(ref[i]))


def test_working_set_without_intercept_matches_reference():
    M, y, _ = planted_queries(3_000, K=128, q=2, seed=3)
    ref, lam_ref = recover(y, M, fit_intercept=False, progress=False, solver="reference")
    ws, lam_ws = recover(y, M, fit_intercept=False, progress=False, solver="working_set")
    np.testing.assert_allclose(lam_ws, lam_ref, rtol=1e-12)
    for i in range(2):
        p_ref = lasso_objective(y[i], M, ref[i], lam_ref[i], fit_intercept=False)
        assert abs(lasso_objective(y[i], M, ws[i], lam_ws[i], fit_intercept=False) - p_ref) <= 1e-6 * p_ref


def test_lasso_objective_uses_the_optimal_intercept():
    M, y, _ = planted_queries(500, K=64, q=1, seed=4)
    w = np.zeros(500)
    w[[3, 7]] = [1.0, -2.0]
    r = y[0] - M @ w
    expected = np.mean((r - r.mean()) ** 2) / 2 + 0.1 * 3.0
    assert lasso_objective(y[0], M, w, 0.1) == pytest.approx(expected, rel=1e-12)
    assert lasso_objective(y[0], M, sp.csr_matrix(w), 0.1) == pytest.approx(expected, rel=1e-12)
    assert lasso_objective(y[0], M, w, 0.1, fit_intercept=False) == pytest.approx(np.mean(r ** 2) / 2 + 0.3)


def test_solver_is_chosen_by_size(monkeypatch):
    calls = []
    for name in ("_recover_working_set", "_recover_fraction"):
        real = getattr(recovery, name)
        monkeypatch.setattr(recovery, name, lambda *a, _real=real, _name=name: calls.append(_name) or _real(*a))
    M, y, _ = planted_queries(400, K=64, q=2, k=3)
    recover(y, M, progress=False)
    assert calls == ["_recover_fraction"]  # n = 400 < WORKING_SET_MIN_N
    monkeypatch.setattr(recovery, "WORKING_SET_MIN_N", 400)
    recover(y, M, progress=False)
    assert calls[-1] == "_recover_working_set"  # n >= WORKING_SET_MIN_N
    recover(y, M, progress=False, solver="reference")
    assert calls[-1] == "_recover_fraction"  # explicit choice wins
    monkeypatch.setattr(recovery, "WORKING_SET_MIN_N", 10**9)
    recover(y, M, progress=False, solver="working_set")
    assert calls[-1] == "_recover_working_set"
    recover(y, M, rule="cv", progress=False, solver="working_set")  # cv: LassoCV per query, neither
    assert len(calls) == 4
    with pytest.raises(ValueError, match="unknown solver 'fast'"):
        recover(y, M, progress=False, solver="fast")
    with pytest.raises(ValueError, match="n_jobs must be >= 1"):
        recover(y, M, progress=False, n_jobs=0)
    with pytest.raises(ValueError, match="lambda fraction must be > 0"):
        recover(y, M, fraction=0.0, progress=False)


@pytest.mark.parametrize("solver,rule", [("working_set", "fraction"), ("reference", "fraction"), ("auto", "cv")])
def test_sparse_output_equals_dense_output(solver, rule):
    M, y, _ = planted_queries(600, K=64, q=3, k=3, seed=5)
    y = np.vstack([y, np.full(64, 2.0)])  # a constant query: lambda 0, no score
    dense, lam_dense = recover(y, M, rule, progress=False, solver=solver)
    sparse, lam_sparse = recover_sparse(y, M, rule, progress=False, solver=solver)
    assert isinstance(dense, np.ndarray) and dense.dtype == np.float32 and dense.shape == (4, 600)
    assert isinstance(sparse, sp.csr_matrix) and sparse.dtype == np.float32 and sparse.shape == (4, 600)
    np.testing.assert_array_equal(sparse.toarray(), dense)
    np.testing.assert_array_equal(lam_sparse, lam_dense)
    assert np.all(sparse.data != 0)  # only non-zero scores stored
    assert not np.signbit(dense[dense == 0]).any()  # zeros are +0.0
    assert sparse.getrow(3).nnz == 0 and (rule == "cv" or lam_dense[3] == 0)
    assert sparse.nnz > 0


def test_threads_give_the_same_scores(monkeypatch):
    monkeypatch.setattr(recovery, "CHUNK_ELEMENTS", 2 * 3_000)  # chunks of 2 queries
    M, y, _ = planted_queries(3_000, K=128, q=5, seed=6)
    one, lam_one = recover(y, M, progress=False, solver="working_set", sparse=True)
    two, lam_two = recover(y, M, progress=False, solver="working_set", sparse=True, n_jobs=2)
    assert (one != two).nnz == 0
    np.testing.assert_array_equal(lam_one, lam_two)


def test_unconverged_queries_are_reported(monkeypatch):
    monkeypatch.setattr(recovery, "_MAX_OUTER", 1)  # one round: no certificate yet
    M, y, _ = planted_queries(2_000, K=128, q=2, noise=1.0, seed=7)
    with pytest.warns(ConvergenceWarning, match="2 of 2 queries stopped with a duality gap above"):
        recover(y, M, progress=False, solver="working_set")


def test_working_set_never_allocates_dense_query_by_example_float64():
    """q x n float64 would be 80 MB here; the chunked solver holds a [n, chunk] block instead."""
    n, q = 200_000, 50
    M, y, supports = planted_queries(n, q=q, seed=8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        tracemalloc.start()
        try:
            scores, _ = recover(y, M, progress=False, sparse=True)  # n >= WORKING_SET_MIN_N: working set
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    assert isinstance(scores, sp.csr_matrix) and scores.shape == (q, n)
    assert peak < q * n * 8 / 2, f"peak {peak / 1e6:.1f} MB"
    assert scores.nnz < 50 * q  # sparse, as the planted influence
    top = [set(scores.getrow(i).indices[np.argsort(-np.abs(scores.getrow(i).data))[:10]]) for i in range(q)]
    assert np.mean([len(t & set(s)) / 10 for t, s in zip(top, supports)]) > 0.3  # something was recovered


def test_scaling_benchmark_quick_table(capsys):
    root = Path(__file__).resolve().parents[1]
    if str(root) not in sys.path:  # `benchmarks` lives next to the package
        sys.path.insert(0, str(root))
    from benchmarks.scaling_recovery import QUICK_NS, main

    rows = main(["--quick", "--in-process"])
    out = capsys.readouterr().out
    expected = [(n, K) for n in QUICK_NS for K in sorted({64, recommended_n_subsets(n, 5)})]
    assert [(r.n, r.K) for r in rows] == expected
    lines = [line for line in out.splitlines() if line.startswith("| ") and not line.startswith("| n ")]
    assert [tuple(int(c) for c in line.split("|")[1:3]) for line in lines] == expected
    assert "load_avg_1_5_15" in out and "torch_threads" in out and "OMP_NUM_THREADS" in out
    for r in rows:
        assert r.q == 6 and r.ref_q == 3
        assert r.ws_wall_s > 0 and r.ws_ms_per_query == pytest.approx(1e3 * r.ws_wall_s / r.q)
        assert r.ref_ms_per_query > 0 and r.speedup == pytest.approx(r.ref_ms_per_query / r.ws_same_ms_per_query)
        assert max(abs(r.obj_rel_min), abs(r.obj_rel_max)) <= 1e-6
        assert 0 <= r.ws_precision <= 1 and 0 <= r.ref_precision <= 1
        assert r.ws_rss_gb > 0 and r.rss_all_gb >= r.ws_rss_gb and r.ws_not_converged == 0
        assert math.isfinite(r.design_s)


# ------------------------------------------------------------------------- noise floor
def test_noise_floor_separates_planted_signal_from_noise():
    """The figures quoted in `noise_floor`'s docstring: 30 queries with 3 planted sources each, 30
    pure-noise queries; no noise query has a score above its floor, most sources do, no other
    document does."""
    import numpy as np
    import pytest

    from stride_nnsight.design import SubsetDesign
    from stride_nnsight.recovery import noise_floor, recover

    design = SubsetDesign(300, 128, 4, seed=0)
    M = design.membership.toarray().astype(float)
    rng = np.random.default_rng(1)
    q = 60
    w = np.zeros((q, 300))
    for i in range(q // 2):
        w[i, rng.choice(300, 3, replace=False)] = rng.uniform(0.5, 1.0, 3)
    y = w @ M.T + 0.05 * rng.normal(size=(q, 128))
    y[q // 2:] = rng.normal(size=(q // 2, 128))
    scores, _ = recover(y, design.membership, progress=False)
    floor = noise_floor(y, design.membership, n_permutations=8, seed=0)
    assert floor.shape == (q,) and (floor > 0).all()
    above = np.abs(scores) > floor[:, None]
    assert above[q // 2:].sum() == 0  # nothing in a noise query clears its floor
    sources = np.mean([above[i][w[i] > 0].mean() for i in range(q // 2)])
    assert sources == pytest.approx(0.789, abs=0.01)  # as quoted
    assert sum(above[i][w[i] == 0].sum() for i in range(q // 2)) == 0  # and no other document
    np.testing.assert_array_equal(floor, noise_floor(y, design.membership, n_permutations=8, seed=0))
    with pytest.raises(ValueError, match="n_permutations"):
        noise_floor(y, design.membership, n_permutations=0)


def test_scaling_benchmark_default_K_is_the_library_default_for_each_n():
    root = Path(__file__).resolve().parents[1]
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    from benchmarks.scaling_recovery import parse_args, rows_to_run
    from stride_nnsight.arguments import StrideArguments

    cfg, _ = parse_args(["--n", "100", "1000000"])
    pairs = rows_to_run(cfg)
    for n in (100, 1_000_000):
        assert (n, StrideArguments(subsets_per_example=cfg.d).subsets_for(n)) in pairs
    assert (1_000_000, 512) in pairs and (100, 200) in pairs  # min(512, n d / 2)
    cfg, _ = parse_args(["--n", "1000", "--K", "256"])
    assert (1000, 256) in rows_to_run(cfg)


def test_shared_fraction_reads_the_noise_and_samples_big_batches():
    """The ``"shared_cv"`` rule: pure noise gets the grid's largest fraction (nothing generalises
    to held-out operators), a strong planted signal a small one; the 1-SE choice is the largest
    fraction within one standard error of the lowest error; big batches use an even sample."""
    from stride_nnsight.recovery import SHARED_CV_GRID, operator_cv_errors, shared_fraction

    qs = [planted(n=300, K=120, d=4, k=3, noise=0.02, seed=s) for s in range(4)]
    M = qs[0][0]
    signal = np.stack([M @ w + 0.02 * np.random.default_rng(s).standard_normal(120) for s, (_, w, _, _) in
                       enumerate(qs)])
    noise = np.random.default_rng(9).standard_normal((4, 120))
    f_noise, diag = shared_fraction(noise, M)
    assert f_noise == max(SHARED_CV_GRID)
    f_signal, diag = shared_fraction(signal, M)
    assert f_signal <= 0.2
    errors, se = np.array(diag["errors"]), np.array(diag["standard_errors"])
    best = errors.argmin()
    within = [g for g, e in zip(SHARED_CV_GRID, errors) if e <= errors[best] + se[best]]
    assert f_signal == max(within) and diag["queries"] == [0, 1, 2, 3]
    # the errors are the held-out operators' squared errors, normalised per query
    raw = operator_cv_errors(signal, M)
    assert raw.shape == (len(SHARED_CV_GRID), 5, 4)
    np.testing.assert_allclose(errors, (raw / (signal.var(axis=1) + np.finfo(float).tiny)).mean(axis=2).mean(axis=1))
    big = np.repeat(signal, 50, axis=0)  # 200 queries
    assert shared_fraction(big, M, max_queries=8)[1]["queries"] == np.unique(
        np.linspace(0, 199, 8).round().astype(int)).tolist()
    with pytest.raises(ValueError, match="folds"):
        operator_cv_errors(signal, M, folds=1)
