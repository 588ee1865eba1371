"""Benchmark result caches are keyed by the code that computed them (issue: stale caches)."""

import sys
from pathlib import Path
from types import SimpleNamespace

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.setting import CODE_SOURCES, code_version  # noqa: E402


def _tree(root: Path, body: str) -> None:
    (root / "stride_nnsight" / "sub").mkdir(parents=True, exist_ok=True)
    (root / "benchmarks").mkdir(exist_ok=True)
    (root / "stride_nnsight" / "a.py").write_text("x = 1\n")
    (root / "stride_nnsight" / "sub" / "b.py").write_text(body)
    (root / "stride_nnsight" / "notes.md").write_text("not code\n")
    (root / "benchmarks" / "methods.py").write_text("y = 2\n")


def test_code_version_follows_every_source_file(tmp_path):
    assert CODE_SOURCES == ("stride_nnsight", "benchmarks/methods.py")
    _tree(tmp_path, "z = 3\n")
    first = code_version(tmp_path)
    assert code_version(tmp_path) == first and len(first) == 10
    (tmp_path / "stride_nnsight" / "notes.md").write_text("edited docs\n")
    assert code_version(tmp_path) == first  # only .py files count
    (tmp_path / "stride_nnsight" / "sub" / "b.py").write_text("z = 4\n")
    changed = code_version(tmp_path)
    assert changed != first
    (tmp_path / "benchmarks" / "methods.py").write_text("y = 5\n")
    assert code_version(tmp_path) not in (first, changed)
    assert code_version() == code_version(REPO)  # the real tree by default


def test_results_are_cached_per_code_version(tmp_path):
    from benchmarks import heldout, run

    setting = SimpleNamespace(cache_dir=tmp_path, key="abc")
    version = code_version()
    assert run._results_dir(setting) == tmp_path / f"results-abc-code{version}"
    assert heldout._results_path(setting) == tmp_path / f"heldout-results-abc-code{version}.npz"
    # the sampling setting enters STRIDE's key only when it differs from the draw every older run used
    from stride_nnsight import StrideArguments

    base = StrideArguments().to_dict()
    older = {k: v for k, v in base.items() if k != "sampling"}
    assert run._args_key(base) == run._args_key(older)
    assert run._args_key({**base, "sampling": "document"}) != run._args_key(base)
