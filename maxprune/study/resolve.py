"""What each run of a study executes: the fully resolved config, computed in one place.

The plan (`maxprune.study.plan`) uses it to know each prune run's target shape
and calibration before anything runs, `maxprune study plan --show RUN` prints it,
and the runner executes exactly it.

A prune run's ``prune`` section is built in layers, later ones winning:

1. the study config's ``prune`` section (shared keys: batch size, seed, ...);
2. the method's settings: with ``study.method_settings="paper"`` the paper's
   (`maxprune.prune.paper.method_config`: calibration size and sampling, Table 1
   shapes on a Llama-3.1-8B parent, Sheared LLaMA's mask-learning schedule), or
   the ``prune`` section of the variant's own ``config=FILE.py[:ARG]``;
3. the variant's ``prune.KEY=VALUE`` overrides;
4. method, pattern and ratio (and ``ratio_of``) of the variant, and the
   calibration source: the variant's ``calibration=``, else the method's paper
   corpus looked up in ``study.calibration`` ("train" = ``data.train``), else
   ``prune.calibration``, else ``data.train``.
"""

from __future__ import annotations

from typing import Any

import ml_collections

from maxprune.prune import paper
from maxprune.schema import load_config, override

PRUNE_RUN_KEYS = ("input", "output")  # set by the runner, per study root


def method_settings(cfg, variant) -> tuple[dict[str, Any], str | None]:
    """(prune-section fragment, model dtype or None) of the variant's method settings (layer 2)."""
    if variant.config:  # the file's whole prune section (schema defaults included) and its compute dtype
        user = load_config(variant.config)
        return user.prune.to_dict(), user.model.dtype
    if cfg.study.method_settings == "paper":
        return paper.method_config(variant.method, variant.ratio, variant.pattern), paper.model_dtype(variant.method)
    return {}, None


def calibration_source(cfg, variant) -> tuple[str | None, str]:
    """(source spec or dir, what it is) for a prune run (layer 4)."""
    corpus = variant.calibration
    if corpus is None and cfg.study.method_settings == "paper" and not variant.config:
        corpus = paper.CALIBRATION[variant.method].corpus
    if corpus in cfg.study.calibration:
        return cfg.study.calibration[corpus], f"study.calibration.{corpus}"
    if corpus == "train":
        return cfg.data.train, "data.train (the training data)"
    if corpus is not None and corpus not in paper.CORPORA:
        return corpus, "the variant's calibration="
    unmapped = f" (study.calibration has no {corpus!r})" if corpus else ""
    if cfg.prune.calibration:
        return cfg.prune.calibration, "prune.calibration" + unmapped
    return cfg.data.train, "data.train" + unmapped


def prune_section(cfg, variant) -> tuple[ml_collections.FrozenConfigDict, dict[str, Any]]:
    """The validated config a variant's prune runs execute (without input/output), and what it came from."""
    settings, dtype = method_settings(cfg, variant)
    changes: dict[str, Any] = {"prune": settings} if settings else {}
    for key, value in variant.overrides:
        changes[key] = value
    changes.update({"prune.method": variant.method, "prune.pattern": variant.pattern, "prune.ratio": variant.ratio})
    if variant.ratio_of:
        changes[f"prune.{variant.method}.ratio_of"] = variant.ratio_of
    if variant.method == "sheared_llama" and cfg.study.sheared_tokens:
        changes["prune.sheared_llama.tokens"] = cfg.study.sheared_tokens
    source, what = calibration_source(cfg, variant)
    changes["prune.calibration"] = source
    if dtype:
        changes["model.dtype"] = dtype
    resolved = override(cfg, changes, f"study variant {variant.spec!r}")
    return resolved, {"calibration_from": what, "settings": _settings_name(cfg, variant)}


def _settings_name(cfg, variant) -> str:
    if variant.config:
        return f"config {variant.config}"
    return "paper (maxprune.prune.paper)" if cfg.study.method_settings == "paper" else "the study's prune section"


def prune_run_config(resolved, parent_dir: str, out_dir: str):
    """The prune run's config with its input and output dirs."""
    return override(resolved, {"prune.input": parent_dir, "prune.output": out_dir})


def train_run_config(cfg, plan, run, **changes):
    """A training run's config: the study's, on the run's data range and token budget, plus `changes`."""
    base = {"data.budgets": dict(plan.budgets), "data.range": run.data_range, "train.tokens": str(run.tokens),
            "seed": run.seed}
    return override(cfg, {**base, **changes})


def arch_changes(arch) -> dict[str, Any]:
    """Config changes that make `model` describe exactly `arch`."""
    changes = {f"model.arch.{k}": v for k, v in arch.to_dict().items() if k != "rope_scaling"}
    if arch.rope_scaling is None:
        changes["model.arch.rope_scaling.enabled"] = False
    else:
        changes.update({f"model.arch.rope_scaling.{k}": v for k, v in arch.rope_scaling.__dict__.items()})
    return changes
