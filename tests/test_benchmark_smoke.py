"""Smoke test of the public benchmark pipeline (``python -m benchmarks.run --quick``).

Runs the tiny configuration end to end (corpus, model, LDS retrains, every method but EK-FAC,
STRIDE ablations, lambda rules, report) in a temporary folder and checks that a RESULTS-style
report with finite numbers comes out. EK-FAC is left out to stay well under a minute; the full
benchmark runs it.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `benchmarks` lives next to the package, not inside it
    sys.path.insert(0, str(ROOT))

METHODS = ["random", "bm25", "bm25_completion", "representation", "gradient_dot", "gradient_cosine", "gradient_dot_store", "trak",
           "stride"]


def test_generated_fallback_corpus_is_valid():
    from benchmarks.setting import build_corpus, quick_config

    corpus = build_corpus(quick_config(text_source="generated"))
    assert corpus.text_source == "generated"
    cfg = quick_config()
    assert len(corpus.documents) == cfg.n_train
    assert len(corpus.query_indices("fact")) == cfg.n_fact_queries
    assert len(corpus.query_indices("text")) == cfg.n_text_queries
    for q in corpus.queries:
        if q.kind == "fact":
            assert len(q.relevant) == 2
            assert all(q.prompt + q.completion in corpus.documents[i] for i in q.relevant)
        else:  # held out: the full text is not a training document
            assert (q.prompt + q.completion) not in corpus.documents
    assert corpus.fingerprint() == build_corpus(quick_config(text_source="generated")).fingerprint()
    # the confirmation set: as many fresh queries of each kind, none repeating a main query
    fresh = corpus.confirm_queries
    assert [q.kind for q in fresh] == [q.kind for q in corpus.queries]
    assert not {(q.prompt, q.completion) for q in fresh} & {(q.prompt, q.completion) for q in corpus.queries}
    assert not {q.relevant for q in fresh if q.kind == "fact"} & {q.relevant for q in corpus.queries}
    for q in fresh:
        if q.kind == "fact":
            assert all(q.prompt + q.completion in corpus.documents[i] for i in q.relevant)
        else:
            assert not any(q.completion.strip() in d for d in corpus.documents)


def test_quick_benchmark_end_to_end(tmp_path, capsys):
    pytest.importorskip("rank_bm25")
    from benchmarks.run import main

    out = tmp_path / "RESULTS.md"
    cache = tmp_path / "cache"
    assert main(["--quick", "--cache-dir", str(cache), "--out", str(out), "--methods", ",".join(METHODS),
                 "--no-single"]) == 0
    text = out.read_text()
    for heading in ("## Setting", "## Methods", "## Costs, like for like", "## Targets",
                    "## Confirmation on fresh queries",
                    "## STRIDE ablations", "## Run"):
        assert heading in text
    assert "QUICK smoke configuration" in text

    summary = json.loads((cache / "last_summary.json").read_text())
    assert set(summary["methods"]) == set(METHODS)
    for name, m in summary["methods"].items():
        for key in ("lds", "lds_fact", "lds_text", "recall@10", "mrr", "per_query_s"):
            assert math.isfinite(m[key]), (name, key, m[key])
        assert -1.0 <= m["lds"] <= 1.0
        lo, hi = m["lds_ci"]
        assert lo <= m["lds"] + 1e-9 and m["lds"] <= hi + 1e-9
    # the planted sources are lexically unmistakable: BM25 must find them
    assert summary["methods"]["bm25"]["recall@10"] > 0.5
    assert summary["methods"]["bm25_completion"]["recall@10"] > 0.5
    stride = summary["methods"]["stride"]
    assert stride["state_bytes"] > 0 and stride["index_s"] > 0
    assert summary["ablations"] and all(math.isfinite(v["lds"]) for v in summary["ablations"].values())
    assert {"placement", "steps"} <= {k.split("=")[0] for k in summary["ablations"]}
    assert summary["lambda"] and all(math.isfinite(v["lds"]) for v in summary["lambda"].values())
    # confirmation: every method again on the fresh queries, ground truth from the same retrains
    assert set(summary["confirmation"]) == set(METHODS)
    assert all(math.isfinite(m["lds"]) and math.isfinite(m["per_query_s"]) for m in summary["confirmation"].values())
    assert summary["confirmation_retrain_diff"] is not None and summary["confirmation_retrain_diff"] < 1e-3

    # a second run reuses every cached stage
    capsys.readouterr()
    assert main(["--quick", "--cache-dir", str(cache), "--out", str(out), "--methods", "bm25,stride",
                 "--no-single", "--skip-ablations"]) == 0
    log = capsys.readouterr().out
    assert "loaded the trained model" in log and "(6 cached, 0 to train" in log
    assert "bm25: cached" in log and "stride: cached" in log


def test_noise_ceiling_reuses_seed_zero_and_reports_both_cis(tmp_path, capsys):
    """benchmarks.noise_ceiling --quick: trains only the second seed, reports rho and STRIDE's CIs."""
    import os

    import numpy as np

    from benchmarks.noise_ceiling import main as ceiling
    from benchmarks.setting import build_setting, ground_truth, ground_truth_folder, quick_config

    cache = tmp_path / "cache"
    setting = build_setting(quick_config(), cache_dir=cache, log=lambda m: None)
    ground_truth(setting, progress=False)
    assert ceiling(["--quick", "--cache-dir", str(cache), "--stride"]) == 0
    text = capsys.readouterr().out
    assert "seed-to-seed rho" in text and "queries and retrained models resampled" in text
    assert "Shared retrain factor" in text and "| BM25, completion only | seed 0" in text
    single = ground_truth_folder(setting)
    pairs = sorted((single.parent / f"{single.name}-seeds2").glob("retrain_*_s0.npz"))
    assert len(pairs) == setting.config.n_models
    assert all(os.path.samefile(p, single / p.name) for p in pairs)  # seed 0 reused, not retrained
    assert len(list((single.parent / f"{single.name}-seeds2").glob("retrain_*_s1.npz"))) == setting.config.n_models

    # more subsets: the first n_models (both seeds) are linked from the two-seed cache, only new ones train
    from benchmarks.noise_ceiling import two_seed_truth

    n = setting.config.n_models
    two = two_seed_truth(setting, progress=False)
    more = two_seed_truth(setting, progress=False, n_models=n + 1)
    assert more.masks.shape[0] == n + 1 and more.losses.shape[:2] == (n + 1, 2)
    np.testing.assert_array_equal(more.masks[:n], two.masks)
    np.testing.assert_array_equal(more.losses[:n], two.losses)
    folder = ground_truth_folder(setting, n + 1)
    folder = folder.parent / f"{folder.name}-seeds2"
    assert folder.name == single.name.replace(f"-m{n}-", f"-m{n + 1}-", 1) + "-seeds2"
    assert all(os.path.samefile(folder / p.name, single / p.name) for p in pairs)
    with pytest.raises(ValueError, match="below the benchmark"):
        two_seed_truth(setting, progress=False, n_models=n - 1)


def test_shared_factor_finds_a_factor_common_to_every_query():
    """benchmarks.noise_ceiling.shared_factor: a factor shared by all queries takes most of the
    variance and is recovered (up to sign); independent noise spreads the variance."""
    import numpy as np

    from benchmarks.noise_ceiling import shared_factor

    rng = np.random.default_rng(0)
    common = rng.normal(size=40)
    losses = 3.0 * common[:, None] + 0.5 * rng.normal(size=(40, 12)) + rng.normal(size=12)
    share, scores = shared_factor(losses)
    assert share > 0.8 and abs(np.corrcoef(scores, common)[0, 1]) > 0.95
    share_noise, _ = shared_factor(rng.normal(size=(40, 12)))
    assert share_noise < 0.3


@pytest.fixture(scope="module")
def quick_cache(tmp_path_factory):
    """One cache folder for the quick setting's model, shared by the tests below."""
    return tmp_path_factory.mktemp("quick-bench-cache")


def test_subset_length_mean_correlation_reads_each_row_against_the_signal():
    """benchmarks.subset_length.mean_correlation: the mean over rows of each row's Pearson
    correlation with the signal (a row following it: +1, against it: -1, unrelated: about 0)."""
    import numpy as np

    from benchmarks.subset_length import mean_correlation

    rng = np.random.default_rng(0)
    signal = rng.normal(size=200)
    rows = np.stack([2.0 * signal + 1.0, -signal, rng.normal(size=200)])
    assert mean_correlation(rows[:1], signal) == pytest.approx(1.0)
    assert mean_correlation(rows[1:2], signal) == pytest.approx(-1.0)
    assert abs(mean_correlation(rows[2:], signal)) < 0.2
    expected = np.mean([np.corrcoef(r, signal)[0, 1] for r in rows])
    assert mean_correlation(rows, signal) == pytest.approx(expected)


def test_data_selection_quick_and_its_paired_interval(quick_cache, capsys):
    """benchmarks.data_selection --quick: every method retrained, a report with paired CIs; the
    interval resamples seeds and queries and contains the mean."""
    import numpy as np

    from benchmarks.data_selection import main as selection
    from benchmarks.data_selection import paired_difference

    a = np.array([[1.0, 2.0, 3.0], [2.0, 3.0, 4.0]])
    m, lo, hi = paired_difference(a, a - 0.5)
    assert m == pytest.approx(0.5) and lo == pytest.approx(0.5) and hi == pytest.approx(0.5)
    m, lo, hi = paired_difference(a, np.zeros_like(a))
    assert m == pytest.approx(2.5) and 1.0 <= lo < m < hi <= 4.0
    with pytest.raises(ValueError, match="seeds, queries"):
        paired_difference(a[0], a[0])

    report = selection(["--quick", "--seeds", "1", "--methods", "random,STRIDE,BM25",
                        "--cache-dir", str(quick_cache)])
    for name in ("| random |", "| STRIDE |", "| BM25 |", "| STRIDE | random |", "| STRIDE | BM25 |"):
        assert name in report
    assert "nan" not in report
    # retrains are cached by (selection, seed): a second run trains nothing
    capsys.readouterr()
    selection(["--quick", "--seeds", "1", "--methods", "random,BM25", "--cache-dir", str(quick_cache)])
    assert len(list(quick_cache.glob("data-selection-*/sel-*.npz"))) == 3


def test_contamination_corpus_and_quick_run(quick_cache):
    """benchmarks.contamination: the corpus keeps, paraphrases or removes each fact by group, and
    the quick run scores every method."""
    from benchmarks.contamination import GROUPS, contaminated_corpus
    from benchmarks.contamination import main as contamination
    from benchmarks.setting import build_setting, quick_config

    setting = build_setting(quick_config(), cache_dir=quick_cache, log=lambda m: None)
    docs, items = contaminated_corpus(setting)
    assert len(docs) == len(setting.documents) and {i["group"] for i in items} == set(GROUPS)
    for item in items:
        stated, answer = item["prompt"] + item["completion"], item["completion"].strip()
        assert any(stated in d for d in docs) == (item["group"] == "verbatim")
        assert any(answer in d for d in docs) == (item["group"] != "absent")
    changed = sum(a != b for a, b in zip(docs, setting.documents))
    assert changed == 2 * sum(i["group"] != "verbatim" for i in items)

    report = contamination(["--quick", "--cache-dir", str(quick_cache)])
    for name in ("STRIDE", "loss", "Min-K%", "zlib", "BM25"):
        assert f"| {name}" in report


def test_ekfac_query_batch_on_the_public_benchmark(quick_cache):
    """benchmarks.ekfac_query_batch --public: EK-FAC timed with query batches of 8 and in one batch on
    the public recipe's main and confirmation queries; the scores do not depend on the batch."""
    from benchmarks.ekfac_query_batch import main as query_batch

    assert query_batch(["--quick", "--public", "--cache-dir", str(quick_cache)]) == 0
    text = (quick_cache / "RESULTS-ekfac-query-batch-public.md").read_text()
    assert "The public benchmark's model" in text and "--public" in text
    rows = [ln.split(" | ") for ln in text.splitlines()
            if ln.startswith("| main queries |") or ln.startswith("| confirmation queries |")]
    assert len(rows) == 2 and all(float(r[2]) > 0 and float(r[3]) > 0 for r in rows)
    assert all(float(r[6].split(" ")[0]) <= 1e-3 * float(r[6].split("max ")[1].rstrip(")")) for r in rows)


def test_auroc_bootstrap_matches_sklearn_per_resample():
    """The vectorised AUROC bootstrap gives what a loop of `roc_auc_score` over the same stratified
    resamples gives (ties included), so the contamination report's CIs keep their meaning."""
    import numpy as np
    from sklearn.metrics import roc_auc_score

    from benchmarks.contamination import auroc_ci, paired_auroc_difference

    rng = np.random.default_rng(3)
    labels = (rng.random(40) < 0.4).astype(int)
    a, b = np.round(rng.normal(size=40) + labels, 1), np.round(rng.normal(size=40), 1)  # rounded: ties
    pos, neg = np.flatnonzero(labels == 1), np.flatnonzero(labels == 0)
    draws, boot = np.random.default_rng(5), []
    for _ in range(50):
        idx = np.concatenate([draws.choice(pos, len(pos)), draws.choice(neg, len(neg))])
        boot.append((roc_auc_score(labels[idx], a[idx]), roc_auc_score(labels[idx], b[idx])))
    boot = np.asarray(boot)
    auc, lo, hi = auroc_ci(labels, a, n_boot=50, seed=5)
    assert np.allclose([auc, lo, hi], [roc_auc_score(labels, a), *np.quantile(boot[:, 0], [0.025, 0.975])])
    d, lo, hi = paired_auroc_difference(labels, a, b, n_boot=50, seed=5)
    point = roc_auc_score(labels, a) - roc_auc_score(labels, b)
    assert np.allclose([d, lo, hi], [point, *np.quantile(boot[:, 0] - boot[:, 1], [0.025, 0.975])])


def test_ekfac_damping_dev_split_alternates_within_each_kind():
    import numpy as np

    from benchmarks.ekfac_damping import GRID, dev_split

    kinds = np.array(["fact", "fact", "text", "fact", "text", "text", "fact"])
    dev = dev_split(kinds)
    assert dev.tolist() == [True, False, True, True, False, True, False]
    assert None in GRID and len(set(GRID)) == len(GRID)


def test_ekfac_factor_bytes_counts_the_output_head_only_when_tracked(tiny_hf_model):
    from benchmarks.methods import _ekfac_factor_bytes

    head = tiny_hf_model.get_output_embeddings()
    o, i = head.weight.shape
    i += 1 if head.bias is not None else 0
    without, with_head = _ekfac_factor_bytes(tiny_hf_model), _ekfac_factor_bytes(tiny_hf_model, head=True)
    assert with_head - without == 4 * (i * i + o * o + i * o + i + o) and without > 0
