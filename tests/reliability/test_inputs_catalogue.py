"""Input catalogue: what each kind of corpus, query and length setting does (docs/reliability.md).

Each test pins one row of the catalogue: the exact exception and message fragment, the
warning text with its counts, or the values that come out.
"""

from __future__ import annotations

import random
import warnings
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from stride_nnsight import Stride, StrideArguments
from stride_nnsight.backends import resolve_backend
from stride_nnsight.backends.base import ModelBackend
from stride_nnsight.design import SubsetDesign, check_design_size
from stride_nnsight.fitting import OperatorFitter
from stride_nnsight.inputs import as_text_list, encode_queries, encode_texts, resolve_max_length
from stride_nnsight.operators import SteeringOperators

WORDS = ("the a cat dog sat ran on in park mat bird sang while and over under house tree river "
         "blue red green small large quickly slowly").split()
TINY = dict(n_subsets=16, subsets_per_example=2, rank=4, steps=2, batch_size=8, linearity_operators=8,
            sketch_dim=4, basis_hidden=8)
CONTEXT = 64  # n_positions of the tiny_model fixture


def corpus(n: int, seed: int = 0, words: tuple[int, int] = (6, 14)) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(*words))) + "." for _ in range(n)]


def n_tokens(tokenizer, text: str) -> int:
    """Tokens of ``text`` as a training document: BOS + its tokens."""
    return 1 + len(tokenizer(text, add_special_tokens=False)["input_ids"])


def messages(record, fragment: str) -> list[str]:
    return [str(w.message) for w in record if fragment in str(w.message)]


# ----------------------------------------------------------------------------- design size
def test_forty_documents_with_too_many_subsets_refused_before_any_work(tiny_model, small_texts):
    stride = Stride(tiny_model, layer=1, n_subsets=256)  # K=256, d=4 (the default K would fit)
    with pytest.raises(ValueError) as err:
        stride.fit(small_texts)  # 40 texts
    assert str(err.value) == ("K=256 subsets but 40 training examples x d=4 = 160 memberships: each subset needs "
                              "a member. Use n_subsets <= 160 or subsets_per_example >= 7 "
                              "(or train on at least 64 examples)")
    assert stride.train_texts is None and stride.design is None and stride.operators is None


def test_subset_design_refuses_fewer_memberships_than_subsets():
    with pytest.raises(ValueError, match=r"Use n_subsets <= 160 or subsets_per_example >= 7"):
        SubsetDesign(40, 256, 4)
    with pytest.raises(ValueError, match=r"1 training examples x d=3 = 3 memberships.*subsets_per_example >= 4"):
        check_design_size(1, 4, 3)
    check_design_size(64, 256, 4)  # n * d == K: allowed


def test_seventy_documents_fit_and_no_subset_is_empty(tiny_model, tiny_tokenizer):
    texts = corpus(70, seed=1)
    stride = Stride(tiny_model, layer=1, n_subsets=256, steps=2).fit(texts, progress=False)
    assert len(stride.history) == 2
    sizes = stride.design.subset_sizes()
    assert sizes.shape == (256,) and sizes.min() >= 1 and sizes.sum() == 70 * 4


def test_small_corpora_with_default_subsets_fit(tiny_model, small_texts):
    stride = Stride(tiny_model, layer=1, steps=2).fit(small_texts, progress=False)  # 40 texts, d=4
    sizes = stride.design.subset_sizes()
    assert stride.args.n_subsets == 80 and sizes.shape == (80,) and sizes.min() >= 1 and sizes.sum() == 40 * 4


def test_design_whose_redraw_emptied_a_subset_now_fits(tiny_model):
    # n=2, K=3, d=2, seed=6: the redraw of a straddling column used to leave a subset empty
    # (then fitting crashed with "random_ expects 'from' to be less than 'to'")
    design = SubsetDesign(2, 3, 2, seed=6)
    assert design.subset_sizes().min() >= 1
    stride = Stride(tiny_model, layer=1, **dict(TINY, n_subsets=3, subsets_per_example=2), seed=6)
    stride.fit(corpus(2), progress=False)
    assert len(stride.history) == 2


@pytest.mark.parametrize("n", [1, 2, 3, 5, 8, 13, 30])
def test_random_designs_never_have_an_empty_or_a_full_subset(n):
    for K in range(1, 24):
        for d in range(1, K + 1):
            if n * d < K:
                continue
            for seed in range(8):
                M = SubsetDesign(n, K, d, seed=seed).membership.toarray()
                assert set(np.unique(M)) <= {0.0, 1.0}, (n, K, d, seed)
                np.testing.assert_array_equal(M.sum(0), np.full(n, d))
                sizes = M.sum(1)
                assert sizes.min() >= 1, (n, K, d, seed)
                if n > 1 and n * (K - d) >= K:  # enough non-memberships for every subset to miss one
                    assert sizes.max() < n, (n, K, d, seed)


def _dealt_without_repair(n: int, K: int, d: int, seed: int) -> np.ndarray:
    """The design algorithm before the repair step (balanced dealing + redraw), dense [K, n]."""
    rng = np.random.default_rng(seed)
    pool = np.concatenate([rng.permutation(K) for _ in range(-(-n * d // K))])[: n * d]
    rows = pool.reshape(n, d)
    for j in np.nonzero((np.diff(np.sort(rows, axis=1), axis=1) == 0).any(axis=1))[0]:
        rows[j] = rng.choice(K, size=d, replace=False)
    M = np.zeros((K, n))
    M[rows.ravel(), np.repeat(np.arange(n), d)] = 1
    return M


@pytest.mark.parametrize("n, K, d, seed", [(2000, 256, 4, 0), (2000, 256, 8, 0), (2000, 512, 4, 0),
                                           (500, 64, 6, 3), (70, 256, 4, 0)])
def test_designs_that_needed_no_repair_are_unchanged(n, K, d, seed):
    # the repair only acts on empty / full subsets, so fitted states and the benchmark keep their designs
    np.testing.assert_array_equal(SubsetDesign(n, K, d, seed=seed).membership.toarray(),
                                  _dealt_without_repair(n, K, d, seed))


def _fitter(tiny_model, tokenizer, n, K, d, seed=0, sampling="document"):
    backend = resolve_backend(tiny_model)
    args = StrideArguments(n_subsets=K, subsets_per_example=d, layer=1, rank=2, steps=2, batch_size=16,
                           linearity_operators=2, sketch_dim=2, seed=seed, sampling=sampling)
    torch.manual_seed(0)
    ops = SteeringOperators(K, 32, 2, 32, placement="residual", layer=1, hidden=4)
    return OperatorFitter(backend, ops, SubsetDesign(n, K, d, seed=seed), encode_texts(tokenizer, corpus(n), 64), args)


@pytest.mark.parametrize("sampling, rows", [("document", 4), ("membership", 8)])
def test_stability_rows_avoid_subsets_that_hold_every_example(tiny_model, tiny_tokenizer, sampling, rows):
    # document sampling: min(n=2, 16 // (2 * 2)) documents x d=2 stability rows each
    fitter = _fitter(tiny_model, tiny_tokenizer, n=2, K=3, d=2, seed=6, sampling=sampling)
    full = [k for k in range(3) if len(fitter.design.members(k)) == 2]
    assert full  # 2 examples in 2 of 3 subsets: some subset must hold both
    for _ in range(10):
        _, _, stab_ex, stab_ops, _, _ = fitter.sample_rows()
        assert len(stab_ex) == rows
        for j, k in zip(stab_ex, stab_ops):
            assert int(k) not in full and j not in fitter.design.members(int(k))


def test_no_stability_rows_when_every_subset_holds_every_example(tiny_model, tiny_tokenizer):
    fitter = _fitter(tiny_model, tiny_tokenizer, n=5, K=3, d=3)
    fid_ex, fid_ops, stab_ex, stab_ops, _, _ = fitter.sample_rows()
    # document sampling: 16 // (2 * 3) = 2 documents, each under its 3 subsets, no stability rows
    assert len(fid_ex) == 6 and len(stab_ex) == 0 and len(stab_ops) == 0
    assert len(set(fid_ex.tolist())) == 2
    membership = _fitter(tiny_model, tiny_tokenizer, n=5, K=3, d=3, sampling="membership")
    fid_ex, _, stab_ex, stab_ops, _, _ = membership.sample_rows()
    assert len(fid_ex) == 8 and len(stab_ex) == 0 and len(stab_ops) == 0


# ------------------------------------------------------------------------- containers
def test_dataframe_trains_on_its_text_column():
    pd = pytest.importorskip("pandas")
    df = pd.DataFrame({"label": [0, 1], "text": ["the cat sat.", "a dog ran."]})
    assert as_text_list(df, "train_texts") == ["the cat sat.", "a dog ran."]


def test_dataframe_without_text_column_names_its_columns():
    pd = pytest.importorskip("pandas")
    df = pd.DataFrame({"body": ["x", "y"], "label": [0, 1]})
    with pytest.raises(ValueError, match=r"the DataFrame has no 'text' column \(columns: \['body', 'label'\]\)"):
        as_text_list(df, "train_texts")


def test_dataframe_missing_value_names_its_position():
    pd = pytest.importorskip("pandas")
    df = pd.DataFrame({"text": ["x", None, "z"]})  # pandas stores the missing value as NaN
    with pytest.raises(TypeError, match=r"train_texts\[1\] is a float \(a missing value\?\), expected str"):
        as_text_list(df, "train_texts")


def test_series_gives_its_values_not_its_index():
    pd = pytest.importorskip("pandas")
    series = pd.Series(["b text", "a text"], index=["doc-b", "doc-a"])
    out = as_text_list(series, "train_texts")
    assert out == ["b text", "a text"] and all(type(t) is str for t in out)


def test_dict_is_refused_with_the_fix():
    with pytest.raises(TypeError, match=r"iterating it gives its keys.*Pass list\(d.values\(\)\) and "
                                        r"train_ids=list\(d.keys\(\)\)"):
        as_text_list({"doc-1": "the cat sat.", "doc-2": "a dog ran."}, "train_texts")
    with pytest.raises(TypeError, match=r"query_ids=list\(d.keys\(\)\)"):
        as_text_list({"q": "the cat"}, "prompts")


@pytest.mark.parametrize("unordered", [{"the cat sat.", "a dog ran."}, frozenset({"the cat sat."})])
def test_set_is_refused_as_unordered(unordered):
    with pytest.raises(TypeError, match=r"no stable order.*Pass sorted\(train_texts\) or a list"):
        as_text_list(unordered, "train_texts")


def test_numpy_array_and_generator_are_accepted():
    out = as_text_list(np.array(["the cat", "a dog"]), "train_texts")
    assert out == ["the cat", "a dog"] and all(type(t) is str for t in out)
    assert as_text_list((t for t in ["x", "y"]), "train_texts") == ["x", "y"]
    with pytest.raises(ValueError, match=r"numpy array of shape \(1, 2\): pass a 1-D array"):
        as_text_list(np.array([["a", "b"]]), "train_texts")


def test_non_str_element_names_its_index():
    with pytest.raises(TypeError, match=r"train_texts\[2\] is a bytes, expected str"):
        as_text_list(["a", "b", b"c"], "train_texts")


# --------------------------------------------------------------------- tokenizer errors
def test_lone_surrogate_names_the_document_and_the_fix(tiny_tokenizer):
    with pytest.raises(ValueError) as err:
        encode_texts(tiny_tokenizer, ["the cat sat.", "a dog\ud800 ran."], 64)
    message = str(err.value)
    assert message.startswith("training text 1 could not be tokenized (TypeError")
    assert "it starts 'a dog\\ud800 ran.'" in message
    assert "'\\ud800' at position 5" in message and "text.encode('utf-8', 'replace').decode()" in message


def test_lone_surrogate_in_a_query_names_the_query(tiny_tokenizer):
    with pytest.raises(ValueError, match=r"^query 1 \(completion\) could not be tokenized.*lone surrogate"):
        encode_queries(tiny_tokenizer, ["the cat", "a dog"], [" sat", " ran\ud800"], 64)


def test_lone_surrogate_through_fit_is_refused_before_any_work(tiny_model):
    texts = corpus(8)
    texts[5] = "\ud800" + texts[5]
    stride = Stride(tiny_model, layer=1, **TINY)
    with pytest.raises(ValueError, match=r"^train_texts\[5\] cannot be used: it starts '\\ud800.*not valid UTF-8 "
                                         r"\('\\ud800' at position 0"):
        stride.fit(texts, progress=False)
    assert stride.train_texts is None
    with pytest.raises(ValueError, match=r"^prompts\[0\] cannot be used"):
        stride.encode_queries(["x\ud800"], [" sat"])


# -------------------------------------------------------------------------- max_length
def test_max_length_defaults_to_none_and_validates():
    assert StrideArguments().max_length is None
    assert StrideArguments(max_length=2).max_length == 2
    for bad in (1, 2.5, True, "64"):
        with pytest.raises(ValueError, match="max_length must be an int >= 2 tokens"):
            StrideArguments(max_length=bad)


def test_context_length_read_from_the_config(tiny_model):
    assert resolve_backend(tiny_model).context_length == CONTEXT

    class Bare(ModelBackend):
        def __init__(self, config):
            self.config = config

        def hf_config(self):
            return self.config

    assert Bare(SimpleNamespace(max_position_embeddings=4096)).context_length == 4096
    assert Bare(SimpleNamespace(text_config=SimpleNamespace(seq_length=2048))).context_length == 2048
    assert Bare(SimpleNamespace(hidden_size=8)).context_length is None
    assert Bare(None).context_length is None


def test_context_length_of_a_transformer_lens_bridge(tiny_hf_model, tiny_tokenizer):
    pytest.importorskip("transformer_lens")
    from stride_nnsight.backends.transformer_lens import TransformerLensBackend, bridge_from_hf

    bridge = bridge_from_hf(tiny_hf_model, tiny_tokenizer, copy_model=True)
    assert TransformerLensBackend(bridge).context_length == CONTEXT


def test_resolve_max_length_rules():
    assert resolve_max_length(None, 64) == 64
    assert resolve_max_length(None, None) is None
    assert resolve_max_length(32, 64) == 32 and resolve_max_length(32, None) == 32
    with pytest.warns(UserWarning) as record:
        assert resolve_max_length(100, 64) == 64
    assert [str(w.message) for w in record] == [
        "max_length=100 exceeds the model's context of 64 tokens: using max_length=64"]


def test_max_length_none_uses_the_longest_document(tiny_model, tiny_tokenizer):
    texts = corpus(24, seed=3)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        stride = Stride(tiny_model, layer=1, **TINY).fit(texts, progress=False)
    longest = max(n_tokens(tiny_tokenizer, t) for t in texts)
    assert longest < CONTEXT and stride.train_max_length == longest
    assert not messages(record, "truncated")
    provenance = stride.provenance()
    assert provenance["max_length"] == longest and provenance["query_max_length"] == CONTEXT


def test_max_length_beyond_the_context_is_clipped_with_a_warning(tiny_model, tiny_tokenizer):
    # used to be an IndexError inside the position embedding
    texts = corpus(15, seed=4) + [" ".join(["the cat sat on the mat"] * 20)]
    longest = n_tokens(tiny_tokenizer, texts[-1])
    assert longest > CONTEXT
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        stride = Stride(tiny_model, layer=1, **TINY, max_length=100).fit(texts, progress=False)
    assert messages(record, "exceeds the model's context") == [
        "max_length=100 exceeds the model's context of 64 tokens: using max_length=64"]
    assert messages(record, "truncated") == [
        f"1 of 16 training documents are longer than max_length=64 tokens (longest: {longest} tokens, BOS "
        "included) and were truncated: their later tokens are neither trained on nor attributed. Fix: 64 tokens "
        "is the model's context: split long documents into chunks of at most 64 tokens."]
    assert stride.train_max_length == 64 and stride.provenance()["max_length"] == 64


def test_truncation_warning_counts_exactly(tiny_model, tiny_tokenizer):
    texts = corpus(24, seed=5, words=(3, 20))
    lengths = [n_tokens(tiny_tokenizer, t) for t in texts]
    limit = 12
    cut = sum(length > limit for length in lengths)
    assert 0 < cut < len(texts)
    with pytest.warns(UserWarning) as record:
        stride = Stride(tiny_model, layer=1, **TINY, max_length=limit).fit(texts, progress=False)
    assert messages(record, "truncated") == [
        f"{cut} of 24 training documents are longer than max_length=12 tokens (longest: {max(lengths)} tokens, "
        "BOS included) and were truncated: their later tokens are neither trained on nor attributed. Fix: raise "
        "max_length (max_length=None uses the longest document, up to the model's context) or split long "
        "documents into chunks of at most 12 tokens."]
    assert stride.train_max_length == 12


def test_long_prompts_are_cut_from_the_left_with_a_warning(tiny_model, tiny_tokenizer):
    stride = Stride(tiny_model, layer=1, **TINY)  # max_length None: queries get the model's context
    long_prompt = " ".join(["the dog ran over the river"] * 15)
    sat = tiny_tokenizer(" sat", add_special_tokens=False)["input_ids"]
    longest = n_tokens(tiny_tokenizer, long_prompt + " and") + len(sat)
    assert n_tokens(tiny_tokenizer, long_prompt) + len(sat) > CONTEXT
    with pytest.warns(UserWarning) as record:
        batch = stride.encode_queries(["the cat", long_prompt, long_prompt + " and"], [" sat", " sat", " sat"])
    assert messages(record, "queries are longer") == [
        f"2 of 3 queries are longer than 64 tokens (the model's context; longest: {longest} tokens, BOS "
        "included): their prompts were cut from the left, so the attribution only sees their last tokens. "
        "Fix: shorten those prompts."]
    assert batch.input_ids.shape[1] == CONTEXT
    assert batch.input_ids[1, CONTEXT - len(sat):].tolist() == sat  # the completion is kept whole


def test_long_prompts_with_an_explicit_max_length_name_it(tiny_tokenizer):
    prompt = "the dog ran over the river and the cat"
    with pytest.warns(UserWarning, match=r"^1 of 1 queries are longer than 6 tokens \(max_length; .*"
                                         r"Fix: shorten those prompts or raise max_length\.$"):
        batch = encode_queries(tiny_tokenizer, [prompt], [" sat"], 6)
    assert batch.input_ids.shape == (1, 6)


def test_short_queries_do_not_warn(tiny_tokenizer):
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        encode_queries(tiny_tokenizer, ["the cat"], [" sat"], 64)
        encode_texts(tiny_tokenizer, ["the cat sat."], 64)


def test_effective_max_length_survives_save_and_load(tiny_model, tiny_tokenizer, tmp_path):
    texts = corpus(24, seed=6)
    stride = Stride(tiny_model, layer=1, **TINY).fit(texts, progress=False)
    stride.save(tmp_path / "state")
    loaded = Stride.load(tmp_path / "state", tiny_model)
    assert loaded.args.max_length is None
    assert loaded.train_max_length == stride.train_max_length == max(n_tokens(tiny_tokenizer, t) for t in texts)
