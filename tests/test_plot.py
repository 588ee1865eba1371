"""Plots of an Attribution (stride_nnsight/plot.py), checked by the values drawn (Agg backend)."""

import sys

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from stride_nnsight import Attribution

matplotlib = pytest.importorskip("matplotlib")
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from stride_nnsight import plot  # noqa: E402


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def _matrix():
    rng = np.random.default_rng(0)
    m = rng.normal(size=(3, 60)) * (rng.random((3, 60)) < 0.3)
    m[1] = 0.0
    m[1, [3, 10, 11, 20, 41, 59]] = [0.9, -0.7, 0.9, 0.2, -0.05, 0.3]  # known values, a tie
    m[2] = 0.0  # an all-zero query
    return m.astype(np.float32)


def _attr(sparse, floor=(0.4, 0.25, None)):
    m = _matrix()
    return Attribution(scores=sp.csr_matrix(m) if sparse else torch.from_numpy(m), query_ids=["qa", 7, "qc"],
                       train_ids=[f"d{j}" for j in range(m.shape[1])],
                       query_texts=["The capital of Veldoria is Quarnith", "b", "c"],
                       provenance={"metric": "negative_completion_loss",
                                   **({"noise_floor": list(floor)} if floor is not None else {})})


def _lines(ax, gid):
    return [line for line in ax.get_lines() if line.get_gid() == gid]


@pytest.mark.parametrize("sparse", [False, True])
def test_distribution_counts_every_nonzero_score_and_marks_the_floor(sparse):
    attr = _attr(sparse)
    assert attr.is_sparse == sparse
    m = _matrix()
    for q in range(2):
        ax = plot.plot_distribution(attr, q)
        heights = [bar.get_height() for bar in ax.containers[0]]
        assert sum(heights) == np.count_nonzero(m[q]) > 0  # zeros are left out, every non-zero counted
        edges = [bar.get_x() for bar in ax.containers[0]]
        assert min(edges) <= m[q][m[q] != 0].min() and max(edges) + ax.containers[0][-1].get_width() >= m[q].max()
        floor = float(attr.noise_floor[q])
        xs = sorted(line.get_xdata()[0] for line in _lines(ax, "noise_floor"))
        assert xs == pytest.approx([-floor, floor])
        assert "negative_completion_loss" in ax.get_xlabel()
        assert f"{np.count_nonzero(m[q])} of 60" in ax.get_title()


def test_distribution_without_floor_all_zero_and_log():
    ax = plot.plot_distribution(_attr(False, floor=None), 0, log=True)
    assert _lines(ax, "noise_floor") == [] and ax.get_yscale() == "log"
    ax = plot.plot_distribution(_attr(True), 2)  # all zero; its floor is None (unknown): no lines
    assert sum(bar.get_height() for bar in ax.containers[0]) == 0 and _lines(ax, "noise_floor") == []
    assert any(t.get_text() == "no non-zero score" for t in ax.texts)


@pytest.mark.parametrize("sparse", [False, True])
def test_rank_lines_are_the_sorted_scores(sparse):
    attr = _attr(sparse)
    m = _matrix()
    for q in range(2):
        row = m[q].astype(np.float64)
        ax = plot.plot_rank(attr, q)
        (pro,), (opp,) = _lines(ax, "proponents"), _lines(ax, "opponents")
        expected_pro = np.sort(row[row > 0])[::-1]
        expected_opp = np.sort(row[row < 0])
        np.testing.assert_allclose(pro.get_ydata(), expected_pro, rtol=1e-6)
        np.testing.assert_allclose(opp.get_ydata(), expected_opp, rtol=1e-6)
        assert list(pro.get_xdata()) == list(range(1, len(expected_pro) + 1))
        assert list(opp.get_xdata()) == list(range(1, len(expected_opp) + 1))
        (band,) = [p for p in ax.patches if p.get_gid() == "noise_floor"]
        ys = band.get_path().transformed(band.get_patch_transform()).vertices[:, 1]  # data units
        assert (ys.min(), ys.max()) == pytest.approx((-float(attr.noise_floor[q]), float(attr.noise_floor[q])))
    # at most k=3 of each side (the tie kept; only two opponents exist)
    ax = plot.plot_rank(attr, 1, k=3, log_x=True)
    assert list(_lines(ax, "proponents")[0].get_ydata()) == pytest.approx([0.9, 0.9, 0.3])
    assert list(_lines(ax, "opponents")[0].get_ydata()) == pytest.approx([-0.7, -0.05])
    assert ax.get_xscale() == "log"


def test_rank_of_several_queries_and_the_all_zero_one():
    attr = _attr(True)
    ax = plot.plot_rank(attr, [0, 1, 2])
    pros = _lines(ax, "proponents")
    assert len(pros) == 3 and len(_lines(ax, "opponents")) == 3
    assert len(pros[2].get_ydata()) == 0  # the all-zero query: nothing ranked
    assert len([p for p in ax.patches if p.get_gid() == "noise_floor"]) == 2  # its floor is unknown
    by_id = plot.plot_rank(attr, queries=["qa", 7, "qc"])
    for a, b in zip(pros, _lines(by_id, "proponents")):
        np.testing.assert_array_equal(a.get_ydata(), b.get_ydata())
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend == ["query qa", "query 7", "query qc"]


@pytest.mark.parametrize("sparse", [False, True])
def test_query_by_id_and_by_row_give_the_same_plot(sparse):
    attr = _attr(sparse)
    for row, qid in ((0, "qa"), (1, 7), (-2, 7)):
        a = plot.plot_distribution(attr, row)
        b = plot.plot_distribution(attr, query=qid)
        assert [p.get_height() for p in a.containers[0]] == [p.get_height() for p in b.containers[0]]
        np.testing.assert_array_equal(_lines(plot.plot_rank(attr, row), "proponents")[0].get_ydata(),
                                      _lines(plot.plot_rank(attr, queries=qid), "proponents")[0].get_ydata())
    fig_row, fig_id = plot.plot_attribution(attr, 1), attr.plot(query=7)
    for ax_row, ax_id in zip(fig_row.axes, fig_id.axes):
        assert ax_row.get_title() == ax_id.get_title()
        for x, y in zip(ax_row.get_lines(), ax_id.get_lines()):
            np.testing.assert_array_equal(x.get_ydata(), y.get_ydata())


def test_plot_attribution_has_both_panels_and_draws():
    attr = _attr(True)
    fig = plot.plot_attribution(attr, query="qa", k=5)
    hist, rank = fig.axes
    assert sum(b.get_height() for b in hist.containers[0]) == np.count_nonzero(_matrix()[0])
    assert len(_lines(rank, "proponents")[0].get_ydata()) == 5
    assert "Veldoria" in fig.get_suptitle() and "query qa" in fig.get_suptitle()
    fig.canvas.draw()  # lays out and renders without error
    given = plt.subplots()[1]
    assert plot.plot_distribution(attr, 0, ax=given) is given and plot.plot_rank(attr, 0, ax=given) is given


def test_bad_queries_give_clear_errors():
    attr = _attr(False)
    with pytest.raises(KeyError, match="no query with id 'nope'.*query= takes a query id, row= a row position"):
        plot.plot_distribution(attr, query="nope")
    with pytest.raises(KeyError, match="no query with id 1"):  # 1 is a position, not an id
        plot.plot_rank(attr, queries=[1])
    with pytest.raises(IndexError, match="row 3 out of range for 3 queries"):
        plot.plot_attribution(attr, 3)
    with pytest.raises(TypeError, match="rows are selected by position"):
        plot.plot_distribution(attr, "qa")
    with pytest.raises(TypeError, match="not both"):
        plot.plot_distribution(attr, 0, query="qa")
    with pytest.raises(TypeError, match="not both"):
        plot.plot_rank(attr, [0], queries=["qa"])
    with pytest.raises(ValueError, match="k must be a positive int"):
        plot.plot_rank(attr, 0, k=0)
    bad = _attr(True)
    bad.scores = torch.tensor(np.where(np.arange(60) == 4, np.nan, _matrix()), dtype=torch.float32)
    with pytest.raises(ValueError, match="non-finite"):
        plot.plot_distribution(bad, 1)
    with pytest.raises(ValueError, match="non-finite"):
        plot.plot_rank(bad, [0])


def test_missing_matplotlib_raises_with_the_install_hint(monkeypatch):
    for name in [n for n in sys.modules if n == "matplotlib" or n.startswith("matplotlib.")]:
        monkeypatch.setitem(sys.modules, name, None)
    attr = _attr(False)
    for call in (lambda: plot.plot_distribution(attr), lambda: plot.plot_rank(attr), lambda: attr.plot()):
        with pytest.raises(ImportError, match=r"pip install 'stride-nnsight\[plot\]'"):
            call()
