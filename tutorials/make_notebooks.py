"""Regenerate the tutorial notebooks from the cell sources below (keeps them reviewable).

Run: python tutorials/make_notebooks.py   (the test suite executes the .ipynb files)
"""

from pathlib import Path

import nbformat as nbf

HERE = Path(__file__).parent


def notebook(cells: list[tuple[str, str]]) -> nbf.NotebookNode:
    nb = nbf.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.cells = [nbf.v4.new_markdown_cell(src) if kind == "md" else nbf.v4.new_code_cell(src) for kind, src in cells]
    return nb


QUICKSTART = [
    ("md", """# STRIDE quickstart: which training documents made the model say this?

This notebook runs STRIDE end to end on the bundled tiny setting: a small corpus with
*planted facts* (each stated in two known documents) and a tiny GPT-2 trained on it.
On your own model, replace the first cell with
`model = TransformersModel("your/model", task="text-generation")` and your training texts."""),
    ("code", """import os
import torch
from stride_nnsight import Stride
from stride_nnsight.toy import toy_language_model

# Trains a 4-layer GPT-2 on the bundled corpus (~20 s on 2 CPU cores), or loads it from the cache.
model, corpus = toy_language_model(seed=0, cache_dir=os.environ.get("STRIDE_NNSIGHT_CACHE", ".stride_cache"))
print(len(corpus.documents), "training documents;", len(corpus.facts), "planted facts")
corpus.facts[0]"""),
    ("md", """## Fit the steering operators
`K` operators (one per random subset of the training set, each example in `d` subsets),
applied as an nnsight intervention at the output of one decoder block. The base model
stays frozen. We use fewer steps than the default to keep the notebook quick."""),
    ("code", """stride = Stride(model, n_subsets=128, subsets_per_example=6, seed=0, steps=150)
stride.fit(corpus.documents, progress=False)
print(stride)
h = stride.history
print(f"fidelity loss: {sum(h.fidelity[:15]) / 15:.3f} -> {sum(h.fidelity[-15:]) / 15:.3f} nats")"""),
    ("md", """## Attribute queries
`attribute` measures how each operator moves the completion's loss and recovers
per-document influence by Lasso. The result's `scores` is a `[query, train]` tensor."""),
    ("code", """facts = corpus.facts[:8]
attr = stride.attribute([f.prompt for f in facts], [f.completion for f in facts],
                        query_ids=[f.id for f in facts], progress=False)
attr"""),
    ("code", """fact = facts[0]
table = attr.top_k(5, query=fact.id)
table["planted_source"] = table.train_index.isin(fact.source_ids)
table[["rank", "train_index", "score", "planted_source", "text"]]"""),
    ("md", "## Slice, export, keep"),
    ("code", """print(attr.scores.shape, attr.dims)
print("score of the first source document for each query:",
      [round(float(attr.sel(query=f.id, train=f.source_ids[0])), 4) for f in facts])
hits = [len(set(torch.topk(attr.scores[i], 10).indices.tolist()) & set(f.source_ids)) / 2 for i, f in enumerate(facts)]
print(f"recall@10 of planted sources: {sum(hits) / len(hits):.2f} (random: {10 / len(corpus):.3f})")
df = attr.to_pandas(long=True)
attr.provenance["placement"], attr.provenance["n_subsets"], attr.provenance["model_fingerprint"]"""),
    ("code", """import tempfile
with tempfile.TemporaryDirectory() as d:
    stride.save(d)
    again = Stride.load(d, model)
    same = again.attribute([facts[0].prompt], [facts[0].completion], progress=False)
torch.allclose(same.scores[0], attr.scores[0], atol=1e-5)"""),
]


PATCHING = [
    ("md", """# Attribution meets activation patching

Interpretability work asks *how* a model computes an answer (activation patching) and
*where from* it learned it (training data attribution). STRIDE composes with patching:

* `stride.attribute(..., metric=fn)` attributes any scalar you compute from the logits,
  here a **logit difference** between the true answer and a distractor;
* `stride.attribute(..., intervention=patch)` applies **your patch** in every measured run,
  so the scores attribute the *patched* model's behaviour;
* `stride.steer(k)` applies operator `k` inside **your own** `model.trace(...)`.

We use the bundled tiny model: two planted facts *"The capital of A is X"* and
*"The capital of B is Y"*, and patch the entity tokens of A's prompt with B's."""),
    ("code", """import os
import torch
from pathlib import Path
from stride_nnsight.cli import demo_stride
from stride_nnsight.toy import toy_language_model

cache = Path(os.environ.get("STRIDE_NNSIGHT_CACHE", ".stride_cache"))
model, corpus = toy_language_model(seed=0, cache_dir=cache)
# The demo's operators (library defaults): loaded if `stride-nnsight demo --cache-dir ...` already fitted them, else fitted now.
stride, _, _ = demo_stride(model, corpus, cache, progress=False)
tok = model.tokenizer"""),
    ("code", """# Two capital facts whose prompts have the same number of tokens (so positions line up).
capitals = [f for f, r in zip(corpus.facts, corpus.relations) if r == "capital"]
enc = lambda f, completion: stride.encode_queries([f.prompt], [completion])
pairs = [(a, b) for a in capitals for b in capitals if a.id < b.id
         and enc(a, a.completion).input_ids.shape == enc(b, a.completion).input_ids.shape]
fact_a, fact_b = pairs[0]
print(fact_a.text, "|", fact_b.text)
tok_a = tok(fact_a.completion, add_special_tokens=False).input_ids[0]
tok_b = tok(fact_b.completion, add_special_tokens=False).input_ids[0]

def logit_diff(logits, batch):
    \"\"\"logit(first token of A's answer) - logit(first token of B's answer), at the position predicting it.\"\"\"
    pos = batch.loss_mask.argmax(1) - 1
    rows = torch.arange(logits.shape[0])
    return logits[rows, pos, tok_a] - logits[rows, pos, tok_b]"""),
    ("code", """# Cache block 1's output on B's prompt, then patch it into A's run at the positions that differ.
# (Patch sites must come before the steered block, here block 2, since nnsight visits modules in order.)
clean, corrupt = enc(fact_a, fact_a.completion), enc(fact_b, fact_a.completion)
differ = (clean.input_ids[0] != corrupt.input_ids[0]).nonzero().flatten()
with model.trace(input_ids=corrupt.input_ids, attention_mask=corrupt.attention_mask):
    cached = model.transformer.h[1].output.save()

def patch(m):
    m.transformer.h[1].output[:, differ] = cached[:, differ]

with model.trace(input_ids=clean.input_ids, attention_mask=clean.attention_mask):
    patch(model)
    patched_logits = model.output.logits.save()
with model.trace(input_ids=clean.input_ids, attention_mask=clean.attention_mask):
    clean_logits = model.output.logits.save()
print("logit diff clean:  ", float(logit_diff(clean_logits, clean)))
print("logit diff patched:", float(logit_diff(patched_logits, clean)))"""),
    ("code", """before = stride.attribute([fact_a.prompt], [fact_a.completion], metric=logit_diff, progress=False)
after = stride.attribute([fact_a.prompt], [fact_a.completion], metric=logit_diff, intervention=patch, progress=False)

def show(attr, title):
    table = attr.top_k(5, query=0)
    table["source_of"] = ["A" if j in fact_a.source_ids else "B" if j in fact_b.source_ids else "" for j in table.train_index]
    print(title); print(table[["rank", "train_index", "score", "source_of"]].to_string(index=False))

show(before, "proponents of the logit difference, clean run")
show(after, "proponents of the logit difference, patched run")"""),
    ("md", """`before` and `after` are ordinary `Attribution`s: subtract their scores to see which
training documents the patch made matter more or less."""),
    ("code", """delta = after.scores[0] - before.scores[0]
moved = torch.topk(delta.abs(), 5).indices.tolist()
[(j, round(float(delta[j]), 4), "A" if j in fact_a.source_ids else "B" if j in fact_b.source_ids else "") for j in moved]"""),
    ("md", "`steer` puts an operator into your own trace, next to your patch:"),
    ("code", """k = int(torch.argmax(before.measurements[0]))  # the operator that helps the clean answer most
with model.trace(input_ids=clean.input_ids, attention_mask=clean.attention_mask):
    patch(model)
    stride.steer(k)
    steered = model.output.logits.save()
print("patched + steered logit diff:", float(logit_diff(steered, clean).detach()))
float(logit_diff(steered, clean).detach()) != float(logit_diff(patched_logits, clean))"""),
]


def main() -> None:
    nbf.write(notebook(QUICKSTART), HERE / "01_quickstart.ipynb")
    nbf.write(notebook(PATCHING), HERE / "02_activation_patching.ipynb")


if __name__ == "__main__":
    main()
