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
    for i, cell in enumerate(nb.cells):  # stable ids: regenerating changes only what was edited
        cell.id = f"cell-{i:02d}"
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
    table = attr.top_k(5, row=0)
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


REMOTE = [
    ("md", """# STRIDE on NDIF: fitting and attributing with a remote model

Large models live on [NDIF](https://ndif.us); you reach them through nnsight sessions and
never download the weights. `Stride(model, ..., remote=...)` runs STRIDE's two model-heavy
steps there: **fitting** the steering operators and **measuring** how each operator moves a
query's loss. `remote` takes the values nnsight takes: `True` (NDIF), a host URL, or
`"local"`, nnsight's in-process simulation of the remote path. This notebook uses `"local"`
on a tiny untrained GPT-2, so it runs offline in well under a minute. It shows the workflow,
not attribution quality. The last cell shows the change for a real model on NDIF.

What runs where:
- **On your machine:** the subset design, the sampling of each step's rows (same seed, same
  rows as a local fit), tokenization and the Lasso recovery.
- **In each remote session:** the block creates the operators and the AdamW optimiser, loads
  the state it was sent, runs a chunk of training steps (or measurements) against the
  server's model, which never moves, and saves detached CPU copies of the results.
- **Sent in:** operator and AdamW state, the chunk's row indices and operator ids, and the
  tokens of only the examples the chunk uses. **Sent back:** the updated state and the loss
  curve (fit), or `y [q, K]` and `base [q]` (measurement). Nothing else."""),
    ("code", """import random, tempfile, time
import torch
from nnsight import TransformersModel
from transformers import GPT2LMHeadModel
from stride_nnsight import Stride
from stride_nnsight.toy import train_tokenizer, tiny_gpt2_config

words = "the a cat dog sat ran on in park mat bird sang while and over under house tree river".split()
rng = random.Random(0)
texts = [" ".join(rng.choice(words) for _ in range(rng.randint(6, 12))) + "." for _ in range(24)]
tokenizer = train_tokenizer(texts, vocab_size=200)
torch.manual_seed(0)
hf_model = GPT2LMHeadModel(tiny_gpt2_config(tokenizer, n_layer=2, n_embd=32, n_head=2, n_positions=64)).eval()
model = TransformersModel(hf_model, tokenizer=tokenizer, task="text-generation")

settings = dict(layer=1, placement="logits", n_subsets=8, subsets_per_example=2, rank=4, seed=0,
                steps=8, batch_size=6, linearity_operators=4, sketch_dim=3, basis_hidden=16, max_length=32)"""),
    ("md", """## Fit in sessions
The work is cut into chunks, one session each. `remote_steps_per_session` caps a chunk;
`remote_session_budget_s` is the server's limit for one session (NDIF's is one hour). After
each session the driver measures seconds per step and plans the next chunk to use at most
`remote_budget_fraction` (default one half) of the budget, so chunks shrink when sessions
run long. With a `checkpoint_dir`, every finished chunk is written to disk, and a rerun
resumes after the last one."""),
    ("code", """workdir = tempfile.mkdtemp()
stride = Stride(model, remote="local", remote_steps_per_session=3, **settings)
start = time.time()
stride.fit(texts, checkpoint_dir=workdir, progress=False)
print(f"remote fit: {time.time() - start:.1f} s")
for record in stride.remote_log:
    print(f"chunk {record.chunk}: steps {record.start}..{record.stop - 1}, {record.status}, "
          f"{record.seconds:.2f} s, {record.bytes_back:,} bytes back")"""),
    ("md", """Same seed, same sampled rows, same steps: the remote fit reproduces a local one. AdamW's
state travels with the operators from session to session, so the chunking does not change
the result."""),
    ("code", """local = Stride(model, **settings).fit(texts, progress=False)
print("largest weight difference:", max((a - b).abs().max().item() for a, b in
      zip(stride.operators.state_dict().values(), local.operators.state_dict().values())))
print("loss curves equal:", torch.allclose(torch.tensor(stride.history.total), torch.tensor(local.history.total)))"""),
    ("md", """## Resume after a failure
A failed session raises `RemoteChunkError`. The error names the chunk and its step range,
and says where to resume. Here a layer index that the server's model does not have makes
chunk 0 fail. Calling `fit` again with the same `checkpoint_dir` continues after the last
finished chunk. Rerunning the finished fit above sends nothing, because every chunk is
already on disk."""),
    ("code", """from stride_nnsight.remote import RemoteChunkError

broken = Stride(model, remote="local", remote_steps_per_session=3, **settings)
broken.layer = 7  # the tiny model has 2 blocks
try:
    broken.fit(texts, progress=False)
except RemoteChunkError as error:
    print(error)

again = Stride(model, remote="local", remote_steps_per_session=3, **settings)
again.fit(texts, checkpoint_dir=workdir, progress=False)
print("sessions run by the rerun:", len(again.remote_log) - len(stride.remote_log))"""),
    ("md", """## Attribute remotely
Measurement runs in sessions too, up to `remote_queries_per_session` queries per session.
Set `remote_checkpoint_dir` to make it resumable. Only the `[q, K]` measurements come back;
the Lasso recovery runs here."""),
    ("code", """prompts, completions = ["the cat sat", "a bird sang"], [" on the mat.", " over the tree."]
attr = stride.attribute(prompts, completions, progress=False)
attr_local = local.attribute(prompts, completions, progress=False)
print(attr.scores.shape, "scores equal to the local run:", torch.allclose(attr.scores, attr_local.scores, atol=1e-6))
attr.provenance["remote"]"""),
    ("md", """## On NDIF: the one-line change
Replace `remote="local"` with `remote=True` and load a model that NDIF hosts. Loading it
with `LanguageModel(...)` only fetches the config and tokenizer. Set your API key once (get
one at https://login.ndif.us):

```python
import nnsight
from nnsight import LanguageModel
from stride_nnsight import Stride

nnsight.CONFIG.set_default_api_key("YOUR_NDIF_API_KEY")   # once; saved in nnsight's config
model = LanguageModel("meta-llama/Llama-3.1-8B")          # weights stay on NDIF

stride = Stride(model, layer=16, remote=True,        # state capped at max_state_mb: docs/remote.md "Sizes"
                remote_steps_per_session=100,              # cap per session
                remote_session_budget_s=3600,              # NDIF's limit for one session
                remote_checkpoint_dir="stride-llama-ckpt") # resumable fit and measurement
stride.fit(train_texts)                                     # resumes from stride-llama-ckpt if rerun
attr = stride.attribute(prompts, completions)
stride.save("stride-llama")                                 # operators are local after the fit
```

Which placement to use on NDIF: the logits placement scores far better (the residual
placement's attribution was near random where it was measured: LDS 0.004 against 0.089 in the
bundled benchmark's ablation), but every operator owns an `r x vocabulary` matrix, and that
matrix and its AdamW state travel in and out of every session (about 200 MB per copy for K=64,
r=16 and a 50k vocabulary). Prefer the logits placement with a smaller `K` or `rank` when the
vocabulary allows, and compare against BM25 on your data. See `docs/remote.md`."""),
]


READING = [
    ("md", """# Reading an attribution: noise floor, HTML view, report and the command line

Every query gets scores, even one the training data did not shape. This notebook shows how to
tell signal from noise (`noise_floor`, `top_k(above_noise=True)`), how an `Attribution` displays
in a notebook, how to write a standalone HTML report, and the same workflow from the command
line on a model saved to disk."""),
    ("code", """import os, tempfile
from pathlib import Path
from stride_nnsight import Stride
from stride_nnsight.toy import toy_language_model

model, corpus = toy_language_model(seed=0, cache_dir=os.environ.get("STRIDE_NNSIGHT_CACHE", ".stride_cache"))
stride = Stride(model, n_subsets=128, subsets_per_example=6, seed=0, steps=150).fit(corpus.documents, progress=False)
facts = corpus.facts[:4]
prompts = [f.prompt for f in facts] + ["The weather today is"]
completions = [f.completion for f in facts] + [" sunny and warm"]
attr = stride.attribute(prompts, completions, query_ids=[f.id for f in facts] + ["weather"], progress=False)
attr  # in a notebook: each query's top proponents and opponents, scores as bars, shared words marked"""),
    ("md", """## What noise looks like
Each query's measurements are shuffled across the subsets 8 times and recovered again; the
largest score those null recoveries give is the query's noise floor. `noise_ratio` is a score
over that floor. The floor is conservative: a weaker second source can sit below it."""),
    ("code", """print("noise floor per query:", [round(float(v), 3) for v in attr.noise_floor])
print("non-zero scores per query:", [int((attr.sel(query=q) != 0).sum()) for q in attr.query_ids])
attr.top_k(3, query="weather")[["rank", "train_id", "score", "noise_ratio"]]"""),
    ("code", """above = attr.top_k(3, above_noise=True)
above[["query_id", "rank", "train_id", "score", "noise_ratio"]]"""),
    ("md", """## A report to share, and the command line
`to_html` writes every query with its provenance. The CLI runs the same workflow on a model
directory and a JSONL (or CSV, Parquet, `datasets`) file."""),
    ("code", """import json
from stride_nnsight.cli import main

work = Path(tempfile.mkdtemp())
attr.to_html(work / "report.html")
model._module.save_pretrained(work / "model")
model.tokenizer.save_pretrained(work / "model")
(work / "train.jsonl").write_text("".join(json.dumps({"id": i, "text": t}) + "\\n" for i, t in enumerate(corpus.documents)))
(work / "queries.jsonl").write_text("".join(json.dumps({"id": f.id, "prompt": f.prompt, "completion": f.completion}) + "\\n"
                                            for f in facts))
main(["fit", "--model", str(work / "model"), "--data", str(work / "train.jsonl"), "--out", str(work / "state"),
      "--set", "n_subsets=128", "--set", "subsets_per_example=6", "--set", "steps=150", "--no-progress"])
main(["attribute", "--state", str(work / "state"), "--model", str(work / "model"), "--queries",
      str(work / "queries.jsonl"), "--out", str(work / "scores.json"), "--no-progress"])
main(["report", "--scores", str(work / "scores.json"), "--out", str(work / "cli_report.html")])
main(["info", str(work / "state")])"""),
    ("code", """page = (work / "cli_report.html").read_text()
all(f"data-query-id='{f.id}'" in page for f in facts)"""),
]


SELECTION = [
    ("md", """# Choosing training data with attribution

A target set of queries stands for a behaviour to improve. `select_documents` keeps the training
documents that most support those queries under a budget; here we check, by retraining the toy
model, that the selected half of the corpus teaches the target better than a random half, and
what happens to queries nobody targeted. (On the public benchmark this is measured with several
seeds against BM25 and EK-FAC selections: `benchmarks/RESULTS-data-selection.md`.)"""),
    ("code", """import os
import numpy as np
import torch
from transformers import GPT2LMHeadModel
from stride_nnsight import Stride
from stride_nnsight.apps import select_documents
from stride_nnsight.toy import DEFAULT_TRAIN_KWARGS, completion_loss, tiny_gpt2_config, toy_language_model, train_causal_lm

model, corpus = toy_language_model(seed=0, cache_dir=os.environ.get("STRIDE_NNSIGHT_CACHE", ".stride_cache"))
stride = Stride(model, n_subsets=128, subsets_per_example=6, seed=0, steps=150).fit(corpus.documents, progress=False)
targets, others = corpus.facts[:20], corpus.facts[20:]   # the behaviour to improve, and everything else
attr = stride.attribute([f.prompt for f in targets], [f.completion for f in targets],
                        query_ids=[f.id for f in targets], progress=False)
attr"""),
    ("md", """## Three selection rules
`"total"` ranks documents by their summed positive score over the targets; `"per_query"` takes
each target's strongest proponents in turn, so no target dominates the budget; `"mean_rank"`
keeps the best mean rank. With a budget of half the corpus, how many of the targets' planted
source documents does each keep (a random half keeps about 50%)?"""),
    ("code", """budget = len(corpus.documents) // 2
sources = {i for f in targets for i in f.source_ids}
for rule in ("total", "per_query", "mean_rank"):
    chosen = set(select_documents(attr, budget, rule=rule).tolist())
    print(f"{rule:>9}: {len(chosen & sources)} of {len(sources)} target sources kept")
random_half = np.random.default_rng(0).choice(len(corpus.documents), budget, replace=False)
print(f"   random: {len(set(random_half.tolist()) & sources)} of {len(sources)}")"""),
    ("md", """## Retrain on each half
Same tokenizer, same recipe as the toy model, one training seed (the benchmark uses several and
reports confidence intervals)."""),
    ("code", """tokenizer = model.tokenizer

def retrain(indices):
    torch.manual_seed(0)
    fresh = GPT2LMHeadModel(tiny_gpt2_config(tokenizer))
    return train_causal_lm(fresh, tokenizer, [corpus.documents[i] for i in sorted(indices)], seed=0,
                           **DEFAULT_TRAIN_KWARGS)

def mean_loss(m, facts):
    return float(completion_loss(m, tokenizer, [f.prompt for f in facts], [f.completion for f in facts])[0].mean())

selected = retrain(select_documents(attr, budget, rule="total").tolist())
rand = retrain(random_half.tolist())
for name, m in (("STRIDE-selected half", selected), ("random half", rand)):
    print(f"{name:>20}: target loss {mean_loss(m, targets):.2f} nats, other facts {mean_loss(m, others):.2f} nats")"""),
    ("md", """The selected half lowers the target loss. Queries nobody targeted can pay for it: the
selection spends the budget on the targets' proponents, so compare the second column before
using a selection to train a model you care about."""),
    ("code", """mean_loss(selected, targets) < mean_loss(rand, targets)"""),
]


CONTAMINATION = [
    ("md", """# Contamination detection: which evaluation items did the corpus contain?

Given evaluation items, `contamination_scores` reads each item's strongest proponent against
its noise floor: an item copied into the corpus tends to have one strong, isolated source. The
standard references need no attribution: the model's loss, Min-K% probability and zlib ratio
on the item (`baselines.membership_scores`), and the best BM25 match in the corpus. On the toy
model below and on the public benchmark (`benchmarks/RESULTS-contamination.md`) compare them
before relying on any one."""),
    ("code", """import os
import numpy as np
from sklearn.metrics import roc_auc_score
from stride_nnsight import Stride, baselines
from stride_nnsight.apps import contamination_scores
from stride_nnsight.toy import toy_language_model

model, corpus = toy_language_model(seed=0, cache_dir=os.environ.get("STRIDE_NNSIGHT_CACHE", ".stride_cache"))
stride = Stride(model, n_subsets=128, subsets_per_example=6, seed=0, steps=150).fit(corpus.documents, progress=False)

# contained items: planted facts; absent items: the same prompts with another fact's answer
contained = [(f.prompt, f.completion) for f in corpus.facts[:20]]
rng = np.random.default_rng(0)
absent = [(f.prompt, corpus.facts[(f.id + 1 + int(rng.integers(19))) % 40].completion) for f in corpus.facts[:20]]
items = contained + absent
labels = np.array([1] * len(contained) + [0] * len(absent))
prompts, completions = [p for p, _ in items], [c for _, c in items]"""),
    ("code", """attr = stride.attribute(prompts, completions, progress=False)
scores = {"STRIDE": contamination_scores(attr).numpy()}
for name, s in baselines.membership_scores(model, [p + c for p, c in items]).items():
    scores[name] = s.numpy()
scores["BM25"] = baselines.bm25(corpus.documents, prompts, completions).scores.numpy().max(axis=1)
for name, s in scores.items():
    print(f"{name:>7}: AUROC {roc_auc_score(labels, np.nan_to_num(s, posinf=1e9)):.3f}")"""),
    ("md", """Absent items here reuse known words in a new combination, so every method has something to
go on; the benchmark adds paraphrased copies, which test whether a method sees past the exact
wording. Items flagged by several methods are the ones to inspect by hand, for example with
`attr.top_k(3, above_noise=True)`:"""),
    ("code", """attr[: len(contained)].top_k(1, above_noise=True)[["query_id", "train_id", "score", "noise_ratio"]].head()"""),
]


def main() -> None:
    nbf.write(notebook(QUICKSTART), HERE / "01_quickstart.ipynb")
    nbf.write(notebook(READING), HERE / "04_reading_attributions.ipynb")
    nbf.write(notebook(PATCHING), HERE / "02_activation_patching.ipynb")
    nbf.write(notebook(REMOTE), HERE / "03_remote_ndif.ipynb")
    nbf.write(notebook(SELECTION), HERE / "05_data_selection.ipynb")
    nbf.write(notebook(CONTAMINATION), HERE / "06_contamination.ipynb")


if __name__ == "__main__":
    main()
