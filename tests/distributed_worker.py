"""One process of a ``torchrun`` data-parallel run, started by tests/test_distributed.py.

Fits STRIDE on a saved tiny model under torch.distributed (gloo), attributes queries, and writes
what the test compares with a single-process run: rank 0 saves the fitted state, every rank saves
the `Attribution` it returned. ``--die-at-step N`` makes rank 1 exit abruptly after fit step N
(a killed process) to test that the fit resumes from rank 0's checkpoint.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--job", required=True, help="JSON file: texts, prompts, completions, settings")
    p.add_argument("--out", required=True)
    p.add_argument("--checkpoint", default=None)
    p.add_argument("--die-at-step", type=int, default=0)
    a = p.parse_args()

    import torch

    torch.set_num_threads(1)
    from nnsight import TransformersModel
    from transformers import GPT2LMHeadModel, PreTrainedTokenizerFast

    from stride_nnsight import Stride, distributed
    from stride_nnsight.fitting import OperatorFitter

    rank, world = distributed.init_from_env(backend="gloo")
    assert world == int(os.environ["WORLD_SIZE"]) > 1, "run me under torchrun"
    job = json.loads(Path(a.job).read_text())
    hf = GPT2LMHeadModel.from_pretrained(a.model, local_files_only=True).eval()
    tok = PreTrainedTokenizerFast.from_pretrained(a.model, local_files_only=True)
    lm = TransformersModel(hf, tokenizer=tok, task="text-generation")
    if a.die_at_step and rank == 1:
        step = OperatorFitter.train_step

        def dying(self):
            out = step(self)
            if self.step >= a.die_at_step:
                os._exit(3)  # no cleanup, no checkpoint: a killed process
            return out

        OperatorFitter.train_step = dying
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    stride = Stride(lm, **job["settings"]).fit(job["texts"], progress=False, checkpoint_dir=a.checkpoint)
    attr = stride.attribute(job["prompts"], job["completions"], progress=False)
    if rank == 0:
        stride.save(out / "stride.json")
    attr.save(out / f"attr-rank{rank}.json")
    # the "shared_cv" rule chooses one fraction from every rank's measurements
    stride.attribute(job["prompts"], job["completions"], progress=False, lambda_rule="shared_cv",
                     null_permutations=0).save(out / f"shared-rank{rank}.json")
    distributed.shutdown()


if __name__ == "__main__":
    main()
