"""Command line: fit STRIDE on your own model and data, attribute queries, write a report.

``stride-nnsight demo`` runs STRIDE end to end on the bundled tiny setting. For your own model
and corpus::

    stride-nnsight fit --model gpt2 --data train.jsonl --out state/
    stride-nnsight attribute --state state/ --model gpt2 --queries queries.jsonl --out scores.json
    stride-nnsight report --scores scores.json --out report.html
    stride-nnsight info state/

Data files: JSONL, CSV, Parquet or a Hugging Face ``datasets`` directory (``save_to_disk``);
settings: any ``StrideArguments`` field, from ``--config stride.yaml`` and ``--set key=value``
(the flags win). A fit is resumable: it checkpoints under ``OUT/checkpoint`` and a rerun of
the same command continues it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import warnings
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

__all__ = ["main", "run_demo", "demo_stride", "load_model", "fit_command", "attribute_command", "report_command",
           "info_command"]


def _default_cache() -> Path:
    root = os.environ.get("STRIDE_NNSIGHT_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "stride-nnsight")
    return Path(root)


def sensible_threads(out=sys.stdout) -> int:
    """Use one torch thread when the machine is already busy: torch's default (one thread per
    core) thrashes when other processes compete for the cores, which made the demo 50x slower
    on a loaded 2-core machine. ``OMP_NUM_THREADS`` / ``torch.set_num_threads`` set by the user
    win. Returns the thread count in use."""
    import torch

    if "OMP_NUM_THREADS" in os.environ or torch.get_num_threads() <= 1 or not hasattr(os, "getloadavg"):
        return torch.get_num_threads()
    cores = os.cpu_count() or 1
    load = os.getloadavg()[0]
    if load >= cores - 0.5:
        torch.set_num_threads(1)
        print(f"      the machine is busy (load {load:.1f} on {cores} cores): using 1 torch thread "
              "(set OMP_NUM_THREADS to choose)", file=out)
    return torch.get_num_threads()


def run_demo(
    n_queries: int = 6,
    top: int = 5,
    cache_dir: Optional[Path] = None,
    steps: Optional[int] = None,
    placement: Optional[str] = None,
    seed: int = 0,
    refit: bool = False,
    out=sys.stdout,
) -> dict:
    """Train (or load) the toy model, fit (or load) STRIDE, attribute fact queries, print.

    Returns a dict with the measured ``recall@10`` over all fact queries and the
    random expectation, so callers (and tests) can check it.
    """
    import torch

    from .toy import toy_language_model

    cache_dir = Path(cache_dir) if cache_dir is not None else _default_cache()
    sensible_threads(out)
    t0 = time.perf_counter()
    print(f"[1/4] tiny GPT-2 on the bundled corpus (cache: {cache_dir})", file=out)
    model, corpus = toy_language_model(seed=seed, cache_dir=cache_dir, progress=True)
    print(f"      {len(corpus)} documents, {len(corpus.facts)} planted facts, "
          f"{sum(p.numel() for p in model._module.parameters()) / 1e6:.2f}M parameters "
          f"({time.perf_counter() - t0:.1f}s)", file=out)

    settings = {k: v for k, v in {"steps": steps, "placement": placement}.items() if v is not None}
    t1 = time.perf_counter()
    stride, fitted_now, state_dir = demo_stride(model, corpus, cache_dir, seed=seed, refit=refit, **settings)
    if fitted_now:
        h = stride.history
        k = max(1, len(h) // 10)
        print(f"[2/4] fitted {stride}", file=out)
        print(f"      fidelity loss {sum(h.fidelity[:k]) / k:.3f} -> {sum(h.fidelity[-k:]) / k:.3f} nats; "
              f"saved to {state_dir} ({time.perf_counter() - t1:.1f}s)", file=out)
    else:
        print(f"[2/4] loaded fitted STRIDE operators from {state_dir}", file=out)

    t2 = time.perf_counter()
    facts = corpus.facts
    print(f"[3/4] attributing {len(facts)} fact queries", file=out)
    attr = stride.attribute([f.prompt for f in facts], [f.completion for f in facts],
                            query_ids=[f.id for f in facts], progress=False)
    per_query = time.perf_counter() - t2
    print(f"      {per_query:.2f}s ({1000 * per_query / len(facts):.0f} ms per query)", file=out)

    print(f"[4/4] top {top} training documents for {min(n_queries, len(facts))} queries "
          "(* = planted source of the fact; ~ = score within the query's noise floor)\n", file=out)
    for fact in facts[:n_queries]:
        print(f"  {fact.prompt!r} -> {fact.completion!r}", file=out)
        table = attr.top_k(top, query=fact.id)
        for row in table.itertuples():
            mark = "*" if row.train_index in fact.source_ids else " "
            quiet = "~" if getattr(row, "noise_ratio", float("inf")) <= 1.0 else " "
            text = " ".join(row.text.split())
            text = text if len(text) <= 70 else text[:67] + "..."
            print(f"   {mark} #{row.rank} doc {row.train_index:4d}  {row.score:+.4f}{quiet} {text}", file=out)
        print(file=out)

    hits = 0.0
    for fact in facts:
        top10 = set(torch.topk(attr.sel(query=fact.id), 10).indices.tolist())
        hits += len(top10 & set(fact.source_ids)) / len(fact.source_ids)
    recall = hits / len(facts)
    chance = 10 / len(corpus)
    print(f"recall@10 of planted sources over {len(facts)} queries: {recall:.3f} "
          f"(random ranking: {chance:.3f}); total {time.perf_counter() - t0:.1f}s", file=out)
    return {"recall@10": recall, "random": chance, "attribution": attr, "stride": stride}


def demo_stride(model, corpus, cache_dir: Path, seed: int = 0, refit: bool = False, progress: bool = True,
                **settings):
    """The demo's fitted ``Stride``: loaded from ``cache_dir`` when it was fitted before with
    the same settings, else fitted (resumably) and saved there. Returns
    ``(stride, fitted_now, state_dir)``."""
    from .stride import Stride, find_state_file

    from .arguments import StrideArguments

    # The directory is named after every setting (defaults included), so a change of the
    # library's defaults never reuses operators fitted under the old ones.
    args = StrideArguments(seed=seed).replace(**settings).to_dict()
    tag = hashlib.sha256(json.dumps(args, sort_keys=True).encode()).hexdigest()[:10]
    state_dir = Path(cache_dir) / f"stride-{tag}"
    if find_state_file(state_dir) is not None and not refit:
        try:
            return Stride.load(state_dir, model), False, state_dir
        except ValueError as err:  # fitted on an older toy model: refit below
            warnings.warn(f"ignoring cached STRIDE state in {state_dir}: {err}", stacklevel=2)
            from . import storage

            storage.remove_directory(state_dir)
    stride = Stride(model, seed=seed, **settings)
    stride.fit(corpus.documents, checkpoint_dir=state_dir / "checkpoint", progress=progress)
    stride.save(state_dir)
    return stride, True, state_dir


# ----------------------------------------------------------------------- your own model and data
def load_model(name_or_path: str, *, dtype: Optional[str] = None):
    """An nnsight ``TransformersModel`` for a causal LM: a local directory (``save_pretrained``)
    or a Hugging Face hub id, loaded with ``from_pretrained`` (and its tokenizer)."""
    import torch
    from nnsight import TransformersModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    local = Path(name_or_path).exists()
    kwargs = {"local_files_only": True} if local else {}
    if dtype is not None:
        kwargs["dtype"] = getattr(torch, dtype)
    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, **{k: v for k, v in kwargs.items() if k != "dtype"})
        hf = AutoModelForCausalLM.from_pretrained(name_or_path, **kwargs)
    except OSError as e:
        raise SystemExit(f"stride-nnsight: cannot load the model {name_or_path!r}: {e}\n"
                         "Pass a directory written by save_pretrained (model and tokenizer) or a hub id.") from None
    return TransformersModel(hf.eval(), tokenizer=tokenizer, task="text-generation")


def _settings(config: Optional[Path], assignments: Sequence[str]) -> dict:
    """``StrideArguments`` fields from a settings file, then ``key=value`` flags (Python literals,
    else strings) on top; unknown names are refused with the list of valid ones."""
    import ast
    from dataclasses import fields

    from . import storage
    from .arguments import StrideArguments

    settings = dict(storage.read_settings_file(config)) if config is not None else {}
    for item in assignments:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise SystemExit(f"stride-nnsight: --set takes key=value, got {item!r}")
        try:
            settings[key.strip()] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            settings[key.strip()] = value.strip()
    known = {f.name for f in fields(StrideArguments)}
    unknown = sorted(set(settings) - known)
    if unknown:
        raise SystemExit(f"stride-nnsight: unknown setting(s) {unknown}; valid: {sorted(known)}")
    return settings


def _report_stream(stdout):
    """Where a command prints its report: ``stdout`` (default ``sys.stdout``) on rank 0, nowhere on
    the other ranks under torchrun (they compute, rank 0 reports and writes)."""
    from .distributed import is_main_process

    return (stdout or sys.stdout) if is_main_process() else open(os.devnull, "w")


def fit_command(model: str, data: Path, out: Path, *, text_field: str = "text", id_field: Optional[str] = None,
                config: Optional[Path] = None, assignments: Sequence[str] = (), checkpoint_dir: Optional[Path] = None,
                overwrite: bool = False, progress: bool = True, stdout=None):
    """``stride-nnsight fit``: fit STRIDE on the texts of ``data`` and save the state to ``out``."""
    from . import storage
    from .distributed import is_main_process
    from .stride import Stride

    stdout = _report_stream(stdout)
    settings = _settings(config, assignments)
    id_column = id_field or "id"
    table = storage.read_records(data, [text_field], optional=[id_column])
    ids = table.get(id_column)
    if id_field is not None and ids is None:
        raise SystemExit(f"stride-nnsight: {data} has no id column {id_field!r}")
    texts = table[text_field]
    print(f"[1/3] {len(texts)} training texts from {data} (column {text_field!r}"
          f"{f', ids from {id_column!r}' if ids is not None else ', ids 0..n-1'})", file=stdout or sys.stdout)
    lm = load_model(model)
    stride = Stride(lm, **settings)
    ckpt = Path(checkpoint_dir) if checkpoint_dir is not None else Path(out) / "checkpoint"
    print(f"[2/3] fitting {stride} ({stride.args.fit_steps(len(texts))} steps; checkpoints in {ckpt}: rerun the "
          "same command to resume)", file=stdout or sys.stdout)
    stride.fit(texts, ids, checkpoint_dir=ckpt, overwrite=overwrite, progress=progress)
    if is_main_process():
        stride.save(out)
    print(f"[3/3] saved to {out}. Next: stride-nnsight attribute --state {out} --model {model} "
          "--queries queries.jsonl --out scores.json", file=stdout or sys.stdout)
    return stride


def attribute_command(state: Path, model: str, queries: Path, out: Path, *, prompt_field: str = "prompt",
                      completion_field: str = "completion", id_field: Optional[str] = None, top: int = 3,
                      strict: bool = True, progress: bool = True, stdout=None):
    """``stride-nnsight attribute``: score every query of ``queries`` against the fitted state.

    ``out``: ``.json`` (an ``Attribution`` file, for ``report`` and ``Attribution.load``), or
    ``.csv`` / ``.parquet`` (one row per non-zero score: query_id, rank, train_id, score)."""
    from . import storage
    from .distributed import is_main_process
    from .stride import Stride

    stdout = _report_stream(stdout)
    suffix = Path(out).suffix.lower()
    if suffix not in (".json", ".csv", ".parquet"):
        raise SystemExit(f"stride-nnsight: --out {out}: use .json (for `report`), .csv or .parquet")
    id_column = id_field or "id"
    table = storage.read_records(queries, [prompt_field, completion_field], optional=[id_column])
    ids = table.get(id_column)
    if id_field is not None and ids is None:
        raise SystemExit(f"stride-nnsight: {queries} has no id column {id_field!r}")
    stride = Stride.load(state, load_model(model), strict=strict)
    attr = stride.attribute(table[prompt_field], table[completion_field], query_ids=ids, progress=progress)
    if not is_main_process():
        return attr
    if suffix == ".json":
        attr.save(out)
    else:
        storage.write_table(out, long_scores(attr))
    print(f"{attr.n_queries} queries x {attr.n_train} training texts, {attr.nnz} non-zero scores -> {out}",
          file=stdout or sys.stdout)
    for q in range(min(attr.n_queries, 5)):
        best = attr.top_k(top, row=q) if attr.row_status()[q] == "ok" else None
        listed = ", ".join(f"{r.train_id!r} ({r.score:+.3g})" for r in best.itertuples()) if best is not None \
            and len(best) else "no non-zero score"
        print(f"  {attr.query_ids[q]!r}: {listed}", file=stdout or sys.stdout)
    return attr


def long_scores(attr):
    """The non-zero scores as a long ``DataFrame``: query_id, rank (1 = largest score), train_id, score."""
    import numpy as np
    import pandas as pd

    m = attr._csr()
    records = []
    for q in range(m.shape[0]):
        cols, vals = m.indices[m.indptr[q]: m.indptr[q + 1]], m.data[m.indptr[q]: m.indptr[q + 1]]
        for rank, i in enumerate(np.argsort(-vals, kind="stable"), start=1):
            records.append((attr.query_ids[q], rank, attr.train_ids[int(cols[i])], float(vals[i])))
    return pd.DataFrame.from_records(records, columns=["query_id", "rank", "train_id", "score"])


def report_command(scores: Path, out: Path, *, top: int = 10, stdout=None) -> str:
    """``stride-nnsight report``: an HTML page from an ``Attribution`` file (``attribute --out *.json``)."""
    from .results import Attribution

    if Path(scores).suffix.lower() != ".json":
        raise SystemExit(f"stride-nnsight: --scores {scores}: the report reads the .json Attribution file that "
                         "`attribute --out scores.json` writes")
    attr = Attribution.load(scores)
    page = attr.to_html(out, k=top)
    print(f"report of {attr.n_queries} queries -> {out}", file=stdout or sys.stdout)
    return page


def info_command(state: Path, stdout=None) -> dict:
    """``stride-nnsight info``: what a saved state holds (no model needed)."""
    from . import storage
    from .stride import STATE_KEYS, STATE_KIND, find_state_file

    file = find_state_file(state) if Path(state).is_dir() else Path(state)
    if file is None or not Path(file).exists():
        raise SystemExit(f"stride-nnsight: no saved STRIDE state in {state} (the --out directory of `fit`)")
    content = storage.load(file, STATE_KIND, required=STATE_KEYS)
    args, ops = content["args"], content["operator_settings"]
    history = content["history"]
    steps = len(history.get("step", history.get("total", [])))
    size = sum(p.stat().st_size for p in Path(file).parent.iterdir() if p.is_file())
    lines = [f"STRIDE state {file}",
             f"  training texts   {content['design']['n_examples']}",
             f"  operators        K={ops['n_operators']}, d={args['subsets_per_example']}, rank={ops['rank']}, "
             f"placement={ops['placement']!r}, layer={ops['layer']}",
             f"  fit              {steps} of {content.get('steps_planned')} steps; sampling "
             f"{args.get('sampling', 'membership')!r}, lr {args['lr']}, max_length {content.get('max_length')}",
             f"  model            {content.get('backend')} fingerprint {content['fingerprint']} "
             f"({content.get('fingerprint_kind')})",
             f"  files            {size / 1e6:.1f} MB"]
    print("\n".join(lines), file=stdout or sys.stdout)
    return content


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="stride-nnsight", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    fit = sub.add_parser("fit", help="fit STRIDE on your model and corpus, save the state",
                         formatter_class=argparse.RawDescriptionHelpFormatter,
                         epilog="example:\n  stride-nnsight fit --model ./my-model --data train.jsonl --out state/ "
                                "--set n_subsets=512 --set layer=-3")
    fit.add_argument("--model", required=True, help="local model directory (save_pretrained) or hub id")
    fit.add_argument("--data", required=True, type=Path, help="training texts: .jsonl, .csv, .parquet or a "
                                                               "datasets directory")
    fit.add_argument("--text-field", default="text", help="column holding the text (default: text)")
    fit.add_argument("--id-field", default=None, help="column holding document ids (default: 'id' if present)")
    fit.add_argument("--config", type=Path, default=None, help="YAML / JSON file of StrideArguments settings")
    fit.add_argument("--set", dest="assignments", action="append", default=[], metavar="KEY=VALUE",
                     help="one setting, overriding the config file (repeatable)")
    fit.add_argument("--out", required=True, type=Path, help="directory for the fitted state")
    fit.add_argument("--checkpoint-dir", type=Path, default=None, help="default: OUT/checkpoint")
    fit.add_argument("--overwrite", action="store_true", help="discard a checkpoint of another run and start over")
    fit.add_argument("--no-progress", action="store_true")
    att = sub.add_parser("attribute", help="attribute queries with a fitted state",
                         formatter_class=argparse.RawDescriptionHelpFormatter,
                         epilog="example:\n  stride-nnsight attribute --state state/ --model ./my-model "
                                "--queries queries.jsonl --out scores.json")
    att.add_argument("--state", required=True, type=Path, help="the --out directory of `fit`")
    att.add_argument("--model", required=True, help="the model the state was fitted on")
    att.add_argument("--queries", required=True, type=Path, help="queries: prompt and completion columns")
    att.add_argument("--prompt-field", default="prompt")
    att.add_argument("--completion-field", default="completion")
    att.add_argument("--id-field", default=None, help="column holding query ids (default: 'id' if present)")
    att.add_argument("--out", required=True, type=Path, help=".json (Attribution, for `report`), .csv or .parquet")
    att.add_argument("--top", type=int, default=3, help="documents printed per query (default 3)")
    att.add_argument("--no-strict", action="store_true", help="accept a model whose weights differ from the fit's")
    att.add_argument("--no-progress", action="store_true")
    rep = sub.add_parser("report", help="HTML report of an attribution file",
                         epilog="example: stride-nnsight report --scores scores.json --out report.html")
    rep.add_argument("--scores", required=True, type=Path, help="the .json file of `attribute`")
    rep.add_argument("--out", required=True, type=Path, help="the .html file to write")
    rep.add_argument("--top", type=int, default=10, help="proponents and opponents per query (default 10)")
    info = sub.add_parser("info", help="what a saved state holds", epilog="example: stride-nnsight info state/")
    info.add_argument("state", type=Path)
    demo = sub.add_parser("demo", help="end-to-end STRIDE demo on the bundled tiny model and corpus")
    demo.add_argument("--queries", type=int, default=6, help="fact queries to print (default 6)")
    demo.add_argument("--top", type=int, default=5, help="documents shown per query (default 5)")
    demo.add_argument("--cache-dir", type=Path, default=None,
                      help="where the toy model and fitted operators are kept (default ~/.cache/stride-nnsight)")
    demo.add_argument("--steps", type=int, default=None, help="fitting steps (default: library default)")
    demo.add_argument("--placement", choices=["residual", "logits"], default=None)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--refit", action="store_true", help="refit even if fitted operators are cached")
    args = parser.parse_args(argv)
    from .storage import DataFileError

    distributed_run = args.command in ("fit", "attribute")  # under torchrun: one group, work split by rank
    if distributed_run:
        from .distributed import init_from_env

        init_from_env()
    finished = False
    try:
        if args.command == "demo":
            run_demo(args.queries, args.top, args.cache_dir, args.steps, args.placement, args.seed, args.refit)
        elif args.command == "fit":
            fit_command(args.model, args.data, args.out, text_field=args.text_field, id_field=args.id_field,
                        config=args.config, assignments=args.assignments, checkpoint_dir=args.checkpoint_dir,
                        overwrite=args.overwrite, progress=not args.no_progress)
        elif args.command == "attribute":
            attribute_command(args.state, args.model, args.queries, args.out, prompt_field=args.prompt_field,
                              completion_field=args.completion_field, id_field=args.id_field, top=args.top,
                              strict=not args.no_strict, progress=not args.no_progress)
        elif args.command == "report":
            report_command(args.scores, args.out, top=args.top)
        elif args.command == "info":
            info_command(args.state)
        finished = True
    except (DataFileError, FileNotFoundError) as e:
        print(f"stride-nnsight {args.command}: {e}", file=sys.stderr)
        return 2
    finally:
        if distributed_run:  # every rank waits for rank 0's writes, then the group is torn down
            from .distributed import shutdown

            shutdown(wait=finished)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
