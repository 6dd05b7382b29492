"""The whole config schema: each section is owned by its package's ``schema.py`` (or, for `mesh`, by
`sharding`); the loader is `maxprune.config`.

    cfg = load_config("configs/prune/wanda.py:2:4", ["--config.prune.ratio=0.6"])
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import ml_collections
from ml_collections import ConfigDict

from maxprune import config, sharding
from maxprune.config import Section, at_least
from maxprune.data import schema as data_schema
from maxprune.eval import schema as eval_schema
from maxprune.model import schema as model_schema
from maxprune.prune import schema as prune_schema
from maxprune.study import schema as study_schema
from maxprune.train import schema as train_schema


def _check_seed(cfg: ConfigDict) -> None:
    at_least("seed", cfg.seed, 0)


SCHEMA = config.Schema({
    "model": Section(model_schema.section, model_schema.check),
    "mesh": Section(sharding.mesh_section, sharding.check_mesh),
    "seed": Section(lambda: 0, _check_seed),
    "data": Section(data_schema.section, data_schema.check, data_schema.OPEN_MAPPINGS),
    "train": Section(train_schema.section, train_schema.check),
    "prune": Section(prune_schema.section, prune_schema.check),
    "study": Section(study_schema.section, study_schema.check, study_schema.OPEN_MAPPINGS),
    "eval": Section(eval_schema.section, eval_schema.check),
})


def default_config() -> ConfigDict:
    """Every known key with its default."""
    return SCHEMA.defaults()


def validate(cfg: ConfigDict) -> None:
    SCHEMA.validate(cfg)


def load_config(spec: str | None, overrides: Sequence[str] = ()) -> ml_collections.FrozenConfigDict:
    """Defaults <- `path.py[:arg]`'s get_config() <- `--config.a.b=value` overrides; validated, frozen."""
    return SCHEMA.load(spec, overrides)


def override(cfg, changes: Mapping[str, Any], source: str = "derived by the study") -> ml_collections.FrozenConfigDict:
    """A validated, frozen copy of `cfg` with dotted-key `changes` (the type checks of an override)."""
    return SCHEMA.override(cfg, changes, source)
