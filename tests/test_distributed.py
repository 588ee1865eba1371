"""Data parallelism on torch.distributed (stride_nnsight.distributed): a fit and an attribution
run by ``torchrun --nproc_per_node=2`` (gloo, CPU) give what one process gives, and a fit whose
second process is killed resumes from rank 0's checkpoint, here with a different world size.

Tolerances: a data-parallel step sums the two processes' gradients instead of one process's
(float rounding), which AdamW carries through the steps; the operators agree to 1e-4 (relative
to their scale), the scores to 1e-4. Measurement and recovery are per query, so the sharded
measurements equal the single-process ones to float rounding and the recovered scores follow.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from stride_nnsight import Attribution, Stride, distributed

WORKER = Path(__file__).with_name("distributed_worker.py")
SETTINGS = {"n_subsets": 16, "subsets_per_example": 2, "steps": 24, "batch_size": 16, "layer": 0, "rank": 4,
            "max_length": 32, "checkpoint_every": 10, "seed": 3}
PROMPTS = ["the cat sat on", "a dog ran in the", "the bird sang while", "the small house", "a red tree"]
COMPLETIONS = [" the mat", " park", " the river", " was blue", " grew slowly"]


@pytest.fixture(scope="module")
def job(tmp_path_factory, tiny_hf_model, tiny_tokenizer, small_texts):
    """The tiny model saved as a user's model directory, the job file, and the single-process
    reference (fit with a checkpoint directory, so the activation cache is kept too)."""
    from nnsight import TransformersModel

    root = tmp_path_factory.mktemp("distributed")
    tiny_hf_model.save_pretrained(root / "model")
    tiny_tokenizer.save_pretrained(root / "model")
    texts = small_texts[:40]
    (root / "job.json").write_text(json.dumps({"texts": texts, "prompts": PROMPTS, "completions": COMPLETIONS,
                                               "settings": SETTINGS}))
    lm = TransformersModel(tiny_hf_model, tokenizer=tiny_tokenizer, task="text-generation")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ref = Stride(lm, **SETTINGS).fit(texts, progress=False, checkpoint_dir=root / "ref")
        attr = ref.attribute(PROMPTS, COMPLETIONS, progress=False)
    finally:
        torch.set_num_threads(before)
    return {"root": root, "lm": lm, "texts": texts, "ref": ref, "attr": attr}


def _torchrun(job: dict, out: Path, checkpoint: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(WORKER),
           "--model", str(job["root"] / "model"), "--job", str(job["root"] / "job.json"), "--out", str(out),
           "--checkpoint", str(checkpoint), *extra]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)


def _close_operators(a: Stride, b: Stride, rtol: float = 1e-4) -> None:
    for (name, x), (_, y) in zip(a.operators.state_dict().items(), b.operators.state_dict().items()):
        scale = float(x.abs().max()) or 1.0
        assert float((x - y).abs().max()) <= rtol * scale, name


@pytest.fixture(scope="module")
def two_processes(job):
    out, checkpoint = job["root"] / "ddp", job["root"] / "ddp-ckpt"
    run = _torchrun(job, out, checkpoint)
    assert run.returncode == 0, run.stderr[-4000:]
    return out, checkpoint


def test_two_process_fit_equals_one_process(job, two_processes):
    out, checkpoint = two_processes
    fitted = Stride.load(out / "stride.json", job["lm"])
    _close_operators(job["ref"], fitted)
    ref_h, h = job["ref"].history, fitted.history
    assert len(h) == len(ref_h) == SETTINGS["steps"]
    np.testing.assert_allclose(h.fidelity, ref_h.fidelity, rtol=1e-4)
    np.testing.assert_allclose(h.stability, ref_h.stability, rtol=1e-3, atol=1e-7)
    # the activation cache was built by both ranks (batches shared out) and holds what one process wrote
    # the default cache: the residual and the vocabulary candidates (fit_vocabulary), no h
    assert not (checkpoint / "activations" / "h_final.npy").exists()
    for name in ("z.npy", "candidate_ids.npy", "candidate_log_weights.npy"):
        np.testing.assert_array_equal(np.load(checkpoint / "activations" / name),
                                      np.load(job["root"] / "ref" / "activations" / name))
    assert not list((checkpoint / "activations").glob("progress-rank*"))  # finished: progress files gone


def test_sharded_attribution_equals_one_process_on_every_rank(job, two_processes):
    out, _ = two_processes
    ref = job["attr"]
    for rank in range(2):
        attr = Attribution.load(out / f"attr-rank{rank}.json")
        assert attr.query_ids == ref.query_ids and attr.n_train == ref.n_train
        np.testing.assert_allclose(attr.measurements.numpy(), ref.measurements.numpy(), rtol=1e-3, atol=1e-6)
        np.testing.assert_allclose(attr.scores.numpy(), ref.scores.numpy(), atol=1e-4)
        np.testing.assert_allclose(attr.noise_floor.numpy(), ref.noise_floor.numpy(), rtol=1e-3, atol=1e-6)


def test_shared_cv_fraction_is_chosen_from_every_rank(job, two_processes):
    """Under two processes ``lambda_rule="shared_cv"`` chooses the fraction from all the queries'
    measurements (gathered), so both ranks use the single-process fraction and scores."""
    out, _ = two_processes
    ref = job["ref"].attribute(PROMPTS, COMPLETIONS, progress=False, lambda_rule="shared_cv", null_permutations=0)
    for rank in range(2):
        attr = Attribution.load(out / f"shared-rank{rank}.json")
        assert attr.provenance["lambda_fraction"] == ref.provenance["lambda_fraction"]
        assert attr.provenance["lambda_selection"]["queries"] == list(range(len(PROMPTS)))
        np.testing.assert_allclose(attr.scores.numpy(), ref.scores.numpy(), atol=1e-4)


def test_sharded_recovery_is_the_single_process_recovery(job):
    """Same fitted operators, queries split by hand as two ranks would: identical rows."""
    stride, ref = job["ref"], job["attr"]
    args = stride.args
    parts = []
    for rank in range(2):
        idx = distributed.local_indices(len(PROMPTS), rank, 2)
        y, base, scores, lambdas, floor, _, _ = stride.__class__._measure_and_recover(
            stride, [PROMPTS[i] for i in idx], [COMPLETIONS[i] for i in idx], args, metric=None,
            intervention=None, progress=False, null_permutations=8)
        parts.append((idx, scores, floor))
    rows = distributed.assemble_rows([(i, [s[j] for j in range(s.shape[0])]) for i, s, _ in parts], len(PROMPTS))
    np.testing.assert_allclose(np.vstack([r.toarray() for r in rows]), ref.scores.numpy(), atol=1e-6)
    # the noise floor of a query depends on its global index, not on its neighbours: recovered alone
    # at local position 0 it differs, with its global index it is the same
    floors = distributed.assemble_rows([(i, f) for i, _, f in parts], len(PROMPTS))
    assert floors[0] == pytest.approx(float(ref.noise_floor[0]))


def test_a_killed_process_leaves_a_checkpoint_that_resumes_with_another_world_size(job):
    out, checkpoint = job["root"] / "killed", job["root"] / "killed-ckpt"
    run = _torchrun(job, out, checkpoint, "--die-at-step", "15")
    assert run.returncode != 0
    from stride_nnsight import storage
    from stride_nnsight.fitting import CHECKPOINT_KIND, CHECKPOINT_NAME

    state = storage.load(checkpoint / CHECKPOINT_NAME, CHECKPOINT_KIND)
    assert state["step"] == 10  # the last checkpoint rank 0 wrote before rank 1 died
    resumed = Stride(job["lm"], **SETTINGS).fit(job["texts"], progress=False, checkpoint_dir=checkpoint)
    assert len(resumed.history) == SETTINGS["steps"]
    _close_operators(job["ref"], resumed)


def test_torchrun_command_line_fit_and_attribute(job):
    """``torchrun --nproc_per_node=2 -m stride_nnsight.cli fit`` then ``attribute``: rank 0 writes
    the state and the scores, which match the single-process run."""
    root = job["root"]
    (root / "train.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in job["texts"]))
    (root / "queries.jsonl").write_text("".join(json.dumps({"prompt": p, "completion": c}) + "\n"
                                                for p, c in zip(PROMPTS, COMPLETIONS)))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    run = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
           "stride_nnsight.cli"]
    sets = [x for k, v in SETTINGS.items() for x in ("--set", f"{k}={v}")]
    fit = subprocess.run(run + ["fit", "--model", str(root / "model"), "--data", str(root / "train.jsonl"),
                                "--out", str(root / "cli-state"), "--no-progress", *sets],
                         env=env, capture_output=True, text=True, timeout=600)
    assert fit.returncode == 0, fit.stderr[-4000:]
    assert fit.stdout.count("[3/3] saved to") == 1  # one process reports
    _close_operators(job["ref"], Stride.load(root / "cli-state", job["lm"]))
    att = subprocess.run(run + ["attribute", "--state", str(root / "cli-state"), "--model", str(root / "model"),
                                "--queries", str(root / "queries.jsonl"), "--out", str(root / "cli-scores.json"),
                                "--no-progress"], env=env, capture_output=True, text=True, timeout=600)
    assert att.returncode == 0, att.stderr[-4000:]
    attr = Attribution.load(root / "cli-scores.json")
    np.testing.assert_allclose(attr.scores.numpy(), job["attr"].scores.numpy(), atol=1e-4)


def test_remote_fit_refused_under_several_processes(tiny_model, small_texts, monkeypatch):
    monkeypatch.setattr(distributed, "rank_and_world", lambda: (0, 2))
    stride = Stride(tiny_model, remote="local", **{k: v for k, v in SETTINGS.items() if k != "checkpoint_every"})
    with pytest.raises(ValueError, match="remote fit runs in NDIF sessions"):
        stride.fit(small_texts[:40], progress=False)


def test_helpers_in_one_process():
    assert distributed.rank_and_world() == (0, 1) and distributed.is_main_process()
    assert distributed.local_indices(7, 1, 3).tolist() == [1, 4]
    assert distributed.all_gather_objects({"a": 1}) == [{"a": 1}]
    assert distributed.broadcast_object(5) == 5
    t = torch.tensor([1.0, 2.0])
    assert torch.equal(distributed.all_reduce_sum(t), t)
    rows = distributed.assemble_rows([(np.array([0, 2]), ["a", "c"]), (np.array([1]), ["b"])], 3)
    assert rows == ["a", "b", "c"]
    with pytest.raises(RuntimeError, match="not returned"):
        distributed.assemble_rows([(np.array([0]), ["a"])], 2)


def test_shutdown_destroys_the_group_and_is_a_no_op_without_one(tmp_path):
    """`shutdown` tears the default group down (the command line calls it before exiting: a gloo
    group alive at interpreter exit can abort a rank) and does nothing when none exists."""
    distributed.shutdown()  # no group: nothing to do
    store = torch.distributed.FileStore(str(tmp_path / "store"), 1)
    torch.distributed.init_process_group("gloo", store=store, rank=0, world_size=1)
    assert torch.distributed.is_initialized()
    distributed.shutdown()
    assert not torch.distributed.is_initialized() and distributed.rank_and_world() == (0, 1)
