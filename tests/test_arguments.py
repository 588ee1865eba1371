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
    # small subsets: at least min_operator_rows fidelity terms per operator (K=512 at n=520, d=4)
    assert args.subsets_for(520) == 512 and 3 * 520 * 4 < 24 * 512
    assert args.fit_steps(520) == math.ceil(24 * 512 / per_step) == 768
    assert args.replace(min_operator_rows=1).fit_steps(520) == math.ceil(3 * 520 * 4 / per_step)
    assert args.replace(n_subsets=256).fit_steps(520) == math.ceil(3 * 520 * 4 / per_step)  # 8 members: passes bind


def test_subsets_follow_the_training_set_by_default():
    args = StrideArguments()
    assert args.n_subsets is None
    # K = min(512, n d // 2), at least d: about two members per subset on small corpora
    assert [args.subsets_for(n) for n in (1, 24, 150, 255, 256, 520, 2000, 10**6)] == [4, 48, 300, 510, 512, 512,
                                                                                         512, 512]
    assert args.replace(subsets_per_example=8).subsets_for(24) == 96
    assert StrideArguments(n_subsets=64).subsets_for(10**6) == 64  # an explicit K wins
    for n in (1, 3, 24, 150, 2000):  # every auto K is a valid design: d <= K <= n d
        assert args.subsets_per_example <= args.subsets_for(n) <= n * args.subsets_per_example


def test_explicit_steps_win():
    assert StrideArguments(steps=37).fit_steps(10_000) == 37


@pytest.mark.parametrize("bad, match", [
    ({"steps": 0}, "steps must be a positive int"),
    ({"steps": 2.5}, "steps must be a positive int"),
    ({"fit_passes": 0}, "fit_passes must be a positive number"),
    ({"lambda_fraction": 1.0}, "lambda_fraction must lie in"),
    ({"subsets_per_example": 9, "n_subsets": 8}, "cannot exceed n_subsets"),
    ({"n_subsets": 0}, "n_subsets must be a positive int"),
    ({"n_subsets": 12.0}, "n_subsets must be a positive int"),
])
def test_bad_settings_name_the_problem(bad, match):
    with pytest.raises(ValueError, match=match):
        StrideArguments(**bad)


def test_replace_rejects_unknown_names_and_roundtrips():
    args = StrideArguments(rank=8)
    with pytest.raises(TypeError, match="unknown STRIDE setting"):
        args.replace(rnak=4)
    assert StrideArguments.from_dict(args.to_dict()) == args
