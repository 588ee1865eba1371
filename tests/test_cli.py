"""The main job: `stride-nnsight demo` on the bundled corpus, and the attribution quality it shows."""

import io

import pytest

from stride_nnsight.cli import main, run_demo


def test_demo_finds_planted_sources(toy, toy_cache_dir):
    """End-to-end quality on the bundled planted-facts corpus, library defaults.

    Setting: 340 documents, 40 facts, each stated in exactly 2 source documents.
    Measured (2026-11-22): recall@10 of the planted sources over the 40 fact queries =
    0.988 with the current defaults (d=4, steps scaled to 3 passes = 255 here, lambda
    0.3 x lambda_max); 0.975 with d=4, 800 steps, lambda 0.05; 1.00 with d=8, 400 steps.
    A random ranking gets 10/340 = 0.029 in expectation; constant or shuffled scores cannot exceed ~0.1. The assertion (>= 0.5,
    17x chance) leaves room for seed noise but not for a broken pipeline.
    """
    out = io.StringIO()
    result = run_demo(n_queries=2, top=3, cache_dir=toy_cache_dir, out=out)
    text = out.getvalue()
    assert abs(result["random"] - 10 / 340) < 1e-9
    assert result["recall@10"] >= 0.5, text
    assert "* #" in text  # a planted source is marked among the printed top documents
    assert "recall@10 of planted sources" in text

    # A second run reuses the saved operators instead of refitting and gives the same numbers.
    again = run_demo(n_queries=1, top=1, cache_dir=toy_cache_dir, out=io.StringIO())
    assert again["recall@10"] == result["recall@10"]


def test_cli_parses_and_rejects_bad_arguments(capsys):
    import pytest

    with pytest.raises(SystemExit):
        main(["demo", "--placement", "attention"])
    assert "invalid choice" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([])


def test_busy_machine_gets_one_torch_thread(monkeypatch):
    import io
    import os

    import torch

    from stride_nnsight.cli import sensible_threads

    before = torch.get_num_threads()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    try:
        torch.set_num_threads(2)
        monkeypatch.setattr(os, "getloadavg", lambda: (0.2, 0.2, 0.2))
        assert sensible_threads(io.StringIO()) == 2          # idle: torch's default kept
        out = io.StringIO()
        monkeypatch.setattr(os, "getloadavg", lambda: (3.0, 3.0, 3.0))
        assert sensible_threads(out) == 1 and "busy" in out.getvalue()
        torch.set_num_threads(2)
        monkeypatch.setenv("OMP_NUM_THREADS", "2")
        assert sensible_threads(io.StringIO()) == 2          # the user's choice wins
    finally:
        torch.set_num_threads(before)


# ------------------------------------------------------------- your own model and data
FIT_SETTINGS = ["--set", "steps=6", "--set", "n_subsets=8", "--set", "subsets_per_example=2", "--set", "rank=2",
                "--set", "basis_hidden=8", "--set", "batch_size=8", "--set", "layer=1"]


def _write_jsonl(path, rows):
    import json

    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _html_outline(page):
    """Sections (query ids) and table rows (proponent / opponent) of a report, read with an HTML parser."""
    from html.parser import HTMLParser

    class Outline(HTMLParser):
        def __init__(self):
            super().__init__()
            self.queries, self.rows, self.open = [], [], []

        def handle_starttag(self, tag, attrs):
            attrs = dict(attrs)
            self.open.append(tag)
            if tag == "section":
                self.queries.append(attrs.get("data-query-id"))
            if tag == "tr" and attrs.get("class") in ("pro-row", "opp-row"):
                self.rows.append((self.queries[-1], attrs["class"]))

        def handle_endtag(self, tag):
            assert self.open and self.open[-1] == tag, (tag, self.open[-3:])  # well nested
            self.open.pop()

    parser = Outline()
    parser.feed(page.replace("<!DOCTYPE html>", "").replace("<meta charset='utf-8'>", ""))
    assert parser.open == []
    return parser


def test_fit_attribute_report_info_on_your_own_model_and_jsonl(tmp_path, tiny_hf_model, tiny_tokenizer, small_texts,
                                                                 capsys):
    import pandas as pd

    from stride_nnsight import Attribution

    tiny_hf_model.save_pretrained(tmp_path / "model")
    tiny_tokenizer.save_pretrained(tmp_path / "model")
    data = _write_jsonl(tmp_path / "train.jsonl", [{"id": f"doc{i}", "text": t} for i, t in enumerate(small_texts[:24])])
    queries = _write_jsonl(tmp_path / "queries.jsonl", [{"id": "q-cat", "prompt": "the cat", "completion": " sat"},
                                                        {"id": "q-dog", "prompt": "a dog", "completion": " ran"}])
    config = tmp_path / "stride.yaml"
    config.write_text("n_subsets: 4\nseed: 3\n")  # n_subsets is overridden by --set below
    state = tmp_path / "state"
    assert main(["fit", "--model", str(tmp_path / "model"), "--data", str(data), "--config", str(config),
                 "--out", str(state), "--no-progress"] + FIT_SETTINGS) == 0
    out = capsys.readouterr().out
    assert "24 training texts" in out and "ids from 'id'" in out and (state / "checkpoint").is_dir()

    assert main(["info", str(state)]) == 0
    info = capsys.readouterr().out
    assert "training texts   24" in info and "K=8, d=2, rank=2" in info and "6 of 6 steps" in info

    scores = tmp_path / "scores.json"
    assert main(["attribute", "--state", str(state), "--model", str(tmp_path / "model"), "--queries", str(queries),
                 "--out", str(scores), "--no-progress"]) == 0
    attr = Attribution.load(scores)
    assert attr.query_ids == ["q-cat", "q-dog"] and attr.train_ids[0] == "doc0" and attr.is_sparse
    assert attr.provenance["seed"] == 3 and attr.provenance["n_subsets"] == 8  # config file, then --set
    for suffix in (".csv", ".parquet"):
        table_path = tmp_path / f"scores{suffix}"
        assert main(["attribute", "--state", str(state), "--model", str(tmp_path / "model"), "--queries",
                     str(queries), "--out", str(table_path), "--no-progress"]) == 0
        table = pd.read_csv(table_path) if suffix == ".csv" else pd.read_parquet(table_path)
        assert list(table.columns) == ["query_id", "rank", "train_id", "score"]
        assert len(table) == attr.nnz and (table["score"] != 0).all()
        first = table[table.query_id == "q-cat"].sort_values("rank")
        if len(first):
            assert first.iloc[0]["score"] == pytest.approx(float(attr.sel(query="q-cat").max()), rel=1e-6)

    report = tmp_path / "report.html"
    assert main(["report", "--scores", str(scores), "--out", str(report), "--top", "3"]) == 0
    outline = _html_outline(report.read_text(encoding="utf-8"))
    assert outline.queries == ["q-cat", "q-dog"]
    expected = sum(min(3, int((attr.sel(query=q) > 0).sum())) + min(3, int((attr.sel(query=q) < 0).sum()))
                   for q in attr.query_ids)
    assert len(outline.rows) == expected and expected > 0
    assert "<mark>" in report.read_text(encoding="utf-8") or attr.nnz == 0


def test_cli_errors_name_the_problem(tmp_path, capsys):
    data = _write_jsonl(tmp_path / "train.jsonl", [{"body": "a text"}])
    assert main(["fit", "--model", "unused", "--data", str(data), "--out", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err
    assert "no column 'text'" in err and "['body']" in err and "--text-field" in err
    with pytest.raises(SystemExit, match="unknown setting"):
        main(["fit", "--model", "unused", "--data", str(data), "--out", str(tmp_path / "s"), "--text-field", "body",
              "--set", "n_subset=3"])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{not json\n')
    assert main(["fit", "--model", "unused", "--data", str(bad), "--out", str(tmp_path / "s")]) == 2
    assert "line 2: not valid JSON" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="no saved STRIDE state"):
        main(["info", str(tmp_path)])
    with pytest.raises(SystemExit, match="use .json"):
        main(["attribute", "--state", str(tmp_path), "--model", "m", "--queries", str(data), "--out",
              str(tmp_path / "x.txt")])


def test_read_records_reads_every_format(tmp_path):
    import pandas as pd

    from stride_nnsight.storage import DataFileError, read_records

    frame = pd.DataFrame({"text": ["one", "two"], "id": ["a", "b"]})
    frame.to_csv(tmp_path / "d.csv", index=False)
    frame.to_parquet(tmp_path / "d.parquet", index=False)
    _write_jsonl(tmp_path / "d.jsonl", frame.to_dict("records"))
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_pandas(frame).save_to_disk(str(tmp_path / "ds"))
    for name in ("d.csv", "d.parquet", "d.jsonl", "ds"):
        assert read_records(tmp_path / name, ["text"], optional=["id", "missing"]) == \
            {"text": ["one", "two"], "id": ["a", "b"]}, name
    with pytest.raises(DataFileError, match="unknown extension '.txt'"):
        (tmp_path / "d.txt").write_text("x")
        read_records(tmp_path / "d.txt", ["text"])
    with pytest.raises(FileNotFoundError):
        read_records(tmp_path / "nope.jsonl", ["text"])
    _write_jsonl(tmp_path / "n.jsonl", [{"text": 3}])
    with pytest.raises(DataFileError, match="must hold text"):
        read_records(tmp_path / "n.jsonl", ["text"])
