"""Downstream uses: data selection and contamination scores (stride_nnsight/apps.py)."""

import pytest
import torch

from stride_nnsight import Attribution
from stride_nnsight.apps import contamination_scores, select_documents


def _attr(floor=None):
    scores = torch.tensor([[0.9, 0.0, 0.2, -0.5, 0.0, 0.0],
                           [0.0, 0.3, 0.25, 0.0, 0.0, -0.1]])
    prov = {} if floor is None else {"noise_floor": floor}
    return Attribution(scores=scores, query_ids=["a", "b"], train_ids=list("uvwxyz"), provenance=prov)


def test_selection_rules_pick_the_proponents():
    attr = _attr()
    assert select_documents(attr, 3, "total").tolist() == [0, 2, 1]       # 0.9 > 0.45 > 0.3
    assert select_documents(attr, 3, "per_query").tolist() == [0, 1, 2]   # a's best, b's best, a's next
    assert select_documents(attr, 5, "per_query").tolist() == [0, 1, 2, 3, 4]  # proponents, then corpus order
    # mean ranks: u (1, 4) 2.5, v (4, 1) 2.5, w (2, 2) 2.0, the rest >= 4; ties keep corpus order
    assert select_documents(attr, 0.5, "mean_rank").tolist() == [2, 0, 1]
    assert sorted(select_documents(attr, 6, "total").tolist()) == list(range(6))  # no repeats
    with pytest.raises(ValueError, match="unknown selection rule"):
        select_documents(attr, 2, "best")
    with pytest.raises(ValueError, match="between 1 and"):
        select_documents(attr, 7)
    with pytest.raises(ValueError, match="non-finite"):
        select_documents(Attribution(scores=torch.tensor([[float("nan"), 1.0]]), query_ids=None, train_ids=None), 1)


def test_contamination_scores_are_top_score_over_noise_floor():
    attr = _attr(floor=[0.3, 0.5])
    assert contamination_scores(attr).tolist() == pytest.approx([3.0, 0.6])
    assert contamination_scores(_attr(), floor=torch.tensor([0.9, 0.0])).tolist() == [1.0, float("inf")]
    with pytest.raises(ValueError, match="noise floor"):
        contamination_scores(_attr())


def test_contamination_toy_benchmark_runs(toy, toy_cache_dir, monkeypatch, capsys):
    """The smoke-scale contamination check prints an AUROC per method (values are measured, not asserted)."""
    import sys
    from pathlib import Path

    root = str(Path(__file__).resolve().parents[1])
    if root not in sys.path:
        sys.path.insert(0, root)
    from benchmarks.contamination_toy import main

    monkeypatch.setenv("STRIDE_NNSIGHT_CACHE", str(toy_cache_dir))
    out = main()
    assert len(out) == 3 and all(0.0 <= auc <= 1.0 and 0.0 <= tpr <= 1.0 for auc, tpr in out.values())
    assert "TPR at 5% FPR" in capsys.readouterr().out
