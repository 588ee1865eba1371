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


def main() -> None:
    nbf.write(notebook(QUICKSTART), HERE / "01_quickstart.ipynb")


if __name__ == "__main__":
    main()
