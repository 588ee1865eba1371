import numpy as np
import pytest

from stride_nnsight.design import SubsetDesign, recommended_n_subsets


def test_column_regular_and_binary():
    design = SubsetDesign(n_examples=500, n_subsets=64, subsets_per_example=6, seed=3)
    M = design.membership
    assert M.shape == (64, 500)
    dense = M.toarray()
    assert set(np.unique(dense)) <= {0.0, 1.0}
    np.testing.assert_array_equal(dense.sum(0), np.full(500, 6))


def test_subset_sizes_are_balanced():
    design = SubsetDesign(1000, 50, 5, seed=0)
    sizes = design.subset_sizes()
    assert sizes.sum() == 5000
    assert sizes.max() - sizes.min() <= 6  # dealt from permutations: nearly equal


def test_seeded_and_reproducible():
    a = SubsetDesign(200, 32, 4, seed=1).membership.toarray()
    b = SubsetDesign(200, 32, 4, seed=1).membership.toarray()
    c = SubsetDesign(200, 32, 4, seed=2).membership.toarray()
    np.testing.assert_array_equal(a, b)
    assert (a != c).any()


def test_members_and_subsets_of_agree():
    design = SubsetDesign(100, 20, 3, seed=0)
    for j in range(100):
        for k in design.subsets_of(j):
            assert j in design.members(int(k))
    assert len(design.subsets_of(7)) == 3


def test_d_equal_k_puts_everything_everywhere():
    design = SubsetDesign(10, 4, 4, seed=0)
    assert design.membership.toarray().all()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(n_examples=0, n_subsets=4, subsets_per_example=1), "n_examples"),
        (dict(n_examples=5, n_subsets=0, subsets_per_example=1), "n_subsets"),
        (dict(n_examples=5, n_subsets=4, subsets_per_example=5), "cannot exceed"),
        (dict(n_examples=5, n_subsets=4, subsets_per_example=0), "subsets_per_example"),
    ],
)
def test_bad_inputs_raise_clear_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SubsetDesign(**kwargs)


def test_type_errors():
    with pytest.raises(TypeError, match="n_subsets must be an int"):
        SubsetDesign(10, 4.0, 2)


def test_warns_below_sparse_recovery_regime():
    with pytest.warns(UserWarning, match="sparse-recovery regime"):
        SubsetDesign(10_000, 20, 2, sparsity=50)
    assert recommended_n_subsets(10_000, 50) > 20


def test_index_errors():
    design = SubsetDesign(10, 4, 2)
    with pytest.raises(IndexError):
        design.members(4)
    with pytest.raises(IndexError):
        design.subsets_of(10)


def test_supported_sparsity_inverts_the_recommended_k():
    from stride_nnsight.design import recommended_n_subsets, supported_sparsity

    for n, K in ((2000, 256), (100_000, 256), (1_000_000, 256), (1_000_000, 1000), (40, 16)):
        k = supported_sparsity(n, K)
        assert recommended_n_subsets(n, k) <= K < recommended_n_subsets(n, k + 1)
    assert supported_sparsity(2000, 256) == 30 and supported_sparsity(1_000_000, 256) == 11


def test_large_corpus_with_few_subsets_warns(recwarn):
    import warnings

    from stride_nnsight.stride import warn_if_underdetermined

    with pytest.warns(UserWarning, match=r"K=256 is small for 100,000 training documents: .* about 14 "):
        warn_if_underdetermined(100_000, 256)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warn_if_underdetermined(2000, 256)   # 30 >= 20: the regime the defaults were sized for
        warn_if_underdetermined(60, 16)      # small corpus: n < 10 K
