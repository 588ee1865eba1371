import pytest
import torch

from stride_nnsight.inputs import as_text_list, encode_queries, encode_texts


def test_encode_texts_masks(tiny_tokenizer):
    batch = encode_texts(tiny_tokenizer, ["the cat sat.", "a dog ran in the park quickly."], max_length=64)
    lengths = batch.attention_mask.sum(1)
    assert lengths[0] < lengths[1]
    # every real token but the first is scored, padding never is
    assert (batch.loss_mask.sum(1) == lengths - 1).all()
    assert (batch.loss_mask <= batch.attention_mask).all()
    assert batch.input_ids[0, 0] == tiny_tokenizer.bos_token_id


def test_encode_texts_truncates(tiny_tokenizer):
    with pytest.warns(UserWarning, match="1 of 1 training documents are longer than max_length=10"):
        batch = encode_texts(tiny_tokenizer, ["the cat " * 50], max_length=10)
    assert batch.input_ids.shape[1] == 10


def test_encode_queries_scores_only_completion(tiny_tokenizer):
    batch = encode_queries(tiny_tokenizer, ["The capital of Veldoria is"], [" Quarnith"], max_length=64)
    n_completion = len(tiny_tokenizer(" Quarnith", add_special_tokens=False)["input_ids"])
    assert batch.loss_mask.sum() == n_completion
    scored = batch.input_ids[0][batch.loss_mask[0].bool()].tolist()
    assert tiny_tokenizer.decode(scored) == " Quarnith"


def test_query_errors(tiny_tokenizer):
    with pytest.raises(ValueError, match="one completion per prompt"):
        encode_queries(tiny_tokenizer, ["a", "b"], ["c"], 64)
    with pytest.raises(ValueError, match="no tokens"):
        encode_queries(tiny_tokenizer, ["a"], [""], 64)


def test_rows_trims_padding(tiny_tokenizer):
    batch = encode_texts(tiny_tokenizer, ["the cat.", "the dog ran over the river quickly and slowly."], 64)
    short = batch.rows([0])
    assert short.input_ids.shape[1] == int(batch.attention_mask[0].sum())
    assert torch.equal(short.input_ids[0], batch.input_ids[0, : short.input_ids.shape[1]])


def test_as_text_list_validation():
    assert as_text_list(("a", "b")) == ["a", "b"]
    with pytest.raises(TypeError, match="single string"):
        as_text_list("abc")
    with pytest.raises(ValueError, match="empty"):
        as_text_list([])
    with pytest.raises(TypeError, match=r"texts\[1\]"):
        as_text_list(["a", 3])

    class FakeDataset:
        column_names = ["text", "label"]

        def __getitem__(self, key):
            return ["x", "y"]

    assert as_text_list(FakeDataset()) == ["x", "y"]
    FakeDataset.column_names = ["content"]
    with pytest.raises(ValueError, match="no 'text' column"):
        as_text_list(FakeDataset())


def test_long_documents_warn_once_from_the_library_not_the_tokenizer(tiny_tokenizer):
    """A document longer than the tokenizer's ``model_max_length`` gets the library's truncation
    warning (with counts and the fix), not also the tokenizer's misleading "... will result in
    indexing errors" (nothing is indexed out of range: the library truncates first)."""
    import copy

    tok = copy.deepcopy(tiny_tokenizer)
    tok.model_max_length = 8
    tok.deprecation_warnings.clear()
    long_text = " ".join(["the cat sat on the mat"] * 10)
    with pytest.warns(UserWarning, match="truncated"):
        batch = encode_texts(tok, [long_text, "a dog"], 16)
    assert batch.input_ids.shape[1] == 16
    assert "sequence-length-is-longer-than-the-specified-maximum" not in tok.deprecation_warnings
    plain = tok(long_text, add_special_tokens=False)  # the tokenizer alone does flag it
    assert len(plain["input_ids"]) > 8
    assert "sequence-length-is-longer-than-the-specified-maximum" in tok.deprecation_warnings

    class NoVerbose:  # a tokenizer callable that does not take verbose=
        pad_token_id, bos_token_id = 0, None

        def __call__(self, text, add_special_tokens=True):
            return {"input_ids": [1 + (ord(c) % 5) for c in text]}

    assert encode_texts(NoVerbose(), ["abc"], 8).input_ids.shape[1] >= 3
