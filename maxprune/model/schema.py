"""The `model` config section: a preset, any `Arch` field overridden, and how the model runs (dtype, remat,
attention); `arch_from_config` is the Arch it names."""

from __future__ import annotations

import dataclasses
from typing import Any

from ml_collections import ConfigDict
from ml_collections.config_dict import placeholder

from maxprune.config import choice, typed_placeholders
from maxprune.errors import MaxpruneError
from maxprune.model.arch import PRESETS, Arch, RopeScaling, preset
from maxprune.model.llama import ModelOptions


def section() -> dict[str, Any]:
    arch = typed_placeholders(Arch, skip=("rope_scaling",))
    # enabled=False drops the preset's scaling; any set field overrides it (or the defaults).
    arch["rope_scaling"] = {"enabled": placeholder(bool), **typed_placeholders(RopeScaling)}
    return {"preset": "tiny", "arch": arch, "dtype": "bfloat16", "matmul_dtype": "same",
            "remat": "none", "attention": "auto", "scan_unroll": 1}


def check(cfg: ConfigDict) -> None:
    choice("model.preset", cfg.model.preset, sorted(PRESETS))
    ModelOptions.from_config(cfg.model)  # dtype, matmul_dtype, remat and attention choices
    arch_from_config(cfg)


def arch_from_config(cfg: ConfigDict) -> Arch:
    """`model.preset` with every non-None `model.arch` field applied."""
    model = cfg.model
    base = preset(model.preset)
    changes = {k: v for k, v in model.arch.items() if k != "rope_scaling" and v is not None}
    changes["rope_scaling"] = _rope_scaling(base.rope_scaling, model.arch.rope_scaling)
    try:
        return base.replace(**changes)
    except MaxpruneError as e:
        set_keys = [f"model.arch.{k}={v!r}" for k, v in changes.items() if k != "rope_scaling"]
        raise MaxpruneError(f"model.preset={model.preset!r} with {', '.join(set_keys) or 'no overrides'} "
                            f"is not a valid architecture: {e}") from None


def _rope_scaling(base: RopeScaling | None, over: ConfigDict) -> RopeScaling | None:
    fields = {k: v for k, v in over.items() if k != "enabled" and v is not None}
    if over.enabled is False:
        if fields:
            raise MaxpruneError(f"model.arch.rope_scaling.enabled=False contradicts the set "
                                f"field(s) {', '.join(fields)}")
        return None
    if not fields and not over.enabled:
        return base
    return dataclasses.replace(base or RopeScaling(), **fields)
