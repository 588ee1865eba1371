"""TransformerLens backend: agreement with the nnsight backend on the same weights, hook
semantics (edit after reading z), gradients through the TL hook, right padding, wiring.

Everything runs offline on a CPU: a byte-level BPE tokenizer trained here, a 2-layer
GPT-2 built from a config, and a TransformerLens 4 ``TransformerBridge`` booted around a
copy of that model with ``TransformerBridge.boot_transformers(dir, hf_model=..., tokenizer=...)``.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

transformer_lens = pytest.importorskip("transformer_lens")
nnsight = pytest.importorskip("nnsight")

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # noqa: E402
from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast  # noqa: E402
from transformer_lens.model_bridge import TransformerBridge  # noqa: E402

from stride_nnsight.backends import resolve_backend  # noqa: E402
from stride_nnsight.backends.nnsight import NNsightBackend  # noqa: E402
from stride_nnsight.backends.transformer_lens import (  # noqa: E402
    TransformerLensBackend,
    bridge_from_hf,
    make_hook,
)
from stride_nnsight.operators import SteeringOperators, token_nll  # noqa: E402

TEXTS = [
    "the cat sat on the mat and looked at the door",
    "a dog ran in the park with a red ball",
    "birds fly over the hills when the sun is low",
    "the quick brown fox jumps over the lazy dog",
    "rain fell on the town for three long days",
]
SPECIAL = "<|endoftext|>"
N_LAYER, D_MODEL = 2, 32


def _train_tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=[SPECIAL],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(TEXTS * 4, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=SPECIAL, eos_token=SPECIAL, pad_token=SPECIAL,
        unk_token=SPECIAL, padding_side="right",
    )


@pytest.fixture(scope="module")
def setting(tmp_path_factory):
    """(hf_model, tokenizer_dir, nnsight backend, TL backend, bridge) on the same weights."""
    tok_dir = str(tmp_path_factory.mktemp("tok"))
    _train_tokenizer().save_pretrained(tok_dir)
    tok = AutoTokenizer.from_pretrained(tok_dir)  # boot_transformers needs name_or_path
    config = GPT2Config(
        n_layer=N_LAYER, n_embd=D_MODEL, n_head=2, n_positions=64, vocab_size=len(tok),
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(0)
    hf = GPT2LMHeadModel(config).eval()

    from nnsight import TransformersModel

    # nnsight and TL each get a copy of the same weights: the bridge rewires the HF
    # module it wraps in place, and nnsight sets its tokenizer's padding side to "left".
    nn_model = TransformersModel(copy.deepcopy(hf), tokenizer=copy.deepcopy(tok), task="text-generation")
    bridge = TransformerBridge.boot_transformers(
        tok_dir, hf_model=copy.deepcopy(hf), tokenizer=AutoTokenizer.from_pretrained(tok_dir), device="cpu"
    )
    bridge.eval()
    return {
        "hf": hf, "tok": tok, "tok_dir": tok_dir,
        "nn": NNsightBackend(nn_model), "tl": resolve_backend(bridge), "bridge": bridge,
    }


def _right_padded(tok, texts, pad_id=0):
    seqs = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
    return ids, mask


@pytest.fixture(scope="module")
def batch(setting):
    ids, mask = _right_padded(setting["tok"], ["the cat sat on the mat", "a dog ran", "birds fly over the hills"])
    assert (mask == 0).any(), "the batch must contain right padding"
    return ids, mask


def _operators(layer, seed=1, n=3):
    torch.manual_seed(seed)
    ops = SteeringOperators(n, D_MODEL, 4, D_MODEL, placement="residual", layer=layer)
    with torch.no_grad():
        ops.coefficients.normal_(0.0, 0.5)
    return ops


# ---------------------------------------------------------------------- (1) agreement


@pytest.mark.parametrize("layer", [0, 1])
def test_backends_agree_without_edit(setting, batch, layer):
    ids, mask = batch
    nn_logits, nn_z = setting["nn"].forward(ids, mask, layer)
    tl_logits, tl_z = setting["tl"].forward(ids, mask, layer)
    assert tl_logits.shape == (ids.shape[0], ids.shape[1], setting["tl"].vocab_size)
    assert tl_z.shape == (ids.shape[0], ids.shape[1], D_MODEL)
    torch.testing.assert_close(tl_logits, nn_logits, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(tl_z, nn_z, atol=1e-4, rtol=1e-4)
    # ... and both are the plain HF model (no folded layer norms / centred weights).
    with torch.no_grad():
        hf = setting["hf"](input_ids=ids, attention_mask=mask)
    torch.testing.assert_close(tl_logits, hf.logits, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(
    "layer, operator",
    [
        (0, torch.tensor([0, 2, -1])),  # per-row operator ids (-1: unsteered row)
        (1, torch.tensor([0, 2, -1])),
        (1, torch.tensor([0.5, -1.0, 2.0])),  # mixing weights over the operators
    ],
    ids=["ids-layer0", "ids-layer1", "mix-layer1"],
)
def test_backends_agree_with_edit(setting, batch, layer, operator):
    ids, mask = batch
    ops = _operators(layer)
    edit = lambda z: ops(z, operator)  # noqa: E731
    nn_logits, nn_z = setting["nn"].forward(ids, mask, layer, edit)
    tl_logits, tl_z = setting["tl"].forward(ids, mask, layer, edit)
    base_logits, _ = setting["tl"].forward(ids, mask, layer)
    assert (tl_logits - base_logits).abs().max() > 1e-2  # the edit does something
    torch.testing.assert_close(tl_logits, nn_logits, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(tl_z, nn_z, atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------------- (2) hook semantics


def test_edit_changes_logits_but_not_z(setting, batch):
    tl, layer = setting["tl"], 0
    ids, mask = batch
    base_logits, base_z = tl.forward(ids, mask, layer)
    ops = _operators(layer)
    logits, z = tl.forward(ids, mask, layer, lambda h: ops(h, torch.tensor([0, 2, -1])))
    assert torch.equal(z, base_z), "z must be read before the edit"
    steered = (logits - base_logits).abs().amax(dim=(1, 2))
    assert steered[0] > 1e-2 and steered[1] > 1e-2
    assert steered[2] == 0, "operator id -1 must leave its row unsteered"


def test_identity_edit_leaves_logits_unchanged(setting, batch):
    tl = setting["tl"]
    ids, mask = batch
    base_logits, base_z = tl.forward(ids, mask, 1)
    logits, z = tl.forward(ids, mask, 1, lambda h: h)
    assert torch.equal(logits, base_logits) and torch.equal(z, base_z)
    fresh = SteeringOperators(3, D_MODEL, 4, D_MODEL, layer=1)  # a_k = 0: identity operators
    logits, _ = tl.forward(ids, mask, 1, lambda h: fresh(h, 2))
    torch.testing.assert_close(logits, base_logits, atol=1e-6, rtol=0)


def test_hooks_do_not_leak(setting, batch):
    ids, mask = batch
    bridge = setting["bridge"]
    with torch.no_grad():
        before = bridge(ids, attention_mask=mask)
    setting["tl"].forward(ids, mask, 1, lambda h: h + 10.0)
    with torch.no_grad():
        after = bridge(ids, attention_mask=mask)
    assert torch.equal(before, after)
    assert not any(hp._forward_hooks for hp in bridge.hook_dict.values())


def test_make_hook_with_tl_hook_apis(setting, batch):
    """The user-facing hook works with run_with_hooks and the hooks() context manager."""
    tl, bridge = setting["tl"], setting["bridge"]
    ids, mask = batch
    ops = _operators(1)
    edit = lambda h: ops(h, torch.tensor([1, 0, 2]))  # noqa: E731
    expected, _ = tl.forward(ids, mask, 1, edit)
    name = tl.hook_name(1)
    assert name == "blocks.1.hook_resid_post"
    got = bridge.run_with_hooks(ids, fwd_hooks=[(name, make_hook(edit))], attention_mask=mask)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)
    with bridge.hooks(fwd_hooks=[(name, make_hook(edit))]):
        got = bridge(ids, attention_mask=mask)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="shape"):
        bridge.run_with_hooks(ids, fwd_hooks=[(name, make_hook(lambda h: h[..., :4]))], attention_mask=mask)
    with pytest.raises(TypeError):
        make_hook("not callable")


# ---------------------------------------------------------------------- (3) gradients


def test_gradient_reaches_operators_through_tl_hook(setting, batch):
    ids, mask = batch
    grads = {}
    for key in ("tl", "nn"):
        backend = setting[key]
        backend.freeze()
        ops = _operators(1)
        logits, _ = backend.forward(ids, mask, 1, lambda h: ops(h, torch.tensor([0, 2, -1])))
        token_nll(logits, ids, mask).mean().backward()
        grads[key] = {n: p.grad for n, p in ops.named_parameters()}
        for n, g in grads[key].items():
            assert g is not None and torch.isfinite(g).all(), n
        assert grads[key]["coefficients"][0].abs().sum() > 0
        assert grads[key]["coefficients"][2].abs().sum() > 0
        assert grads[key]["coefficients"][1].abs().sum() == 0  # operator 1 not used
        assert grads[key]["basis.inp.weight"].abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in setting["bridge"].parameters())
    for n in grads["tl"]:
        torch.testing.assert_close(grads["tl"][n], grads["nn"][n], atol=1e-5, rtol=1e-3)


# ---------------------------------------------------------------------- (4) padding


def test_right_padding_matches_unpadded(setting, batch):
    """Each row alone, unpadded, gives the padded batch's values on its real tokens (with an
    edit, so z, the edit and everything downstream are all covered)."""
    tl = setting["tl"]
    ids, mask = batch
    ops = _operators(0)
    operator = torch.tensor([0, 1, 2])
    padded_logits, padded_z = tl.forward(ids, mask, 0, lambda h: ops(h, operator))
    for i in range(ids.shape[0]):
        n = int(mask[i].sum())
        logits, z = tl.forward(ids[i : i + 1, :n], mask[i : i + 1, :n], 0, lambda h: ops(h, operator[i : i + 1]))
        torch.testing.assert_close(padded_logits[i, :n], logits[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(padded_z[i, :n], z[0], atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------- (5) wiring


def test_resolve_backend_and_attributes(setting):
    bridge, tl = setting["bridge"], setting["tl"]
    assert isinstance(tl, TransformerLensBackend)
    assert isinstance(resolve_backend(bridge), TransformerLensBackend)
    assert resolve_backend(tl) is tl
    assert tl.name == "transformer_lens"
    assert tl.model is bridge
    assert (tl.n_layers, tl.d_model, tl.vocab_size) == (N_LAYER, D_MODEL, len(setting["tok"]))
    assert tl.tokenizer is bridge.tokenizer
    assert tl.device == torch.device("cpu") and tl.dtype == torch.float32
    # torch_module's parameters are the model weights (the same values the HF model holds)
    n_weights = sum(p.numel() for p in tl.torch_module.parameters())
    assert n_weights >= sum(p.numel() for p in setting["hf"].parameters())
    # same weights in an independently built model (nnsight's own copy): same fingerprint;
    # one block weight changed (restored after): a different one
    before = tl.fingerprint()
    assert before == setting["nn"].fingerprint()
    name, weight = next((n, p) for n, p in tl.named_weights() if n.endswith("h.1.mlp.c_fc.weight"))
    saved = weight.detach().clone()
    try:
        with torch.no_grad():
            weight.mul_(1.01)
        assert tl.fingerprint() != before, name
    finally:
        with torch.no_grad():
            weight.copy_(saved)
    assert tl.fingerprint() == before
    other_tok = copy.deepcopy(setting["tok"])
    assert resolve_backend(bridge, tokenizer=other_tok).tokenizer is other_tok
    assert [tl.hook_name(layer) for layer in range(N_LAYER)] == [
        "blocks.0.hook_resid_post", "blocks.1.hook_resid_post",
    ]


def test_bad_layer(setting, batch):
    tl = setting["tl"]
    assert tl.check_layer(-1) == N_LAYER - 1
    with pytest.raises(ValueError, match="out of range"):
        tl.check_layer(N_LAYER)
    with pytest.raises(ValueError, match="out of range"):
        tl.forward(*batch, layer=-N_LAYER - 1)
    with pytest.raises(TypeError):
        tl.check_layer(1.0)


def test_rejects_non_bridge(setting):
    with pytest.raises(TypeError, match="TransformerBridge"):
        TransformerLensBackend(setting["hf"])


def test_bridge_from_hf_in_memory_tokenizer(setting, batch):
    """The helper boots from an in-memory tokenizer and can leave the HF model untouched."""
    hf = setting["hf"]
    names = [n for n, _ in hf.named_parameters()]
    bridge = bridge_from_hf(hf, _train_tokenizer(), copy_model=True)
    assert [n for n, _ in hf.named_parameters()] == names  # copy_model=True: not rewired
    ids, mask = batch
    logits, z = TransformerLensBackend(bridge).forward(ids, mask, 1)
    ref_logits, ref_z = setting["tl"].forward(ids, mask, 1)
    torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(z, ref_z, atol=1e-5, rtol=1e-5)


def test_compatibility_mode_warns_and_centres(setting, batch):
    """enable_compatibility_mode() (weight processing) keeps the next-token distribution but
    centres the residual stream: the backend works on it but warns."""
    bridge = bridge_from_hf(setting["hf"], setting["tok"], copy_model=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bridge.enable_compatibility_mode(disable_warnings=True)
    with pytest.warns(UserWarning, match="processed weights"):
        tl = TransformerLensBackend(bridge)
    ids, mask = batch
    logits, z = tl.forward(ids, mask, 1)
    ref_logits, ref_z = setting["tl"].forward(ids, mask, 1)
    torch.testing.assert_close(z, ref_z - ref_z.mean(-1, keepdim=True), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits.log_softmax(-1), ref_logits.log_softmax(-1), atol=1e-5, rtol=1e-5)
    # the edit is applied exactly once even with compatibility-mode hook aliases
    calls = []
    tl.forward(ids, mask, 1, lambda h: calls.append(1) or h)
    assert len(calls) == 1


def test_vmap_per_example_gradients_through_the_bridge(setting):
    """The gradient baselines' batched path (torch.func.vmap over a padded chunk) runs through a
    TransformerBridge and gives the one-at-a-time gradients, which equal nnsight's."""
    from stride_nnsight import baselines as B

    texts = ["the cat sat on the mat", "a dog ran", "birds sing in the green tree today"]
    loop = B.example_gradients(setting["bridge"], texts=texts, tokenizer=setting["tok"])
    batched = B.example_gradients(setting["bridge"], texts=texts, tokenizer=setting["tok"], per_example="vmap")
    torch.testing.assert_close(batched, loop, rtol=1e-4, atol=1e-6)
    assert float(loop.abs().max()) > 0
