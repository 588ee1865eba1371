import pytest
import torch

from stride_nnsight.results import Attribution


def make(q=3, n=5):
    torch.manual_seed(0)
    return Attribution(
        scores=torch.randn(q, n),
        query_ids=[f"q{i}" for i in range(q)],
        train_ids=list(range(100, 100 + n)),
        query_texts=[f"query {i}" for i in range(q)],
        train_texts=[f"doc {j}" for j in range(n)],
        provenance={"method": "STRIDE", "layer": 1, "n_subsets": 8},
        measurements=torch.randn(q, 8),
    )


def test_shape_dtype_named():
    a = make()
    assert a.scores.dtype == torch.float32 and a.shape == (3, 5)
    assert a.dims == ("query", "train") and a.axis("train") == 1
    assert a.sel(query="q1", train=103) == a.scores[1, 3]
    torch.testing.assert_close(a.sel(train=[104, 100]), a.scores[:, [4, 0]])
    torch.testing.assert_close(a.sel(query=["q2"]), a.scores[[2]])
    torch.testing.assert_close(a.sel(query="q0"), a.scores[0])
    with pytest.raises(KeyError, match="no train"):
        a.sel(train=7)


def test_top_k_and_opponents():
    a = make()
    df = a.top_k(2, query="q1")
    best = torch.topk(a.scores[1], 2).indices.tolist()
    assert df["train_index"].tolist() == best
    assert df["train_id"].tolist() == [100 + j for j in best]
    assert df["score"].is_monotonic_decreasing
    worst = a.top_k(1, row=1, opponents=True)
    assert worst["train_index"].item() == int(torch.argmin(a.scores[1]))
    assert len(a.top_k(3)) == int((a.scores > 0).sum(1).clamp(max=3).sum())  # positive scores only
    with pytest.raises(ValueError):
        a.top_k(0)
    with pytest.raises(KeyError):
        a.top_k(1, query="nope")


def test_to_pandas():
    a = make()
    wide = a.to_pandas()
    assert wide.shape == (3, 5) and wide.loc["q2", 103] == pytest.approx(float(a.scores[2, 3]))
    long = a.to_pandas(long=True)
    assert len(long) == 15 and set(long.columns) == {"query", "train", "score"}


def test_indexing_cat_and_roundtrip(tmp_path):
    a = make()
    sub = a[1:]
    assert sub.query_ids == ["q1", "q2"] and torch.equal(sub.scores, a.scores[1:])
    both = Attribution.cat([a[:1], a[1:]])
    assert torch.equal(both.scores, a.scores) and both.query_ids == a.query_ids
    assert torch.equal(both.measurements, a.measurements)
    path = a.save(tmp_path / "attr.pt")
    back = Attribution.load(path)
    assert torch.equal(back.scores, a.scores) and back.provenance == a.provenance
    with pytest.raises(ValueError, match="different training sets"):
        Attribution.cat([a, Attribution(torch.zeros(1, 4), ["x"], [0, 1, 2, 3])])


def test_repr_mentions_provenance_and_top_doc():
    text = repr(make())
    assert "STRIDE" in text and "queries=3" in text and "top proponent" in text


def test_validation():
    with pytest.raises(ValueError, match="2-D"):
        Attribution(torch.zeros(3), [0, 1, 2], [0])
    with pytest.raises(ValueError, match="ids do not match"):
        Attribution(torch.zeros(2, 2), [0], [0, 1])
