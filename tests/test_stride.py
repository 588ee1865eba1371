"""The facade: construction, fit -> attribute -> save/load, and clear errors."""

import warnings

import pytest
import torch

from stride_nnsight import Attribution, Stride, StrideArguments

FAST = dict(n_subsets=16, subsets_per_example=2, rank=4, steps=12, batch_size=8, linearity_operators=8,
            sketch_dim=4, basis_hidden=8, max_length=32)


@pytest.fixture(scope="module")
def fitted(tiny_model, small_texts):
    return Stride(tiny_model, layer=1, seed=0, placement="residual", **FAST).fit(small_texts[:24], progress=False)


def test_fit_and_attribute_shapes_and_provenance(fitted):
    attr = fitted.attribute(["the cat sat", "a dog"], [" on the mat.", " ran"], progress=False)
    assert isinstance(attr, Attribution)
    assert attr.scores.shape == (2, 24) and attr.scores.dtype == torch.float32
    assert attr.measurements.shape == (2, 16)
    p = attr.provenance
    assert p["method"] == "STRIDE" and p["layer"] == 1 and p["n_subsets"] == 16
    assert p["subsets_per_example"] == 2 and p["rank"] == 4 and p["placement"] == "residual"
    assert p["backend"] == "nnsight" and p["hook"] == "blocks.1.hook_resid_post"
    assert len(p["lambdas"]) == 2 and p["model_fingerprint"] == fitted.fingerprint
    assert attr.query_texts[0] == "the cat sat on the mat."
    assert "Stride(" in repr(fitted) and "fitted on 24" in repr(fitted)


def test_default_subsets_are_chosen_from_the_training_set(tiny_model, small_texts, tmp_path):
    fast = {k: v for k, v in FAST.items() if k != "n_subsets"}
    stride = Stride(tiny_model, layer=1, placement="residual", **{**fast, "steps": 2})
    assert stride.args.n_subsets is None and "K=auto" in repr(stride)
    stride.fit(small_texts[:12], progress=False)
    assert stride.args.n_subsets == 12 == stride.design.n_subsets == stride.operators.n_operators  # 12 x d=2 // 2
    assert stride.attribute(["the cat"], [" sat"], progress=False).provenance["n_subsets"] == 12
    stride.fit(small_texts[:20], progress=False)  # a refit on another corpus chooses again
    assert stride.design.n_subsets == 20
    stride.save(tmp_path / "state")  # the saved settings hold the K that was used
    assert Stride.load(tmp_path / "state", tiny_model).args.n_subsets == 20


def test_save_load_roundtrip(fitted, tiny_model, tmp_path):
    before = fitted.attribute(["the cat sat"], [" on the mat."], progress=False)
    fitted.save(tmp_path / "state")
    loaded = Stride.load(tmp_path / "state", tiny_model)
    after = loaded.attribute(["the cat sat"], [" on the mat."], progress=False)
    torch.testing.assert_close(after.scores, before.scores)
    torch.testing.assert_close(after.measurements, before.measurements)
    assert loaded.args == fitted.args and loaded.train_texts == fitted.train_texts
    assert loaded.history.total == fitted.history.total


def test_load_refuses_other_model(fitted, tiny_tokenizer, tmp_path):
    from nnsight import TransformersModel
    from transformers import GPT2LMHeadModel

    fitted.save(tmp_path / "state")
    torch.manual_seed(123)
    other = GPT2LMHeadModel(fitted.backend.torch_module.config).eval()
    other_model = TransformersModel(other, tokenizer=tiny_tokenizer, task="text-generation")
    with pytest.raises(ValueError, match="model mismatch"):
        Stride.load(tmp_path / "state", other_model)
    assert Stride.load(tmp_path / "state", other_model, strict=False).operators is not None
    with pytest.raises(FileNotFoundError, match="stride.save"):
        Stride.load(tmp_path / "nowhere", other_model)


def test_logits_placement_end_to_end(tiny_model, small_texts):
    stride = Stride(tiny_model, layer=0, placement="logits", **FAST).fit(small_texts[:24], progress=False)
    attr = stride.attribute(["the cat", "a dog"], [" sat", " ran"], progress=False, recovery="lasso")
    assert attr.scores.shape == (2, 24) and attr.provenance["placement"] == "logits"
    assert stride.operators.coefficients.shape[-1] == stride.backend.vocab_size
    # scores are held sparse and equal the dense recovery of the same measurements (the Lasso alone
    # here; the default adds the token component, tests/test_token_component.py)
    from stride_nnsight.recovery import recover

    args = stride.args
    dense, _ = recover(attr.measurements.numpy(), stride.design.membership, args.lambda_rule, args.lambda_fraction,
                       args.fit_intercept, progress=False, seed=args.seed)
    assert attr.is_sparse and attr.nnz == int((dense != 0).sum())
    torch.testing.assert_close(attr.scores, torch.from_numpy(dense))
    # every query carries its noise floor (8 shuffled recoveries by default)
    from stride_nnsight.recovery import noise_floor

    floor = noise_floor(attr.measurements.numpy(), stride.design.membership, args.lambda_rule, args.lambda_fraction,
                        args.fit_intercept, n_permutations=8, seed=args.seed)
    torch.testing.assert_close(attr.noise_floor, torch.from_numpy(floor).float())
    assert attr.provenance["null_permutations"] == 8
    table = attr.top_k(5)
    assert "noise_ratio" in table.columns
    kept = attr.top_k(5, above_noise=True)
    assert set(kept.train_index) <= set(table.train_index) and (kept.noise_ratio > 1).all()
    assert attr[[1]].provenance["noise_floor"] == [attr.provenance["noise_floor"][1]]  # rows keep their floors
    bare = stride.attribute(["the cat"], [" sat"], progress=False, null_permutations=0)
    assert bare.noise_floor is None and "noise_ratio" not in bare.top_k(3).columns
    with pytest.raises(ValueError, match="null_permutations=8"):
        bare.top_k(3, above_noise=True)
    with pytest.raises(ValueError, match="null_permutations must be"):
        stride.attribute(["the cat"], [" sat"], progress=False, null_permutations=-1)


def test_measurement_default_override_and_provenance(tiny_model, small_texts):
    """The logits placement measures first-order by default (``"auto"``);
    ``attribute(measurement="exact")`` measures the exact change from the same operators; the
    provenance records which; a custom metric is measured exactly under ``"auto"`` and refused
    under an explicit ``"first_order"`` (states saved without the setting: tests/test_arguments.py)."""
    stride = Stride(tiny_model, layer=0, placement="logits", **FAST).fit(small_texts[:24], progress=False)
    prompts, completions = ["the cat", "a dog"], [" sat", " ran"]
    first = stride.attribute(prompts, completions, progress=False, null_permutations=0)
    exact = stride.attribute(prompts, completions, progress=False, null_permutations=0, measurement="exact")
    assert first.provenance["measurement"] == "first_order" and exact.provenance["measurement"] == "exact"
    assert first.provenance["settings"]["measurement"] == "auto"
    y_first, _ = stride.measure(prompts, completions, progress=False)
    y_exact, _ = stride.measure(prompts, completions, progress=False, measurement="exact")
    torch.testing.assert_close(first.measurements, y_first)
    torch.testing.assert_close(exact.measurements, y_exact)
    assert not torch.allclose(y_first, y_exact, atol=1e-6)
    # the small edits of a short fit: two readings of one effect, closely correlated
    assert float(torch.corrcoef(torch.stack([y_first.flatten(), y_exact.flatten()]))[0, 1]) > 0.9
    metric = lambda logits, batch: logits[:, -1, 5]  # noqa: E731
    custom = stride.attribute(prompts, completions, progress=False, null_permutations=0, metric=metric)
    assert custom.provenance["measurement"] == "exact"
    with pytest.raises(ValueError, match="needs the default metric"):
        stride.attribute(prompts, completions, progress=False, metric=metric, measurement="first_order")
    with pytest.raises(ValueError, match="measurement must be one of"):
        stride.attribute(prompts, completions, progress=False, measurement="linear")


def test_from_pretrained_model_saved_to_disk(tiny_hf_model, tiny_tokenizer, small_texts, tmp_path):
    """The loading path users take (from_pretrained on a local dir) works end to end."""
    from nnsight import TransformersModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tiny_hf_model.save_pretrained(tmp_path / "m")
    tiny_tokenizer.save_pretrained(tmp_path / "m")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "m", local_files_only=True)
    tok = AutoTokenizer.from_pretrained(tmp_path / "m", local_files_only=True)
    model = TransformersModel(hf, tokenizer=tok, task="text-generation")
    stride = Stride(model, layer=1, **FAST).fit(small_texts[:24], progress=False)
    assert stride.attribute(["the"], [" cat"], progress=False).scores.shape == (1, 24)


def test_bad_inputs_raise_clear_errors(tiny_model, fitted):
    with pytest.raises(ValueError, match="decoder blocks"):
        Stride(tiny_model, layer=7)
    with pytest.raises(ValueError, match="placement"):
        Stride(tiny_model, placement="attention")
    with pytest.raises(ValueError, match="cannot exceed"):
        Stride(tiny_model, n_subsets=4, subsets_per_example=8)
    with pytest.raises(TypeError, match="unknown STRIDE setting"):
        Stride(tiny_model, n_subset=4)
    with pytest.raises(RuntimeError, match="not fitted"):
        Stride(tiny_model, layer=0).attribute(["a"], [" b"])
    with pytest.raises(TypeError, match="single string"):
        fitted.attribute("the cat", " sat")
    with pytest.raises(ValueError, match="one completion per prompt"):
        fitted.attribute(["a", "b"], [" c"], progress=False)
    with pytest.raises(ValueError, match="empty"):
        Stride(tiny_model, layer=0, **FAST).fit([])
    with pytest.raises(ValueError, match="lambda_fraction"):
        StrideArguments(lambda_fraction=2.0)


def test_checkpointed_fit_resumes(tiny_model, small_texts, tmp_path):
    settings = dict(FAST, steps=10, checkpoint_every=5, activation_cache=False)  # one forward for all three fits
    full = Stride(tiny_model, layer=1, **settings).fit(small_texts[:24], progress=False)
    first = Stride(tiny_model, layer=1, **dict(settings, steps=5)).fit(
        small_texts[:24], progress=False, checkpoint_dir=tmp_path)
    assert len(first.history) == 5
    resumed = Stride(tiny_model, layer=1, **settings).fit(small_texts[:24], progress=False, checkpoint_dir=tmp_path)
    assert len(resumed.history) == 10
    torch.testing.assert_close(resumed.operators.coefficients, full.operators.coefficients, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("dtype", ["bfloat16"])
def test_half_precision_model_keeps_float32_operators_and_close_scores(toy, dtype):
    """A model loaded in bf16 (large models are): the operators stay float32 (their master
    weights), fit and attribution run, and the scores track the float32 model's (same settings,
    same seed) on the bundled planted facts."""
    import copy

    import numpy as np
    from nnsight import TransformersModel

    model, corpus = toy
    facts = corpus.facts[:8]
    prompts, completions = [f.prompt for f in facts], [f.completion for f in facts]
    scores = {}
    for name in ("float32", dtype):
        hf = copy.deepcopy(model._module).to(getattr(torch, name))
        lm = TransformersModel(hf, tokenizer=model.tokenizer, task="text-generation")
        stride = Stride(lm, n_subsets=128, subsets_per_example=6, seed=0, steps=150).fit(corpus.documents,
                                                                                        progress=False)
        assert {p.dtype for p in stride.operators.parameters()} == {torch.float32}
        scores[name] = stride.attribute(prompts, completions, progress=False).scores.numpy()
    a, b = scores["float32"], scores[dtype]
    assert np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.95   # measured 0.978 at the default rank 2 (0.997 at rank 8)
    assert (a.argmax(1) == b.argmax(1)).mean() >= 0.75     # measured 1.0


def test_model_dispatched_with_device_map_matches_plain_model(tiny_hf_model, tiny_tokenizer, small_texts, tmp_path):
    """A model loaded with a device_map (accelerate dispatch; here one block offloaded to disk,
    so its weights are on ``meta`` at rest and its hook moves them in for each forward) fits and
    attributes exactly like the same model loaded plainly; the operators sit on the steered
    block's execution device."""
    from nnsight import TransformersModel
    from transformers import AutoModelForCausalLM

    tiny_hf_model.save_pretrained(tmp_path / "m")
    device_map = {"transformer.wte": "cpu", "transformer.wpe": "cpu", "transformer.drop": "cpu",
                  "transformer.h.0": "cpu", "transformer.h.1": "disk", "transformer.ln_f": "cpu", "lm_head": "cpu"}
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "m", device_map=device_map,
                                              offload_folder=str(tmp_path / "offload"), local_files_only=True)
    assert all(p.device.type == "meta" for p in hf.transformer.h[1].parameters())  # really offloaded
    dispatched = Stride(TransformersModel(hf, tokenizer=tiny_tokenizer, task="text-generation"), layer=1, **FAST)
    assert dispatched.backend.layer_device(1) == torch.device("cpu")  # from the block's accelerate hook
    plain = Stride(TransformersModel(tiny_hf_model, tokenizer=tiny_tokenizer, task="text-generation"), layer=1, **FAST)
    got, want = (s.fit(small_texts[:24], progress=False).attribute(["the cat"], [" sat"], progress=False)
                 for s in (dispatched, plain))
    torch.testing.assert_close(got.scores, want.scores)
    torch.testing.assert_close(got.measurements, want.measurements)


def test_layer_device_follows_the_steered_block(tiny_model):
    """Operators go where the steered block runs: its weights' device, else (offloaded
    weights on meta) its accelerate hook's execution device, else the model's device."""
    from types import SimpleNamespace

    backend = Stride(tiny_model, layer=1, **FAST).backend
    assert backend.layer_device(1) == backend.device == torch.device("cpu")
    block = backend.block_module(1)
    meta_block = torch.nn.Linear(2, 2, device="meta")
    meta_block._hf_hook = SimpleNamespace(execution_device="cuda:1")
    backend.block_module = lambda layer: meta_block if layer == 1 else block
    assert backend.layer_device(1) == torch.device("cuda", 1)   # no CUDA needed to resolve it
    assert backend.layer_device(-1) == torch.device("cuda", 1)  # negative layers resolve first
    meta_block._hf_hook = SimpleNamespace(execution_device=0)
    assert backend.layer_device(1) == torch.device("cuda", 0)
    del meta_block._hf_hook
    assert backend.layer_device(1) == backend.device


def test_half_precision_operator_fit(tiny_model, small_texts):
    """operator_dtype="bfloat16": parameters and saved state stay float32; the scores follow
    the float32 fit's closely (same seed and design)."""
    args = dict(FAST, placement="logits", steps=30)
    full = Stride(tiny_model, layer=1, **args).fit(small_texts[:24], progress=False)
    half = Stride(tiny_model, layer=1, operator_dtype="bfloat16", **args).fit(small_texts[:24], progress=False)
    assert all(p.dtype == torch.float32 for p in half.operators.parameters())
    assert half.operators.compute_dtype == "bfloat16" and half.args.operator_dtype == "bfloat16"
    a, b = (s.operators.coefficients.detach().flatten() for s in (full, half))
    assert not torch.equal(a, b)  # the fits differ (rounding), but only slightly:
    assert float(torch.corrcoef(torch.stack([a, b]))[0, 1]) > 0.98
    with pytest.raises(ValueError, match="operator_dtype"):
        StrideArguments(operator_dtype="half")


def test_fit_vocabulary_is_recorded_as_used(tiny_model, small_texts):
    """Candidates serve the logits placement only: another placement records fit_vocabulary=None."""
    settings = dict(layer=1, n_subsets=8, subsets_per_example=2, rank=4, steps=3, batch_size=8, seed=0)
    head = Stride(tiny_model, placement="head", fit_vocabulary=32, **settings).fit(small_texts[:12], progress=False)
    assert head.args.fit_vocabulary is None
    logits = Stride(tiny_model, fit_vocabulary=32, **settings).fit(small_texts[:12], progress=False)
    assert logits.args.fit_vocabulary == 32
    assert logits.attribute(["the cat"], [" sat."], progress=False).provenance["settings"]["fit_vocabulary"] == 32


def test_logit_columns_fit_save_and_load(tiny_model, small_texts, tmp_path):
    """A vocabulary larger than logit_columns: state K x r x H, the most frequent corpus tokens own
    a column, the rest are unedited; saved and loaded with the state (same scores); a state saved
    before the settings existed loads as one column per entry, the whole vocabulary, no cap."""
    from stride_nnsight.arguments import StrideArguments

    settings = dict(layer=1, n_subsets=8, subsets_per_example=2, rank=4, steps=4, batch_size=8, seed=0)
    stride = Stride(tiny_model, logit_columns=64, **settings).fit(small_texts[:12], progress=False)
    V = stride.backend.vocab_size
    assert V > 64 and stride.operators.coefficients.shape == (8, 4, 64)
    tokens = stride._encode_train()
    counts = torch.bincount(tokens.input_ids[tokens.loss_mask.bool()], minlength=V)  # predicted tokens
    order = counts.argsort(descending=True, stable=True)
    assert torch.equal(stride.operators.column_of[order[:64]], torch.arange(64))  # the 64 most frequent: own columns
    assert bool((stride.operators.column_of[order[64:]] == 64).all())           # the rest: unedited
    attr = stride.attribute(["the cat"], [" sat on the mat."], progress=False)
    stride.save(tmp_path / "s")
    loaded = Stride.load(tmp_path / "s", tiny_model)
    assert torch.equal(loaded.operators.column_of, stride.operators.column_of)
    torch.testing.assert_close(loaded.attribute(["the cat"], [" sat on the mat."], progress=False).scores, attr.scores)
    old = {k: v for k, v in stride.args.to_dict().items() if k not in ("logit_columns", "fit_vocabulary",
                                                                        "max_state_mb")}
    assert StrideArguments.from_saved(old).logit_columns is None
    assert StrideArguments.from_saved(old).fit_vocabulary is None
    assert StrideArguments.from_saved(old).max_state_mb is None
    assert StrideArguments.from_dict(old).fit_vocabulary == StrideArguments().fit_vocabulary == 128


def test_state_cap_lowers_rank_and_leaves_rare_tokens_unedited(tiny_model, small_texts, tmp_path):
    """``max_state_mb`` below the default state: the fit lowers the automatic rank, then cuts the
    logit columns, warns with what it changed and how much of the corpus stays edited, records the
    resolved settings (provenance, saved state), and its real state stays within the cap; a later
    fit with a larger cap resolves again. Explicit settings are not overridden."""
    from stride_nnsight.arguments import DEFAULT_RANK
    from stride_nnsight.operators import state_bytes

    assert DEFAULT_RANK > 1
    settings = dict(layer=1, n_subsets=8, subsets_per_example=2, steps=4, batch_size=8, seed=0)
    probe = Stride(tiny_model, **settings)
    V, d = probe.backend.vocab_size, probe.backend.d_model
    cap = state_bytes(8, 1, d, V, 64) * 0.75                     # rank 1 is over: columns must be cut too
    stride = Stride(tiny_model, max_state_mb=cap / 1e6, **settings)
    with pytest.warns(UserWarning, match=rf"rank {DEFAULT_RANK} -> 1; coefficient columns .* cover \d+\.\d+% of the corpus"):
        stride.fit(small_texts[:12], progress=False)
    ops = stride.operators
    H = stride.args.logit_columns
    assert stride.args.rank == 1 and ops.rank == 1 and H is not None and 16 <= H < V
    assert sum(t.numel() * t.element_size() for t in ops.state_dict().values()) <= cap
    attr = stride.attribute(["the cat"], [" sat on the mat."], progress=False)
    assert attr.provenance["rank"] == 1 and attr.provenance["settings"]["logit_columns"] == H
    stride.save(tmp_path / "s")
    loaded = Stride.load(tmp_path / "s", tiny_model)
    assert (loaded.args.rank, loaded.args.logit_columns) == (1, H)
    torch.testing.assert_close(loaded.attribute(["the cat"], [" sat on the mat."], progress=False).scores, attr.scores)
    stride.args = stride.args.replace(max_state_mb=None)       # a re-fit resolves the automatic settings again
    stride.fit(small_texts[:12], progress=False)
    assert (stride.args.rank, stride.args.logit_columns) == (DEFAULT_RANK, None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")                         # default cap at this size: nothing to change
        default = Stride(tiny_model, **settings).fit(small_texts[:12], progress=False)
    assert (default.args.rank, default.args.logit_columns) == (DEFAULT_RANK, None)
    explicit = Stride(tiny_model, rank=3, max_state_mb=state_bytes(8, 3, d, V, 64) * 2 / 1e6, **settings)
    explicit.fit(small_texts[:12], progress=False)
    assert (explicit.args.rank, explicit.args.logit_columns) == (3, None)



def test_shared_cv_rule_is_the_fraction_rule_at_the_chosen_fraction(fitted, tmp_path):
    """``lambda_rule="shared_cv"`` picks one fraction for the batch (recorded with its diagnostics)
    and the scores and noise floor are exactly those of ``"fraction"`` at that fraction."""
    import numpy as np

    from stride_nnsight.recovery import SHARED_CV_GRID, shared_fraction

    prompts, completions = ["the cat sat", "a dog", "the bird"], [" on the mat.", " ran", " flew away."]
    shared = fitted.attribute(prompts, completions, lambda_rule="shared_cv", progress=False)
    p = shared.provenance
    assert p["lambda_rule"] == "shared_cv" and p["lambda_fraction"] in SHARED_CV_GRID
    assert p["lambda_selection"]["fraction"] == p["lambda_fraction"]
    expected, _ = shared_fraction(shared.measurements.numpy(), fitted.design.membership, fitted.args.fit_intercept,
                                  seed=fitted.args.seed)
    assert p["lambda_fraction"] == expected
    plain = fitted.attribute(prompts, completions, lambda_fraction=p["lambda_fraction"], progress=False)
    np.testing.assert_array_equal(shared.scores.numpy(), plain.scores.numpy())
    assert shared.noise_floor.tolist() == plain.noise_floor.tolist()
    assert plain.provenance["lambda_selection"] is None
    shared.save(tmp_path / "shared.json")
    assert Attribution.load(tmp_path / "shared.json").provenance["lambda_selection"] == p["lambda_selection"]
    with pytest.raises(ValueError, match="lambda_rule must be one of"):
        StrideArguments(lambda_rule="bic")


def test_logit_columns_go_to_the_most_frequent_predicted_tokens(tiny_model, small_texts):
    """With fewer columns than tokens, the columns go to the tokens the fit predicts most often:
    BOS opens every document but is never a target, so it takes no column."""
    stride = Stride(tiny_model, layer=1, n_subsets=8, subsets_per_example=2, steps=2, batch_size=8, seed=0,
                    logit_columns=16).fit(small_texts[:12], progress=False)
    V = stride.backend.vocab_size
    tokens = stride._encode_train()
    targets = torch.bincount(tokens.input_ids[tokens.loss_mask.bool()], minlength=V)[:V]
    kept = stride.operators.column_of < 16
    assert int(kept.sum()) == 16
    assert int(targets[kept].min()) >= int(targets[~kept].max()) > 0
    bos = stride.backend.tokenizer.bos_token_id
    assert bos is not None and int(targets[bos]) == 0 and not bool(kept[bos])

