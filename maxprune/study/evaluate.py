"""Evaluate each finished run of a study and reduce its metrics.json to one table row."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from maxprune.errors import MaxpruneError
from maxprune.eval import summary


def evaluator(cfg, progress: bool = True) -> Callable[[Path, Path], dict]:
    """`fn(model_dir, out_json) -> row`: evaluates once (an existing out_json is reused)."""

    def evaluate(model_dir: Path, out: Path) -> dict:
        if out.exists():
            return metrics_row(summary.read_metrics(out))
        metrics = summary.evaluate(model_dir, cfg, progress=progress, log=lambda *_: None)
        summary.write_metrics(metrics, out, overwrite=True)
        return metrics_row(metrics)

    return evaluate


def metrics_row(metrics: dict) -> dict:
    """{column: value} and {column: std} in the paper's columns (loss, perplexities, accuracies x100, avg)."""
    values, stds = {}, {}
    if metrics.get("validation"):
        values["loss"] = metrics["validation"]["loss"]
    for corpus, result in (metrics.get("perplexity") or {}).items():
        values[f"ppl_{corpus}"] = result["ppl"]
    for task, result in (metrics.get("tasks") or {}).items():
        values[f"acc_{task}"] = 100 * result["value"]
        stds[f"acc_{task}"] = 100 * result["std"]
    average = metrics.get("average") or {}
    avg = average.get("value") if average.get("complete") else average.get("mean_of_run_tasks")
    if avg is not None:
        values["acc_avg"] = avg
        if average.get("std") is not None:
            stds["acc_avg"] = average["std"]
    if not values:
        raise MaxpruneError("an evaluation produced no numbers: set eval.tasks, eval.perplexity.corpora "
                            "or eval.validation")
    return {"values": values, "stds": stds}
