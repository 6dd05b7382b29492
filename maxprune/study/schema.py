"""The `study` config section: the token budgets M and N, the pruning variants, imported parents, seeds."""

from __future__ import annotations

from typing import Any

from ml_collections import ConfigDict
from ml_collections.config_dict import placeholder

from maxprune.config import choice
from maxprune.data.budgets import parse_tokens
from maxprune.errors import MaxpruneError
from maxprune.study.variants import check_name, parse_variant

OPEN_MAPPINGS = ("imported", "calibration")  # name -> model dir / source spec: the user names the entries


def section() -> dict[str, Any]:
    return {
        "name": "study",
        "pretrain_tokens": "2M",          # M: the parent's pretraining budget
        "retrain_tokens": ("1M",),        # every N: retraining budgets (and S_N / S_M+N baselines)
        "retrain_from": placeholder(str),  # where retraining data starts (default: M, right after pretraining)
        "variants": (),                   # ({"method": "wanda", "pattern": "2:4", "ratio": 0.5, ...}, ...)
        "imported": {},                   # name -> model dir of an imported parent (Ext-R_N runs)
        "seeds": (0,),                    # retraining and scratch runs repeat per seed
        "sheared_tokens": placeholder(str),  # Sheared LLaMA's mask-learning budget (default: its method settings')
        "eval_pruned": True,              # evaluate pruned models before retraining (Table 10)
        "method_settings": "paper",       # "paper": each method's paper settings (maxprune.prune.paper) under the
                                          # study's prune section; "study": the study's prune section alone
        "calibration": {},                # corpus name (maxprune.prune.paper.CORPORA) -> source spec; a corpus not
                                          # named here calibrates on prune.calibration, else data.train
        "merge_scratch": True,            # one run where an S_N and an S_{M+N} budget coincide (the paper's S250)
        "require_validation": False,      # `study run` refuses without data.validation (the paper's DCLM loss)
    }


def check(cfg: ConfigDict) -> None:
    s = cfg.study
    check_name(s.name, "study.name")  # the default study root is runs/<study.name>
    for name in s.imported:
        check_name(name, "study.imported name")
    parse_tokens(s.pretrain_tokens)
    choice("study.method_settings", s.method_settings, ("paper", "study"))
    if s.sheared_tokens is not None:
        parse_tokens(s.sheared_tokens)
    if s.retrain_from is not None:
        parse_tokens(s.retrain_from)
    for n in s.retrain_tokens:
        parse_tokens(n)
    if not s.seeds or any(not isinstance(seed, int) or seed < 0 for seed in s.seeds):
        raise MaxpruneError(f"study.seeds={s.seeds} must be a non-empty tuple of integers >= 0")
    if s.variants:
        for variant in s.variants:
            parse_variant(variant)
