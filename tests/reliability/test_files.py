"""Files the library writes and reads (stride_nnsight.storage), run identity of checkpoints,
partly fitted Strides, and bit-identical resume after Ctrl-C / SIGKILL.

Every test asserts the exact outcome (exception type + message fragment, or values).
"""

from __future__ import annotations

import copy
import json
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import stride_nnsight.remote as remote_mod
from stride_nnsight import (
    Attribution,
    CheckpointMismatchError,
    PartialFitError,
    StateFileError,
    Stride,
    StrideArguments,
    storage,
)
from stride_nnsight.backends import resolve_backend
from stride_nnsight.design import SubsetDesign
from stride_nnsight.fitting import CHECKPOINT_NAME, LEGACY_CHECKPOINT_NAME, OperatorFitter
from stride_nnsight.inputs import encode_texts
from stride_nnsight.operators import SteeringOperators
from stride_nnsight.remote import MEASURE_PREFIX, MEASURE_STATE, RemoteChunkError, RemoteSettings
from stride_nnsight.stride import LEGACY_STATE_FILE, STATE_FILE

FAST = dict(layer=1, placement="residual", n_subsets=16, subsets_per_example=2, rank=4, steps=6, batch_size=8,
            linearity_operators=8, sketch_dim=4, basis_hidden=8, max_length=48, seed=0)
PROMPTS, COMPLETIONS = ["the cat sat", "a dog"], [" on the mat.", " ran in the park."]


def texts24(small_texts):
    return small_texts[:24]


@pytest.fixture(scope="module")
def fitted(tiny_model, small_texts):
    return Stride(tiny_model, **FAST).fit(texts24(small_texts), progress=False)


@pytest.fixture
def saved(fitted, tmp_path):
    return fitted.save(tmp_path / "state")


def manifest_of(path: Path) -> dict:
    return json.loads(Path(path).read_text())


def tensor_file_of(path: Path) -> Path:
    return Path(path).parent / manifest_of(path)["tensor_file"]


def rewrite_manifest(path: Path, change) -> None:
    manifest = manifest_of(path)
    change(manifest)
    Path(path).write_text(json.dumps(manifest))


def legacy_state(stride: Stride) -> dict:
    """What stride-nnsight 0.1's Stride.save wrote with torch.save (format 1)."""
    return {
        "format": 1, "package_version": "0.1.0", "args": stride.args.to_dict(), "layer": stride.layer,
        "design": stride.design.to_dict(),
        "operators": {k: v.detach().cpu() for k, v in stride.operators.state_dict().items()},
        "operator_settings": stride.operators.settings(), "history": stride.history.to_dict(),
        "train_ids": stride.train_ids, "train_texts": stride.train_texts, "fingerprint": stride.fingerprint,
        "backend": stride.backend.name,
    }


# ------------------------------------------------------------------------ malicious pickles
class Evil:
    """Unpickling this runs code: it writes ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('pwned')",))


def write_evil(path: Path, flavor: str, marker: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"format": 1, "step": 3, "args": Evil(marker), "scores": Evil(marker), "y": Evil(marker)}
    if flavor == "pickle":
        path.write_bytes(pickle.dumps(payload))
    else:
        torch.save(payload, path)


def test_the_evil_payload_runs_when_unpickled(tmp_path):
    """Sanity: the payload used below does execute code under a plain unpickle."""
    marker = tmp_path / "marker"
    write_evil(tmp_path / "x.pt", "torch", marker)
    torch.load(tmp_path / "x.pt", weights_only=False)
    assert marker.read_text() == "pwned"


def _remote_stride(fitted, directory):
    stride = copy.copy(fitted)
    stride.remote = "local"
    stride.remote_settings = RemoteSettings(checkpoint_dir=str(directory))
    return stride


def _place(target: str, tmp_path: Path, fitted, saved_dir: Path):
    """Where the file goes for ``target`` and the call that opens it."""
    ckpt = tmp_path / "ckpt"
    model = fitted.backend.model
    texts = fitted.train_texts
    if target == "legacy stride state":
        return tmp_path / "s" / LEGACY_STATE_FILE, lambda: Stride.load(tmp_path / "s", model)
    if target == "stride state manifest":
        return saved_dir / STATE_FILE, lambda: Stride.load(saved_dir, model)
    if target == "stride state tensor file":
        return tensor_file_of(saved_dir / STATE_FILE), lambda: Stride.load(saved_dir, model)
    if target in ("legacy fit checkpoint", "fit checkpoint manifest"):
        name = LEGACY_CHECKPOINT_NAME if target.startswith("legacy") else CHECKPOINT_NAME
        return ckpt / name, lambda: Stride(model, **FAST).fit(texts, progress=False, checkpoint_dir=ckpt)
    if target in ("legacy attribution file", "attribution manifest"):
        path = tmp_path / ("attr.pt" if target.startswith("legacy") else "attr.json")
        return path, lambda: Attribution.load(path)
    if target in ("legacy remote checkpoint", "remote checkpoint manifest"):
        name = LEGACY_CHECKPOINT_NAME if target.startswith("legacy") else CHECKPOINT_NAME
        return ckpt / name, lambda: Stride(model, remote="local", **FAST).fit(texts, progress=False,
                                                                               checkpoint_dir=ckpt)
    if target in ("legacy remote measure state", "remote measure state manifest"):
        stride = _remote_stride(fitted, tmp_path / "remote")
        key = remote_mod._measure_key(stride.operators, stride.encode_queries(PROMPTS, COMPLETIONS),
                                      stride.args.measure_batch_size)
        name = "measure_state.pt" if target.startswith("legacy") else MEASURE_STATE
        return (tmp_path / "remote" / f"{MEASURE_PREFIX}{key}" / name,
                lambda: stride.measure(PROMPTS, COMPLETIONS, progress=False))
    raise AssertionError(target)


TARGETS = ["legacy stride state", "stride state manifest", "stride state tensor file", "legacy fit checkpoint",
           "fit checkpoint manifest", "legacy attribution file", "attribution manifest", "legacy remote checkpoint",
           "remote checkpoint manifest", "legacy remote measure state", "remote measure state manifest"]


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("flavor", ["torch", "pickle"])
@pytest.mark.parametrize("target", TARGETS)
def test_malicious_pickle_is_never_executed(target, flavor, tmp_path, fitted, saved):
    marker = tmp_path / "marker"
    path, open_it = _place(target, tmp_path, fitted, saved)
    write_evil(path, flavor, marker)
    with pytest.raises(StateFileError) as info:
        open_it()
    assert not marker.exists(), "loading executed code from the file"
    message = str(info.value)
    assert path.name in message
    if target.endswith("tensor file"):
        assert "truncated or unreadable" in message
    else:  # files are recognised by content: a pickle under any name is read only with weights_only=True
        assert "not loaded (unpickling can run arbitrary code)" in message and "convert_legacy" in message


# ----------------------------------------------------------------------- integrity checks
def test_bit_flip_in_tensor_bytes_is_detected(saved, tiny_model):
    tensors = tensor_file_of(saved / STATE_FILE)
    data = bytearray(tensors.read_bytes())
    data[-3] ^= 0x10  # inside the last tensor's bytes
    tensors.write_bytes(bytes(data))
    with pytest.raises(StateFileError, match=r"file is corrupted: tensor '.*' .* does not match its sha256"):
        Stride.load(saved, tiny_model)


def test_edit_of_the_manifest_metadata_is_detected(saved, tiny_model):
    path = saved / STATE_FILE
    text = path.read_text()
    assert '"lr": 0.003' in text
    path.write_text(text.replace('"lr": 0.003', '"lr": 0.004', 1))
    with pytest.raises(StateFileError, match="file is corrupted: the manifest's metadata does not match"):
        Stride.load(saved, tiny_model)


def test_newer_format_is_refused_with_upgrade_hint(saved, tiny_model):
    rewrite_manifest(saved / STATE_FILE, lambda m: m.update(format=99))
    with pytest.raises(StateFileError, match=r"file format 99 .* reads formats 1\.\.2.*Upgrade stride-nnsight"):
        Stride.load(saved, tiny_model)


def test_legacy_file_with_unknown_format_is_refused(fitted, tiny_model, tmp_path):
    state = legacy_state(fitted)
    state["format"] = 99
    torch.save(state, tmp_path / LEGACY_STATE_FILE)
    with pytest.raises(StateFileError, match="unknown format 99"):
        Stride.load(tmp_path, tiny_model)


def test_missing_key_is_named(saved, fitted, tiny_model, tmp_path):
    def drop_texts(manifest):
        del manifest["metadata"]["train_texts"]
        manifest["metadata_sha256"] = __import__("hashlib").sha256(
            storage._canonical(manifest["metadata"])).hexdigest()

    rewrite_manifest(saved / STATE_FILE, drop_texts)
    with pytest.raises(StateFileError, match="stride_state file has no entry 'train_texts'"):
        Stride.load(saved, tiny_model)
    legacy = legacy_state(fitted)
    del legacy["design"]
    torch.save(legacy, tmp_path / LEGACY_STATE_FILE)
    with pytest.raises(StateFileError, match="has no entry 'design'"):
        Stride.load(tmp_path, tiny_model)


@pytest.mark.parametrize("which", ["manifest", "tensor file", "legacy"])
def test_truncated_file_is_reported(which, saved, fitted, tiny_model, tmp_path):
    if which == "legacy":
        torch.save(legacy_state(fitted), tmp_path / LEGACY_STATE_FILE)
        victim, directory, expected = tmp_path / LEGACY_STATE_FILE, tmp_path, "truncated or unreadable"
    elif which == "manifest":
        victim, directory, expected = saved / STATE_FILE, saved, "not valid JSON, it is truncated or corrupted"
    else:
        victim, directory, expected = tensor_file_of(saved / STATE_FILE), saved, "truncated or unreadable"
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 2])
    with pytest.raises(StateFileError, match=expected):
        Stride.load(directory, tiny_model)


def test_wrong_kind_and_missing_tensor_file(saved, tiny_model, tmp_path):
    with pytest.raises(StateFileError, match="is a 'stride_state' file, expected kind 'attribution'"):
        Attribution.load(saved / STATE_FILE)
    tensor_file_of(saved / STATE_FILE).unlink()
    with pytest.raises(StateFileError, match=r"its tensor file stride_state\.[0-9a-f]+\.safetensors is missing"):
        Stride.load(saved, tiny_model)


def test_a_failed_write_leaves_the_previous_file_intact(tmp_path, monkeypatch):
    path = tmp_path / "x.json"
    storage.save(path, "thing", {"a": torch.arange(3), "note": "old"})
    writes = {"n": 0}
    original = storage._write_atomic

    def die_before_manifest(target, write):
        writes["n"] += 1
        if writes["n"] == 2:  # the tensor file is written, the manifest not yet
            raise KeyboardInterrupt
        return original(target, write)

    monkeypatch.setattr(storage, "_write_atomic", die_before_manifest)
    with pytest.raises(KeyboardInterrupt):
        storage.save(path, "thing", {"a": torch.arange(5), "note": "new"})
    back = storage.load(path, "thing")
    assert back["note"] == "old" and torch.equal(back["a"], torch.arange(3))


def test_optimizer_and_generator_state_round_trip_exactly(tmp_path):
    torch.manual_seed(0)
    net = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3, betas=(0.8, 0.95))
    for _ in range(3):
        opt.zero_grad()
        net(torch.randn(5, 4)).square().sum().backward()
        opt.step()
    gen = torch.Generator().manual_seed(7)
    torch.randint(0, 9, (11,), generator=gen)
    storage.save(tmp_path / "s.json", "thing", {"optimizer": opt.state_dict(), "generator": gen.get_state()})
    back = storage.load(tmp_path / "s.json", "thing")
    fresh = torch.optim.AdamW(net.parameters(), lr=0.5)
    fresh.load_state_dict(back["optimizer"])
    assert fresh.state_dict()["param_groups"] == opt.state_dict()["param_groups"]
    for a, b in zip(opt.state_dict()["state"].values(), fresh.state_dict()["state"].values()):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    regen = torch.Generator()
    regen.set_state(back["generator"])
    assert torch.equal(torch.randint(0, 1000, (50,), generator=regen), torch.randint(0, 1000, (50,), generator=gen))


# ------------------------------------------------------------------------ round trips
def test_stride_round_trip_gives_identical_scores_and_tuple_ids(tiny_model, small_texts, tmp_path):
    ids = [("doc", i) for i in range(24)]
    stride = Stride(tiny_model, **FAST).fit(texts24(small_texts), ids, progress=False)
    before = stride.attribute(PROMPTS, COMPLETIONS, progress=False)
    stride.save(tmp_path / "s")
    assert sorted(p.suffix for p in (tmp_path / "s").iterdir()) == [".json", ".safetensors"]
    loaded = Stride.load(tmp_path / "s", tiny_model)
    after = loaded.attribute(PROMPTS, COMPLETIONS, progress=False)
    assert torch.equal(after.scores, before.scores) and torch.equal(after.measurements, before.measurements)
    assert loaded.train_ids == ids and isinstance(loaded.train_ids[0], tuple)
    assert loaded.history.total == stride.history.total and loaded.is_fitted


def test_ids_that_cannot_be_stored_are_refused_before_writing(tiny_model, small_texts, tmp_path):
    stride = Stride(tiny_model, **FAST).fit(texts24(small_texts), [object() for _ in range(24)], progress=False)
    with pytest.raises(TypeError, match=r"cannot save stride_state/train_ids\[0\]: a builtins.object .* str\(x\)"):
        stride.save(tmp_path / "s")
    assert not (tmp_path / "s" / STATE_FILE).exists()


def test_attribution_round_trip(tmp_path):
    attr = Attribution(torch.randn(2, 3), [("q", 0), "q1"], [7, "b", (1, 2)], ["x", "y"], None,
                       {"lambdas": [0.1, float("nan")], "settings": {"betas": (0.9, 0.99)}, "hook": ["a", "b"]},
                       torch.randn(2, 5))
    back = Attribution.load(attr.save(tmp_path / "attr.json"))
    assert torch.equal(back.scores, attr.scores) and torch.equal(back.measurements, attr.measurements)
    assert back.query_ids == attr.query_ids and back.train_ids == attr.train_ids
    assert back.query_texts == ["x", "y"] and back.train_texts is None
    assert back.provenance["settings"] == {"betas": (0.9, 0.99)} and np.isnan(back.provenance["lambdas"][1])


def test_old_format_files_still_load(fitted, tiny_model, tmp_path):
    torch.save(legacy_state(fitted), tmp_path / LEGACY_STATE_FILE)
    loaded = Stride.load(tmp_path, tiny_model)
    before = fitted.attribute(PROMPTS, COMPLETIONS, progress=False)
    after = loaded.attribute(PROMPTS, COMPLETIONS, progress=False)
    assert torch.equal(after.scores, before.scores) and loaded.train_texts == fitted.train_texts
    torch.save(before.to_dict(), tmp_path / "attr.pt")
    old = Attribution.load(tmp_path / "attr.pt")
    assert torch.equal(old.scores, before.scores) and old.provenance == before.provenance
    # the new format wins when a directory holds both
    fitted.save(tmp_path)
    assert Stride.load(tmp_path, tiny_model).train_texts == fitted.train_texts


# ---------------------------------------------------------------------- run identity
@pytest.fixture
def finished_checkpoint(tiny_model, small_texts, tmp_path):
    settings = dict(FAST, steps=4, checkpoint_every=2)
    Stride(tiny_model, **settings).fit(texts24(small_texts), progress=False, checkpoint_dir=tmp_path / "ck")
    return tmp_path / "ck", settings


def _other_model(tiny_model):
    from nnsight import TransformersModel
    from transformers import GPT2LMHeadModel

    torch.manual_seed(123)
    other = GPT2LMHeadModel(resolve_backend(tiny_model).torch_module.config).eval()
    return TransformersModel(other, tokenizer=tiny_model.tokenizer, task="text-generation")


CHANGED = {"lr": 1e-3, "rank": 8, "layer": 0, "max_length": 56, "batch_size": 6}


@pytest.mark.parametrize("change, expected", [
    ("corpus", r"corpus \(texts and ids\) differs \(hash [0-9a-f]{12} in the checkpoint vs [0-9a-f]{12} now\)"),
    ("ids", r"corpus \(texts and ids\) differs"),
    ("lr", r"setting lr: 0\.003 in the checkpoint vs 0\.001 now"),
    ("rank", r"setting rank: 4 in the checkpoint vs 8 now"),
    ("layer", r"setting layer: 1 in the checkpoint vs 0 now"),
    ("max_length", r"setting max_length: 48 in the checkpoint vs 56 now"),
    ("batch_size", r"setting batch_size: 8 in the checkpoint vs 6 now"),
    ("model", r"model fingerprint differs"),
])
def test_checkpoint_of_another_run_is_refused(change, expected, finished_checkpoint, tiny_model, small_texts):
    directory, settings = finished_checkpoint
    texts, ids, model = texts24(small_texts), None, tiny_model
    if change == "corpus":
        texts = small_texts[16:40]
    elif change == "ids":
        ids = [f"doc-{i}" for i in range(24)]
    elif change == "model":
        model = _other_model(tiny_model)
    else:
        settings = dict(settings, **{change: CHANGED[change]})
    with pytest.raises(CheckpointMismatchError, match=expected) as info:
        Stride(model, **settings).fit(texts, ids, progress=False, checkpoint_dir=directory)
    message = str(info.value)
    assert "belongs to a different run" in message and "overwrite=True" in message and str(directory) in message


def test_overwrite_starts_over(finished_checkpoint, tiny_model, small_texts):
    directory, settings = finished_checkpoint
    changed = dict(settings, lr=1e-3)
    restarted = Stride(tiny_model, **changed).fit(texts24(small_texts), progress=False, checkpoint_dir=directory,
                                                  overwrite=True)
    fresh = Stride(tiny_model, **changed).fit(texts24(small_texts), progress=False)
    assert all(torch.equal(a, b) for a, b in zip(restarted.operators.parameters(), fresh.operators.parameters()))
    assert restarted.history.total == fresh.history.total
    # the directory now holds the new run: resuming it works, the old settings are refused
    again = Stride(tiny_model, **changed).fit(texts24(small_texts), progress=False, checkpoint_dir=directory)
    assert again.history.total == fresh.history.total
    with pytest.raises(CheckpointMismatchError, match="setting lr: 0.001 in the checkpoint vs 0.003 now"):
        Stride(tiny_model, **settings).fit(texts24(small_texts), progress=False, checkpoint_dir=directory)


def test_checkpoint_beyond_the_planned_steps_and_legacy_checkpoint(finished_checkpoint, tiny_model, small_texts):
    directory, settings = finished_checkpoint
    with pytest.raises(CheckpointMismatchError, match="is at step 4, beyond the 2 steps this fit plans"):
        Stride(tiny_model, **dict(settings, steps=2)).fit(texts24(small_texts), progress=False,
                                                          checkpoint_dir=directory)
    state = storage.load(directory / CHECKPOINT_NAME, "fit_checkpoint")
    del state["identity"]
    storage.remove(directory / CHECKPOINT_NAME)
    torch.save(state, directory / LEGACY_CHECKPOINT_NAME)
    with pytest.raises(CheckpointMismatchError, match="has no run identity .* overwrite=True"):
        Stride(tiny_model, **settings).fit(texts24(small_texts), progress=False, checkpoint_dir=directory)


def test_remote_fit_checks_the_same_identity(tiny_model, small_texts, tmp_path):
    settings = dict(FAST, steps=4)
    Stride(tiny_model, remote="local", remote_steps_per_session=2, **settings).fit(
        texts24(small_texts), progress=False, checkpoint_dir=tmp_path)
    with pytest.raises(CheckpointMismatchError, match=r"setting lr: 0\.003 in the checkpoint vs 0\.001 now"):
        Stride(tiny_model, remote="local", **dict(settings, lr=1e-3)).fit(
            texts24(small_texts), progress=False, checkpoint_dir=tmp_path)
    with pytest.raises(CheckpointMismatchError, match=r"corpus \(texts and ids\) differs"):  # and locally
        Stride(tiny_model, **settings).fit(small_texts[16:40], progress=False, checkpoint_dir=tmp_path)
    local = Stride(tiny_model, **settings).fit(texts24(small_texts), progress=False, checkpoint_dir=tmp_path)
    assert local.is_fitted and len(local.history) == 4  # the remote checkpoint resumes locally (nothing left)


# ------------------------------------------------------------------------ partial fits
def _interrupt_after(monkeypatch, steps):
    original = OperatorFitter.train_step

    def train_step(self):
        if self.step == steps:
            raise KeyboardInterrupt
        return original(self)

    monkeypatch.setattr(OperatorFitter, "train_step", train_step)


def test_partial_fit_is_refused_unless_allowed(tiny_model, small_texts, tmp_path, monkeypatch):
    stride = Stride(tiny_model, **dict(FAST, steps=8))
    _interrupt_after(monkeypatch, 3)
    with pytest.raises(KeyboardInterrupt):
        stride.fit(texts24(small_texts), progress=False)
    monkeypatch.undo()
    assert not stride.is_fitted and len(stride.history) == 3 and "partly fitted" in repr(stride)
    with pytest.raises(PartialFitError, match=r"cannot attribute: .* \(3 of 8 steps ran.*allow_partial=True"):
        stride.attribute(PROMPTS, COMPLETIONS, progress=False)
    with pytest.raises(PartialFitError, match=r"cannot save: .* \(3 of 8 steps ran"):
        stride.save(tmp_path / "s")
    attr = stride.attribute(PROMPTS, COMPLETIONS, progress=False, allow_partial=True)
    assert (attr.provenance["steps_run"], attr.provenance["steps_planned"], attr.provenance["steps"]) == (3, 8, 3)
    stride.save(tmp_path / "s", allow_partial=True)
    loaded = Stride.load(tmp_path / "s", tiny_model)
    assert not loaded.is_fitted
    with pytest.raises(PartialFitError, match=r"3 of 8 steps"):
        loaded.attribute(PROMPTS, COMPLETIONS, progress=False)


def test_interrupted_refit_is_not_fitted(tiny_model, small_texts, monkeypatch):
    stride = Stride(tiny_model, **FAST).fit(texts24(small_texts), progress=False)
    assert stride.is_fitted
    _interrupt_after(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        stride.fit(small_texts[16:40], progress=False)
    assert not stride.is_fitted and len(stride.history) == 2
    with pytest.raises(PartialFitError, match=r"2 of 6 steps"):
        stride.attribute(PROMPTS, COMPLETIONS, progress=False)


def test_failed_remote_chunk_leaves_a_partial_fit(tiny_model, small_texts, monkeypatch):
    original = remote_mod._sample_chunk
    drawn = {"n": 0}

    def corrupt_second_chunk(fitter, steps):
        payload = original(fitter, steps)
        drawn["n"] += 1
        if drawn["n"] == 2:
            payload["operator_ids"][0, 0] = 10_000  # IndexError in the session
        return payload

    monkeypatch.setattr(remote_mod, "_sample_chunk", corrupt_second_chunk)
    stride = Stride(tiny_model, remote="local", remote_steps_per_session=2, **FAST)
    with pytest.raises(RemoteChunkError):
        stride.fit(texts24(small_texts), progress=False)
    assert not stride.is_fitted and len(stride.history) == 2
    with pytest.raises(PartialFitError, match=r"2 of 6 steps"):
        stride.attribute(PROMPTS, COMPLETIONS, progress=False)


# ------------------------------------------------------------------ Ctrl-C, in process
def make_fitter(model, tokenizer, texts, steps=12):
    backend = resolve_backend(model)
    backend.freeze()
    args = StrideArguments(n_subsets=8, subsets_per_example=2, layer=1, rank=4, steps=steps, batch_size=8, lr=2e-2,
                           placement="residual", linearity_operators=6, sketch_dim=3, checkpoint_every=100)
    torch.manual_seed(0)
    ops = SteeringOperators(8, 32, 4, 32, placement="residual", layer=1, hidden=8)
    return OperatorFitter(backend, ops, SubsetDesign(len(texts), 8, 2, seed=0), encode_texts(tokenizer, texts, 48),
                          args)


def assert_identical(a: OperatorFitter, b: OperatorFitter) -> None:
    assert a.history.step == b.history.step and a.history.total == b.history.total
    for (name, x), (_, z) in zip(a.operators.state_dict().items(), b.operators.state_dict().items()):
        assert torch.equal(x, z), name


@pytest.mark.parametrize("where", ["while sampling", "during the optimizer update"])
def test_ctrl_c_mid_step_resumes_bit_identically(where, tiny_model, tiny_tokenizer, small_texts, tmp_path):
    texts = small_texts[:16]
    full = make_fitter(tiny_model, tiny_tokenizer, texts)
    full.run(progress=False)

    part = make_fitter(tiny_model, tiny_tokenizer, texts)
    if where == "while sampling":
        original = part.sample_rows

        def sample_rows():
            rows = original()  # the sampler has advanced ...
            if part.step == 5:
                raise KeyboardInterrupt  # ... and the step is cut short
            return rows

        part.sample_rows = sample_rows
        expected_step = 5
    else:
        real_step = part.optimizer.step

        def step(*args, **kwargs):
            if part.step == 5:
                os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C arrives while the update is applied
            return real_step(*args, **kwargs)

        part.optimizer.step = step
        expected_step = 6  # the update completes, then the interrupt is raised
    # Python's own Ctrl-C handler, whatever the launcher set (a shell's background job ignores SIGINT)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            part.run(progress=False, checkpoint_dir=tmp_path)
    finally:
        signal.signal(signal.SIGINT, previous)
    assert storage.load(tmp_path / CHECKPOINT_NAME, "fit_checkpoint")["step"] == expected_step
    resumed = make_fitter(tiny_model, tiny_tokenizer, texts)
    resumed.run(progress=False, checkpoint_dir=tmp_path)
    assert_identical(resumed, full)


# ------------------------------------------------------- SIGINT / SIGKILL, in a subprocess
SCRIPT = textwrap.dedent('''
    import random, signal, sys
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even when launched with SIGINT ignored
    import torch
    torch.set_num_threads(1)
    from nnsight import TransformersModel
    from safetensors.torch import save_file
    from transformers import GPT2LMHeadModel
    from stride_nnsight import Stride
    from stride_nnsight.toy import tiny_gpt2_config, train_tokenizer

    WORDS = ("the a cat dog sat ran on in park mat bird sang while and over under house tree river "
             "blue red green small large quickly slowly").split()
    rng = random.Random(0)
    texts = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 14))) + "." for _ in range(40)]
    tok = train_tokenizer(texts + ["The capital of Veldoria is Quarnith."], vocab_size=300)
    torch.manual_seed(0)
    hf = GPT2LMHeadModel(tiny_gpt2_config(tok, n_layer=2, n_embd=32, n_head=2, n_positions=64)).eval()
    model = TransformersModel(hf, tokenizer=tok, task="text-generation")
    settings = dict(layer=1, placement="residual", n_subsets=16, subsets_per_example=2, rank=4, steps=STEPS,
                    batch_size=8, linearity_operators=8, linearity_weight=0.1, sketch_dim=4, basis_hidden=8, max_length=48,
                    checkpoint_every=1, seed=0)
    jobs = sys.argv[1:]
    for checkpoint_dir, out in zip(jobs[::2], jobs[1::2]):
        stride = Stride(model, **settings)
        try:
            stride.fit(texts[:24], progress=False, checkpoint_dir=None if checkpoint_dir == "-" else checkpoint_dir)
        except KeyboardInterrupt:
            print("interrupted at step", len(stride.history), flush=True)
            sys.exit(3)
        save_file({k: v.contiguous() for k, v in stride.operators.state_dict().items()}, out)
''').replace("STEPS", "80")
STEPS = 80


def _python(script: Path, *args: str, **popen) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               RAYON_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    return subprocess.Popen([sys.executable, str(script), *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **popen)


def _interrupt_mid_fit(script: Path, directory: Path, sig: int) -> int:
    """Start a fit, send ``sig`` once its first checkpoint exists; returns the checkpoint's step."""
    proc = _python(script, str(directory), str(directory / "unused.safetensors"))
    deadline = time.monotonic() + 300
    while not (directory / CHECKPOINT_NAME).exists():
        assert proc.poll() is None, proc.communicate()[0]
        assert time.monotonic() < deadline, "the fit did not write a checkpoint in time"
        time.sleep(0.01)
    time.sleep(0.2)
    proc.send_signal(sig)
    output = proc.communicate(timeout=300)[0]
    if sig == signal.SIGINT:
        assert proc.returncode == 3 and "interrupted at step" in output, output
    else:
        assert proc.returncode == -signal.SIGKILL, output
    step = storage.load(directory / CHECKPOINT_NAME, "fit_checkpoint")["step"]
    assert 0 < step < STEPS, f"the signal did not land mid-run (checkpoint at step {step})"
    return step


@pytest.fixture(scope="module")
def signal_runs(tmp_path_factory):
    """Interrupt one fit with SIGINT and one with SIGKILL, then (in one fresh process) resume
    both and run the same fit uninterrupted; returns the three final operator files."""
    from safetensors.torch import load_file

    root = tmp_path_factory.mktemp("signals")
    script = root / "fit.py"
    script.write_text(SCRIPT)
    steps = {name: _interrupt_mid_fit(script, root / name, sig)
             for name, sig in (("sigint", signal.SIGINT), ("sigkill", signal.SIGKILL))}
    proc = _python(script, str(root / "sigint"), str(root / "sigint.safetensors"), str(root / "sigkill"),
                   str(root / "sigkill.safetensors"), "-", str(root / "reference.safetensors"))
    output = proc.communicate(timeout=600)[0]
    assert proc.returncode == 0, output
    return steps, {name: load_file(root / f"{name}.safetensors") for name in ("sigint", "sigkill", "reference")}


@pytest.mark.parametrize("name", ["sigint", "sigkill"])
def test_signal_mid_fit_then_resume_equals_uninterrupted(name, signal_runs):
    steps, operators = signal_runs
    assert 0 < steps[name] < STEPS
    assert operators[name].keys() == operators["reference"].keys()
    for key, value in operators["reference"].items():
        assert torch.equal(operators[name][key], value), key


def test_npz_arrays_and_folders_are_written_atomically_and_never_unpickled(tmp_path):
    """The evaluation caches' files (`storage.write_arrays` / `read_arrays`) and the toy model's
    folder (`storage.save_directory`): atomic, and an ``.npz`` holding a pickled object is
    refused instead of unpickled."""
    import numpy as np

    from stride_nnsight import storage

    path = storage.write_arrays(tmp_path / "a" / "r.npz", losses=np.arange(3.0), digest=np.str_("abc"))
    assert path.name == "r.npz" and sorted(p.name for p in path.parent.iterdir()) == ["r.npz"]  # no .npz.npz, no tmp
    got = storage.read_arrays(path, ("losses", "digest"))
    assert got["losses"].tolist() == [0.0, 1.0, 2.0] and str(got["digest"]) == "abc"
    evil = tmp_path / "evil.npz"
    np.savez(evil, payload=np.array([{"x": 1}], dtype=object))
    with pytest.raises(ValueError, match="pickle"):
        storage.read_arrays(evil, ("payload",))

    def fail(tmp):
        (tmp / "half").write_text("x")
        raise RuntimeError("killed mid-write")

    storage.save_directory(tmp_path / "model", lambda tmp: (tmp / "weights").write_text("old"))
    with pytest.raises(RuntimeError):
        storage.save_directory(tmp_path / "model", fail)
    assert [p.name for p in (tmp_path / "model").iterdir()] == ["weights"]          # the old folder, intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "evil.npz", "model"]  # no temporary left


def test_only_the_storage_module_touches_files():
    """Every file the library writes, removes or unpickles goes through `stride_nnsight.storage`
    (the data-building script `data/make_corpus.py` aside): no module calls the file APIs itself."""
    import re

    package = Path(storage.__file__).parent
    forbidden = re.compile(r"tempfile\.|shutil\.(rmtree|copy|move)|np\.(save|load)\b|torch\.(save|load)\b|"
                           r"json\.dump\(|pickle\.(load|dump)|(?<!storage)\.write_text\(|\.write_bytes\(|\.unlink\(|"
                           r"os\.(remove|replace|rename)\(|np\.memmap\(")
    offenders = []
    for path in sorted(package.rglob("*.py")):
        if path.name == "storage.py" or path.relative_to(package).as_posix() == "data/make_corpus.py":
            continue
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            if forbidden.search(line.split("#")[0]):
                offenders.append(f"{path.relative_to(package)}:{number}: {line.strip()}")
    assert not offenders, "file access outside stride_nnsight.storage:\n" + "\n".join(offenders)


def test_directory_helpers(tmp_path):
    target = tmp_path / "stale"
    (target / "sub").mkdir(parents=True)
    (target / "sub" / "f.json").write_text("{}")
    storage.remove_directory(target)
    assert not target.exists()
    storage.remove_directory(target)  # already gone: fine
    with storage.temporary_directory("stride-test-") as tmp:
        assert Path(tmp).is_dir() and Path(tmp).name.startswith("stride-test-")
    assert not Path(tmp).exists()
    kept = Path(storage.persistent_temporary_directory("stride-test-"))
    assert kept.is_dir()
    storage.remove_directory(kept)
