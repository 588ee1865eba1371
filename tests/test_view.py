"""HTML views of an Attribution (stride_nnsight/view.py)."""

import scipy.sparse as sp
import torch

from stride_nnsight import Attribution


def _attr(sparse=False):
    scores = torch.tensor([[0.5, -0.2, 0.0, 0.1], [0.0, 0.0, 0.0, 0.0]])
    return Attribution(scores=sp.csr_matrix(scores.numpy()) if sparse else scores, query_ids=["q<1>", "q2"],
                       train_ids=["a", "b", "c", "d"],
                       query_texts=["The capital of Veldoria is Quarnith", "nothing here"],
                       train_texts=["Veldoria's capital: Quarnith <script>alert(1)</script>", "unrelated words",
                                    "more", "capital city"],
                       provenance={"method": "STRIDE", "metric": "negative_completion_loss"})


def test_repr_html_escapes_marks_and_orders():
    for sparse in (False, True):
        page = _attr(sparse)._repr_html_()
        assert "<script>" not in page and "&lt;script&gt;" in page  # training text is escaped
        assert "q&lt;1&gt;" in page  # so are ids
        assert "<mark>Quarnith</mark>" in page and "<mark>capital</mark>" in page  # shared words marked
        assert page.index("&lt;script&gt;alert") < page.index("</mark> city")  # +0.5 ranks before +0.1
        assert "no non-zero score (no signal)" in page  # the all-zero query says so
        assert page.count("class='pro-row'") == 2 and page.count("class='opp-row'") == 1
        assert ("sparse scores" in page) == sparse


def test_to_html_writes_a_standalone_page(tmp_path):
    attr = _attr()
    page = attr.to_html(tmp_path / "r" / "report.html", k=1)
    assert (tmp_path / "r" / "report.html").read_text(encoding="utf-8") == page
    assert page.startswith("<!DOCTYPE html>") and page.count("class='pro-row'") == 1  # k=1
    assert "Provenance" in page and "negative_completion_loss" in page


def test_rows_at_noise_level_are_marked():
    attr = _attr()
    attr.provenance["noise_floor"] = [0.3, 0.0]  # +0.5 clears it, +0.1 and -0.2 do not
    page = attr._repr_html_()
    assert page.count("(noise level)</span>") == 2 and "attr.noise_floor" in page
    assert "(noise level)" not in _attr()._repr_html_()
