"""benchmarks.compare_settings' table: paired CIs over queries, and over queries and retrains."""

import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def test_report_gives_both_paired_intervals():
    from benchmarks.compare_settings import parse_variant, report
    from stride_nnsight.evaluation import draw_subset_masks, lds, paired_lds_ci

    rng = np.random.default_rng(0)
    q, n, m = 12, 40, 10
    true = rng.normal(size=(q, n)) * (rng.random((q, n)) < 0.15)
    masks = draw_subset_masks(n, m, 0.5, 0)
    truth = SimpleNamespace(masks=masks, losses=-(masks @ true.T) + 0.2 * rng.normal(size=(m, q)))
    rows = []
    for name, scores in (("defaults", true), ("noise", rng.normal(size=(q, n)))):
        per_query = np.nan_to_num(lds(scores, truth.masks, truth.losses).per_query)
        rows.append({"variant": name, "recall@10": 1.0, "lds": float(per_query.mean()), "scores": scores,
                     "truth": truth, "per_query": per_query, "by_kind": {"fact": float(per_query.mean())},
                     "fit_s": 1.0, "rows_per_doc": 24.0, "positions": None})
    table = report(rows, n_boot=200)
    assert "CI, queries + retrains resampled" in table
    _, lo, hi = paired_lds_ci(rows[1]["scores"], true, truth.masks, truth.losses, n_boot=200)
    assert f"[{lo:+.3f}, {hi:+.3f}]" in table.splitlines()[-1]
    assert table.splitlines()[2].split("|")[6].strip() == "-"  # the baseline row has no difference to test
    assert parse_variant('sampling="document",fit_passes=6') == {"sampling": "document", "fit_passes": 6}


def _design(K=120, n=300, d=4, seed=0):
    from stride_nnsight.design import SubsetDesign

    return SubsetDesign(n, K, d, seed=seed).membership


def test_lambda_rules_read_the_noise_from_the_measurements():
    """benchmarks.lambda_rules' data-driven rules: pure noise gets the largest fraction of the grid
    (nothing to fit), a strong sparse signal a small one; a uniform fraction is `recover`'s."""
    import scipy.sparse as sp

    from benchmarks.lambda_rules import FRACTION_GRID, cvpool_fraction, cvquery_fractions, noise_fractions, \
        recover_fractions
    from stride_nnsight.recovery import recover

    M = _design()
    rng = np.random.default_rng(1)
    q, n = 6, M.shape[1]
    w = np.zeros((q, n))
    for i in range(q):
        w[i, rng.choice(n, 3, replace=False)] = rng.uniform(2, 4, 3)
    signal = (sp.csr_matrix(M) @ w.T).T + 0.05 * rng.normal(size=(q, M.shape[0]))
    noise = rng.normal(size=(q, M.shape[0]))
    assert cvpool_fraction(noise, M)[0] == max(FRACTION_GRID)
    assert cvpool_fraction(signal, M)[0] <= 0.2
    assert (cvquery_fractions(noise, M, one_se=True) >= 0.5).all()
    assert (cvquery_fractions(signal, M, one_se=False) <= 0.2).all()
    assert noise_fractions(noise, M, 1.0).mean() > 0.8 > 0.3 > noise_fractions(signal, M, 1.0).mean()
    uniform, _ = recover(signal, M, "fraction", 0.3, True, progress=False)
    np.testing.assert_allclose(recover_fractions(signal, M, np.full(q, 0.3)), uniform)


def test_shared_cv_cost_prints_both_timings(capsys):
    from benchmarks.shared_cv_cost import main

    main(["3000"])
    line = [x for x in capsys.readouterr().out.splitlines() if x.startswith("n=3000")][0]
    assert "fraction recovery of 64 queries" in line and "shared_cv selection" in line and "-> fraction 0." in line


def test_token_weighted_metric_reduces_to_the_default_and_weights_rare_tokens(tiny_tokenizer):
    import torch

    from benchmarks.token_weights import idf_weights, weighted_metric
    from stride_nnsight.inputs import TokenBatch
    from stride_nnsight.measurement import negative_completion_loss

    docs = ["the cat sat on the mat", "the dog ran", "the bird sang"]
    V = tiny_tokenizer.vocab_size
    w = idf_weights(tiny_tokenizer, docs, V)
    the, cat = tiny_tokenizer("the")["input_ids"][-1], tiny_tokenizer(" cat")["input_ids"][-1]
    assert float(w[the]) < float(w[cat])  # "the" is in every document
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, V, (2, 6), generator=g)
    mask = torch.tensor([[0, 0, 0, 1, 1, 1], [0, 0, 1, 1, 1, 1]])
    batch = TokenBatch(ids, torch.ones_like(ids), mask)
    logits = torch.randn(2, 6, V, generator=g)
    torch.testing.assert_close(weighted_metric(w, 0.0)(logits, batch), negative_completion_loss(logits, batch))
    assert not torch.allclose(weighted_metric(w, 2.0)(logits, batch), negative_completion_loss(logits, batch))


def test_recovery_ceiling_oracle_and_overlap():
    """benchmarks.recovery_ceiling: word overlap counts shared word types (IDF-weighted: rare words
    count more); the oracle measurements are subset sums; a noise-free sparse oracle is recovered
    on its support by the Lasso, and the dense ridge recovers a dense signal where K >= n."""
    from benchmarks.lambda_rules import recover_fractions
    from benchmarks.recovery_ceiling import completion_overlap, subset_sums
    from benchmarks.recovery_variants import ridge_rows

    docs = ["the cat sat on the mat", "the dog ran", "a cat and a dog"]
    ov = completion_overlap(["The cat ran!"], docs)
    np.testing.assert_array_equal(ov, [[2, 2, 1]])  # {the, cat}, {the, ran}, {cat}
    idf = completion_overlap(["The cat ran!"], docs, idf=True)
    assert idf[0, 1] > idf[0, 0]  # "ran" (1 document) outweighs "cat" (2 documents)

    M = _design(K=120, n=300)
    rng = np.random.default_rng(2)
    w = np.zeros((2, 300))
    w[0, [5, 77, 140]] = [3.0, 2.0, 4.0]
    w[1, [9, 200]] = [2.5, 3.5]
    y = subset_sums(M, w)
    np.testing.assert_allclose(y, (M.toarray() @ w.T).T)
    scores = recover_fractions(y, M, np.full(2, 0.1))
    assert set(np.flatnonzero(scores[0] > 0.5)) == {5, 77, 140}
    assert set(np.flatnonzero(scores[1] > 0.5)) == {9, 200}

    M2 = _design(K=240, n=60)
    dense = rng.normal(size=(1, 60))
    est = ridge_rows(subset_sums(M2, dense), M2, 1e-6)
    np.testing.assert_allclose(est - est.mean(), dense - dense.mean(), atol=1e-4)


def test_recovery_ceiling_hybrid_scales_both_parts():
    from benchmarks.recovery_ceiling import hybrid_scores

    lasso = np.array([[0.0, 4.0, 0.0, -4.0], [0.0, 0.0, 0.0, 0.0]])
    ridge = np.array([[1.0, 1.0, 1.0, 1.0], [2.0, -2.0, 0.0, 0.0]])
    out = hybrid_scores(lasso, ridge, 0.5)
    np.testing.assert_allclose(out[0], [0.125, 0.625, 0.125, -0.375])
    np.testing.assert_allclose(out[1], [0.25, -0.25, 0.0, 0.0])  # an all-zero Lasso row stays zero


def test_recovery_ceiling_top_only_keeps_each_rows_largest():
    from benchmarks.recovery_ceiling import top_only

    s = np.array([[0.1, 3.0, 2.0, 0.5], [5.0, 0.0, 1.0, 4.0]])
    np.testing.assert_array_equal(top_only(s, 2), [[0.0, 3.0, 2.0, 0.0], [5.0, 0.0, 0.0, 4.0]])


def test_state_truncation_is_the_best_low_rank_approximation():
    import torch

    from benchmarks.state_truncation import truncated, truncation_basis

    g = torch.Generator().manual_seed(0)
    coef = torch.randn(6, 2, 20, generator=g)                  # K r = 12 rows over V = 20 columns
    U, S, Vh, energy = truncation_basis(coef)
    torch.testing.assert_close(truncated(U, S, Vh, 12, coef.shape), coef, atol=1e-5, rtol=1e-5)  # full rank: exact
    low = truncated(U, S, Vh, 3, coef.shape)
    assert low.shape == coef.shape and low.dtype == torch.float32
    assert int(torch.linalg.matrix_rank(low.reshape(12, 20), atol=1e-4)) == 3
    # Eckart-Young: the residual's squared norm is the energy left outside the top 3
    residual = float(((coef - low) ** 2).sum() / (coef ** 2).sum())
    assert abs(residual - (1 - float(energy[2]))) < 1e-5
    assert abs(float(energy[-1]) - 1.0) < 1e-12


def test_token_component_benchmark_rows_are_the_library_recoveries(tiny_model, small_texts):
    """benchmarks.token_component: its two STRIDE rows recover the same measurements as
    ``attribute(recovery="lasso")`` and the library default; a third row is completion-only BM25."""
    from benchmarks.token_component import rows_for
    from stride_nnsight import Stride
    from stride_nnsight.evaluation import draw_subset_masks

    docs = small_texts[:24]
    stride = Stride(tiny_model, layer=1, seed=0, n_subsets=16, subsets_per_example=2, rank=4, steps=12,
                    batch_size=8, basis_hidden=8, max_length=32).fit(docs, progress=False)
    prompts, completions = ["the cat sat", "a dog", "the bird"], [" on the mat.", " ran", " flew away."]
    masks = draw_subset_masks(len(docs), 8, 0.5, 0)
    rng = np.random.default_rng(0)
    bench = {"documents": docs, "prompts": prompts, "completions": completions, "kinds": ["text"] * 3,
             "sources": [], "truth": SimpleNamespace(masks=masks, losses=rng.normal(size=(8, 3)))}
    rows = rows_for(bench, stride)
    assert [r["label"].split(" ")[0] for r in rows] == ["Lasso", "Lasso", "BM25,"]
    default = stride.attribute(prompts, completions, progress=False, null_permutations=0).scores.numpy()
    lasso = stride.attribute(prompts, completions, progress=False, null_permutations=0, recovery="lasso")
    np.testing.assert_allclose(rows[1]["scores"], default, rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(rows[0]["scores"], lasso.scores.numpy())
    assert rows[0]["nnz"] <= 16  # the Lasso alone: at most K non-zeros per query


def _seeded_rows(rng, truth, true, n_seeds=3):
    from stride_nnsight.evaluation import lds

    rows = []
    q, n = true.shape
    for name, noise in (("defaults", 0.5), ("worse", 3.0)):
        seed_scores = [true + noise * rng.normal(size=(q, n)) for _ in range(n_seeds)]
        spq = np.stack([np.nan_to_num(lds(s, truth.masks, truth.losses).per_query) for s in seed_scores])
        rows.append({"variant": name, "recall@10": 1.0, "lds": float(spq.mean()), "scores": seed_scores[0],
                     "seed_scores": seed_scores, "seed_per_query": spq, "truth": truth, "per_query": spq.mean(0),
                     "by_kind": {"fact": float(spq.mean())}, "fit_s": 1.0, "rows_per_doc": 24.0, "positions": None})
    return rows


def test_seeded_report_pairs_seeds_and_resamples_them():
    """--seeds: each seed's difference against the same seed of the first variant, and an interval
    that resamples fit seeds too (wider than the query-only one when seeds disagree)."""
    from benchmarks.compare_settings import report, seed_query_ci
    from stride_nnsight.evaluation import draw_subset_masks

    rng = np.random.default_rng(0)
    q, n, m = 12, 40, 10
    true = rng.normal(size=(q, n)) * (rng.random((q, n)) < 0.15)
    masks = draw_subset_masks(n, m, 0.5, 0)
    truth = SimpleNamespace(masks=masks, losses=-(masks @ true.T) + 0.2 * rng.normal(size=(m, q)))
    rows = _seeded_rows(rng, truth, true)
    table = report(rows, n_boot=200)
    assert "fit seeds 0..2" in table and "CI, queries + fit seeds resampled" in table
    last = [c.strip() for c in table.splitlines()[-1].split("|")]
    per_seed = (rows[1]["seed_per_query"] - rows[0]["seed_per_query"]).mean(1)
    assert last[-5] == " / ".join(f"{v:+.3f}" for v in per_seed)
    assert float(last[5].split()[0]) < 0  # the noisier variant is worse
    # seed-level disagreement widens the two-way interval; a constant difference has a point interval
    offsets = np.array([[0.2], [-0.2], [0.0]]) + 0.01 * rng.normal(size=(3, 30))
    lo2, hi2 = seed_query_ci(offsets, n_boot=500)
    assert hi2 - lo2 > 0.1
    np.testing.assert_allclose(seed_query_ci(np.full((3, 30), 0.05), n_boot=50), (0.05, 0.05))


def test_run_fits_each_seed_and_refuses_a_seeded_variant(monkeypatch):
    import pytest

    import benchmarks.compare_settings as cs

    seen = []

    def fake(bench, changes, n_boot, fits=None):
        seen.append(changes.get("seed"))
        s = changes.get("seed", 0)
        return {"scores": np.full((2, 3), float(s)), "per_query": np.array([0.1 * s, 0.3]), "recall@10": 1.0,
                "fit_s": 1.0, "rows_per_doc": 2.0, "positions": None}

    monkeypatch.setattr(cs, "_fit_and_score", fake)
    bench = {"stride_kwargs": {}, "kinds": ["fact", "text"], "truth": None}
    rows = cs.run(bench, ["", "lr=0.01"], seeds=3)
    assert seen == [0, 1, 2, 0, 1, 2]
    np.testing.assert_allclose(rows[0]["per_query"], [0.1, 0.3])
    assert rows[0]["seed_per_query"].shape == (3, 2) and len(rows[1]["seed_scores"]) == 3
    seen.clear()
    cs.run(bench, [""])
    assert seen == [None]  # one seed: the library's own default seed
    with pytest.raises(SystemExit, match="sets seed"):
        cs.run(bench, ["seed=4"], seeds=2)


def test_variants_differing_only_in_attribute_settings_share_a_fit(monkeypatch):
    """recovery / token_weights / lambda variants are measured and recovered from the fit of the
    same fitting settings (per seed), with the override passed to attribute; other variants refit."""
    import torch

    import benchmarks.compare_settings as cs
    from stride_nnsight import StrideArguments

    fitted, attributed = [], []

    class FakeStride:
        def __init__(self, lm, **kw):
            self.args = StrideArguments(**kw)

        def fit(self, documents, progress=True):
            fitted.append((self.args.seed, self.args.lr))
            return self

        def attribute(self, prompts, completions, progress=True, **overrides):
            attributed.append((self.args.seed, overrides))
            scores = torch.arange(3, dtype=torch.float32).repeat(len(prompts), 1) * (1 + self.args.seed)
            return type("A", (), {"scores": scores})()

    monkeypatch.setattr(cs, "Stride", FakeStride)
    monkeypatch.setattr("nnsight.TransformersModel", lambda *a, **k: None)
    rng = np.random.default_rng(0)
    truth = type("T", (), {"masks": rng.random((6, 3)) < 0.5, "losses": rng.random((6, 2))})()
    bench = {"stride_kwargs": {}, "kinds": ["fact", "text"], "truth": truth, "model": None, "tokenizer": None,
             "documents": ["a", "b", "c"], "prompts": ["p", "q"], "completions": [" x", " y"], "sources": [[0]]}
    rows = cs.run(bench, ["", "token_weights='presence'", "recovery='lasso',lambda_fraction=0.5", "lr=0.01"],
                  seeds=2, n_boot=10)
    assert len(rows) == 4
    assert fitted == [(0, StrideArguments().lr), (1, StrideArguments().lr), (0, 0.01), (1, 0.01)]
    lasso = {"recovery": "lasso", "lambda_fraction": 0.5}
    assert [o for _, o in attributed] == [{}, {}, {"token_weights": "presence"}, {"token_weights": "presence"},
                                         lasso, lasso, {}, {}]
    assert [s for s, _ in attributed] == [0, 1, 0, 1, 0, 1, 0, 1]


def test_saved_scores_keep_every_variant_and_seed_and_two_seeds_is_refused_on_gates(monkeypatch, tmp_path):
    """--save writes [variants, seeds, q, n] scores that rescore to the report's LDS; --two-seeds asks
    the setting for its two-seed truth and is refused, naming the fix, where there is none."""
    import pytest

    import benchmarks.compare_settings as cs

    def fake(bench, changes, n_boot, fits=None):
        s = changes.get("seed", 0) + 10 * ("lr" in changes)
        return {"scores": np.full((2, 3), float(s)), "per_query": np.array([0.1, 0.3]), "recall@10": 1.0,
                "fit_s": 1.0, "rows_per_doc": 2.0, "positions": None}

    monkeypatch.setattr(cs, "_fit_and_score", fake)
    rows = cs.run({"stride_kwargs": {}, "kinds": ["fact", "text"], "truth": None}, ["", "lr=0.01"], seeds=2)
    with np.load(cs.save_scores(rows, tmp_path / "sub" / "scores.npz")) as saved:
        assert list(saved["variants"]) == ["defaults", "lr=0.01"]
        assert saved["scores"].shape == (2, 2, 2, 3) and saved["scores"].dtype == np.float32
        np.testing.assert_array_equal(saved["scores"][:, :, 0, 0], [[0, 1], [10, 11]])
    with pytest.raises(ValueError, match="no two-seed ground truth.*drop two_seeds"):
        cs.load_bench("gate", two_seeds=True)
    with pytest.raises(SystemExit):
        cs.main(["--bench", "gate1", "--two-seeds"])
    calls = []
    monkeypatch.setattr("benchmarks.noise_ceiling.two_seed_truth", lambda setting, progress: calls.append("two") or "2")
    monkeypatch.setattr("benchmarks.setting.ground_truth", lambda setting, progress: calls.append("one") or "1")
    assert cs._truth(None, True) == "2" and cs._truth(None, False) == "1" and calls == ["two", "one"]
