"""Reliability catalogue for ``Attribution`` (issue 10 item 9): results that look real but are not.

Each case feeds one input that the old code turned into a plausible-looking but wrong
result and asserts the exact outcome now (values, or exception type + message).
"""

import warnings

import numpy as np
import pytest
import torch

from stride_nnsight.results import Attribution

FIT = {"method": "STRIDE", "model_fingerprint": "abc", "layer": 1, "hook": "blocks.1.hook_resid_post",
       "placement": "logits", "n_subsets": 16, "subsets_per_example": 2, "rank": 4, "seed": 0,
       "design_seed": 0, "steps": 6, "settings": {"lr": 0.1, "n_subsets": 16},
       "metric": "negative_completion_loss", "patched": False}


def attr_of(scores, query_ids=None, train_ids=None, **prov):
    scores = torch.as_tensor(scores, dtype=torch.float32)
    q, n = scores.shape
    return Attribution(scores, [f"q{i}" for i in range(q)] if query_ids is None else query_ids,
                       list(range(100, 100 + n)) if train_ids is None else train_ids,
                       provenance=dict(FIT, **prov))


# ---------------------------------------------------------------- zero scores
def test_all_zero_row_gives_no_rows_and_one_warning_naming_it():
    a = attr_of([[0.5, -0.2, 0.0], [0.0, 0.0, 0.0], [0.1, 0.3, 0.0], [0.0, 0.0, 0.0]])
    with pytest.warns(UserWarning) as caught:
        df = a.top_k(2)
    assert [str(w.message) for w in caught] == ["2 of 4 queries have no non-zero score (no signal): q1, q3"]
    assert df["query_id"].tolist() == ["q0", "q2", "q2"]
    assert df["train_index"].tolist() == [0, 1, 0]


def test_all_zero_single_query_returns_empty_table_with_columns():
    a = attr_of([[0.0, 0.0]])
    with pytest.warns(UserWarning, match=r"^1 of 1 queries have no non-zero score \(no signal\): q0$"):
        df = a.top_k(5, row=0)
    assert len(df) == 0
    assert list(df.columns) == ["query_id", "rank", "train_index", "train_id", "score"]


def test_zero_scores_are_never_proponents_or_opponents():
    a = attr_of([[2.0, 0.0, -1.0, 0.0, 0.5]])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a row with some signal warns about nothing
        pro = a.top_k(4)
        con = a.top_k(4, opponents=True)
    assert pro["train_index"].tolist() == [0, 4] and pro["score"].tolist() == [2.0, 0.5]
    assert pro["rank"].tolist() == [1, 2]
    assert con["train_index"].tolist() == [2] and con["score"].tolist() == [-1.0]


def test_repr_has_no_top_proponent_for_all_zero_or_all_negative_row():
    text = repr(attr_of([[0.0, 0.0], [-1.0, -2.0], [0.0, 3.0]]))
    lines = text.splitlines()
    assert lines[1] == "  [0] 'q0' <- no non-zero score (no signal)"
    assert lines[2] == "  [1] 'q1' <- no proponent (no positive score)"
    assert lines[3] == "  [2] 'q2' <- top proponent 101 (+3.0000) '101'"
    assert lines[4] == "  warning: 1 of 3 queries have no non-zero score"
    assert text.count("top proponent") == 1


# ----------------------------------------------------------- non-finite scores
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_row_is_never_ranked(bad):
    a = attr_of([[0.5, 0.1], [bad, 0.2]])
    with pytest.raises(ValueError, match=r"1 of 2 queries have non-finite scores \(NaN/inf\): q1; "
                                         r"their attribution is invalid"):
        a.top_k(1)
    with pytest.raises(ValueError, match="non-finite"):
        a.top_k(1, query="q1", opponents=True)
    assert a.top_k(1, query="q0")["train_index"].tolist() == [0]  # the valid row still ranks


def test_repr_flags_non_finite_row():
    lines = repr(attr_of([[float("nan"), 1.0], [1.0, 0.0]])).splitlines()
    assert lines[1] == "  [0] 'q0' <- NON-FINITE scores (NaN/inf): attribution invalid"
    assert lines[-1] == "  warning: 1 of 2 queries have NON-FINITE scores (invalid)"


def test_row_status_flags_every_row():
    a = attr_of([[1.0, 0.0], [0.0, 0.0], [float("nan"), 0.0], [0.0, float("inf")], [-1.0, 0.0]])
    assert a.row_status() == ["ok", "all_zero", "non_finite", "non_finite", "ok"]
    keep = [i for i, s in enumerate(a.row_status()) if s != "non_finite"]
    assert a[keep].query_ids == ["q0", "q1", "q4"]


# --------------------------------------------------------- positions vs ids
def test_query_means_id_and_row_means_position():
    a = attr_of([[1.0, 0.0], [0.0, 2.0], [3.0, 0.0]], query_ids=[10, 0, 7])
    assert a.top_k(1, query=0)["query_id"].tolist() == [0]          # the id 0 (row 1)
    assert a.top_k(1, row=0)["query_id"].tolist() == [10]           # the row 0
    assert a.top_k(1, row=-1)["query_id"].tolist() == [7]
    assert a.top_k(1, row=np.int64(1))["train_index"].tolist() == [1]
    assert a.query_index(7) == 2 and a.query_index(np.int64(0)) == 1


def test_integer_query_on_string_ids_is_not_a_position():
    a = attr_of([[1.0, 0.0], [0.0, 2.0]])
    with pytest.raises(KeyError, match=r"no query with id 0 \(0 is looked up as an id; for the query at row 0 "
                                       r"use top_k\(row=0\)"):
        a.top_k(1, query=0)
    with pytest.raises(KeyError, match="no query with id 1"):
        a.query_index(1)


def test_query_and_row_together_or_positional_query_refused():
    a = attr_of([[1.0, 0.0]])
    with pytest.raises(TypeError, match=r"either query= \(a query id\) or row= \(a row position\), not both"):
        a.top_k(1, query="q0", row=0)
    with pytest.raises(TypeError):
        a.top_k(1, "q0")  # query is keyword-only now
    with pytest.raises(IndexError, match="row 1 out of range for 1 queries"):
        a.top_k(1, row=1)


# -------------------------------------------------------------- integer types
def test_numpy_integers_accepted_bools_refused():
    a = attr_of([[3.0, 2.0, 1.0], [1.0, 2.0, 3.0]])
    assert a.top_k(np.int64(2), row=np.int32(0))["train_index"].tolist() == [0, 1]
    assert a[np.int64(1)].query_ids == ["q1"]
    assert a[np.array([1, 0])].query_ids == ["q1", "q0"]
    assert a[torch.tensor([-1])].query_ids == ["q1"]
    with pytest.raises(TypeError, match="k must be an integer, got the bool True"):
        a.top_k(True)
    with pytest.raises(TypeError, match="k must be an integer"):
        a.top_k(2.0)
    with pytest.raises(TypeError, match="row must be an integer, got the bool True"):
        a[True]
    with pytest.raises(TypeError, match="row must be an integer, got the bool"):
        a[[True, False]]
    with pytest.raises(TypeError, match=r"to select a query by its id use attr.query_index"):
        a["q1"]
    with pytest.raises(ValueError, match="k must be a positive int, got 0"):
        a.top_k(np.int64(0))


def test_numpy_ids_are_stored_as_python_and_sel_accepts_numpy():
    a = Attribution(torch.arange(6.0).reshape(2, 3), np.array([5, 6]), np.arange(100, 103))
    assert a.query_ids == [5, 6] and all(type(i) is int for i in a.query_ids + a.train_ids)
    assert float(a.sel(query=np.int64(6), train=np.int64(101))) == 4.0
    torch.testing.assert_close(a.sel(train=np.array([102, 100])), torch.tensor([[2.0, 0.0], [5.0, 3.0]]))


# ----------------------------------------------------------------- duplicates
def test_duplicate_query_ids_refused():
    with pytest.raises(ValueError, match=r"query_ids must be unique, but 'a' appears twice \(rows 0 and 2\); "
                                         r"give every query a distinct id"):
        Attribution(torch.zeros(3, 2), ["a", "b", "a"], [0, 1])


def test_duplicate_train_ids_refused():
    with pytest.raises(ValueError, match=r"train_ids must be unique, but 7 appears twice \(columns 1 and 2\); "
                                         r"give every training example a distinct id"):
        Attribution(torch.zeros(1, 3), ["a"], [1, 7, 7])


def test_selecting_a_row_twice_refused():
    a = attr_of([[1.0], [2.0]])
    with pytest.raises(ValueError, match="row 0 is selected twice"):
        a[[0, -2]]


# ------------------------------------------------------------------------ cat
@pytest.mark.parametrize("key, value, shown", [
    ("n_subsets", 32, "provenance['n_subsets'] is 16 in part 0 but 32 in part 1"),
    ("model_fingerprint", "zzz", "provenance['model_fingerprint'] is 'abc' in part 0 but 'zzz' in part 1"),
    ("hook", "blocks.0.hook_resid_post", "provenance['hook'] is 'blocks.1.hook_resid_post' in part 0"),
    ("steps", 12, "provenance['steps'] is 6 in part 0 but 12 in part 1"),
    ("settings", {"lr": 0.2, "n_subsets": 16}, "provenance['settings']['lr'] is 0.1 in part 0 but 0.2 in part 1"),
])
def test_cat_refuses_parts_of_different_fits(key, value, shown):
    a = attr_of([[1.0, 0.0]])
    b = attr_of([[0.0, 1.0]], query_ids=["other"], **{key: value})
    with pytest.raises(ValueError, match="cannot concatenate attributions from different fits: ") as err:
        Attribution.cat([a, b])
    assert shown in str(err.value)


def test_cat_refuses_a_part_missing_a_fit_key():
    a = attr_of([[1.0, 0.0]])
    b = attr_of([[0.0, 1.0]], query_ids=["other"])
    del b.provenance["rank"]
    with pytest.raises(ValueError, match=r"provenance\['rank'\] is 4 in part 0 but <missing> in part 1"):
        Attribution.cat([a, b])


def test_cat_refuses_different_metrics():
    a = attr_of([[1.0, 0.0]])
    b = attr_of([[0.0, 1.0]], query_ids=["other"], metric="logit_diff")
    with pytest.raises(ValueError, match="from different metrics: provenance\\['metric'\\]"):
        Attribution.cat([a, b, a])


def test_cat_refuses_the_same_query_twice():
    a = attr_of([[1.0, 0.0], [0.0, 1.0]])
    with pytest.raises(ValueError, match=r"query id 'q1' is in part 0 and part 1: each query can appear once"):
        Attribution.cat([a, a[1:]])


def test_cat_joins_lambda_settings_of_one_fit_per_row():
    a = attr_of([[1.0, 0.0], [0.0, 1.0]], lambda_rule="fraction", lambdas=[0.1, 0.2], base_metric=[-1.0, -2.0])
    b = attr_of([[2.0, 0.0]], query_ids=["x"], lambda_rule="cv", lambdas=[0.3], base_metric=[-3.0])
    both = Attribution.cat([a, b])
    assert both.query_ids == ["q0", "q1", "x"]
    assert both.provenance["lambdas"] == [0.1, 0.2, 0.3]
    assert both.provenance["base_metric"] == [-1.0, -2.0, -3.0]
    assert both.provenance["lambda_rule"] == ["fraction", "fraction", "cv"]
    assert both.provenance["n_subsets"] == 16 and both.provenance["settings"] == FIT["settings"]


def test_cat_of_two_stride_fits_is_refused_and_one_fit_is_joined(tiny_model, small_texts):
    from stride_nnsight import Stride

    def fitted(seed):
        stride = Stride(tiny_model, layer=1, n_subsets=16, subsets_per_example=2, rank=4, steps=6,
                        batch_size=8, seed=seed)
        stride.fit(small_texts[:24], progress=False)
        return stride

    first, second = fitted(0), fitted(1)
    a = first.attribute(["the cat"], [" sat"], query_ids=["a"], progress=False)
    b = first.attribute(["a dog"], [" ran"], query_ids=["b"], lambda_rule="cv", progress=False)
    c = second.attribute(["a dog"], [" ran"], query_ids=["c"], progress=False)
    joined = Attribution.cat([a, b])
    assert joined.query_ids == ["a", "b"] and joined.provenance["lambda_rule"] == ["fraction", "cv"]
    with pytest.raises(ValueError, match=r"different fits: provenance\['seed'\] is 0 in part 0 but 1 in part 1"):
        Attribution.cat([a, c])


def test_duplicate_ids_refused_before_any_work(tiny_model, small_texts, monkeypatch):
    from stride_nnsight import Stride
    from stride_nnsight import stride as stride_module

    s = Stride(tiny_model, layer=1, n_subsets=8, subsets_per_example=2, rank=2, steps=2, batch_size=4, seed=0)
    with pytest.raises(ValueError, match=r"train_ids must be unique, but 'a' appears twice \(positions 0 and 2\)"):
        s.fit(small_texts[:4], train_ids=["a", "b", "a", "c"], progress=False)
    assert s.train_texts is None  # nothing was set
    s.fit(small_texts[:8], progress=False)
    monkeypatch.setattr(stride_module, "measure", lambda *a, **k: pytest.fail("measured despite duplicate ids"))
    with pytest.raises(ValueError, match="query_ids must be unique"):
        s.attribute(["the cat", "a dog"], [" sat.", " ran."], query_ids=[7, 7], progress=False)
