"""Plots of an `Attribution` with matplotlib (an optional extra: ``pip install 'stride-nnsight[plot]'``).

* `plot_distribution`: histogram of one query's non-zero scores, its noise floor at ``±floor``.
* `plot_rank`: influence vs rank of one or several queries (proponents above zero, opponents
  below), the noise floor as a band.
* `plot_attribution`: a figure with both panels for one query (also ``attr.plot(...)``).

Queries are picked as everywhere in the package: ``row=`` a *position*, ``query=`` an *id*
(``attr.query_index``), never mixed. Scores are read one row at a time, so a sparse attribution
is never made dense. matplotlib is imported inside the functions: importing this module does not
need it. Every function draws into ``ax`` when given (so figures can be composed) and returns
what it drew into.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Optional, Union

import numpy as np
import torch

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from .results import Attribution

__all__ = ["plot_attribution", "plot_distribution", "plot_rank"]

INSTALL_HINT = "pip install 'stride-nnsight[plot]'"


def _pyplot() -> Any:
    """``matplotlib.pyplot``, or ImportError saying how to install it."""
    try:
        import matplotlib.pyplot as plt
    except ImportError as err:
        raise ImportError(f"stride_nnsight.plot needs matplotlib, which is not installed: {INSTALL_HINT} "
                          f"(or pip install matplotlib)") from err
    return plt


def _one_row(attr: "Attribution", row: Any, query: Any) -> int:
    """Position of the query picked by ``row`` (a position) or ``query`` (an id); neither: row 0."""
    if row is not None and query is not None:
        raise TypeError("give either row= (a row position) or query= (a query id), not both")
    if query is not None:
        try:
            return attr.query_index(query)
        except KeyError as err:
            raise KeyError(f"{err.args[0]}; query= takes a query id, row= a row position") from None
    return attr._position(0 if row is None else row)


def _listed(value: Any) -> list[Any]:
    """``value`` as a list: a list / tuple / range / 1-D array or tensor as its items, else ``[value]``."""
    if isinstance(value, (np.ndarray, torch.Tensor)) and value.ndim > 0:
        return value.reshape(-1).tolist()
    return list(value) if isinstance(value, (list, tuple, range)) else [value]


def _some_rows(attr: "Attribution", rows: Any, queries: Any) -> list[int]:
    """Positions picked by ``rows`` (one position or a list) or ``queries`` (one id or a list); neither: row 0."""
    if rows is not None and queries is not None:
        raise TypeError("give either rows= (row positions) or queries= (query ids), not both")
    if queries is not None:
        return [_one_row(attr, None, key) for key in _listed(queries)]
    return [attr._position(r) for r in _listed(0 if rows is None else rows)]


def _checked_row(attr: "Attribution", q: int) -> np.ndarray:
    """Scores of row ``q`` as float64 ``[n_train]`` (``attr._row``: one row, never the matrix);
    ValueError when the row has a NaN/inf score, as in ``top_k``."""
    values = attr._row(q).numpy().astype(np.float64)
    if not np.isfinite(values).all():
        raise ValueError(f"query {attr.query_ids[q]!r} (row {q}) has non-finite scores (NaN/inf): its "
                         "attribution is invalid, so there is nothing to plot (see attr.row_status())")
    return values


def _floor(attr: "Attribution", q: int) -> Optional[float]:
    """The noise floor of row ``q`` when known and positive, else ``None``."""
    floor = attr.noise_floor
    if floor is None:
        return None
    value = float(floor[q])
    return value if math.isfinite(value) and value > 0 else None


def _unit(attr: "Attribution") -> str:
    metric = attr.provenance.get("metric")
    return f"score (change of {metric})" if isinstance(metric, str) else "score"


def _label(attr: "Attribution", q: int) -> str:
    return f"query {attr.query_ids[q]}"


def plot_distribution(attr: "Attribution", row: Any = None, *, query: Any = None, bins: Union[int, str] = "auto",
                      log: bool = False, ax: Optional["Axes"] = None) -> "Axes":
    """Histogram of one query's non-zero scores.

    Exact zeros (every document the sparse recovery left out) are not counted: the bars sum
    to the row's number of non-zero scores. When ``attr.noise_floor`` is known (and positive) for
    the query, dashed vertical lines mark ``-floor`` and ``+floor``: scores between them are
    indistinguishable from the query's shuffled measurements.

    Args:
        attr: the attribution (dense or sparse; only this row is read).
        row: position of the query (int; negative counts from the end). Default: row 0.
        query: the query's *id* instead (as in ``attr.query_ids``); give at most one of the two.
        bins: histogram bins (``numpy.histogram_bin_edges`` rules or a count).
        log: logarithmic count axis.
        ax: draw into this Axes; default: a new figure.

    Returns:
        ax (matplotlib.axes.Axes): the Axes drawn into. x: score, in the attribution's units
            (change of ``provenance['metric']``); y: number of training documents.
            ``ax.containers[0]`` holds the bars; the floor lines have gid ``"noise_floor"``.

    Raises:
        ImportError: matplotlib is not installed (``pip install 'stride-nnsight[plot]'``).
        TypeError: ``row`` and ``query`` both given, or ``row`` not an integer.
        KeyError: no query has the id ``query``.
        IndexError: ``row`` out of range.
        ValueError: the query's scores contain NaN/inf.
    """
    plt = _pyplot()
    q = _one_row(attr, row, query)
    values = _checked_row(attr, q)
    nonzero = values[values != 0]
    if ax is None:
        _, ax = plt.subplots(figsize=(5.5, 3.8), layout="constrained")
    ax.hist(nonzero, bins=bins if len(nonzero) else 1, log=log, color="#4a6fa5", edgecolor="white", linewidth=0.5)
    floor = _floor(attr, q)
    if floor is not None:
        for sign in (-1, 1):
            ax.axvline(sign * floor, color="#888888", linestyle="--", linewidth=1, gid="noise_floor",
                       label=f"noise floor ±{floor:.3g}" if sign > 0 else None)
        ax.legend(loc="upper right", fontsize="small", frameon=False)
    if not len(nonzero):
        ax.text(0.5, 0.5, "no non-zero score", transform=ax.transAxes, ha="center", va="center", color="#666666")
    ax.set_xlabel(_unit(attr))
    ax.set_ylabel("training documents")
    ax.set_title(f"{_label(attr, q)}: {len(nonzero)} of {attr.n_train} scores non-zero", fontsize="medium")
    return ax


def _ranked(values: np.ndarray, k: Optional[int]) -> tuple[np.ndarray, np.ndarray]:
    """(proponents, opponents): positive scores largest first, negative scores most negative
    first, at most ``k`` of each (``None``: all)."""
    pos, neg = np.sort(values[values > 0])[::-1], np.sort(values[values < 0])
    return (pos, neg) if k is None else (pos[:k], neg[:k])


def plot_rank(attr: "Attribution", rows: Any = None, *, queries: Any = None, k: Optional[int] = None,
              log_x: bool = False, ax: Optional["Axes"] = None) -> "Axes":
    """Influence vs rank: each query's proponents (positive scores, largest first) above zero and
    opponents (negative scores, most negative first) below, both from rank 1.

    Exact zeros are not ranked (as in ``top_k``). A query's noise floor, when known, is a shaded
    band ``[-floor, +floor]`` in the query's colour: points inside it are at noise level.

    Args:
        attr: the attribution (dense or sparse; only the picked rows are read, one at a time).
        rows: one query position or a list of them. Default: row 0.
        queries: one query *id* or a list of ids instead; give at most one of the two.
        k: at most this many proponents and this many opponents per query (``None``: all
            non-zero scores).
        log_x: logarithmic rank axis.
        ax: draw into this Axes; default: a new figure.

    Returns:
        ax (matplotlib.axes.Axes): the Axes drawn into. x: rank (1 = strongest); y: score in
            the attribution's units. Per query one line with gid ``"proponents"`` (y: its
            positive scores, descending) and one with gid ``"opponents"`` (y: its negative
            scores, ascending), in that order; the bands have gid ``"noise_floor"``.

    Raises:
        ImportError: matplotlib is not installed (``pip install 'stride-nnsight[plot]'``).
        TypeError: ``rows`` and ``queries`` both given, or a row / ``k`` not an integer.
        KeyError: no query has one of the ids in ``queries``.
        IndexError: a row out of range.
        ValueError: ``k < 1``, or a picked query's scores contain NaN/inf.
    """
    from .results import _as_int

    plt = _pyplot()
    if k is not None:
        k = _as_int(k, "k")
        if k < 1:
            raise ValueError(f"k must be a positive int or None, got {k!r}")
    picked = _some_rows(attr, rows, queries)
    if ax is None:
        _, ax = plt.subplots(figsize=(5.5, 3.8), layout="constrained")
    empty, single = True, len(picked) == 1
    for i, q in enumerate(picked):
        pos, neg = _ranked(_checked_row(attr, q), k)
        color = f"C{i % 10}"
        name = _label(attr, q)
        # one query: proponents / opponents / floor in the legend; several: one entry per query
        labels = ("proponents", "opponents", "noise floor") if single else (name, "_" + name, "_" + name)
        kw = dict(color=color, marker="o", markersize=2.5, linewidth=1.2)
        ax.plot(np.arange(1, len(pos) + 1), pos, gid="proponents", label=labels[0], **kw)
        ax.plot(np.arange(1, len(neg) + 1), neg, gid="opponents", label=labels[1], linestyle=":", **kw)
        empty = empty and not (len(pos) or len(neg))
        floor = _floor(attr, q)
        if floor is not None:
            ax.axhspan(-floor, floor, color=color, alpha=0.12, linewidth=0, gid="noise_floor",
                       label=f"{labels[2]} ±{floor:.3g}")
    ax.axhline(0.0, color="#444444", linewidth=0.6)
    if empty:
        ax.text(0.5, 0.5, "no non-zero score", transform=ax.transAxes, ha="center", va="center", color="#666666")
    if log_x:
        ax.set_xscale("log")
    ax.set_xlabel("rank" + (" (log)" if log_x else ""))
    ax.set_ylabel(_unit(attr))
    ax.set_title(f"influence vs rank: {_label(attr, picked[0])}" if single else
                 "influence vs rank (dotted: opponents)", fontsize="medium")
    ax.legend(fontsize="small", frameon=False)
    return ax


def plot_attribution(attr: "Attribution", row: Any = None, *, query: Any = None, k: Optional[int] = None,
                     bins: Union[int, str] = "auto", log_x: bool = False,
                     figsize: tuple[float, float] = (11.0, 4.0)) -> "Figure":
    """A figure with both views of one query: `plot_distribution` (left) and `plot_rank` (right).

    Args:
        attr: the attribution (dense or sparse; only this row is read).
        row: position of the query (default 0), or ``query``: its id; at most one of the two.
        k: at most this many proponents / opponents in the rank panel (``None``: all).
        bins: histogram bins of the distribution panel.
        log_x: logarithmic rank axis.
        figsize: figure size in inches (width, height).

    Returns:
        fig (matplotlib.figure.Figure): the new figure; ``fig.axes`` is ``[distribution, rank]``.
            (In a notebook, end the line with ``;`` or assign the result, or the figure is
            shown twice.)

    Raises:
        ImportError: matplotlib is not installed (``pip install 'stride-nnsight[plot]'``).
        TypeError: ``row`` and ``query`` both given, or ``row`` / ``k`` not an integer.
        KeyError: no query has the id ``query``.
        IndexError: ``row`` out of range.
        ValueError: ``k < 1``, or the query's scores contain NaN/inf.
    """
    plt = _pyplot()
    q = _one_row(attr, row, query)
    fig, (left, right) = plt.subplots(1, 2, figsize=figsize, layout="constrained")
    plot_distribution(attr, q, bins=bins, ax=left)
    plot_rank(attr, q, k=k, log_x=log_x, ax=right)
    text = attr.query_texts[q] if attr.query_texts is not None else None
    if text:
        from .results import _short

        fig.suptitle(f"{_label(attr, q)}: {_short(text, 100)}", fontsize="medium")
    return fig
