"""The study runner: execute a plan's runs in dependency order, resumably, one lock per study.

Layout of a study root::

    study.json        the plan and every run's status (rewritten atomically)
    .lock             held by the one runner allowed at a time (`maxprune.locks`)
    <run name>/       each run's own dir: run dir of the trainer, or a pruned model dir
        model/        the run's model dir
        eval.json     its evaluation

A finished run (its model dir and evaluation present, status complete) is
skipped; an interrupted training run resumes from its own checkpoints; an
interrupted prune or evaluation is redone (they write to a staging dir and
rename at the end, so nothing half-written is taken for done).
"""

from __future__ import annotations

import copy
import json
import os
import time
from pathlib import Path
from typing import Any, Callable

import ml_collections

from maxprune import config as config_lib
from maxprune import locks
from maxprune.errors import MaxpruneError
from maxprune.model.arch import Arch
from maxprune.model.model_dir import read_arch
from maxprune.study.plan import Plan, Run, plan_study

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
    tmp = root / (STATUS_FILE + ".tmp")
    tmp.write_text(json.dumps(status, indent=2, sort_keys=True) + "\n")
    tmp.replace(root / STATUS_FILE)


# -------------------------------------------------------------- run configs
def derive(cfg, **changes) -> ml_collections.FrozenConfigDict:
    """A validated, frozen copy of `cfg` with dotted-key `changes` (e.g. train__tokens="2M")."""
    # deepcopy: FrozenConfigDict.as_configdict() shares its nodes between calls
    mutable = copy.deepcopy(cfg.as_configdict() if hasattr(cfg, "as_configdict") else ml_collections.ConfigDict(cfg))
    for dotted, value in changes.items():
        *path, key = dotted.split("__")
        node = mutable
        for part in path:
            node = node[part]
        with node.ignore_type():
            node[key] = value
    config_lib.validate(mutable)
    return ml_collections.FrozenConfigDict(mutable)


def _arch_changes(arch: Arch) -> dict[str, Any]:
    """Config changes that make `model` describe exactly `arch`."""
    changes = {f"model__arch__{k}": v for k, v in arch.to_dict().items() if k != "rope_scaling"}
    if arch.rope_scaling is None:
        changes["model__arch__rope_scaling__enabled"] = False
    else:
        changes.update({f"model__arch__rope_scaling__{k}": v for k, v in arch.rope_scaling.__dict__.items()})
    return changes


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

    def _train_cfg(self, run: Run, **changes):
        return derive(self.cfg, data__budgets=dict(self.plan.budgets), data__range=run.data_range,
                      train__tokens=str(run.tokens), seed=run.seed, **changes)

    def _run_pretrain(self, run: Run) -> dict:
        from maxprune.train import trainer
        result = trainer.train(self._train_cfg(run), self.root / run.name, progress=self.progress)
        return {"tokens_seen": result.tokens_seen, "lr": result.lr}

    def _run_import(self, run: Run) -> dict:
        path = Path(run.extra["path"])
        if (path / "config.json").exists() and not (self.root / run.name / "model").exists():
            from maxprune.convert.hf import from_hf
            from_hf(path, self.root / run.name / "model")
        read_arch(self.model_dir(run.name))  # a clear error if it is not a model dir
        return {}

    def _run_prune(self, run: Run) -> dict:
        from maxprune.prune.run import prune_model_dir
        v = run.variant
        extra = {f"prune__{v.method}__ratio_of": v.ratio_of} if v.ratio_of else {}
        if v.method == "sheared_llama":  # the mask-learning budget the plan counted
            extra["prune__sheared_llama__tokens"] = self.cfg.study.sheared_tokens
        cfg = derive(self.cfg, prune__method=v.method, prune__pattern=v.pattern, prune__ratio=v.ratio, **extra,
                     prune__input=str(self.model_dir(run.deps[0])), prune__output=str(self.model_dir(run.name)))
        prune_model_dir(cfg, overwrite=True, progress=self.progress)
        return {"calibration_tokens": run.extra["calibration_tokens"],
                "mask_learning_tokens": run.extra["mask_learning_tokens"]}

    def _run_retrain(self, run: Run) -> dict:
        from maxprune.train import trainer
        cfg = self._train_cfg(run, train__init=str(self.model_dir(run.deps[0])))
        result = trainer.train(cfg, self.root / run.name, progress=self.progress)
        return {"tokens_seen": result.tokens_seen, "lr": result.lr}

    def _run_scratch(self, run: Run) -> dict:
        from maxprune.train import trainer
        pruned = self.model_dir(run.deps[0])
        if run.variant.sparse:  # the same fixed mask, from random init
            cfg = self._train_cfg(run, train__masks_from=str(pruned), **_arch_changes(read_arch(pruned)))
        else:
            cfg = self._train_cfg(run, **_arch_changes(read_arch(pruned)))
        result = trainer.train(cfg, self.root / run.name, progress=self.progress)
        return {"tokens_seen": result.tokens_seen, "lr": result.lr}


def make_plan(cfg) -> Plan:
    """The plan for `cfg`: parent Arch from `model`, sequence length from `data.train` (whose size it checks)."""
    from maxprune.data.prepare import open_prepared
    from maxprune.study.plan import check_budgets
    data = open_prepared(cfg.data.train) if cfg.data.train else None
    seq_len = data.seq_len if data else (cfg.prune.seq_len or 8192)
    plan = plan_study(cfg, config_lib.arch_from_config(cfg), seq_len)
    if data is not None:
        check_budgets(plan, data.manifest.num_tokens)
    return plan
