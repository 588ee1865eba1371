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


# ---------------------------------------------------------------------- sparse scores
def _sparse_pair(q=6, n=80, per_row=5, seed=0):
    import numpy as np
    import scipy.sparse as sp

    rng = np.random.default_rng(seed)
    dense = np.zeros((q, n), np.float32)
    for i in range(q - 1):  # the last row stays all zero
        dense[i, rng.choice(n, per_row, replace=False)] = rng.normal(size=per_row)
    ids = [f"q{i}" for i in range(q)]
    return (Attribution(scores=sp.csr_matrix(dense), query_ids=ids, train_ids=list(range(n))),
            Attribution(scores=torch.from_numpy(dense), query_ids=ids, train_ids=list(range(n))))


def test_sparse_scores_behave_like_dense(tmp_path):
    import warnings

    sparse, dense = _sparse_pair()
    assert sparse.is_sparse and not dense.is_sparse
    assert sparse.shape == dense.shape and sparse.nnz == dense.nnz == 25
    assert torch.equal(sparse.scores, dense.scores)
    assert sparse.row_status() == dense.row_status() == ["ok"] * 5 + ["all_zero"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for opp in (False, True):
            assert sparse.top_k(3, opponents=opp).equals(dense.top_k(3, opponents=opp))
    for kw in ({"query": "q1"}, {"train": 7}, {"query": ["q2", "q0"], "train": [3, 4, 5]}, {"query": "q3", "train": 9},
               {"query": [], "train": [1]}):
        assert torch.equal(sparse.sel(**kw), dense.sel(**kw)), kw
    part = sparse[[4, 1]]
    assert part.is_sparse and torch.equal(part.scores, dense[[4, 1]].scores)
    joined = Attribution.cat([sparse[[0, 1, 2]], dense[[3, 4, 5]]])
    assert joined.is_sparse and torch.equal(joined.scores, dense.scores)
    sparse.save(tmp_path / "a.json")
    back = Attribution.load(tmp_path / "a.json")
    assert back.is_sparse and torch.equal(back.scores, dense.scores) and back.query_ids == dense.query_ids
    assert torch.equal(sparse.sparse_scores.to_dense(), dense.scores)
    assert torch.equal(dense.to_sparse().scores, dense.scores) and not sparse.to_dense().is_sparse
    from_torch = Attribution(scores=dense.scores.to_sparse(), query_ids=None, train_ids=None)
    assert from_torch.is_sparse and torch.equal(from_torch.scores, dense.scores)
    view = sparse.scores
    view[0, 0] = 123.0  # the dense view is a copy: the attribution is unchanged
    assert float(sparse.scores[0, 0]) != 123.0
    assert "top proponent" in repr(sparse)


def test_sparse_attribution_at_scale_never_builds_the_dense_matrix():
    """1000 queries x 200,000 documents (dense: 800 MB): ranking, indexing, health and joining
    work on the ~40 non-zeros per row."""
    import tracemalloc

    import numpy as np
    import scipy.sparse as sp

    q, n, per_row = 1000, 200_000, 40
    rng = np.random.default_rng(0)
    rows = np.repeat(np.arange(q), per_row)
    cols = rng.integers(0, n, size=q * per_row)
    matrix = sp.csr_matrix((rng.normal(size=q * per_row).astype(np.float32), (rows, cols)), shape=(q, n))
    tracemalloc.start()
    attr = Attribution(scores=matrix, query_ids=None, train_ids=None)
    table = attr.top_k(5, row=3)
    status = attr.row_status()
    part = attr[list(range(0, q, 2))]
    both = Attribution.cat([attr[[0, 1]], attr[[2, 3]]])
    block = attr.sel(query=[5, 6], train=list(range(100)))
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 60e6, f"peak {peak / 1e6:.0f} MB: something built the dense matrix"
    assert len(table) == 5 and status.count("ok") == q and part.n_queries == 500 and both.n_queries == 4
    assert block.shape == (2, 100)
    assert attr.nnz == matrix.nnz
