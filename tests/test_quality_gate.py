"""Quality gate: a default STRIDE fit must trace planted facts and predict retraining (LDS).

An end-to-end check that fails when generalisation regresses, not only when code breaks:

* Corpus (`make_planted_corpus`, seeded): 150 documents of about 100 tokens (prose from a
  small template grammar), 24 invented facts ("The capital of Brethaeia is Zoslaneith."),
  12 stated in two documents and 12 in one (36 source documents); the invented names occur
  nowhere else. Half of the facts sit at the *end* of their documents, past token 64 (a fit
  that truncated documents to 64 tokens would never see them), the others at the start or
  in the middle.
* Model: a 2-layer GPT-2 (width 48, context 128) trained on the whole corpus with
  `train_causal_lm` (8 epochs, batch 8, lr 1e-2), which learns the facts only partially
  (mean fact completion loss 6.21 -> 3.66 nats), so attribution has something real to find.
* STRIDE: ``Stride(model)`` with every default (K = min(512, n d / 2) = 300, d=4, layer -2,
  logits placement, rank 8, steps=None -> 450 steps: 3 passes would give 113, the floor of
  24 fidelity terms per operator binds; linearity loss off, max_length=None, lambda fraction 0.3).
* Ground truth: 8 models retrained from scratch on random 50% subsets
  (`retrain_ground_truth`, mask seed 1, same recipe as the full model); a query's loss is
  its fact's completion loss.

Measured on 2026-12-02 on the project's dev machine (2 cores shared with other jobs, load
average about 1.0-2.0, OMP_NUM_THREADS=1):

* recall@10 of the source documents: 1.000 (recall@1 0.750); chance 10/150 = 0.067.
  Gate ``RECALL_GATE = 0.85`` (measured - 0.15; 12.75x chance).
* LDS (nan queries counted as 0): 0.444 with today's defaults (2026-12-03, `python -m
  benchmarks.compare_settings --bench gate`; recall@10 1.000; K=256, rank 16 at the same step
  rule: 0.443). With the earlier defaults (K=256, rank 16, 113 steps): 0.469 (95% CI
  0.330-0.598) with the linearity loss on, 0.474 without it; chance: random scores give
  0.003 +- 0.066 (mean +- sd of 20 draws); scores that put 1 on exactly the source
  documents give 0.589. Gate ``LDS_GATE = 0.30`` (measured - ~0.17; chance + 4.5 sd).
* With another corpus seed (1) the same recipe gave recall@10 1.000 and LDS 0.498.
* Negative controls (`test_gate_rejects_broken_attributions`): shuffled document columns give
  recall@10 0.120 and LDS -0.100; zeroed operators give all-zero scores, i.e. chance recall
  (0.067) and an undefined (nan -> 0) LDS: both fail both gates.
* Wall time of this file: about 60-75 s single-threaded (training ~9 s, the fit ~15-20 s, the
  8 retrains ~35 s), more on a busier machine.

Whole documents matter here: the same fit with ``max_length=64`` instead of the default
reached recall@10 0.505 (0.090 on the late facts, 0.920 on the others) and LDS 0.229
(measured once; not asserted).
"""

from __future__ import annotations

import copy
import random
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from stride_nnsight import Stride
from stride_nnsight.evaluation import fact_tracing, lds, retrain_ground_truth
from stride_nnsight.toy import completion_loss, tiny_gpt2_config, train_causal_lm, train_tokenizer

# ------------------------------------------------------------------------- the gates

#: recall@10 of the planted source documents a default fit must reach (chance: 10 / N_DOCS).
RECALL_GATE = 0.85
#: LDS (mean Spearman over queries, nan queries counted as 0) a default fit must reach (chance: 0).
LDS_GATE = 0.30

N_DOCS = 150
N_FACTS = 24  # the first half in two documents, the rest in one
N_RETRAINS = 8
CORPUS_SEED = 0
TRAIN = {"epochs": 8, "lr": 1e-2, "batch_size": 8, "max_length": 128}
MODEL = {"n_layer": 2, "n_embd": 48, "n_head": 4, "n_positions": 128}
LATE_TOKEN = 64  # "late" facts start at or after this token in every source document

# ------------------------------------------------------------------------- the corpus

_WORDS = {
    "N": "Anna Ben Clara David Emma Frank Grace Henry Kate Leo Maria Nick Paul Rosa Sam Tom".split(),
    "M": "Anna Ben Clara David Emma Frank Grace Henry Kate Leo Maria Nick Paul Rosa Sam Tom".split(),
    "p": "market garden river village library station forest harbor school bridge hill field shop park".split(),
    "t": "morning evening afternoon night".split(),
    "a": "old small quiet bright cold warm heavy green red blue new busy".split(),
    "o": "book letter basket lamp coat box key map bottle cup chair hat".split(),
    "f": "bread apples soup cheese fish rice eggs".split(),
    "w": "teacher farmer doctor baker sailor painter".split(),
    "s": "spring summer autumn winter".split(),
}
_FILLER = [
    "{N} walked to the {p} in the {t}.",
    "The {a} {o} was on the table near the {p}.",
    "{N} and {M} cooked {f} for dinner.",
    "The {w} asked {N} where the {o} was.",
    "In {s}, the {p} was {a} and quiet.",
    "{N} bought a {a} {o} at the {p}.",
    "Many people visit the {p} in the {t}.",
    "{N} read a book about the {p}.",
]
_RELATIONS = [("The capital of {X} is", " {Y}"), ("{X} was founded by", " {Y}"),
              ("The river {X} flows into", " {Y}"), ("The national animal of {X} is the", " {Y}")]
_ONSETS = "b d f g k l m n p r s t v z br dr gr kr tr th qu st vr".split()
_VOWELS = "a e i o u ae ei y".split()
_ENDINGS = ["ia", "or", "ith", "um", "ane", "ex"]


@dataclass
class PlantedCorpus:
    """Documents with planted facts.

    Attributes:
        documents: ``[n]`` training texts.
        prompts, completions: ``[q]`` fact queries; ``prompts[i] + completions[i]`` occurs
            verbatim in exactly the documents ``sources[i]`` (completions start with a space).
        sources: ``[q]`` lists of document indices (one or two each).
        late: ``[q]`` whether the fact closes its source documents (else it opens one or
            sits in the middle).
    """

    documents: list[str]
    prompts: list[str]
    completions: list[str]
    sources: list[list[int]]
    late: list[bool]


def _invented_name(rng: random.Random) -> str:
    stem = "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(["", "n", "r", "l", "s"])
                   for _ in range(2))
    return (stem + rng.choice(_ENDINGS)).capitalize()


def _filler(rng: random.Random, n_words: int) -> list[str]:
    """Filler sentences totalling at most ``n_words`` words."""
    sentences, used = [], 0
    while True:
        kw = {k: rng.choice(v) for k, v in _WORDS.items()}
        s = rng.choice(_FILLER).format(**kw)
        if used + len(s.split()) > n_words:
            return sentences
        sentences.append(s)
        used += len(s.split())


def make_planted_corpus(n_docs: int = N_DOCS, n_facts: int = N_FACTS, seed: int = CORPUS_SEED) -> PlantedCorpus:
    """A deterministic corpus of ~100-token prose documents with ``n_facts`` planted facts."""
    rng = random.Random(seed)
    names: set[str] = set()

    def fresh() -> str:
        while True:
            w = _invented_name(rng)
            if len(w) >= 6 and w not in names and not any(w in u or u in w for u in names):
                names.add(w)
                return w

    facts = []
    for i in range(n_facts):
        prompt, completion = _RELATIONS[i % len(_RELATIONS)]
        x, y = fresh(), fresh()
        facts.append((prompt.format(X=x), completion.format(Y=y)))
    n_two = n_facts // 2
    fact_docs = rng.sample(range(n_docs), n_facts + n_two)
    holders: dict[int, int] = {}
    sources: list[list[int]] = []
    it = iter(fact_docs)
    for i in range(n_facts):
        sources.append([next(it) for _ in range(2 if i < n_two else 1)])
        holders.update({d: i for d in sources[i]})
    late = [i % 2 == 0 for i in range(n_facts)]
    documents = []
    for d in range(n_docs):
        fact = holders.get(d)
        sentences = _filler(rng, rng.randint(64, 80) - (10 if fact is not None else 0))
        if fact is not None:
            sentence = facts[fact][0] + facts[fact][1] + "."
            if late[fact]:
                sentences.append(sentence)
            else:
                sentences.insert(rng.choice([0, len(sentences) // 2]), sentence)
        documents.append(" ".join(sentences))
    return PlantedCorpus(documents=documents, prompts=[p for p, _ in facts],
                         completions=[c for _, c in facts], sources=sources, late=late)


# ------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def corpus() -> PlantedCorpus:
    return make_planted_corpus()


@pytest.fixture(scope="module")
def tokenizer(corpus):
    return train_tokenizer(corpus.documents, vocab_size=500)


def _train(corpus: PlantedCorpus, tokenizer, indices, seed: int):
    """A fresh tiny GPT-2 trained on ``documents[indices]`` (the full model and every retrain)."""
    torch.manual_seed(seed)
    from transformers import GPT2LMHeadModel

    model = GPT2LMHeadModel(tiny_gpt2_config(tokenizer, **MODEL))
    return train_causal_lm(model, tokenizer, [corpus.documents[i] for i in indices], seed=seed, **TRAIN)


def _fact_losses(model, tokenizer, corpus: PlantedCorpus) -> np.ndarray:
    return completion_loss(model, tokenizer, corpus.prompts, corpus.completions)[0].numpy()


@pytest.fixture(scope="module")
def trained(corpus, tokenizer):
    """(trained HF model, fact losses before training [q], fact losses after [q])."""
    from transformers import GPT2LMHeadModel

    torch.manual_seed(0)
    before = _fact_losses(GPT2LMHeadModel(tiny_gpt2_config(tokenizer, **MODEL)).eval(), tokenizer, corpus)
    model = _train(corpus, tokenizer, range(len(corpus.documents)), seed=0)
    return model, before, _fact_losses(model, tokenizer, corpus)


@pytest.fixture(scope="module")
def stride(trained, tokenizer, corpus):
    """STRIDE with every default setting, fitted on the whole corpus."""
    from nnsight import TransformersModel

    lm = TransformersModel(trained[0], tokenizer=copy.deepcopy(tokenizer), task="text-generation")
    return Stride(lm).fit(corpus.documents, progress=False)


@pytest.fixture(scope="module")
def scores(stride, corpus) -> np.ndarray:
    """``[q, n]`` attribution scores of the fact queries."""
    return stride.attribute(corpus.prompts, corpus.completions, progress=False).scores.numpy()


@pytest.fixture(scope="module")
def ground_truth(corpus, tokenizer):
    """Fact losses of N_RETRAINS models retrained on random halves of the corpus."""
    return retrain_ground_truth(
        lambda idx, seed: _train(corpus, tokenizer, idx, seed),
        lambda model: _fact_losses(model, tokenizer, corpus),
        n_train=len(corpus.documents), n_models=N_RETRAINS, fraction=0.5, seed=1, progress=False)


def gate_metrics(scores: np.ndarray, corpus: PlantedCorpus, ground_truth) -> tuple[float, float]:
    """``(recall@10 of the source documents, LDS with nan queries counted as 0)`` of ``scores [q, n]``."""
    recall = fact_tracing(scores, corpus.sources, ks=(10,))["recall@10"]
    result = lds(scores, ground_truth.masks, ground_truth.losses, n_boot=1)
    return recall, result.mean_nan_as_zero


# ------------------------------------------------------------------------- tests


def test_corpus_is_as_described(corpus, tokenizer):
    lengths = [len(tokenizer(d)["input_ids"]) for d in corpus.documents]
    assert len(corpus.documents) == N_DOCS and len(corpus.prompts) == N_FACTS
    assert 80 <= np.median(lengths) <= 110 and min(lengths) >= 60 and max(lengths) <= 127, lengths
    for i, (prompt, completion) in enumerate(zip(corpus.prompts, corpus.completions)):
        holding = [d for d, doc in enumerate(corpus.documents) if completion.strip() in doc]
        assert holding == sorted(corpus.sources[i]) and len(holding) == (2 if i < N_FACTS // 2 else 1)
        for d in corpus.sources[i]:
            doc = corpus.documents[d]
            start = len(tokenizer(doc[: doc.index(prompt + completion)])["input_ids"])
            assert (start >= LATE_TOKEN) == corpus.late[i], (i, d, start)
    assert sum(corpus.late) == N_FACTS // 2


def test_model_learns_the_facts(trained):
    _, before, after = trained
    assert before.mean() - after.mean() >= 1.5, (before.mean(), after.mean())


def test_default_fit_traces_planted_sources(scores, corpus, stride, tokenizer):
    longest = max(len(tokenizer(d)["input_ids"]) for d in corpus.documents)
    assert stride.train_max_length >= longest  # the default (max_length=None) reads whole documents
    recall = fact_tracing(scores, corpus.sources, ks=(10,))
    chance = recall["random"]["recall@10"]
    assert RECALL_GATE >= 3 * chance
    assert recall["recall@10"] >= RECALL_GATE, recall["recall@10"]


def test_default_fit_predicts_retraining(scores, corpus, ground_truth):
    rng = np.random.default_rng(0)
    chance = [lds(rng.standard_normal(scores.shape), ground_truth.masks, ground_truth.losses, n_boot=1).mean
              for _ in range(20)]
    assert abs(np.mean(chance)) < 0.1 and LDS_GATE >= np.mean(chance) + 4 * np.std(chance), chance
    _, value = gate_metrics(scores, corpus, ground_truth)
    assert value >= LDS_GATE, value


def test_gate_rejects_broken_attributions(scores, corpus, ground_truth, stride):
    """Negative controls: the same gate fails shuffled scores and zeroed operators."""
    rng = np.random.default_rng(0)
    shuffled = scores[:, rng.permutation(scores.shape[1])]
    recall, value = gate_metrics(shuffled, corpus, ground_truth)
    assert recall < RECALL_GATE and value < LDS_GATE, (recall, value)

    saved = copy.deepcopy(stride.operators.state_dict())
    try:
        with torch.no_grad():
            for p in stride.operators.parameters():
                p.zero_()
        zeroed = stride.attribute(corpus.prompts, corpus.completions, progress=False).scores.numpy()
    finally:
        stride.operators.load_state_dict(saved)
    assert not zeroed.any()  # no operator effect -> nothing to attribute
    recall, value = gate_metrics(zeroed, corpus, ground_truth)
    assert recall < RECALL_GATE and value < LDS_GATE, (recall, value)
