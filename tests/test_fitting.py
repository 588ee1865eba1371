import math

import numpy as np
import pytest
import torch

from stride_nnsight.arguments import StrideArguments
from stride_nnsight.backends import resolve_backend
from stride_nnsight.design import SubsetDesign
from stride_nnsight.fitting import CHECKPOINT_NAME, OperatorFitter
from stride_nnsight.inputs import encode_texts
from stride_nnsight.operators import SteeringOperators


def make_fitter(model, tokenizer, texts, placement="residual", steps=30, **kw):
    backend = resolve_backend(model)
    backend.freeze()
    args = StrideArguments(n_subsets=8, subsets_per_example=2, layer=1, rank=4, steps=steps, batch_size=8,
                           lr=2e-2, placement=placement, linearity_operators=6, sketch_dim=3, checkpoint_every=10,
                           **{"linearity_weight": 0.1, **kw})
    out_dim = 32 if placement == "residual" else backend.vocab_size
    torch.manual_seed(0)
    ops = SteeringOperators(8, 32, 4, out_dim, placement=placement, layer=1, hidden=8)
    design = SubsetDesign(len(texts), 8, 2, seed=0)
    return OperatorFitter(backend, ops, design, encode_texts(tokenizer, texts, 32), args)


@pytest.mark.parametrize("placement", ["residual", "logits"])
def test_fitting_lowers_fidelity_and_moves_parameters(tiny_model, tiny_tokenizer, small_texts, placement):
    fitter = make_fitter(tiny_model, tiny_tokenizer, small_texts[:16], placement, steps=40)
    history = fitter.run(progress=False)
    assert len(history) == 40
    first, last = np.mean(history.fidelity[:8]), np.mean(history.fidelity[-8:])
    assert last < first - 0.05, (first, last)
    assert fitter.operators.coefficients.abs().sum() > 0
    assert all(np.isfinite(history.total))


@pytest.mark.parametrize("sampling", ["document", "membership"])
def test_sampling_respects_membership(tiny_model, tiny_tokenizer, small_texts, sampling):
    fitter = make_fitter(tiny_model, tiny_tokenizer, small_texts[:16], sampling=sampling)
    for _ in range(20):
        fid_ex, fid_ops, stab_ex, stab_ops, probe, probe_ops = fitter.sample_rows()
        for j, k in zip(fid_ex, fid_ops):
            assert j in fitter.design.members(int(k))
        for j, k in zip(stab_ex, stab_ops):
            assert j not in fitter.design.members(int(k))
        assert len(set(probe_ops.tolist())) == len(probe_ops)


def test_document_sampling_scores_each_document_under_all_its_subsets(tiny_model, tiny_tokenizer, small_texts):
    fitter = make_fitter(tiny_model, tiny_tokenizer, small_texts[:16], sampling="document")  # batch 8, d = 2: 2 docs
    assert fitter.args.documents_per_step() == 2 and fitter.args.fidelity_terms_per_step() == 4
    seen = set()
    for _ in range(30):
        fid_ex, fid_ops, stab_ex, stab_ops, _, _ = fitter.sample_rows()
        docs = fid_ex[::2]
        assert len(set(docs.tolist())) == 2  # distinct documents within a step
        assert fid_ex.tolist() == np.repeat(docs, 2).tolist() == stab_ex.tolist()
        for j, ops in zip(docs, fid_ops.reshape(2, 2)):
            assert sorted(ops.tolist()) == sorted(fitter.example_subsets[j].tolist())  # all of its subsets
        for j, k in zip(stab_ex, stab_ops):
            assert int(k) not in fitter.example_subsets[j]
        seen.update(docs.tolist())
    assert len(seen) == 16  # every document gets drawn
    # the step rule counts passes over the memberships: n * d / (fidelity terms per step)
    doc = dict(steps=None, sampling="document")
    assert StrideArguments(**doc, fit_passes=3.0).fit_steps(2000) == 1500
    assert StrideArguments(steps=None, fit_passes=3.0, sampling="membership").fit_steps(2000) == 1500
    assert StrideArguments(**doc, subsets_per_example=3).documents_per_step() == 5
    three = dict(subsets_per_example=3, n_subsets=256)  # 3000 / 256 > 8 members: the passes bind
    assert StrideArguments(**doc, **three).fit_steps(1000) == 600  # 3 passes * 3000 / 15
    assert StrideArguments(steps=None, sampling="membership", **three).fit_steps(1000) == 563
    # default K = 512 at n=1000, d=3: 5.9 members per subset, so the 24-terms-per-operator floor binds
    assert StrideArguments(**doc, subsets_per_example=3).fit_steps(1000) == math.ceil(24 * 512 / 15)
    with pytest.raises(ValueError, match="sampling must be one of"):
        StrideArguments(sampling="rows")


def test_shared_rows_forward_runs_each_document_once():
    from stride_nnsight.operators import shared_rows_forward

    torch.manual_seed(0)
    weight = torch.randn(5, 7)
    calls = []

    def forward(input_ids, attention_mask, edit=None, **kw):
        calls.append((int(input_ids.shape[0]), edit is None, kw))
        x = torch.nn.functional.one_hot(input_ids, 5).float() * attention_mask[..., None]
        return x @ weight, x.sum(-1)

    ids = torch.tensor([[1, 2, 3], [4, 0, 0], [1, 2, 3], [1, 2, 3], [4, 0, 0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0], [1, 1, 1], [1, 1, 1], [1, 0, 0]])
    index = torch.tensor([7, 2, 7, 7, 2])
    wrapped = shared_rows_forward(forward, index)
    logits, z = wrapped(ids, mask, None)
    full_logits, full_z = forward(ids, mask, None)
    assert calls[0][0] == 2  # two distinct documents, one row each
    torch.testing.assert_close(logits, full_logits)
    torch.testing.assert_close(z, full_z)
    calls.clear()
    wrapped(ids, mask, lambda h: h)  # a steered call runs every row
    wrapped(ids, mask, None, positions=torch.zeros(5, 1, dtype=torch.long))  # as does one with positions
    assert [c[0] for c in calls] == [5, 5]
    assert shared_rows_forward(forward, torch.arange(5)) is forward  # nothing shared: the forward itself


@pytest.mark.parametrize("placement", ["logits", "residual"])
def test_document_and_membership_fits_both_learn(tiny_model, tiny_tokenizer, small_texts, placement):
    """Both samplings lower the fidelity loss."""
    for sampling in ("document", "membership"):
        fitter = make_fitter(tiny_model, tiny_tokenizer, small_texts[:16], placement, steps=40, sampling=sampling,
                             linearity_weight=0.0)
        history = fitter.run(progress=False)
        first, last = np.mean(history.fidelity[:8]), np.mean(history.fidelity[-8:])
        assert last < first - 0.05, (sampling, first, last)


def test_loss_positions_are_drawn_among_candidates(tiny_model, tiny_tokenizer, small_texts):
    from stride_nnsight.operators import loss_candidates

    fitter = make_fitter(tiny_model, tiny_tokenizer, small_texts[:16], loss_positions=4)
    twin = make_fitter(tiny_model, tiny_tokenizer, small_texts[:16], loss_positions=4)
    seen = set()
    for _ in range(10):
        fid_ex, _, stab_ex, _, probe, probe_ops = fitter.sample_rows()
        twin.sample_rows()
        n_fid, n_stab, n_probe = len(fid_ex), len(stab_ex), len(probe_ops)
        batch = fitter.texts.rows(np.concatenate([fid_ex, stab_ex, np.full(n_probe, probe)]))
        positions, valid = fitter.sample_positions(batch, n_fid, n_stab, n_probe)
        again, _ = twin.sample_positions(batch, n_fid, n_stab, n_probe)
        assert torch.equal(positions, again)  # a function of the fit's generator: resumable
        cand = loss_candidates(batch.input_ids, batch.attention_mask, batch.loss_mask, n_fid, n_stab)
        assert positions.shape == (len(batch), min(4, batch.input_ids.shape[1]))
        assert torch.equal(valid, cand.gather(1, positions))
        assert valid.sum(1).tolist() == cand.sum(1).clamp(max=4).tolist()  # as many as it can, no repeats
        for row in range(len(batch)):
            chosen = positions[row][valid[row]].tolist()
            assert len(set(chosen)) == len(chosen)
            seen.update((row, j) for j in chosen)
        probe_rows = positions[n_fid + n_stab:]
        assert bool((probe_rows == probe_rows[:1]).all())  # the probe's copies share their positions
    assert len(seen) > 40  # different draws each step
    none = make_fitter(tiny_model, tiny_tokenizer, small_texts[:16])
    assert none.sample_positions(none.texts.rows([0, 1]), 1, 1, 0) == (None, None)
    with pytest.raises(ValueError, match="loss_positions must be a positive int"):
        StrideArguments(loss_positions=0)


@pytest.mark.parametrize("positions", [None, 3])
def test_checkpoint_resume_equals_uninterrupted(tiny_model, tiny_tokenizer, small_texts, tmp_path, positions):
    full = make_fitter(tiny_model, tiny_tokenizer, small_texts[:16], steps=20, loss_positions=positions)
    full.run(progress=False)

    part = make_fitter(tiny_model, tiny_tokenizer, small_texts[:16], steps=20, loss_positions=positions)
    calls = {"n": 0}
    original = part.train_step

    def crash_after_ten():
        if calls["n"] == 10:
            raise KeyboardInterrupt
        calls["n"] += 1
        return original()

    part.train_step = crash_after_ten
    with pytest.raises(KeyboardInterrupt):
        part.run(progress=False, checkpoint_dir=tmp_path)
    assert (tmp_path / CHECKPOINT_NAME).exists()
    resumed = make_fitter(tiny_model, tiny_tokenizer, small_texts[:16], steps=20, loss_positions=positions)
    resumed.run(progress=False, checkpoint_dir=tmp_path)
    assert resumed.history.step == list(range(1, 21))
    np.testing.assert_allclose(resumed.history.total, full.history.total, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(resumed.operators.coefficients, full.operators.coefficients, rtol=1e-4, atol=1e-6)


def test_noop_gradients_are_detected(tiny_model, tiny_tokenizer, small_texts):
    fitter = make_fitter(tiny_model, tiny_tokenizer, small_texts[:16], steps=3)

    class Silent(type(fitter.backend)):
        def forward(self, input_ids, attention_mask, layer, edit=None):  # drops the edit
            return super().forward(input_ids, attention_mask, layer, None)

    fitter.backend.__class__ = Silent
    try:
        with pytest.raises(RuntimeError, match="not reaching the operators"):
            fitter.run(progress=False)
    finally:
        fitter.backend.__class__ = Silent.__mro__[1]
