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
