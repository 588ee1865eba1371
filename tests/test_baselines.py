"""Baselines (stride_nnsight.baselines): sign sanity, shapes, provenance, and known closed forms.

One tiny GPT-2 (2 layers, width 32) is trained briefly on a dozen texts, one of which
states "The capital of Veldoria is Quarnith."; the query asks for " Quarnith" after
"The capital of Veldoria is". Every method must put that document near the top.
"""

from __future__ import annotations

import copy
import math
import random

import pytest
import torch

from stride_nnsight import Attribution
from stride_nnsight import baselines as B
from stride_nnsight.backends import resolve_backend
from stride_nnsight.inputs import encode_queries, encode_texts
from stride_nnsight.operators import token_nll

WORDS = ("the a cat dog sat ran on in park mat bird sang while and over under house tree river "
         "blue red green small large quickly slowly").split()
FACT = "The capital of Veldoria is Quarnith."
FACT_INDEX = 5
PROMPTS = ["The capital of Veldoria is", "the cat sat on"]
COMPLETIONS = [" Quarnith", " the mat"]
QUERY_IDS = ["veldoria", "cat"]
MODEL_METHODS = ("representation", "gradient_dot", "gradient_cosine", "trak", "ekfac")


def _sentences(n: int, seed: int, lo: int = 6, hi: int = 12) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi))) + "." for _ in range(n)]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny models run ~100x faster on one thread than on two busy shared cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def setting(_one_thread):
    """(nnsight model, HF model, tokenizer, train texts), trained briefly (15 AdamW steps)."""
    from nnsight import TransformersModel
    from transformers import GPT2LMHeadModel

    from stride_nnsight.toy import tiny_gpt2_config, train_causal_lm, train_tokenizer

    texts = _sentences(11, seed=0)
    texts.insert(FACT_INDEX, FACT)
    tok = train_tokenizer(texts, vocab_size=300)
    torch.manual_seed(0)
    hf = GPT2LMHeadModel(tiny_gpt2_config(tok, n_layer=2, n_embd=32, n_head=2, n_positions=64))
    train_causal_lm(hf, tok, texts, epochs=5, lr=3e-3, batch_size=4, seed=0)
    for p in hf.parameters():  # as STRIDE leaves it: the baselines must cope with a frozen model
        p.requires_grad_(False)
    lm = TransformersModel(hf, tokenizer=tok, task="text-generation")
    return lm, hf, tok, texts


@pytest.fixture(scope="module")
def attributions(setting):
    """Every method on the shared setting, plus the model's state before and after."""
    lm, hf, _, texts = setting
    train_ids = [f"doc{i}" for i in range(len(texts))]
    kw = dict(query_ids=QUERY_IDS, train_ids=train_ids)
    before = (resolve_backend(lm).fingerprint(), [p.requires_grad for p in hf.parameters()], hf.training)
    out = {
        "bm25": B.bm25(texts, PROMPTS, COMPLETIONS, **kw),
        "representation": B.representation_similarity(lm, texts, PROMPTS, COMPLETIONS, **kw),
        "gradient_dot": B.gradient_similarity(lm, texts, PROMPTS, COMPLETIONS, **kw),
        "gradient_cosine": B.gradient_similarity(lm, texts, PROMPTS, COMPLETIONS, normalize=True, **kw),
        "trak": B.trak(lm, texts, PROMPTS, COMPLETIONS, proj_dim=256, **kw),
        "ekfac": B.ekfac(lm, texts, PROMPTS, COMPLETIONS, **kw),
    }
    after = (resolve_backend(lm).fingerprint(), [p.requires_grad for p in hf.parameters()], hf.training)
    return out, before, after


# --------------------------------------------------------------------------- all methods
@pytest.mark.parametrize("method", ["bm25", *MODEL_METHODS])
def test_sign_sanity_fact_document_ranks_top(attributions, method):
    attr = attributions[0][method]
    scores = attr.scores[0]
    order = torch.argsort(scores, descending=True).tolist()
    assert order.index(FACT_INDEX) < 3, f"{method}: fact document ranked {order.index(FACT_INDEX)}: {scores}"
    assert scores[FACT_INDEX] > 0, f"{method}: the fact document must be a proponent (score > 0)"
    others = torch.cat([scores[:FACT_INDEX], scores[FACT_INDEX + 1:]])
    assert scores[FACT_INDEX] > others.median(), method


@pytest.mark.parametrize("method", ["bm25", *MODEL_METHODS])
def test_shapes_ids_texts_provenance(attributions, setting, method):
    lm, _, _, texts = setting
    attr = attributions[0][method]
    assert isinstance(attr, Attribution)
    assert attr.scores.shape == (2, len(texts)) and attr.scores.dtype == torch.float32
    assert torch.isfinite(attr.scores).all()
    assert attr.query_ids == QUERY_IDS and attr.train_ids == [f"doc{i}" for i in range(len(texts))]
    assert attr.query_texts == [p + c for p, c in zip(PROMPTS, COMPLETIONS)]
    assert attr.train_texts == texts
    prov = attr.provenance
    expected = {"representation": "representation_similarity"}.get(method, method)
    assert prov["method"] == expected and "package_version" in prov and isinstance(prov["settings"], dict)
    if method == "bm25":
        assert "model_fingerprint" not in prov and prov["k1"] == 1.5 and prov["b"] == 0.75
    else:
        assert prov["model_fingerprint"] == resolve_backend(lm).fingerprint()
        assert prov["backend"] == "nnsight"
    assert attr.sel(query="veldoria", train="doc5") == attr.scores[0, FACT_INDEX]


def test_model_left_untouched(attributions):
    _, before, after = attributions
    assert before == after  # weights (fingerprint), requires_grad flags, train/eval mode


def test_cosine_is_normalized_dot(attributions):
    dot = attributions[0]["gradient_dot"].scores
    cos = attributions[0]["gradient_cosine"].scores
    assert cos.abs().max() <= 1 + 1e-5
    assert torch.equal(torch.sign(dot), torch.sign(cos))


# ---------------------------------------------------------------------------------- BM25
def _bm25_by_hand(docs, query, k1=1.5, b=0.75):
    toks = [B.word_tokenize(d) for d in docs]
    avgdl = sum(map(len, toks)) / len(toks)
    out = []
    for doc in toks:
        s = 0.0
        for term in B.word_tokenize(query):
            n = sum(term in d for d in toks)
            tf = doc.count(term)
            if n == 0 or tf == 0:
                continue
            idf = math.log((len(toks) - n + 0.5) / (n + 0.5))
            s += idf * tf * (k1 + 1) / (tf + k1 * (1 - b + b * len(doc) / avgdl))
        out.append(s)
    return torch.tensor(out)


def test_bm25_exact_ranking_on_hand_case():
    docs = [
        "Apple pie recipe: apples, sugar.",       # 0: apple x1 (+ "apples", another word), long
        "A cherry tree.",                         # 1: cherry x1 (the rarer term)
        "Apple and cherry; apple, cherry!",       # 2: both terms twice
        "Nothing relevant here at all, really.",  # 3
        "apple",                                  # 4: apple x1, very short
        "Dates and figs.",                        # 5
        "A quiet river bank.",                    # 6
        "Some bread.",                            # 7
    ]
    attr = B.bm25(docs, ["APPLE"], [" cherry?"])   # query words: apple (3 docs), cherry (2 docs)
    expected = _bm25_by_hand(docs, "APPLE cherry?")
    assert torch.allclose(attr.scores[0].double(), expected.double(), atol=1e-5)
    # both terms > the rarer term (higher idf) > the common term in a short doc > in a long doc
    assert torch.argsort(attr.scores[0], descending=True).tolist()[:4] == [2, 1, 4, 0]
    assert (attr.scores[0, [3, 5, 6, 7]] == 0).all()
    assert attr.query_texts == ["APPLE cherry?"]


def test_bm25_query_part_reads_only_that_text():
    docs = ["Apple pie recipe: apples, sugar.", "A cherry tree.", "Apple and cherry; apple, cherry!", "apple",
            "Dates and figs.", "Some bread."]
    completion = B.bm25(docs, ["APPLE"], [" cherry?"], query="completion")
    assert torch.allclose(completion.scores[0].double(), _bm25_by_hand(docs, " cherry?").double(), atol=1e-5)
    assert completion.provenance["query"] == "completion" and completion.query_texts == [" cherry?"]
    prompt = B.bm25(docs, ["APPLE"], [" cherry?"], query="prompt")
    assert torch.allclose(prompt.scores[0].double(), _bm25_by_hand(docs, "APPLE").double(), atol=1e-5)
    assert B.bm25(docs, ["APPLE"], [" cherry?"]).provenance["query"] == "prompt+completion"
    with pytest.raises(ValueError, match="query='both' is not one of"):
        B.bm25(docs, ["APPLE"], [" cherry?"], query="both")
    with pytest.raises(ValueError, match="leaves 1 queries without a word.*index 1"):
        B.bm25(docs, ["APPLE", "cherry"], [" cherry?", " ?!"], query="completion")


# -------------------------------------------------------------------- representations
def test_representation_identical_text_is_max(setting):
    lm, _, _, texts = setting
    target = texts[2]
    head, _, tail = target.partition(" ")
    for layer in (0, -1):
        attr = B.representation_similarity(lm, texts, [head], [" " + tail], layer=layer)
        assert int(torch.argmax(attr.scores[0])) == 2
        assert attr.scores[0, 2] == pytest.approx(1.0, abs=1e-5)
        assert attr.provenance["layer"] == layer % 2
        assert attr.provenance["hook"] == f"blocks.{layer % 2}.hook_resid_post"


# ---------------------------------------------------------------------- gradients: sign
def test_gradient_dot_predicts_an_sgd_step(setting, attributions):
    """positive = proponent, literally: one SGD step (lr eta) on example j lowers the query
    loss by ~ eta * scores[q, j]."""
    _, hf, tok, texts = setting
    dot = attributions[0]["gradient_dot"].scores
    query = encode_queries(tok, PROMPTS[:1], COMPLETIONS[:1], 64)
    eta = 1e-3

    def query_loss(model):
        with torch.no_grad():
            return float(token_nll(model(input_ids=query.input_ids).logits, query.input_ids, query.loss_mask)[0])

    base = query_loss(hf)
    for j in (FACT_INDEX, 0):
        model = copy.deepcopy(hf)
        for p in model.parameters():
            p.requires_grad_(True)
        doc = encode_texts(tok, [texts[j]], 64)
        loss = token_nll(model(input_ids=doc.input_ids).logits, doc.input_ids, doc.loss_mask)[0]
        loss.backward()
        with torch.no_grad():
            for p in model.parameters():
                p -= eta * p.grad
        decrease = base - query_loss(model)
        assert decrease == pytest.approx(eta * float(dot[0, j]), rel=0.1, abs=2e-5), j
    assert dot[0, FACT_INDEX] > 0


def test_params_selection(setting):
    lm, _, _, texts = setting
    g = B.example_gradients(lm, texts=texts[:3], params=["transformer.ln_f.*"])
    assert g.shape == (3, 64)
    with pytest.raises(ValueError, match="matches no parameter"):
        B.gradient_similarity(lm, texts, PROMPTS, COMPLETIONS, params=["no.such.weight"])


# ----------------------------------------------------------------------------------- TRAK
def test_trak_tiny_damping_recovers_the_closed_form(setting):
    """With a full-column-rank projection (proj_dim >= P) and damping -> 0,
    Phi_q (Phi^T Phi)^-1 Phi^T = g_q (G^T G)^-1 G^T for ANY projection: check it on the
    32 parameters of the final LayerNorm bias with 48 texts (G^T G invertible)."""
    lm, _, _, _ = setting
    many = _sentences(48, seed=1, lo=4, hi=12)
    params = ["transformer.ln_f.bias"]
    G = B.example_gradients(lm, texts=many, params=params).double()
    Gq = B.example_gradients(lm, prompts=PROMPTS, completions=COMPLETIONS, params=params).double()
    expected = Gq @ torch.linalg.solve(G.T @ G, G.T)
    got = B.trak(lm, many, PROMPTS, COMPLETIONS, params=params, proj_dim=128, damping=1e-10, seed=3)
    err = (got.scores.double() - expected).abs().max() / expected.abs().max()
    assert err < 1e-3, float(err)
    again = B.trak(lm, many, PROMPTS, COMPLETIONS, params=params, proj_dim=128, damping=1e-10, seed=3)
    assert torch.equal(got.scores, again.scores)
    assert got.provenance["proj_dim"] == 128 and got.provenance["n_parameters"] == 32


def test_trak_ensemble_is_the_mean_of_its_models(setting):
    """An ensemble of models: the mean of each model's TRAK scores, model m projected with
    seed + m; the kernel solve is invariant to the features' scale (what lets a sweep slice
    one wide projection)."""
    import copy

    from nnsight import TransformersModel

    lm, hf, tok, texts = setting
    other = copy.deepcopy(hf)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.05 * torch.randn_like(p))
    lm2 = TransformersModel(other, tokenizer=tok, task="text-generation")
    params = ["transformer.h.1.*"]
    kw = dict(proj_dim=64, damping=1e-2, params=params)
    both = B.trak([lm, lm2], texts, PROMPTS, COMPLETIONS, seed=5, **kw)
    one = B.trak(lm, texts, PROMPTS, COMPLETIONS, seed=5, **kw)
    two = B.trak(lm2, texts, PROMPTS, COMPLETIONS, seed=6, **kw)
    torch.testing.assert_close(both.scores, (one.scores + two.scores) / 2, rtol=1e-5, atol=1e-7)
    assert not torch.allclose(one.scores, two.scores)  # the members really differ
    assert both.provenance["n_models"] == 2 and len(both.provenance["damping_absolute"]) == 2
    phi = B.trak_features(lm, texts=texts, proj_dim=64, seed=5, params=params)
    phi_q = B.trak_features(lm, prompts=PROMPTS, completions=COMPLETIONS, proj_dim=64, seed=5, params=params)
    scores, lam = B.trak_scores(phi_q, phi, 1e-2)
    torch.testing.assert_close(scores.float(), one.scores, rtol=1e-5, atol=1e-7)
    scaled, lam3 = B.trak_scores(3 * phi_q, 3 * phi, 1e-2)
    torch.testing.assert_close(scaled, scores, rtol=1e-8, atol=1e-10)  # scale-invariant
    assert lam3 == pytest.approx(9 * lam)
    with pytest.raises(ValueError, match="at least one model"):
        B.trak([], texts, PROMPTS, COMPLETIONS)


# ----------------------------------------------------------------------------------- EK-FAC
def test_conv1d_to_linear_gives_identical_logits(setting):
    from transformers.pytorch_utils import Conv1D

    _, hf, tok, texts = setting
    converted = B.conv1d_to_linear(hf)
    assert not any(isinstance(m, Conv1D) for m in converted.modules())
    assert sum(isinstance(m, Conv1D) for m in hf.modules()) == 8  # the original is untouched
    assert B.linear_module_names(converted) == [f"transformer.h.{i}.{m}" for i in range(2)
                                               for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")]
    batch = encode_texts(tok, texts, 64)
    with torch.no_grad():
        a = hf(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        b = converted(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    assert torch.allclose(a, b, atol=1e-6, rtol=0)


def test_ekfac_sign_large_damping_is_gradient_dot(setting):
    """(G + lambda I)^-1 -> I / lambda: lambda * EK-FAC scores must equal the gradient dot
    product over the tracked modules' weights and biases, sign included."""
    lm, hf, _, texts = setting
    damping = 1e6
    ek = B.ekfac(lm, texts, PROMPTS, COMPLETIONS, damping=damping)
    tracked = ek.provenance["tracked_modules"]
    dot = B.gradient_similarity(lm, texts, PROMPTS, COMPLETIONS, params=[f"{m}.{w}" for m in tracked
                                                                      for w in ("weight", "bias")])
    assert torch.allclose(ek.scores * damping, dot.scores, rtol=1e-3, atol=1e-4 * dot.scores.abs().max())
    assert ek.provenance["conv1d_converted"] == 8 and ek.provenance["conversion_max_abs_logit_diff"] <= 1e-5


def test_ekfac_query_batch_default_fits_memory_and_keeps_scores(setting, attributions):
    """The default query batch is all queries within the gradient budget (one pass over the training
    set), smaller when the budget is small; a batch of one gives the same scores; bad values raise."""
    from stride_nnsight.baselines.ekfac import QUERY_GRADIENT_BUDGET_BYTES, conv1d_to_linear, query_batch_size_for

    lm, hf, _, texts = setting
    default = attributions[0]["ekfac"]
    assert default.provenance["query_batch_size"] == len(PROMPTS)
    converted = conv1d_to_linear(hf)
    tracked = default.provenance["tracked_modules"]
    per_query = 4 * sum(converted.get_submodule(m).weight.numel() + converted.get_submodule(m).bias.numel()
                        for m in tracked)
    assert query_batch_size_for(converted, tracked, 10_000) == min(10_000, QUERY_GRADIENT_BUDGET_BYTES // per_query)
    assert query_batch_size_for(converted, tracked, 10_000, budget_bytes=3 * per_query + 1) == 3
    assert query_batch_size_for(converted, tracked, 10_000, budget_bytes=1) == 1
    one = B.ekfac(lm, texts, PROMPTS, COMPLETIONS, query_batch_size=1)
    assert one.provenance["query_batch_size"] == 1
    assert torch.allclose(one.scores, default.scores, rtol=1e-5, atol=1e-6 * default.scores.abs().max())
    for bad in (0, -2, 2.5, True):
        with pytest.raises(ValueError, match="query_batch_size must be a positive int"):
            B.ekfac(lm, texts, PROMPTS, COMPLETIONS, query_batch_size=bad)


# ----------------------------------------------------------------------------- backends
def test_transformer_lens_bridge_gives_the_same_scores(setting, attributions, tmp_path):
    from stride_nnsight.backends.transformer_lens import bridge_from_hf

    _, hf, tok, texts = setting
    bridge = bridge_from_hf(hf, tok, copy_model=True, tokenizer_dir=str(tmp_path))
    for method, fn in (("representation", lambda m: B.representation_similarity(m, texts, PROMPTS, COMPLETIONS)),
                       ("gradient_dot", lambda m: B.gradient_similarity(m, texts, PROMPTS, COMPLETIONS)),
                       ("ekfac", lambda m: B.ekfac(m, texts, PROMPTS, COMPLETIONS))):
        a, b = attributions[0][method], fn(bridge)
        assert b.provenance["backend"] == "transformer_lens"
        assert torch.allclose(a.scores, b.scores, rtol=1e-4, atol=1e-5 * a.scores.abs().max()), method


def test_missing_optional_dependency_names_the_extra():
    from stride_nnsight.baselines._common import require

    with pytest.raises(ImportError, match=r"stride-nnsight\[eval\]"):
        require("surely_not_an_installed_module_xyz", "surely-not")


# --------------------------------------------------------------------------- membership
def test_token_logprobs_match_a_plain_forward_per_text(setting):
    lm, hf, tok, texts = setting
    got = B.token_logprobs(lm, texts[:4], batch_size=3)
    for text, row in zip(texts[:4], got):
        ids = torch.tensor([[tok.bos_token_id] + tok(text)["input_ids"]])
        logp = torch.log_softmax(hf(input_ids=ids).logits[0, :-1].float(), -1)
        want = logp.gather(-1, ids[0, 1:, None]).squeeze(-1)
        assert row.shape == want.shape
        assert torch.allclose(row, want, atol=1e-5)


def test_membership_scores_are_the_stated_formulas(setting):
    import zlib

    lm, _, _, texts = setting
    items = texts[:5]
    logps = B.token_logprobs(lm, items)
    got = B.membership_scores(lm, items, k=0.25)
    assert set(got) == set(B.MEMBERSHIP_METHODS)
    for i, (text, lp) in enumerate(zip(items, logps)):
        nll = -lp.mean().item()
        lowest = sorted(lp.tolist())[: math.ceil(0.25 * len(lp))]
        assert got["loss"][i].item() == pytest.approx(-nll, rel=1e-5)
        assert got["min_k"][i].item() == pytest.approx(sum(lowest) / len(lowest), rel=1e-5)
        assert got["zlib"][i].item() == pytest.approx(-nll / len(zlib.compress(text.encode())), rel=1e-5)
    # Min-K% with k = 1 is the mean log-probability: the loss score
    assert torch.allclose(B.membership_scores(lm, items, ["min_k"], k=1.0)["min_k"], got["loss"], atol=1e-6)


def test_membership_scores_rank_a_trained_text_above_an_unseen_one(setting):
    lm, _, _, texts = setting
    unseen = "The capital of Quarnith is Veldoria."  # the fact's words, never in this order
    got = B.membership_scores(lm, [FACT, unseen])
    for name, s in got.items():
        assert s[0] > s[1], name


def test_membership_scores_reject_bad_arguments(setting):
    lm = setting[0]
    with pytest.raises(ValueError, match="unknown membership methods"):
        B.membership_scores(lm, ["a text"], ["perplexity"])
    with pytest.raises(ValueError, match="fraction"):
        B.membership_scores(lm, ["a text"], k=0.0)


def test_vmap_per_example_gradients_equal_the_loop(setting):
    """per_example="vmap" (a padded chunk under torch.func.vmap) gives the one-at-a-time
    gradients: rows of different lengths in one chunk, every parameter, queries and texts."""
    lm, _, _, texts = setting
    for kw in (dict(texts=texts), dict(prompts=PROMPTS, completions=COMPLETIONS)):
        loop = B.example_gradients(lm, batch_size=5, **kw)
        batched = B.example_gradients(lm, batch_size=5, per_example="vmap", **kw)
        assert batched.shape == loop.shape
        torch.testing.assert_close(batched, loop, rtol=1e-4, atol=1e-6)
    got = B.gradient_similarity(lm, texts, PROMPTS, COMPLETIONS, per_example="vmap")
    assert got.provenance["per_example"] == "vmap"
    torch.testing.assert_close(got.scores, B.gradient_similarity(lm, texts, PROMPTS, COMPLETIONS).scores,
                               rtol=1e-3, atol=1e-6)
    with pytest.raises(ValueError, match="per_example"):
        B.example_gradients(lm, texts=texts, per_example="batched")
