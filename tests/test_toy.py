"""Tests for the bundled toy setting (`stride_nnsight.toy`).

The full toy model is trained at most once per session (~15-20 s on 2 idle cores) and
cached in the session's toy cache; the determinism tests use short trainings of a
smaller model on a slice of the corpus.
"""

from __future__ import annotations

import json
import subprocess
import sys
from importlib import resources

import pytest
import torch

from stride_nnsight import toy


@pytest.fixture(scope="module")
def corpus() -> toy.ToyCorpus:
    return toy.load_corpus()


@pytest.fixture(scope="module")
def tokenizer(corpus):
    return toy.train_tokenizer(corpus.documents)


@pytest.fixture(scope="module")
def cache_dir(request, tmp_path_factory):
    """The session's toy cache (conftest's ``toy_cache_dir``) so the toy model is trained
    once per test session; a fresh temp dir when that fixture does not exist."""
    try:
        return request.getfixturevalue("toy_cache_dir")
    except pytest.FixtureLookupError:
        return tmp_path_factory.mktemp("toy_cache")


@pytest.fixture(scope="module")
def built(cache_dir):
    """The toy model, trained once and saved into ``cache_dir``."""
    return toy.build_toy_model(seed=0, cache_dir=cache_dir)


# --------------------------------------------------------------------------- corpus


def test_corpus_loads(corpus):
    assert 300 <= len(corpus) <= 400
    assert len(corpus.kinds) == len(corpus.documents)
    assert set(corpus.kinds) == {"fact", "text"}
    assert len(corpus.facts) == 40
    assert len(corpus.relations) == len(corpus.facts)
    assert [f.id for f in corpus.facts] == list(range(len(corpus.facts)))
    assert len(corpus.fact_document_ids) == 2 * len(corpus.facts)
    assert len(corpus.text_document_ids) + len(corpus.fact_document_ids) == len(corpus)
    assert len(set(corpus.documents)) == len(corpus.documents)


def test_fact_sources_are_exact(corpus):
    all_sources = []
    for f in corpus.facts:
        assert f.completion.startswith(" ") and not f.prompt.endswith(" ")
        assert len(f.source_ids) == 2
        all_sources.extend(f.source_ids)
        for i, doc in enumerate(corpus.documents):
            in_sources = i in f.source_ids
            assert (f.prompt + f.completion in doc) == in_sources, (f, i)
            # neither the prompt nor the answer appears anywhere else
            if not in_sources:
                assert f.prompt not in doc and f.completion.strip() not in doc, (f, i)
        for i in f.source_ids:
            assert corpus.kinds[i] == "fact"
    assert len(set(all_sources)) == len(all_sources)  # one fact per source document
    assert sorted(all_sources) == corpus.fact_document_ids


def test_corpus_jsonl_format():
    data = resources.files("stride_nnsight") / "data"
    docs = [json.loads(line) for line in (data / "corpus.jsonl").read_text().splitlines()]
    facts = [json.loads(line) for line in (data / "facts.jsonl").read_text().splitlines()]
    assert all(set(d) == {"id", "text", "kind", "fact_ids"} for d in docs)
    for f in facts:
        for i in f["source_ids"]:
            assert docs[i]["fact_ids"] == [f["id"]]


def test_generator_reproduces_files(tmp_path):
    script = resources.files("stride_nnsight") / "data" / "make_corpus.py"
    subprocess.run([sys.executable, str(script), "--out-dir", str(tmp_path)], check=True,
                   capture_output=True)
    data = resources.files("stride_nnsight") / "data"
    for name in ("corpus.jsonl", "facts.jsonl"):
        assert (tmp_path / name).read_bytes() == (data / name).read_bytes(), name


# ------------------------------------------------------------------------ tokenizer


def test_tokenizer_round_trip(tokenizer, corpus):
    assert len(tokenizer) == 1000
    assert tokenizer.convert_tokens_to_ids(toy.SPECIAL_TOKEN) == 0
    assert tokenizer.eos_token_id == tokenizer.bos_token_id == tokenizer.pad_token_id == 0
    assert tokenizer.padding_side == "right"
    for text in corpus.documents[:50] + ["Unseen wörds, digits 12345 & émojis 🙂!"]:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert 0 not in ids
        assert tokenizer.decode(ids) == text
    lengths = [len(x) for x in tokenizer(corpus.documents)["input_ids"]]
    assert max(lengths) <= 63  # documents + eos fit in max_length=64


def test_tokenizer_is_additive_and_deterministic(tokenizer, corpus):
    for f in corpus.facts:
        joint = tokenizer(f.prompt + f.completion)["input_ids"]
        split = tokenizer(f.prompt)["input_ids"] + tokenizer(f.completion)["input_ids"]
        assert joint == split
    again = toy.train_tokenizer(corpus.documents)
    assert again.get_vocab() == tokenizer.get_vocab()


# ---------------------------------------------------------------------------- model


def test_config(tokenizer):
    cfg = toy.tiny_gpt2_config(tokenizer)
    assert cfg.vocab_size == 1000 and cfg.n_layer == 4 and cfg.n_embd == 64
    assert cfg.resid_pdrop == cfg.embd_pdrop == cfg.attn_pdrop == 0.0
    assert cfg.eos_token_id == cfg.bos_token_id == cfg.pad_token_id == 0


def test_model_learned_facts(built):
    model, tok, corpus = built
    assert not model.training
    prompts = [f.prompt for f in corpus.facts]
    completions = [f.completion for f in corpus.facts]
    loss, acc = toy.completion_loss(model, tok, prompts, completions)
    # the same completions after an unrelated fact's prompt (a different relation)
    shift = 5  # 5 facts per relation, consecutive
    other = completions[shift:] + completions[:shift]
    loss_other, _ = toy.completion_loss(model, tok, prompts, other)
    assert loss.shape == acc.shape == (len(prompts),)
    assert acc.mean() >= 0.8, acc
    assert loss.mean() < 0.8, loss
    assert loss_other.mean() > loss.mean() + 1.5
    assert (loss < loss_other).float().mean() >= 0.9


def test_greedy_generation(built):
    model, tok, corpus = built
    # greedy decoding reproduces a completion iff every teacher-forced argmax is right
    _, acc = toy.completion_loss(model, tok, [f.prompt for f in corpus.facts],
                                 [f.completion for f in corpus.facts])
    exact = acc == 1.0
    assert exact.float().mean() >= 0.7
    f = corpus.facts[int(exact.float().argmax())]
    ids = tok(f.prompt, return_tensors="pt")["input_ids"]
    n = len(tok(f.completion)["input_ids"])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                             do_sample=False, pad_token_id=tok.pad_token_id)
    assert tok.decode(out[0, ids.shape[1]:]) == f.completion


def test_cache_round_trip(built, cache_dir):
    model, tok, corpus = built
    path = cache_dir / "toy-gpt2-seed0"
    assert (path / "config.json").is_file() and (path / "toy_meta.json").is_file()
    model2, tok2, _ = toy.build_toy_model(seed=0, cache_dir=cache_dir)  # loads, no training
    assert model2 is not model
    assert tok2.get_vocab() == tok.get_vocab() and tok2.padding_side == "right"
    assert tok2.eos_token_id == tok2.pad_token_id == 0
    batch = tok(corpus.documents[:4], return_tensors="pt", padding=True)
    with torch.no_grad():
        a = model(**batch).logits
        b = model2(**batch).logits
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_train_causal_lm_deterministic(tokenizer, corpus):
    texts = corpus.documents[:48]
    cfg = toy.tiny_gpt2_config(tokenizer, n_layer=1, n_embd=32, n_head=2)
    states = []
    for _ in range(2):
        torch.manual_seed(3)
        model = toy.GPT2LMHeadModel(cfg)
        out = toy.train_causal_lm(model, tokenizer, texts, epochs=2, lr=3e-3, batch_size=8, seed=3)
        assert out is model and not model.training
        states.append({k: v.clone() for k, v in model.state_dict().items()})
    for k in states[0]:
        assert torch.equal(states[0][k], states[1][k]), k
    # a different seed gives a different data order, hence different weights
    torch.manual_seed(3)
    model = toy.GPT2LMHeadModel(cfg)
    toy.train_causal_lm(model, tokenizer, texts, epochs=2, lr=3e-3, batch_size=8, seed=4)
    assert not torch.equal(model.transformer.wte.weight, states[0]["transformer.wte.weight"])


def test_train_reduces_loss(tokenizer, corpus):
    texts = corpus.documents[:32]
    torch.manual_seed(0)
    model = toy.GPT2LMHeadModel(toy.tiny_gpt2_config(tokenizer, n_layer=1, n_embd=32, n_head=2))
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    with torch.no_grad():
        before = model(**batch, labels=labels).loss.item()
    toy.train_causal_lm(model, tokenizer, texts, epochs=3, lr=5e-3, batch_size=8)
    with torch.no_grad():
        after = model(**batch, labels=labels).loss.item()
    assert after < before - 1.0


def test_toy_language_model(built, cache_dir):
    pytest.importorskip("nnsight")
    lm, corpus = toy.toy_language_model(seed=0, cache_dir=cache_dir)
    model, tok, _ = built
    assert tok.padding_side == "right"  # the wrapper got its own copy
    prompt = corpus.facts[0].prompt
    with lm.trace(prompt):
        logits = lm.output.logits.save()
    ids = tok(prompt, return_tensors="pt")
    with torch.no_grad():
        ref = model(**ids).logits
    torch.testing.assert_close(logits, ref)


def test_toy_training_shows_progress_when_asked(tmp_path, monkeypatch):
    """The demo's first stage (training the toy model) shows a progress bar instead of nothing."""
    import stride_nnsight.toy as toy

    seen = {}

    def fake_train(model, tokenizer, texts, **kw):
        seen.update(kw)
        return model.eval()

    monkeypatch.setattr(toy, "train_causal_lm", fake_train)
    toy.build_toy_model(seed=0, cache_dir=None, progress=True)
    assert seen["progress"] is True
    toy.build_toy_model(seed=0, cache_dir=None)
    assert seen["progress"] is False
