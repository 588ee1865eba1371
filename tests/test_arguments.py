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
    ({"rank": 0}, "rank must be a positive int"),
    ({"rank": 2.0}, "rank must be a positive int"),
    ({"max_state_mb": 0}, "max_state_mb must be a positive number"),
    ({"max_state_mb": True}, "max_state_mb must be a positive number"),
])
def test_bad_settings_name_the_problem(bad, match):
    with pytest.raises(ValueError, match=match):
        StrideArguments(**bad)


def test_replace_rejects_unknown_names_and_roundtrips():
    args = StrideArguments(rank=8)
    with pytest.raises(TypeError, match="unknown STRIDE setting"):
        args.replace(rnak=4)
    assert StrideArguments.from_dict(args.to_dict()) == args


def test_state_cap_lowers_the_rank_then_cuts_columns():
    """``rank=None`` is 8 lowered one step at a time while the operators' state is over
    ``max_state_mb``; rank 1 still over: the logits placement keeps the most columns that fit.
    Checked against the bytes of real modules built from the resolved settings."""
    from stride_nnsight.arguments import DEFAULT_RANK
    from stride_nnsight.operators import SteeringOperators, state_bytes

    args = StrideArguments()
    assert args.rank is None and args.logit_columns is None and args.max_state_mb == 200
    # the shape: V = 128k, d_model = 4096, K = 256 -> rank 1, every token its own column, <= 200 MB
    big = args.capped_state(256, 4096, 128_256)
    assert (big.rank, big.logit_columns) == (1, None)
    assert state_bytes(256, 1, 4096, 128_256, 64) <= 200e6 < state_bytes(256, 2, 4096, 128_256, 64)
    wide = args.capped_state(512, 4096, 128_256)       # rank 1 over: H columns, the largest that fit
    assert wide.rank == 1 and state_bytes(512, 1, 4096, 128_256, 64, wide.logit_columns) <= 200e6 \
        < state_bytes(512, 1, 4096, 128_256, 64, wide.logit_columns + 1)
    assert args.capped_state(512, 256, 4096).rank == DEFAULT_RANK     # small vocabularies: nothing changes
    mid = args.capped_state(512, 4096, 32_000)                         # a 32k vocabulary fits at the default rank
    assert (mid.rank, mid.logit_columns) == (DEFAULT_RANK, None) and state_bytes(512, 2, 4096, 32_000, 64) <= 200e6
    eight = args.replace(max_state_mb=400).capped_state(256, 4096, 128_256)   # a larger cap: the default rank
    assert (eight.rank, eight.logit_columns) == (DEFAULT_RANK, None)
    uncapped = args.replace(max_state_mb=None).capped_state(256, 4096, 128_256)
    assert (uncapped.rank, uncapped.logit_columns) == (DEFAULT_RANK, None)
    explicit = args.replace(rank=4).capped_state(256, 4096, 128_256)  # an explicit rank stays; columns give
    assert explicit.rank == 4 and state_bytes(256, 4, 4096, 128_256, 64, explicit.logit_columns) <= 200e6
    chosen = args.replace(logit_columns=8192).capped_state(512, 4096, 128_256)  # explicit columns stay
    assert chosen.logit_columns == 8192 and chosen.rank == DEFAULT_RANK
    head = args.replace(placement="head").capped_state(512, 8192, 8192)
    assert (head.rank, head.logit_columns) == (DEFAULT_RANK, None)
    # at a small size, with caps scaled to it, the real module's state dict stays within the cap
    K, d, V, hidden = 8, 16, 400, 8
    for cap in (4 * K * 8 * V, 4 * K * 3 * V, 4 * K * V // 2):
        a = StrideArguments(basis_hidden=hidden, max_state_mb=cap / 1e6).capped_state(K, d, V)
        ops = SteeringOperators(K, d, a.rank, V, placement="logits", hidden=hidden, columns=a.logit_columns)
        real = sum(t.numel() * t.element_size() for t in ops.state_dict().values())
        assert real == state_bytes(K, a.rank, d, V, hidden, a.logit_columns) <= cap
    assert StrideArguments(basis_hidden=hidden, max_state_mb=4 * K * V // 2 / 1e6).capped_state(K, d, V) \
        .logit_columns < V


def test_measurement_setting_rules_and_old_states():
    """``measurement``: ``"auto"`` (default) is first-order for the default metric under the logits
    and head placements and exact otherwise; an explicit ``"first_order"`` where it cannot apply
    is refused naming the fix; a state saved before the setting existed measures exactly, as it
    did when it was written."""
    assert StrideArguments().measurement == "auto"
    assert StrideArguments().first_order_measurement() is True
    assert StrideArguments(placement="head").first_order_measurement() is True
    assert StrideArguments(placement="residual").first_order_measurement() is False
    assert StrideArguments().first_order_measurement(default_metric=False) is False
    assert StrideArguments(measurement="exact").first_order_measurement() is False
    assert StrideArguments(measurement="first_order").first_order_measurement() is True
    with pytest.raises(ValueError, match="measurement must be one of"):
        StrideArguments(measurement="linear")
    with pytest.raises(ValueError, match="needs the 'logits' or 'head' placement"):
        StrideArguments(measurement="first_order", placement="residual")
    with pytest.raises(ValueError, match="needs the default metric"):
        StrideArguments(measurement="first_order").first_order_measurement(default_metric=False)
    saved = StrideArguments().to_dict()
    del saved["measurement"]
    assert StrideArguments.from_saved(saved).measurement == "exact"
