"""The `data` config section: the prepared training data, its named token budgets, validation data."""

from __future__ import annotations

from typing import Any

from ml_collections import ConfigDict
from ml_collections.config_dict import placeholder

from maxprune.config import at_least

OPEN_MAPPINGS = ("budgets",)  # name -> token range: the user names the entries


def section() -> dict[str, Any]:
    return {
        "train": placeholder(str),        # prepared dataset dir (`maxprune data prepare|builtin`)
        "budgets": {"all": ":"},          # name -> token range, see maxprune.data.budgets
        "range": "all",                   # the budget this run trains on
        "allow_repeat": False,            # let a token budget exceed its range (epochs reshuffled)
        "validation": placeholder(str),   # prepared dataset dir for validation loss
        "workers": 0,                     # grain worker processes (0: read in threads)
    }


def check(cfg: ConfigDict) -> None:
    at_least("data.workers", cfg.data.workers, 0)
