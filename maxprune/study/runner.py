"""The study runner: execute a plan's runs in dependency order, resumably, one lock per study.

Layout of a study root::

    study.json        the plan and every run's status (rewritten atomically)
    .lock             held by the one runner allowed at a time (`maxprune.fs.locks`)
    <run name>/       each run's own dir: run dir of the trainer, or a pruned model dir
        model/        the run's model dir
        eval.json     its evaluation

A finished run (its model dir and evaluation present, status complete) is
skipped; an interrupted training run resumes from its own checkpoints; an
interrupted prune or evaluation is redone (they write to a staging dir and
rename at the end, so nothing half-written is taken for done).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable

from maxprune.convert.hf import from_hf
from maxprune.data.prepared import open_prepared
from maxprune.errors import MaxpruneError
from maxprune.fs import atomic, locks
from maxprune.model.model_dir import read_arch
from maxprune.model.schema import arch_from_config
from maxprune.prune.run import prune_model_dir
from maxprune.study import resolve
from maxprune.study.plan import Plan, Run, check_budgets, plan_study
from maxprune.train import trainer

STATUS_FILE = "study.json"
EVAL_FILE = "eval.json"


# ---------------------------------------------------------------- lock/status
def study_lock(root: Path):
    """Exclusive lock on the study root; a second runner gets a clear error, a dead one's lock frees itself."""
    return locks.dir_lock(root, f"study {root}")


def read_status(root: Path) -> dict[str, Any]:
    path = Path(root) / STATUS_FILE
    return json.loads(path.read_text()) if path.exists() else {"runs": {}}


def _write_status(root: Path, status: dict) -> None:
    atomic.write_json(root / STATUS_FILE, status, sort_keys=True)


class StudyRunner:
    """Runs a study's plan under `root`; `evaluate(model_dir, out_json)` scores each model."""

    def __init__(self, cfg, root: str | Path, plan: Plan, evaluate: Callable[[Path, Path], dict] | None = None,
                 progress: bool = True, log: Callable[[str], None] = print):
        self.cfg, self.root, self.plan = cfg, Path(root).absolute(), plan
        self.evaluate, self.progress, self.log = evaluate, progress, log

    # ------------------------------------------------------------------ API
    def run(self, only: str | None = None) -> dict[str, Any]:
        with study_lock(self.root):
            status = read_status(self.root)
            status.update(name=self.cfg.study.name, plan=[r.name for r in self.plan.runs])
            todo = [self.plan[only]] if only else self.plan.runs
            for run in todo:
                self._require_deps(run, status)
                if status["runs"].get(run.name, {}).get("status") == "complete":
                    continue
                self._mark(status, run, state="running")
                started = time.perf_counter()
                self.log(f"[{self.plan.runs.index(run) + 1}/{len(self.plan.runs)}] {run.name} ({run.kind})")
                record = self._execute(run)
                record["seconds"] = round(time.perf_counter() - started, 1)
                self._mark(status, run, state="complete", **record)
            return status

    # ------------------------------------------------------------ internals
    def _mark(self, status: dict, run: Run, state: str, **fields) -> None:
        entry = status["runs"].setdefault(run.name, {})
        entry.update(kind=run.kind, status=state, **fields)
        _write_status(self.root, status)

    def _require_deps(self, run: Run, status: dict) -> None:
        for dep in run.deps:
            if status["runs"].get(dep, {}).get("status") != "complete":
                raise MaxpruneError(f"run {run.name} needs {dep}, which has not completed; run the study "
                                    f"(or `--only {dep}`) first")

    def model_dir(self, name: str) -> Path:
        run = self.plan[name]
        if run.kind == "import":
            return self._import_dir(run)
        return self.root / name / "model"

    def _import_dir(self, run: Run) -> Path:
        path = Path(run.extra["path"])
        if (path / "config.json").exists():  # an HF checkpoint: convert once
            return self.root / run.name / "model"
        return path

    def _execute(self, run: Run) -> dict[str, Any]:
        handler = getattr(self, f"_run_{run.kind}")
        record = handler(run) or {}
        if self.evaluate is not None and (run.kind != "prune" or self.cfg.study.eval_pruned):
            record["eval"] = self.evaluate(self.model_dir(run.name), self.root / run.name / EVAL_FILE)
        return record

    def run_config(self, run: Run):
        """The config `run` executes (what `maxprune study plan --show RUN` prints)."""
        if run.kind == "prune":
            return resolve.prune_run_config(run.extra["config"], str(self.model_dir(run.deps[0])),
                                            str(self.model_dir(run.name)))
        if run.kind == "pretrain":
            return resolve.train_run_config(self.cfg, self.plan, run)
        if run.kind == "retrain":
            teacher = {"train.teacher": str(self.model_dir(run.extra["teacher"]))} if run.extra.get("teacher") else {}
            return resolve.train_run_config(self.cfg, self.plan, run, **{"train.init": str(self.model_dir(run.deps[0])),
                                                                        **teacher})
        if run.kind == "scratch":
            pruned = self.model_dir(run.deps[0])
            arch = read_arch(pruned) if (pruned / "arch.json").is_file() or run.arch is None else run.arch
            masks = {"train.masks_from": str(pruned)} if run.variant.sparse else {}  # the same fixed mask
            return resolve.train_run_config(self.cfg, self.plan, run, **masks, **resolve.arch_changes(arch))
        raise MaxpruneError(f"run {run.name} ({run.kind}) has no config of its own")

    def _train(self, run: Run) -> dict:
        result = trainer.train(self.run_config(run), self.root / run.name, progress=self.progress)
        return {"tokens_seen": result.tokens_seen, "lr": result.lr}

    _run_pretrain = _run_retrain = _train

    def _run_import(self, run: Run) -> dict:
        path = Path(run.extra["path"])
        if (path / "config.json").exists() and not (self.root / run.name / "model").exists():
            from_hf(path, self.root / run.name / "model")
        read_arch(self.model_dir(run.name))  # a clear error if it is not a model dir
        return {}

    def _run_prune(self, run: Run) -> dict:
        prune_model_dir(self.run_config(run), overwrite=True, progress=self.progress)
        return {"calibration_tokens": run.extra["calibration_tokens"],
                "mask_learning_tokens": run.extra["mask_learning_tokens"]}

    def _run_scratch(self, run: Run) -> dict:
        pruned = self.model_dir(run.deps[0])
        if run.arch is not None and read_arch(pruned) != run.arch:
            raise MaxpruneError(f"run {run.name}: the pruned model {pruned} is not the planned shape; "
                                f"the study config changed since it was pruned")
        return self._train(run)


def make_plan(cfg) -> Plan:
    """The plan for `cfg`: parent Arch from `model`, sequence length from `data.train` (whose size it checks)."""
    data = open_prepared(cfg.data.train) if cfg.data.train else None
    seq_len = data.seq_len if data else (cfg.prune.seq_len or 8192)
    plan = plan_study(cfg, arch_from_config(cfg), seq_len)
    if data is not None:
        check_budgets(plan, data.manifest.num_tokens)
    return plan
