import math

import pytest

from stride_nnsight import StrideArguments


def test_steps_scale_with_the_training_set_by_default():
    args = StrideArguments()
    assert args.steps is None
    per_step = args.batch_size // 2
    # fit_passes passes over the n * d memberships, batch_size // 2 fidelity rows per step
    assert args.fit_steps(2000) == math.ceil(args.fit_passes * 2000 * args.subsets_per_example / per_step)
    assert args.fit_steps(4000) > args.fit_steps(2000)
    assert args.replace(fit_passes=1.0).fit_steps(2000) < args.fit_steps(2000)
    assert args.fit_steps(3) == 100  # floor for tiny corpora


def test_explicit_steps_win():
    assert StrideArguments(steps=37).fit_steps(10_000) == 37


@pytest.mark.parametrize("bad, match", [
    ({"steps": 0}, "steps must be a positive int"),
    ({"steps": 2.5}, "steps must be a positive int"),
    ({"fit_passes": 0}, "fit_passes must be a positive number"),
    ({"lambda_fraction": 1.0}, "lambda_fraction must lie in"),
    ({"subsets_per_example": 9, "n_subsets": 8}, "cannot exceed n_subsets"),
])
def test_bad_settings_name_the_problem(bad, match):
    with pytest.raises(ValueError, match=match):
        StrideArguments(**bad)


def test_replace_rejects_unknown_names_and_roundtrips():
    args = StrideArguments(rank=8)
    with pytest.raises(TypeError, match="unknown STRIDE setting"):
        args.replace(rnak=4)
    assert StrideArguments.from_dict(args.to_dict()) == args
