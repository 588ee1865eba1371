"""Architecture coverage (issue 10 items 11 and 12): STRIDE on many decoder families, on both
toolkits, and ``steer()`` applying exactly what fitting and measurement apply.

Every architecture is an untrained 2-layer model built offline from a config (hidden 32,
the session's tiny BPE tokenizer as vocabulary), wrapped once per module under nnsight and
booted once as a TransformerLens ``TransformerBridge`` around a copy of the same weights.
Per architecture:

* fit -> attribute -> save -> ``load(strict=True)`` -> attribute gives identical scores,
  on the nnsight backend and on the TransformerLens bridge;
* operators fitted under nnsight, loaded (strictly) into the bridge, give the same
  measurements there, and fitting under either toolkit gives the same loss curve;
* ``stride.steer(k)`` in the user's own run gives the logits fit/measurement compute for
  operator ``k`` (residual placement: the steered forward; logits placement: the *final*
  logits plus the operator's edit, ``SteeringOperators.forward(z, k, target=logits)``),
  relative error < 1e-5. Cohere (``logit_scale``), Granite (``logits_scaling``) and Gemma 2
  (final soft-capping) transform the logits after the output head: the old ``steer()``
  edited the head's output there (relative errors 0.94 / 0.88 / 0.66).
"""

from __future__ import annotations

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("transformer_lens")
nnsight = pytest.importorskip("nnsight")

from stride_nnsight import Stride  # noqa: E402
from stride_nnsight.backends.transformer_lens import FINAL_LOGITS_HOOK, bridge_from_hf  # noqa: E402
from stride_nnsight.inputs import encode_queries  # noqa: E402
from stride_nnsight.operators import SteeringOperators, token_nll  # noqa: E402

FAST = dict(layer=1, steps=3, n_subsets=8, subsets_per_example=2, rank=2, batch_size=4, basis_hidden=8,
            linearity_operators=4, sketch_dim=3, max_length=48)
PROMPTS, COMPLETIONS = ["the cat sat on", "a dog ran in the"], [" the mat.", " park"]
N_TRAIN = 12

# hidden 32, 2 layers, 4 heads (2 key/value heads where the family has them), 64 positions
LLAMA_LIKE = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64)
#: name -> (model class, config class, config settings). Logit transforms after the head are
#: set strong enough to matter for untrained weights (the defaults are 1/16, 1.0 and 30).
ARCHITECTURES = {
    "gpt2": ("GPT2LMHeadModel", "GPT2Config", dict(n_layer=2, n_embd=32, n_head=2, n_positions=64)),
    "gpt_neox": ("GPTNeoXForCausalLM", "GPTNeoXConfig", dict(hidden_size=32, intermediate_size=64,
                                                              num_hidden_layers=2, num_attention_heads=4,
                                                              max_position_embeddings=64)),
    "llama": ("LlamaForCausalLM", "LlamaConfig", LLAMA_LIKE),
    "qwen2": ("Qwen2ForCausalLM", "Qwen2Config", LLAMA_LIKE),
    "gemma2": ("Gemma2ForCausalLM", "Gemma2Config", dict(LLAMA_LIKE, head_dim=8, final_logit_softcapping=2.0)),
    "opt": ("OPTForCausalLM", "OPTConfig", dict(hidden_size=32, ffn_dim=64, num_hidden_layers=2,
                                                num_attention_heads=4, max_position_embeddings=64,
                                                word_embed_proj_dim=32)),
    "mixtral": ("MixtralForCausalLM", "MixtralConfig", dict(LLAMA_LIKE, num_local_experts=4,
                                                            num_experts_per_tok=2)),
    "cohere": ("CohereForCausalLM", "CohereConfig", dict(LLAMA_LIKE, logit_scale=0.25)),
    "granite": ("GraniteForCausalLM", "GraniteConfig", dict(LLAMA_LIKE, logits_scaling=4.0)),
}
#: further families, checked more lightly (one nnsight fit, loaded into the bridge; steer on both)
MORE_ARCHITECTURES = {
    "gptj": ("GPTJForCausalLM", "GPTJConfig", dict(n_embd=32, n_layer=2, n_head=4, rotary_dim=4, n_positions=64)),
    "phi": ("PhiForCausalLM", "PhiConfig", dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                num_attention_heads=4, max_position_embeddings=64)),
    "phi3": ("Phi3ForCausalLM", "Phi3Config", LLAMA_LIKE),
    "gemma3": ("Gemma3ForCausalLM", "Gemma3TextConfig", dict(LLAMA_LIKE, head_dim=8, final_logit_softcapping=2.0)),
    "bloom": ("BloomForCausalLM", "BloomConfig", dict(hidden_size=32, n_layer=2, n_head=4)),
    "falcon": ("FalconForCausalLM", "FalconConfig", dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4)),
    "mpt": ("MptForCausalLM", "MptConfig", dict(d_model=32, n_layers=2, n_heads=4, max_seq_len=64)),
    "olmo2": ("Olmo2ForCausalLM", "Olmo2Config", LLAMA_LIKE),
    "qwen2_moe": ("Qwen2MoeForCausalLM", "Qwen2MoeConfig", dict(LLAMA_LIKE, moe_intermediate_size=32, num_experts=4,
                                                              shared_expert_intermediate_size=32, num_experts_per_tok=2)),
    "olmoe": ("OlmoeForCausalLM", "OlmoeConfig", dict(LLAMA_LIKE, num_experts=4, num_experts_per_tok=2)),
    "cohere2": ("Cohere2ForCausalLM", "Cohere2Config", dict(LLAMA_LIKE, logit_scale=0.25)),
    # hybrids: Mamba + attention + MoE; gated linear attention + attention + MoE
    "jamba": ("JambaForCausalLM", "JambaConfig", dict(LLAMA_LIKE, attn_layer_period=2, attn_layer_offset=1,
                                                      expert_layer_period=2, expert_layer_offset=1, num_experts=2,
                                                      mamba_d_state=4, mamba_dt_rank=4, use_mamba_kernels=False)),
    "qwen3_next": ("Qwen3NextForCausalLM", "Qwen3NextConfig", dict(
        LLAMA_LIKE, head_dim=8, layer_types=["linear_attention", "full_attention"], linear_num_value_heads=2,
        linear_num_key_heads=2, linear_key_head_dim=8, linear_value_head_dim=8, moe_intermediate_size=32,
        shared_expert_intermediate_size=32, num_experts=4, num_experts_per_tok=2)),
    # Mamba-2 + attention in parallel, logits multiplied by lm_head_multiplier after the head
    "falcon_h1": ("FalconH1ForCausalLM", "FalconH1Config", dict(
        LLAMA_LIKE, lm_head_multiplier=0.3, mamba_d_state=4, mamba_n_heads=4, mamba_d_head=16, mamba_d_ssm=64,
        mamba_n_groups=1)),
}
#: the decoder blocks each family keeps (what NNsightBackend finds on its own)
LAYERS_PATHS = {"gpt2": "transformer.h", "gpt_neox": "gpt_neox.layers", "opt": "model.decoder.layers"}


def build_hf_model(name: str, tokenizer) -> torch.nn.Module:
    """An untrained tiny model of family ``name`` (eval mode) whose vocabulary is ``tokenizer``'s."""
    model_class, config_class, settings = {**ARCHITECTURES, **MORE_ARCHITECTURES}[name]
    special = tokenizer.pad_token_id
    config = getattr(transformers, config_class)(vocab_size=len(tokenizer), bos_token_id=special,
                                                 eos_token_id=special, pad_token_id=special, **settings)
    # the bridge picks its adapter from config.architectures (set when a model is saved)
    config.architectures = [model_class]
    torch.manual_seed(0)
    return getattr(transformers, model_class)(config).eval()


def on_both_toolkits(name: str, tokenizer, tokenizer_dir: str) -> dict:
    """Family ``name``: the HF model, its nnsight wrapper and a bridge (each on its own copy)."""
    from nnsight import TransformersModel

    hf = build_hf_model(name, tokenizer)
    nn_model = TransformersModel(copy.deepcopy(hf), tokenizer=copy.deepcopy(tokenizer), task="text-generation")
    bridge = bridge_from_hf(hf, tokenizer, copy_model=True, device="cpu", tokenizer_dir=tokenizer_dir)
    return {"name": name, "hf": hf, "nnsight": nn_model, "transformer_lens": bridge}


@pytest.fixture(scope="module", params=list(ARCHITECTURES))
def arch(request, tiny_tokenizer, tmp_path_factory):
    return on_both_toolkits(request.param, tiny_tokenizer, str(tmp_path_factory.mktemp(f"tok-{request.param}")))


@pytest.fixture(scope="module")
def fits(arch, small_texts, tmp_path_factory):
    """Per placement and toolkit: the fitted Stride, the directory it was saved to, and its
    attribution of the two queries (computed before saving)."""
    out = {}
    for placement in ("logits", "residual"):
        for toolkit in ("nnsight", "transformer_lens"):
            stride = Stride(arch[toolkit], placement=placement, seed=0, **FAST)
            stride.fit(small_texts[:N_TRAIN], progress=False)
            attribution = stride.attribute(PROMPTS, COMPLETIONS, progress=False)
            path = stride.save(tmp_path_factory.mktemp(f"{arch['name']}-{placement}-{toolkit}"))
            out[placement, toolkit] = (stride, path, attribution)
    return out


TOOLKITS = ["nnsight", "transformer_lens"]
PLACEMENTS = ["logits", "residual"]


@pytest.mark.parametrize("toolkit", TOOLKITS)
@pytest.mark.parametrize("placement", PLACEMENTS)
def test_arch_fit_attribute_save_load_round_trip(arch, fits, placement, toolkit):
    stride, path, before = fits[placement, toolkit]
    assert stride.backend.name == toolkit
    assert before.scores.shape == (2, N_TRAIN) and torch.isfinite(before.scores).all()
    assert before.measurements.abs().max() > 0, "the fitted operators must move the queries' loss"
    loaded = Stride.load(path, arch[toolkit], strict=True)
    after = loaded.attribute(PROMPTS, COMPLETIONS, progress=False)
    assert torch.equal(after.measurements, before.measurements)
    assert torch.equal(after.scores, before.scores)


@pytest.mark.parametrize("placement", PLACEMENTS)
def test_arch_toolkits_agree(arch, fits, placement):
    """Operators fitted under nnsight load strictly into the bridge (toolkit-independent
    fingerprint) and measure the same there; fitting under either toolkit follows the same
    loss curve."""
    nn_stride, nn_path, nn_attr = fits[placement, "nnsight"]
    tl_stride = fits[placement, "transformer_lens"][0]
    moved = Stride.load(nn_path, arch["transformer_lens"], strict=True)
    assert moved.backend.name == "transformer_lens"
    y, base = moved.measure(PROMPTS, COMPLETIONS, progress=False)
    nn_y, nn_base = nn_stride.measure(PROMPTS, COMPLETIONS, progress=False)
    torch.testing.assert_close(base, nn_base, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(y, nn_y, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(y, nn_attr.measurements, atol=1e-4, rtol=1e-4)
    # the first step's losses depend on the forward passes only: equal; later steps follow
    # AdamW updates, which amplify float-rounding differences of near-zero gradients (up to
    # ~0.3% after 3 steps here), so the rest of the curve is compared loosely
    nn_history, tl_history = nn_stride.history.to_dict(), tl_stride.history.to_dict()
    for key in ("total", "fidelity", "stability", "linearity"):
        torch.testing.assert_close(tl_history[key][0], nn_history[key][0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.tensor(tl_history["total"]), torch.tensor(nn_history["total"]),
                               atol=1e-3, rtol=2e-2)


def _randomised(path, model):
    """The saved operators with large random coefficients, so that each edit is far from zero
    (3 fitting steps leave them near their zero initialisation)."""
    stride = Stride.load(path, model, strict=True)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        stride.operators.coefficients.copy_(torch.randn(stride.operators.coefficients.shape, generator=gen))
    return stride


def _relative_error(got, expected, base) -> float:
    return float((got - expected).norm() / (expected - base).norm())


def check_steer_matches_fit(stride: Stride, model, k: int = 3) -> None:
    """``stride.steer(k)`` in the user's own run (nnsight trace / TransformerLens hooks) gives
    the logits that fitting and measurement compute for operator ``k``, and the measurement
    of ``k`` is that run's change of the completion loss."""
    backend, ops, placement = stride.backend, stride.operators, stride.operators.placement
    batch = encode_queries(backend.tokenizer, PROMPTS[:1], COMPLETIONS[:1], 24)
    ids, mask = batch.input_ids, batch.attention_mask
    with torch.no_grad():
        base, z = backend.forward(ids, mask, stride.layer)
        if placement == "logits":  # what step_losses / completion_measurements compute
            expected = ops(z, k, target=base)
        else:  # what step_losses / measure run
            expected, _ = backend.forward(ids, mask, stride.layer, edit=lambda h: ops(h, k))
        if backend.name == "nnsight":
            with model.trace(input_ids=ids, attention_mask=mask):
                stride.steer(k)
                steered = model.output.logits.save()
        else:
            steered = model.run_with_hooks(ids, fwd_hooks=stride.steer(k), attention_mask=mask,
                                           return_type="logits")
    assert (expected - base).abs().max() > 0.1
    assert _relative_error(steered, expected, base) < 1e-5
    # ... and the measurement of operator k is that run's change of the completion loss
    y, base_metric = stride.measure(PROMPTS[:1], COMPLETIONS[:1], progress=False, measurement="exact")
    steered_metric = -token_nll(steered, ids, batch.loss_mask)[0]
    assert float(y[0, k]) == pytest.approx(float(steered_metric - base_metric[0]), abs=1e-4)


@pytest.mark.parametrize("toolkit", TOOLKITS)
@pytest.mark.parametrize("placement", PLACEMENTS)
def test_arch_steer_applies_what_fit_and_measurement_apply(arch, fits, placement, toolkit):
    check_steer_matches_fit(_randomised(fits[placement, toolkit][1], arch[toolkit]), arch[toolkit])


def test_steer_uses_the_final_logits_hook_point_on_the_bridge(arch, fits):
    """The logits placement's second hook sits on the bridge's final logits (after scaling /
    soft-capping), a hook point that is the identity when nothing is attached."""
    stride = fits["logits", "transformer_lens"][0]
    hooks = stride.steer(0)
    assert [name for name, _ in hooks] == ["blocks.1.hook_resid_post", FINAL_LOGITS_HOOK]
    bridge = arch["transformer_lens"]
    assert FINAL_LOGITS_HOOK in bridge.hook_dict
    ids = torch.tensor([[0, 5, 6, 7]])
    with torch.no_grad():
        plain = bridge(ids, return_type="logits")
        reference = arch["hf"](input_ids=ids).logits
    torch.testing.assert_close(plain, reference, atol=1e-5, rtol=1e-5)
    captured = {}
    bridge.run_with_hooks(ids, fwd_hooks=[(FINAL_LOGITS_HOOK, lambda x, hook: captured.setdefault("x", x))],
                          return_type="logits")
    torch.testing.assert_close(captured["x"], plain, atol=0, rtol=0)


def test_stride_accepts_layers_path(tiny_tokenizer, small_texts, tmp_path):
    """``Stride(model, layers_path=...)`` reaches the nnsight backend (and ``Stride.load``);
    a TransformerLens bridge refuses it with a message naming the fix."""
    from nnsight import TransformersModel

    hf = build_hf_model("llama", tiny_tokenizer)
    model = TransformersModel(copy.deepcopy(hf), tokenizer=tiny_tokenizer, task="text-generation")
    stride = Stride(model, layers_path="model.layers", **FAST).fit(small_texts[:N_TRAIN], progress=False)
    assert stride.backend.layers_path == "model.layers"
    loaded = Stride.load(stride.save(tmp_path), model, layers_path="model.layers")
    assert loaded.backend.layers_path == "model.layers"
    torch.testing.assert_close(loaded.measure(PROMPTS, COMPLETIONS, progress=False)[0],
                               stride.measure(PROMPTS, COMPLETIONS, progress=False)[0], atol=0, rtol=0)
    bridge = bridge_from_hf(hf, tiny_tokenizer, copy_model=True, device="cpu", tokenizer_dir=str(tmp_path / "tok"))
    with pytest.raises(ValueError, match="layers_path='blocks' is for nnsight models only"):
        Stride(bridge, layers_path="blocks", **FAST)


def test_default_layers_paths_found(arch):
    from stride_nnsight.backends.nnsight import NNsightBackend

    assert NNsightBackend(arch["nnsight"]).layers_path == LAYERS_PATHS.get(arch["name"], "model.layers")


@pytest.mark.parametrize("name", list(MORE_ARCHITECTURES))
def test_more_architectures_fit_agree_and_steer(name, tiny_tokenizer, small_texts, tmp_path):
    setting = on_both_toolkits(name, tiny_tokenizer, str(tmp_path / "tok"))
    stride = Stride(setting["nnsight"], seed=0, **FAST).fit(small_texts[:N_TRAIN], progress=False)
    path = stride.save(tmp_path / "state")
    moved = Stride.load(path, setting["transformer_lens"], strict=True)
    torch.testing.assert_close(moved.measure(PROMPTS, COMPLETIONS, progress=False),
                               stride.measure(PROMPTS, COMPLETIONS, progress=False), atol=1e-4, rtol=1e-4)
    # a residual edit at block 1 gives the same logits on both toolkits
    torch.manual_seed(2)
    d_model = stride.backend.d_model
    ops = SteeringOperators(4, d_model, 2, d_model, placement="residual", layer=1, hidden=8)
    with torch.no_grad():
        ops.coefficients.normal_()
    batch = encode_queries(tiny_tokenizer, PROMPTS, COMPLETIONS, 24)
    with torch.no_grad():
        nn_logits, nn_z = stride.backend.forward(batch.input_ids, batch.attention_mask, 1, edit=lambda h: ops(h, 1))
        tl_logits, tl_z = moved.backend.forward(batch.input_ids, batch.attention_mask, 1, edit=lambda h: ops(h, 1))
    assert (nn_logits - stride.backend.forward(batch.input_ids, batch.attention_mask, 1)[0]).abs().max() > 0.1
    torch.testing.assert_close(tl_z, nn_z, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(tl_logits, nn_logits, atol=1e-4, rtol=1e-4)
    for toolkit in TOOLKITS:
        check_steer_matches_fit(_randomised(path, setting[toolkit]), setting[toolkit])
