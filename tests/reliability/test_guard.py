"""Issue 10 (items 3, 6, 8, 10): the model guard, finite fits, no global side effects, and
loading your own model from a path.

* The fingerprint covers every weight (not just the embeddings), is taken from real
  weights (lazy models are loaded first), at ``fit()``, and re-checked before measuring.
* NaN/inf models and losses stop the fit with a ``FloatingPointError`` naming the step and
  the training examples, before any update or checkpoint; NaN operators are never saved.
* ``Stride()``, ``fit()`` and ``load()`` leave the global torch RNG alone; a model in
  training mode is run in eval mode (with a warning) and its mode restored.
* ``TransformersModel(path, tokenizer=AutoTokenizer.from_pretrained(path), ...)`` (lazy,
  weights on ``meta`` until first use) fits, attributes, saves and loads strictly.
"""

from __future__ import annotations

import copy
import re
import warnings

import pytest
import torch

from stride_nnsight import Stride
from stride_nnsight.backends import resolve_backend
from stride_nnsight.fitting import CHECKPOINT_NAME

FAST = dict(layer=1, n_subsets=16, subsets_per_example=2, rank=4, steps=6, batch_size=8, seed=0,
            linearity_operators=4, sketch_dim=3, basis_hidden=8, max_length=48, measure_batch_size=8)
PROMPTS, COMPLETIONS = ["the cat sat on", "a dog ran in the"], [" the mat.", " park."]


def wrap(hf_model, tokenizer):
    from nnsight import TransformersModel

    return TransformersModel(hf_model, tokenizer=tokenizer, task="text-generation")


@pytest.fixture
def fresh_hf(tiny_hf_model):
    """A private copy of the tiny GPT-2 (tests edit its weights)."""
    return copy.deepcopy(tiny_hf_model).eval()


@pytest.fixture
def fresh_model(fresh_hf, tiny_tokenizer):
    return wrap(fresh_hf, tiny_tokenizer)


def perturb_blocks(hf_model, scale: float = 1e-3, seed: int = 1) -> None:
    """Add noise to every transformer-block weight (a 'fine-tune'); embeddings untouched."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in hf_model.named_parameters():
            if ".h." in name:
                p.add_(scale * torch.randn(p.shape, generator=g))


# ------------------------------------------------------------------ item 3: fingerprint
def test_fingerprint_changes_with_one_block_weight(fresh_model, fresh_hf):
    backend = resolve_backend(fresh_model)
    before = backend.fingerprint()
    assert backend.fingerprint() == before  # deterministic
    with torch.no_grad():
        fresh_hf.transformer.h[1].mlp.c_fc.weight.mul_(1 + 1e-6)  # a tiny edit of one block matrix
    changed = backend.fingerprint()
    assert changed != before
    with torch.no_grad():
        fresh_hf.transformer.h[1].mlp.c_fc.weight.div_(1 + 1e-6)
        fresh_hf.transformer.h[0].ln_1.bias.add_(0.01)  # a 32-value bias: all of it is hashed
    assert backend.fingerprint() not in (before, changed)
    assert backend.fingerprint_kind() == "weights"


def test_fingerprint_covers_every_parameter_tied_once(fresh_model, fresh_hf):
    names = [name for name, _ in resolve_backend(fresh_model).named_weights()]
    hf_names = {name for name, _ in fresh_hf.named_parameters(remove_duplicate=False)}
    assert set(names) <= hf_names and len(names) == len(set(names))
    assert len(names) == len(list(fresh_hf.parameters()))  # every tensor once (lm_head is tied to wte)
    assert "transformer.h.0.attn.c_attn.weight" in names


def test_strict_load_refuses_a_finetuned_model(fresh_model, fresh_hf, tiny_tokenizer, small_texts, tmp_path):
    stride = Stride(fresh_model, **FAST).fit(small_texts[:20], progress=False)
    stride.save(tmp_path / "state")
    tuned = copy.deepcopy(fresh_hf)
    perturb_blocks(tuned)  # same config and embeddings, different blocks
    with pytest.raises(ValueError, match="model mismatch") as info:
        Stride.load(tmp_path / "state", wrap(tuned, tiny_tokenizer))
    assert stride.fingerprint in str(info.value)
    loaded = Stride.load(tmp_path / "state", wrap(copy.deepcopy(fresh_hf), tiny_tokenizer))  # same weights
    assert loaded.fingerprint == stride.fingerprint


def test_attribute_rechecks_the_model(fresh_model, fresh_hf, small_texts):
    stride = Stride(fresh_model, **FAST).fit(small_texts[:20], progress=False)
    fitted = stride.fingerprint
    ok = stride.attribute(PROMPTS, COMPLETIONS, progress=False)
    weight = fresh_hf.transformer.h[0].mlp.c_proj.weight
    saved = weight.detach().clone()
    with torch.no_grad():
        weight.add_(1e-3)  # the user edits the model after fitting
    now = resolve_backend(fresh_model).fingerprint()
    for call in (stride.attribute, stride.measure):
        with pytest.raises(ValueError, match="model changed since the operators were fitted") as info:
            call(PROMPTS, COMPLETIONS, progress=False)
        assert fitted in str(info.value) and now in str(info.value) and "refit" in str(info.value)
    with torch.no_grad():
        weight.copy_(saved)
    again = stride.attribute(PROMPTS, COMPLETIONS, progress=False)
    torch.testing.assert_close(again.scores, ok.scores)


def test_fingerprint_is_taken_at_fit(fresh_model, fresh_hf, small_texts):
    stride = Stride(fresh_model, **FAST)
    at_init = stride.fingerprint
    perturb_blocks(fresh_hf)  # changed between Stride() and fit(): the fit is on the new weights
    stride.fit(small_texts[:20], progress=False)
    assert stride.fingerprint != at_init
    assert stride.fingerprint == resolve_backend(fresh_model).fingerprint()
    assert stride.attribute(PROMPTS, COMPLETIONS, progress=False).provenance["model_fingerprint"] == stride.fingerprint


def test_transformer_lens_fingerprint_sees_block_weights(tiny_hf_model, tiny_tokenizer):
    pytest.importorskip("transformer_lens")
    from stride_nnsight.backends.transformer_lens import bridge_from_hf

    hf = copy.deepcopy(tiny_hf_model)
    nn = resolve_backend(wrap(copy.deepcopy(hf), tiny_tokenizer))
    tl = resolve_backend(bridge_from_hf(hf, tiny_tokenizer, copy_model=False))
    assert [n for n, _ in tl.named_weights()] == [n for n, _ in nn.named_weights()]  # HF names, no q/k/v splits
    assert tl.fingerprint() == nn.fingerprint()
    before = tl.fingerprint()
    with torch.no_grad():
        hf.transformer.h[1].mlp.c_fc.weight.add_(1e-3)  # the bridge runs these very tensors
    assert tl.fingerprint() != before


# ------------------------------------------------------------------- item 10: own model
@pytest.fixture(scope="module")
def saved_models(tmp_path_factory, tiny_tokenizer):
    """Two checkpoints of the same tiny GPT-2 config with different weights, each with its tokenizer."""
    from transformers import GPT2LMHeadModel

    from stride_nnsight.toy import tiny_gpt2_config

    dirs = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        model = GPT2LMHeadModel(tiny_gpt2_config(tiny_tokenizer, n_layer=2, n_embd=32, n_head=2, n_positions=64))
        path = tmp_path_factory.mktemp(f"model{seed}")
        model.save_pretrained(path)
        tiny_tokenizer.save_pretrained(path)
        dirs.append(str(path))
    return dirs


def lazy(path):
    """The README's own-model form: loads nothing but the config and the tokenizer."""
    from nnsight import TransformersModel
    from transformers import AutoTokenizer

    return TransformersModel(path, tokenizer=AutoTokenizer.from_pretrained(path), task="text-generation")


def test_own_model_from_path_lazily(saved_models, small_texts, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    first, second = saved_models
    model = lazy(first)
    assert not model.dispatched and all(p.device.type == "meta" for p in model._module.parameters())
    stride = Stride(model, **FAST)
    assert model.dispatched and stride.fingerprint_kind == "weights"  # real weights, loaded before freezing
    stride.fit(small_texts[:20], progress=False)
    assert all(p.grad is None and not p.requires_grad for p in model._module.parameters())
    attr = stride.attribute(PROMPTS, COMPLETIONS, progress=False)
    assert attr.scores.shape == (2, 20) and torch.isfinite(attr.scores).all()
    assert attr.provenance["fingerprint_kind"] == "weights"
    stride.save(tmp_path / "state")

    loaded = Stride.load(tmp_path / "state", lazy(first))  # strict, a fresh lazy model of the same path
    torch.testing.assert_close(loaded.attribute(PROMPTS, COMPLETIONS, progress=False).scores, attr.scores)
    with pytest.raises(ValueError, match="model mismatch"):
        Stride.load(tmp_path / "state", lazy(second))  # same config, other weights

    eager = wrap(AutoModelForCausalLM.from_pretrained(first), AutoTokenizer.from_pretrained(first))
    assert Stride(eager, **FAST).fingerprint == stride.fingerprint
    assert Stride(lazy(second), **FAST).fingerprint != stride.fingerprint


def test_wrapper_without_tokenizer_loads_it_from_the_model_path(saved_models):
    from nnsight import NNsight
    from transformers import AutoModelForCausalLM

    stride = Stride(NNsight(AutoModelForCausalLM.from_pretrained(saved_models[0])), **FAST)
    assert stride.backend.tokenizer is not None
    assert stride.backend.tokenizer.name_or_path == saved_models[0]


def test_wrapper_without_tokenizer_or_path_is_refused(fresh_hf):
    from nnsight import NNsight

    with pytest.raises(ValueError, match=r"has no tokenizer.*AutoTokenizer\.from_pretrained"):
        Stride(NNsight(fresh_hf), **FAST)


def test_own_model_lazily_in_the_local_remote_simulation(saved_models, small_texts):
    model = lazy(saved_models[0])
    stride = Stride(model, remote="local", **FAST)  # simulated on this machine: the weights are loaded here
    assert model.dispatched and stride.fingerprint_kind == "weights"
    stride.fit(small_texts[:20], progress=False)
    attr = stride.attribute(PROMPTS, COMPLETIONS, progress=False)
    assert attr.scores.shape == (2, 20) and torch.isfinite(attr.scores).all()


REMOTE_HOST = "https://ndif.invalid"  # never contacted: nothing here runs remotely


def test_remote_lazy_model_keeps_meta_weights_and_says_so(saved_models, small_texts, tmp_path):
    model = lazy(saved_models[0])
    stride = Stride(model, remote=REMOTE_HOST, **FAST)
    assert not model.dispatched  # the weights stay on the server
    assert stride.fingerprint_kind == "shapes"
    assert stride.provenance()["fingerprint_kind"] == "shapes"
    eager = Stride(lazy(saved_models[0]), **FAST).fit(small_texts[:20], progress=False)
    assert stride.fingerprint == eager.shape_fingerprint  # names, shapes, dtypes and config agree
    eager.save(tmp_path / "state")
    again = lazy(saved_models[0])
    with pytest.warns(UserWarning, match="only the architecture could be verified"):
        loaded = Stride.load(tmp_path / "state", again, remote=REMOTE_HOST)
    assert not again.dispatched and loaded.fingerprint_kind == "shapes"
    with pytest.raises(ValueError, match="model mismatch"):  # another architecture is still refused
        Stride.load(tmp_path / "state", lazy_other_width(saved_models[0], tmp_path), remote=REMOTE_HOST)


def lazy_other_width(path, tmp_path):
    """A lazily loaded checkpoint of a wider tiny GPT-2 (another architecture)."""
    from transformers import AutoConfig, AutoTokenizer, GPT2LMHeadModel

    config = AutoConfig.from_pretrained(path)
    config.n_embd = 64
    other = tmp_path / "wider"
    GPT2LMHeadModel(config).save_pretrained(other)
    AutoTokenizer.from_pretrained(path).save_pretrained(other)
    return lazy(str(other))


# --------------------------------------------------------------------- item 6: finite
def test_nan_weights_refused_at_fit(fresh_model, fresh_hf, small_texts):
    with torch.no_grad():
        fresh_hf.transformer.h[0].mlp.c_fc.weight[3, 5] = float("nan")
    stride = Stride(fresh_model, **FAST)
    with pytest.raises(FloatingPointError, match=r"non-finite weights.*transformer\.h\.0\.mlp\.c_fc\.weight"):
        stride.fit(small_texts[:20], progress=False)


@pytest.fixture
def untied(tiny_tokenizer):
    """A tiny GPT-2 whose output head is not tied to its input embedding."""
    from transformers import GPT2LMHeadModel

    from stride_nnsight.toy import tiny_gpt2_config

    config = tiny_gpt2_config(tiny_tokenizer, n_layer=2, n_embd=32, n_head=2, n_positions=64)
    config.tie_word_embeddings = False
    torch.manual_seed(0)
    hf = GPT2LMHeadModel(config).eval()
    return wrap(hf, tiny_tokenizer), hf


def poison_token(hf_model, tokenizer, texts, word: str = " cat") -> set[int]:
    """Make the input embedding of the last token of ``word`` overflow: the weights stay
    finite, but the activations of every text containing the token become inf/NaN. Returns
    the indices of those texts."""
    token = tokenizer(word, add_special_tokens=False)["input_ids"][-1]
    with torch.no_grad():
        hf_model.transformer.wte.weight[token] = 3e38
    return {i for i, text in enumerate(texts) if token in tokenizer(text, add_special_tokens=False)["input_ids"]}


def test_nonfinite_loss_stops_fit_before_update_and_checkpoint(untied, tiny_tokenizer, small_texts, tmp_path):
    model, hf = untied
    texts = small_texts[:20]
    poisoned = poison_token(hf, tiny_tokenizer, texts)
    assert 0 < len(poisoned) < len(texts)
    stride = Stride(model, **{**FAST, "steps": 40}, checkpoint_every=1)
    with pytest.raises(FloatingPointError, match="non-finite loss at fit step") as info:
        stride.fit(texts, progress=False, checkpoint_dir=tmp_path / "ckpt")
    error = info.value
    named = {i for rows in error.examples.values() for i in rows}
    assert named and named <= poisoned  # only rows that hold the overflowing token
    assert set(error.examples) <= {"fidelity", "stability", "linearity"}
    assert re.search(r"check the model.*lower lr", str(error))
    assert len(stride.history) == error.step - 1  # the failed step was neither applied nor recorded
    for value in stride.operators.state_dict().values():
        assert torch.isfinite(value).all()
    if error.step == 1:  # nothing ran, so nothing may have been checkpointed
        assert not (tmp_path / "ckpt" / CHECKPOINT_NAME).exists()


def test_nonfinite_remote_chunk_is_refused(untied, tiny_tokenizer, small_texts):
    model, hf = untied
    texts = small_texts[:20]
    poison_token(hf, tiny_tokenizer, texts)
    stride = Stride(model, remote="local", remote_steps_per_session=40, **{**FAST, "steps": 40})
    initial = {k: v.clone() for k, v in stride._new_operators().state_dict().items()}
    with pytest.raises(FloatingPointError, match="non-finite loss at fit step") as info:
        stride.fit(texts, progress=False)
    assert info.value.step >= 1 and info.value.examples
    for name, value in stride.operators.state_dict().items():  # the NaN chunk was not loaded
        torch.testing.assert_close(value, initial[name])


def test_nan_operators_are_not_saved(fresh_model, small_texts, tmp_path):
    stride = Stride(fresh_model, **FAST).fit(small_texts[:20], progress=False)
    with torch.no_grad():
        next(stride.operators.parameters()).view(-1)[0] = float("nan")
    with pytest.raises(FloatingPointError, match="non-finite"):
        stride.save(tmp_path / "state")
    assert not (tmp_path / "state").exists() or not any((tmp_path / "state").iterdir())


# ------------------------------------------------------------ item 8: no side effects
def test_global_rng_untouched_and_init_deterministic(fresh_model, small_texts, tmp_path):
    torch.manual_seed(1234)
    expected = torch.rand(5)
    torch.manual_seed(1234)
    stride = Stride(fresh_model, **FAST)
    stride.fit(small_texts[:20], progress=False)
    stride.save(tmp_path / "state")
    Stride.load(tmp_path / "state", fresh_model)
    torch.testing.assert_close(torch.rand(5), expected, rtol=0, atol=0)
    assert torch.initial_seed() == 1234
    # ... while the operators' initialisation still depends on args.seed alone
    torch.manual_seed(1)
    a = Stride(fresh_model, **FAST)._new_operators().state_dict()
    torch.manual_seed(2)
    b = Stride(fresh_model, **FAST)._new_operators().state_dict()
    c = Stride(fresh_model, **{**FAST, "seed": 1})._new_operators().state_dict()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0)
    assert any(not torch.equal(a[name], c[name]) for name in a)


@pytest.fixture
def dropout_model(tiny_tokenizer):
    from transformers import GPT2LMHeadModel

    from stride_nnsight.toy import tiny_gpt2_config

    config = tiny_gpt2_config(tiny_tokenizer, n_layer=2, n_embd=32, n_head=2, n_positions=64)
    config.resid_pdrop = config.embd_pdrop = config.attn_pdrop = 0.5
    torch.manual_seed(0)
    hf = GPT2LMHeadModel(config)
    return wrap(hf, tiny_tokenizer), hf


def test_train_mode_warns_runs_in_eval_and_restores(dropout_model, small_texts):
    model, hf = dropout_model
    stride = Stride(model, **FAST)  # Stride() itself puts the model in eval mode
    hf.train()  # the user switches dropout back on
    hf.transformer.h[0].attn.eval()  # ... except in one submodule: modes are restored per module
    modes = {name: m.training for name, m in hf.named_modules()}
    with pytest.warns(UserWarning, match=r"training mode.*dropout.*model\.eval\(\)"):
        stride.fit(small_texts[:20], progress=False)
    assert {name: m.training for name, m in hf.named_modules()} == modes
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        a = stride.attribute(PROMPTS, COMPLETIONS, progress=False)
        b = stride.attribute(PROMPTS, COMPLETIONS, progress=False)
    assert not [w for w in caught if "training mode" in str(w.message)]  # warned once per Stride
    torch.testing.assert_close(a.scores, b.scores, rtol=0, atol=0)  # no dropout in the measurements
    assert {name: m.training for name, m in hf.named_modules()} == modes
    hf.eval()
    torch.testing.assert_close(stride.attribute(PROMPTS, COMPLETIONS, progress=False).scores, a.scores)
