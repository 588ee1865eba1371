"""Tests of stride_nnsight.evaluation: hand-computed cases and synthetic linear 'models' (no training)."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch

from stride_nnsight import Attribution
from stride_nnsight.evaluation import (
    LDSResult,
    bootstrap_ci,
    counterfactual_removal,
    draw_subset_masks,
    fact_tracing,
    lds,
    random_mrr,
    random_recall_at_k,
    retrain_ground_truth,
    spearman_per_query,
)


# ------------------------------------------------------------------------------ LDS


def test_lds_hand_example():
    # model i is trained on example i only, so its prediction for a query is scores[q, i]
    masks = np.eye(3, dtype=bool)
    scores = np.array([[3.0, 2.0, 1.0], [1.0, 2.0, 3.0]])
    losses = np.array([[0.1, 0.1], [0.2, 0.3], [0.3, 0.2]])  # [m, q]
    # q0: predictions 3,2,1 vs -loss -.1,-.2,-.3 -> +1
    # q1: predictions 1,2,3 vs -loss -.1,-.3,-.2 -> ranks (1,2,3) vs (3,1,2): 1 - 6*6/24 = -0.5
    res = lds(scores, masks, losses)
    assert isinstance(res, LDSResult)
    np.testing.assert_allclose(res.per_query, [1.0, -0.5])
    assert res.mean == pytest.approx(0.25)
    assert res.n_queries == 2 and res.n_models == 3 and res.n_nan == 0 and res.n_seeds == 1
    assert res.ci_low <= res.mean <= res.ci_high
    assert "lds=0.2500" in repr(res) and "models=3" in repr(res)
    # same through an Attribution, a tensor and 0/1 int masks
    attr = Attribution(scores=torch.tensor(scores), query_ids=None, train_ids=None)
    np.testing.assert_allclose(lds(attr, masks.astype(int), torch.tensor(losses)).per_query, [1.0, -0.5])


def test_lds_random_scores_near_zero():
    rng = np.random.default_rng(1)
    n, q, m = 60, 300, 40
    masks = draw_subset_masks(n, m, 0.5, seed=3)
    w_true = rng.normal(size=(q, n))
    losses = -(masks @ w_true.T) + 0.1 * rng.normal(size=(m, q))
    res = lds(rng.normal(size=(q, n)), masks, losses)
    assert abs(res.mean) < 0.1
    assert res.ci_low < res.ci_high


def test_lds_perfect_scores_on_linear_model():
    rng = np.random.default_rng(2)
    n, q, m = 80, 20, 50
    masks = draw_subset_masks(n, m, 0.5, seed=0)
    w_true = rng.normal(size=(q, n))
    losses = 5.0 - masks @ w_true.T + 0.01 * rng.normal(size=(m, q))
    res = lds(w_true, masks, losses)
    assert res.mean > 0.95
    assert res.ci_low > 0.9
    # flipping the sign of the scores (opponents as proponents) gives the opposite
    assert lds(-w_true, masks, losses).mean < -0.95


def test_lds_multi_seed_averages_first():
    rng = np.random.default_rng(3)
    n, q, m, s = 30, 4, 12, 3
    masks = draw_subset_masks(n, m, 0.5, seed=1)
    scores = rng.normal(size=(q, n))
    per_seed = rng.normal(size=(m, s, q))
    res = lds(scores, masks, per_seed)
    ref = lds(scores, masks, per_seed.mean(axis=1))
    np.testing.assert_allclose(res.per_query, ref.per_query)
    assert res.n_seeds == 3 and res.n_models == m and "3 seeds" in repr(res)
    # seed noise that cancels in the average: seeds alone are uninformative, the mean is perfect
    clean = -(masks @ scores.T)
    noise = 10 * rng.normal(size=(m, 1, q))
    noisy = np.concatenate([clean[:, None] + noise, clean[:, None] - noise], axis=1)
    assert lds(scores, masks, noisy).mean == pytest.approx(1.0)
    assert lds(scores, masks, noisy[:, 0]).mean < 0.9
    # a nan seed is ignored in the average
    noisy_nan = np.concatenate([clean[:, None], np.full((m, 1, q), np.nan)], axis=1)
    assert lds(scores, masks, noisy_nan).mean == pytest.approx(1.0)


def test_lds_nan_queries_excluded_and_counted():
    rng = np.random.default_rng(4)
    n, q, m = 20, 3, 10
    masks = draw_subset_masks(n, m, 0.5, seed=2)
    scores = rng.normal(size=(q, n))
    scores[1] = 0.0  # all-zero row -> constant predictions
    losses = -(masks @ scores.T)
    losses[:, 2] = 1.0  # constant losses
    with np.errstate(all="raise"):
        res = lds(scores, masks, losses)
    assert np.isnan(res.per_query[1]) and np.isnan(res.per_query[2])
    assert res.per_query[0] == pytest.approx(1.0)
    assert res.n_nan == 2 and res.n_valid == 1
    assert res.mean == pytest.approx(1.0)
    assert res.mean_nan_as_zero == pytest.approx(1.0 / 3)
    assert "2 nan queries excluded" in repr(res)
    assert res.to_dict()["per_query"][1] is None
    # a failed model (nan loss) is dropped for that query only
    losses2 = -(masks @ scores.T)
    losses2[0, 0] = np.nan
    assert lds(scores, masks, losses2).per_query[0] == pytest.approx(1.0)


def test_lds_shape_errors():
    masks = np.eye(3, dtype=bool)
    with pytest.raises(ValueError, match="masks cover"):
        lds(np.zeros((2, 4)), masks, np.zeros((3, 2)))
    with pytest.raises(ValueError, match="losses"):
        lds(np.zeros((2, 3)), masks, np.zeros((3, 5)))
    with pytest.raises(ValueError, match="0/1"):
        lds(np.zeros((2, 3)), np.full((3, 3), 2), np.zeros((3, 2)))


def test_spearman_per_query_matches_scipy():
    from scipy.stats import spearmanr

    rng = np.random.default_rng(5)
    a, b = rng.normal(size=(15, 4)), rng.normal(size=(15, 4))
    a[3:6, 1] = 0.5  # ties
    got = spearman_per_query(a, b)
    for j in range(4):
        assert got[j] == pytest.approx(spearmanr(a[:, j], b[:, j]).statistic)


def test_bootstrap_ci():
    v = np.random.default_rng(6).normal(loc=0.3, scale=0.1, size=200)
    low, high = bootstrap_ci(v, 0.95, n_boot=500, seed=0)
    assert low < v.mean() < high
    assert high - low == pytest.approx(2 * 1.96 * v.std() / np.sqrt(v.size), rel=0.25)
    assert bootstrap_ci(v, 0.95, n_boot=500, seed=0) == (low, high)  # reproducible
    narrow = bootstrap_ci(v, 0.5, n_boot=500, seed=0)
    assert narrow[1] - narrow[0] < high - low
    assert bootstrap_ci([np.nan, 0.4, np.nan]) == (0.4, 0.4)
    assert all(np.isnan(bootstrap_ci([np.nan])))


# --------------------------------------------------------------- retraining ground truth


def test_draw_subset_masks():
    masks = draw_subset_masks(100, 8, 0.3, seed=1)
    assert masks.shape == (8, 100) and masks.dtype == bool
    assert (masks.sum(1) == 30).all()
    np.testing.assert_array_equal(masks, draw_subset_masks(100, 8, 0.3, seed=1))
    np.testing.assert_array_equal(masks[:5], draw_subset_masks(100, 5, 0.3, seed=1))  # prefix-stable
    assert not np.array_equal(masks, draw_subset_masks(100, 8, 0.3, seed=2))
    with pytest.raises(ValueError):
        draw_subset_masks(10, 2, 0.0)


class LinearWorld:
    """A pure-function 'training run': the model is its kept index set plus seed noise.

    ``loss(q) = base - sum_{j kept} W[q, j] + noise * N(0, 1)[seed]``.
    """

    def __init__(self, n_train=40, n_queries=6, noise=0.01, seed=0, fail_after=None):
        rng = np.random.default_rng(seed)
        self.W = rng.normal(size=(n_queries, n_train)) * (rng.random((n_queries, n_train)) < 0.3)
        self.base = 10.0
        self.noise = noise
        self.calls = 0
        self.fail_after = fail_after
        self.seen_seeds: list[int] = []

    def train_fn(self, indices, seed):
        if self.fail_after is not None and self.calls >= self.fail_after:
            raise RuntimeError("simulated crash")
        self.calls += 1
        self.seen_seeds.append(seed)
        assert indices.dtype == np.int64 and np.all(np.diff(indices) > 0)
        return (indices.copy(), seed)

    def eval_fn(self, model):
        indices, seed = model
        noise = self.noise * np.random.default_rng(seed).normal(size=self.W.shape[0])
        return self.base - self.W[:, indices].sum(1) + noise


def test_retrain_ground_truth_without_cache():
    world = LinearWorld()
    gt = retrain_ground_truth(world.train_fn, world.eval_fn, n_train=40, n_models=16, fraction=0.5,
                              seed=0, progress=False)
    assert gt.masks.shape == (16, 40) and gt.losses.shape == (16, 6) and gt.train_seeds.shape == (16, 1)
    np.testing.assert_array_equal(gt.masks, draw_subset_masks(40, 16, 0.5, seed=0))
    assert world.calls == 16 and len(set(world.seen_seeds)) == 16
    res = gt.lds(world.W)
    assert res.mean > 0.9
    assert "models=16" in repr(gt)


def test_retrain_ground_truth_resumes(tmp_path):
    cache = tmp_path / "gt"
    kwargs = dict(n_train=40, n_models=8, fraction=0.5, seed=3, cache_dir=cache, progress=False)
    crashing = LinearWorld(fail_after=5)
    with pytest.raises(RuntimeError, match="simulated crash"):
        retrain_ground_truth(crashing.train_fn, crashing.eval_fn, **kwargs)
    assert len(list(cache.glob("retrain_*.npz"))) == 5
    assert not list(cache.glob("*.tmp"))
    manifest = json.loads((cache / "manifest.json").read_text())
    assert manifest["n_models"] == 8 and manifest["seed"] == 3 and manifest["fraction"] == 0.5

    resumed = LinearWorld()
    gt = retrain_ground_truth(resumed.train_fn, resumed.eval_fn, **kwargs)
    assert resumed.calls == 3  # only the missing ones
    fresh = LinearWorld()
    ref = retrain_ground_truth(fresh.train_fn, fresh.eval_fn, **{**kwargs, "cache_dir": None})
    np.testing.assert_allclose(gt.losses, ref.losses)
    np.testing.assert_array_equal(gt.masks, ref.masks)
    np.testing.assert_array_equal(gt.train_seeds, ref.train_seeds)

    again = LinearWorld()
    retrain_ground_truth(again.train_fn, again.eval_fn, **kwargs)
    assert again.calls == 0  # everything cached

    for bad in ({"fraction": 0.3}, {"n_models": 9}, {"seed": 4}, {"n_train": 41}):
        with pytest.raises(ValueError, match="other settings"):
            retrain_ground_truth(again.train_fn, again.eval_fn, **{**kwargs, **bad})
    with pytest.raises(ValueError, match="extra"):
        retrain_ground_truth(again.train_fn, again.eval_fn, **kwargs, extra={"queries": "other"})
    assert again.calls == 0


def test_retrain_ground_truth_several_seeds(tmp_path):
    world = LinearWorld(noise=0.5)
    gt = retrain_ground_truth(world.train_fn, world.eval_fn, n_train=40, n_models=6, n_seeds=2,
                              cache_dir=tmp_path, progress=False)
    assert gt.losses.shape == (6, 2, 6) and world.calls == 12
    assert len(set(gt.train_seeds.ravel().tolist())) == 12
    assert not np.allclose(gt.losses[:, 0], gt.losses[:, 1])
    assert gt.lds(world.W).n_seeds == 2
    world2 = LinearWorld(noise=0.5)
    gt2 = retrain_ground_truth(world2.train_fn, world2.eval_fn, n_train=40, n_models=6, n_seeds=2,
                               cache_dir=tmp_path, progress=False)
    assert world2.calls == 0
    np.testing.assert_allclose(gt2.losses, gt.losses)


def test_retrain_ground_truth_checks_eval_output():
    world = LinearWorld()
    with pytest.raises(ValueError, match="one loss per query"):
        retrain_ground_truth(world.train_fn, lambda m: np.zeros((2, 3)), n_train=40, n_models=2, progress=False)


# ------------------------------------------------------------------------ fact tracing


def test_fact_tracing_hand_example():
    scores = np.array([
        [0.9, 0.1, 0.5, 0.3, 0.0, 0.2],  # ranking 0,2,3,5,1,4: doc 2 at rank 2, doc 4 at rank 6
        [0.1, 0.8, 0.2, 0.3, 0.4, 0.5],  # doc 1 at rank 1
    ])
    out = fact_tracing(scores, [[2, 4], [1]], ks=(1, 2, 5, 6))
    assert out["recall@1"] == pytest.approx(0.5)
    assert out["recall@2"] == pytest.approx(0.75)
    assert out["recall@5"] == pytest.approx(0.75)
    assert out["recall@6"] == pytest.approx(1.0)
    assert out["mrr"] == pytest.approx(0.75)
    np.testing.assert_allclose(out["per_query"]["recall@2"], [0.5, 1.0])
    np.testing.assert_allclose(out["per_query"]["reciprocal_rank"], [0.5, 1.0])
    np.testing.assert_allclose(out["per_query"]["first_rank"], [2, 1])
    assert out["n_queries"] == 2
    assert out["random"]["recall@1"] == pytest.approx(1 / 6)
    # without ties, every tie rule agrees
    for ties in ("pessimistic", "optimistic"):
        other = fact_tracing(torch.tensor(scores), [[2, 4], [1]], ks=(1, 2, 5, 6), ties=ties)
        assert {k: other[k] for k in ("recall@1", "recall@2", "recall@5", "mrr")} == \
            pytest.approx({k: out[k] for k in ("recall@1", "recall@2", "recall@5", "mrr")})


def test_fact_tracing_ties():
    # doc 2 is tied with docs 1 and 3 right after doc 0
    scores = np.array([[1.0, 0.0, 0.0, 0.0]])
    out = fact_tracing(scores, [[2]], ks=(1, 2, 3, 4))
    assert [out[f"recall@{k}"] for k in (1, 2, 3, 4)] == pytest.approx([0, 1 / 3, 2 / 3, 1])
    assert out["mrr"] == pytest.approx((1 / 2 + 1 / 3 + 1 / 4) / 3)
    assert out["per_query"]["first_rank"][0] == pytest.approx(3.0)
    pess = fact_tracing(scores, [[2]], ks=(1, 2, 3, 4), ties="pessimistic")
    assert pess["recall@3"] == 0.0 and pess["mrr"] == pytest.approx(1 / 4)
    opt = fact_tracing(scores, [[2]], ks=(1, 2, 3, 4), ties="optimistic")
    assert opt["recall@2"] == 1.0 and opt["mrr"] == pytest.approx(1 / 2)
    # a constant row scores exactly the random baseline
    flat = fact_tracing(np.zeros((1, 10)), [[3, 7]], ks=(1, 5))
    assert flat["recall@5"] == pytest.approx(random_recall_at_k(10, 2, 5))
    assert flat["mrr"] == pytest.approx(random_mrr(10, 2)) == pytest.approx(flat["random"]["mrr"])


def test_fact_tracing_expected_matches_brute_force():
    scores = np.array([5.0, 2.0, 2.0, 2.0, 2.0, 0.0])
    relevant = [2, 4]
    tie_group = [1, 2, 3, 4]
    rr, hits = [], []
    for perm in itertools.permutations(tie_group):
        order = [0, *perm, 5]
        ranks = {doc: r for r, doc in enumerate(order, start=1)}
        rr.append(1 / min(ranks[d] for d in relevant))
        hits.append(np.mean([ranks[d] <= 3 for d in relevant]))
    out = fact_tracing(scores[None], [relevant], ks=(3,))
    assert out["mrr"] == pytest.approx(np.mean(rr))
    assert out["recall@3"] == pytest.approx(np.mean(hits))


def test_random_baselines():
    assert random_recall_at_k(100, 2, 10) == pytest.approx(0.1)
    assert random_recall_at_k(5, 1, 10) == 1.0
    assert random_mrr(3, 2) == pytest.approx(5 / 6)  # first rank of pairs {1,2},{1,3},{2,3}
    assert random_mrr(10, 1) == pytest.approx(sum(1 / r for r in range(1, 11)) / 10)
    with pytest.raises(ValueError):
        random_recall_at_k(10, 11, 1)


def test_fact_tracing_errors():
    with pytest.raises(ValueError, match="no relevant"):
        fact_tracing(np.zeros((1, 4)), [[]])
    with pytest.raises(ValueError, match="in \\[0, 4\\)"):
        fact_tracing(np.zeros((1, 4)), [[4]])
    with pytest.raises(ValueError, match="one per query"):
        fact_tracing(np.zeros((2, 4)), [[1]])


# -------------------------------------------------------------- counterfactual removal


def test_counterfactual_removal_linear_world():
    world = LinearWorld(n_train=40, n_queries=6, noise=0.0, seed=7)
    k, n_random = 4, 3
    out = counterfactual_removal(world.W, world.train_fn, world.eval_fn, k=k, n_random=n_random,
                                 seed=0, progress=False)
    assert world.calls == 1 + 6 + n_random == out["n_retrains"]
    assert out["removed"].shape == (6, k) and out["random_rise_all"].shape == (n_random, 6)
    # in a linear world the rise is exactly the removed examples' influence
    for i, q in enumerate(out["query_indices"]):
        expected = np.sort(world.W[q])[::-1][:k].sum()
        assert out["topk_rise"][i] == pytest.approx(expected)
        assert set(out["removed"][i]) == set(np.argsort(-world.W[q], kind="stable")[:k])
    assert out["mean_topk_rise"] > out["mean_random_rise"]
    assert out["mean_topk_rise"] > 0
    assert out["frac_topk_above_random"] == 1.0
    np.testing.assert_allclose(out["rise_over_random"], out["topk_rise"] - out["random_rise"])

    # reversed scores (opponents first) lower the loss instead
    world2 = LinearWorld(n_train=40, n_queries=6, noise=0.0, seed=7)
    rev = counterfactual_removal(-world2.W, world2.train_fn, world2.eval_fn, k=k, n_random=n_random,
                                 progress=False, query_indices=[1, 4], base_losses=out["base_loss"])
    assert world2.calls == 2 + n_random  # base given: no full retrain
    np.testing.assert_array_equal(rev["query_indices"], [1, 4])
    assert rev["mean_topk_rise"] < rev["mean_random_rise"]


def test_counterfactual_removal_checks_k():
    world = LinearWorld()
    with pytest.raises(ValueError, match="k must be"):
        counterfactual_removal(world.W, world.train_fn, world.eval_fn, k=0, progress=False)


# ------------------------------------------------------ CIs over models, noise ceiling
def test_vectorised_spearman_matches_scipy_with_ties():
    from stride_nnsight.evaluation import _spearman_columns, spearman_per_query

    rng = np.random.default_rng(0)
    p = rng.integers(0, 5, size=(30, 12)).astype(float)  # many ties
    t = rng.normal(size=(30, 12))
    t[:, 3] = 1.0  # constant target -> nan
    np.testing.assert_allclose(_spearman_columns(p, t), spearman_per_query(p, t), atol=1e-12, equal_nan=True)
    p[0, 0] = np.nan  # non-finite values fall back to the per-column routine
    np.testing.assert_allclose(_spearman_columns(p, t), spearman_per_query(p, t), atol=1e-12, equal_nan=True)


def _planted_truth(m=8, n=60, q=20, seed=0):
    from stride_nnsight.evaluation import draw_subset_masks

    rng = np.random.default_rng(seed)
    true = rng.normal(size=(q, n)) * (rng.random((q, n)) < 0.1)
    masks = draw_subset_masks(n, m, 0.5, seed)
    losses = -(masks @ true.T) + 0.3 * rng.normal(size=(m, q))
    return true, masks, losses


def test_lds_replicates_without_resampling_give_the_point_lds_and_pair_methods():
    from stride_nnsight.evaluation import lds, lds_replicates, paired_lds_ci

    true, masks, losses = _planted_truth()
    noise = np.random.default_rng(1).normal(size=true.shape)
    reps = lds_replicates([true, noise], masks, losses, n_boot=3, resample_models=False, resample_queries=False)
    assert reps.shape == (3, 2)
    np.testing.assert_allclose(reps[:, 0], lds(true, masks, losses).mean_nan_as_zero)
    np.testing.assert_allclose(reps[:, 1], lds(noise, masks, losses).mean_nan_as_zero)
    diff, lo, hi = paired_lds_ci(true, noise, masks, losses)
    assert diff == pytest.approx(reps[0, 0] - reps[0, 1]) and 0 < lo < diff < hi
    # with 8 retrained models the models' own sampling error widens the interval
    _, lo_q, hi_q = paired_lds_ci(true, noise, masks, losses, resample_models=False)
    assert hi - lo > hi_q - lo_q
    with pytest.raises(ValueError, match="shape of the first"):
        lds_replicates([true, noise[:, :5]], masks, losses)


def test_seed_to_seed_lds_recovers_the_reliability_of_one_seed():
    from stride_nnsight.evaluation import seed_to_seed_lds

    rng = np.random.default_rng(0)
    m, q = 400, 6
    effect = rng.normal(size=(m, 1, q))
    losses = effect + rng.normal(size=(m, 2, q))  # equal effect and seed-noise variance: rho = 0.5
    result = seed_to_seed_lds(losses)
    assert abs(result.mean - 0.5) < 0.08 and result.n_seeds == 2 and result.n_queries == q
    assert result.ci_low <= result.mean <= result.ci_high
    quiet = effect + 0.1 * rng.normal(size=(m, 2, q))
    assert seed_to_seed_lds(quiet).mean > 0.95
    with pytest.raises(ValueError, match="n_seeds=2"):
        seed_to_seed_lds(losses[:, 0])


def test_a_second_seed_reuses_the_first_seeds_retrains(tmp_path):
    from stride_nnsight.evaluation import retrain_ground_truth

    calls = []

    def train(indices, seed):
        calls.append(seed)
        return np.random.default_rng(seed).normal(size=3) + len(indices)

    single = retrain_ground_truth(train, lambda m: m, n_train=10, n_models=4, seed=1, cache_dir=tmp_path / "one",
                                  progress=False)
    assert len(calls) == 4
    calls.clear()
    both = retrain_ground_truth(train, lambda m: m, n_train=10, n_models=4, seed=1, cache_dir=tmp_path / "two",
                                progress=False, n_seeds=2, reuse_dir=tmp_path / "one")
    assert len(calls) == 4 and set(calls).isdisjoint(set(single.train_seeds.reshape(-1).tolist()))
    np.testing.assert_array_equal(both.losses[:, 0], single.losses)  # seed 0 taken over, not retrained
    with pytest.raises(ValueError, match="other settings"):
        retrain_ground_truth(train, lambda m: m, n_train=10, n_models=4, seed=2, cache_dir=tmp_path / "three",
                             progress=False, n_seeds=2, reuse_dir=tmp_path / "one")


def test_more_subsets_reuse_the_first_subsets_retrains(tmp_path):
    """Masks are drawn one after the other, so a cache of 4 subsets x 2 seeds serves the first 4
    of 6; only the 2 new subsets are trained, and their losses match a run made from scratch."""
    from stride_nnsight.evaluation import retrain_ground_truth

    calls = []

    def train(indices, seed):
        calls.append(seed)
        return np.random.default_rng(seed).normal(size=3) + len(indices) + indices.sum()

    four = retrain_ground_truth(train, lambda m: m, n_train=10, n_models=4, seed=1, cache_dir=tmp_path / "four",
                                progress=False, n_seeds=2)
    calls.clear()
    six = retrain_ground_truth(train, lambda m: m, n_train=10, n_models=6, seed=1, cache_dir=tmp_path / "six",
                               progress=False, n_seeds=2, reuse_dir=tmp_path / "four")
    assert len(calls) == 4  # 2 new subsets x 2 seeds
    np.testing.assert_array_equal(six.losses[:4], four.losses)
    np.testing.assert_array_equal(six.masks[:4], four.masks)
    calls.clear()
    fresh = retrain_ground_truth(train, lambda m: m, n_train=10, n_models=6, seed=1, progress=False, n_seeds=2)
    np.testing.assert_array_equal(fresh.losses, six.losses)
    with pytest.raises(ValueError, match="other settings"):  # another fraction: other masks
        retrain_ground_truth(train, lambda m: m, n_train=10, n_models=6, fraction=0.3, seed=1,
                             cache_dir=tmp_path / "seven", progress=False, n_seeds=2, reuse_dir=tmp_path / "four")


@pytest.mark.parametrize("with_nan", [False, True])
def test_lds_replicates_of_several_methods_equal_each_method_alone(with_nan):
    """The methods are ranked side by side in one call per draw; each column must be what the
    same draws give that method alone (finite losses: the vectorised ranks; a nan loss: the
    per-query fallback)."""
    from stride_nnsight.evaluation import lds_replicates

    rng = np.random.default_rng(0)
    scores = [rng.normal(size=(12, 40)) for _ in range(3)]
    masks = rng.random((15, 40)) < 0.5
    losses = rng.normal(size=(15, 12))
    if with_nan:
        losses[2, 4] = np.nan
    joint = lds_replicates(scores, masks, losses, n_boot=40, seed=3)
    assert joint.shape == (40, 3)
    for i, s in enumerate(scores):
        np.testing.assert_allclose(joint[:, i], lds_replicates([s], masks, losses, n_boot=40, seed=3)[:, 0],
                                   rtol=1e-12, atol=1e-12)
    assert np.ptp(joint[:, 0]) > 0  # the draws do vary
