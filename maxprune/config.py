"""Configs: an ml_collections schema, merged with a config file and overrides, validated once.

Every key a user can set is declared here with its default and type, so a typo
or a wrong type fails at load with a one-line message naming the key, not deep
inside a run. A config file (`get_config(arg=None)`) may be partial: it is merged
onto `default_config()`, then `--config.a.b=value` overrides apply, then the
section checks run, and the result is frozen so nothing changes it mid-run.

A new section (data, train, prune, ...) is one builder and one check in `SECTIONS`.
"""

from __future__ import annotations

import ast
import copy
import dataclasses
import difflib
import functools
import importlib.util
import inspect
import re
import typing
from pathlib import Path
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import ml_collections
from ml_collections import ConfigDict
from ml_collections.config_dict import placeholder

from maxprune.errors import MaxpruneError
from maxprune.model.arch import PRESETS, Arch, RopeScaling, preset

MESH_AXES = ("data", "fsdp", "tensor")


# ------------------------------------------------------------------ sections
def _typed_placeholders(cls, skip=()) -> dict[str, Any]:
    """Each dataclass field as a typed placeholder: None means "keep the preset's value"."""
    hints = typing.get_type_hints(cls)
    return {f.name: placeholder(hints[f.name]) for f in dataclasses.fields(cls) if f.name not in skip}


def _model_section() -> dict[str, Any]:
    arch = _typed_placeholders(Arch, skip=("rope_scaling",))
    # enabled=False drops the preset's scaling; any set field overrides it (or the defaults).
    arch["rope_scaling"] = {"enabled": placeholder(bool), **_typed_placeholders(RopeScaling)}
    return {"preset": "tiny", "arch": arch, "dtype": "bfloat16", "matmul_dtype": "same",
            "remat": "none", "attention": "auto", "scan_unroll": 1}


def _check_model(cfg: ConfigDict) -> None:
    _check_choice("model.preset", cfg.model.preset, sorted(PRESETS))
    from maxprune.model.llama import ModelOptions
    ModelOptions.from_config(cfg.model)  # dtype, matmul_dtype, remat and attention choices
    arch_from_config(cfg)


def _mesh_section() -> dict[str, Any]:
    return {"data": 1, "fsdp": -1, "tensor": 1}  # -1: fill with the remaining devices


def _check_mesh(cfg: ConfigDict) -> None:
    for axis in MESH_AXES:
        if cfg.mesh[axis] != -1 and cfg.mesh[axis] < 1:
            raise MaxpruneError(f"mesh.{axis}={cfg.mesh[axis]} must be >= 1, or -1 to use "
                                f"the remaining devices")
    fill = [f"mesh.{axis}" for axis in MESH_AXES if cfg.mesh[axis] == -1]
    if len(fill) > 1:
        raise MaxpruneError(f"at most one mesh axis may be -1, got -1 for {', '.join(fill)}")


def _check_seed(cfg: ConfigDict) -> None:
    if cfg.seed < 0:
        raise MaxpruneError(f"seed={cfg.seed} must be >= 0")


def _data_section() -> dict[str, Any]:
    return {
        "train": placeholder(str),        # prepared dataset dir (`maxprune data prepare|builtin`)
        "budgets": {"all": ":"},          # name -> token range, see maxprune.data.budgets
        "range": "all",                   # the budget this run trains on
        "allow_repeat": False,            # let a token budget exceed its range (epochs reshuffled)
        "validation": placeholder(str),   # prepared dataset dir for validation loss
        "workers": 0,                     # grain worker processes (0: read in threads)
    }


def _check_data(cfg: ConfigDict) -> None:
    if cfg.data.workers < 0:
        raise MaxpruneError(f"data.workers={cfg.data.workers} must be >= 0")


def _train_section() -> dict[str, Any]:
    return {
        "init": placeholder(str),         # model dir to start from; unset = random init of `model`
        "masks_from": placeholder(str),   # sparse scratch: random init under this model dir's masks
        "tokens": placeholder(str),       # token budget, e.g. "2M" or "200B"
        "global_batch": 8,                # sequences per step
        "microbatches": 1,                # gradient accumulation steps per global batch
        # The paper's recipe (Table 4)
        "lr": 3e-4,
        "lr_sweep": placeholder(tuple),   # e.g. (1e-5, 3e-5, 1e-4, 3e-4, 1e-3): prefix runs, lowest loss wins
        "sweep_fraction": 0.1,            # prefix length of each sweep run, as a fraction of the steps
        "sweep_schedule": "compressed",   # a sweep run's LR schedule: "compressed" (its own) or "prefix" (cut)
        "warmup_ratio": 0.05,
        "min_lr_ratio": 0.1,
        "b1": 0.9,
        "b2": 0.95,
        "eps": 1e-8,
        "weight_decay": 0.01,
        "grad_clip": 1.0,
        # Checkpoints, logging, validation
        "checkpoint_every": 100,
        "keep_checkpoints": 2,
        "async_checkpoint": True,
        "log_every": 10,
        "eval_every": 0,                  # steps between validation losses (0: at the end only)
        "eval_sequences": 64,
        "tensorboard": True,
        "stop_after_steps": 0,            # stop (with a checkpoint) after this many steps in one call
        "skip_nonfinite": 0,              # drop up to this many non-finite updates in a row (0: stop at the first)
        # Distillation (beyond the paper): forward KL from a teacher model dir
        "teacher": placeholder(str),
        "kd_weight": 0.5,
        "kd_temperature": 1.0,
    }


def _check_train(cfg: ConfigDict) -> None:
    t = cfg.train
    for key in ("global_batch", "microbatches", "checkpoint_every", "keep_checkpoints", "log_every",
                "eval_sequences"):
        if t[key] < 1:
            raise MaxpruneError(f"train.{key}={t[key]} must be >= 1")
    for key in ("eval_every", "stop_after_steps", "skip_nonfinite"):
        if t[key] < 0:
            raise MaxpruneError(f"train.{key}={t[key]} must be >= 0")
    if t.init and t.masks_from:
        raise MaxpruneError("set train.init or train.masks_from, not both: masks_from trains a random init "
                            "under another model's masks (sparse scratch)")
    if t.tokens is not None:
        from maxprune.data.budgets import parse_tokens
        parse_tokens(t.tokens)
    if not t.lr > 0:
        raise MaxpruneError(f"train.lr={t.lr} must be > 0")
    if t.lr_sweep is not None and (not t.lr_sweep or any(not lr > 0 for lr in t.lr_sweep)):
        raise MaxpruneError(f"train.lr_sweep={t.lr_sweep} must be a non-empty list of positive LRs")
    if not 0 < t.sweep_fraction <= 1:
        raise MaxpruneError(f"train.sweep_fraction={t.sweep_fraction} must be in (0, 1]")
    if t.sweep_schedule not in ("compressed", "prefix"):
        raise MaxpruneError(f"train.sweep_schedule={t.sweep_schedule!r} must be 'compressed' or 'prefix'")
    if not 0 <= t.warmup_ratio < 1 or not 0 <= t.min_lr_ratio <= 1:
        raise MaxpruneError(f"train.warmup_ratio={t.warmup_ratio} must be in [0, 1) and "
                            f"train.min_lr_ratio={t.min_lr_ratio} in [0, 1]")
    if not (0 <= t.b1 < 1 and 0 <= t.b2 < 1 and t.eps > 0 and t.weight_decay >= 0 and t.grad_clip > 0):
        raise MaxpruneError("train.b1/b2 must be in [0, 1), train.eps and train.grad_clip > 0, "
                            "train.weight_decay >= 0")
    if not 0 <= t.kd_weight <= 1 or not t.kd_temperature > 0:
        raise MaxpruneError(f"train.kd_weight={t.kd_weight} must be in [0, 1] and "
                            f"train.kd_temperature={t.kd_temperature} > 0")


def _prune_section() -> dict[str, Any]:
    from maxprune.prune import schema
    return schema.section()


def _check_prune(cfg: ConfigDict) -> None:
    from maxprune.prune import schema
    schema.check(cfg)


def _study_section() -> dict[str, Any]:
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


def _check_study(cfg: ConfigDict) -> None:
    from maxprune.data.budgets import parse_tokens
    from maxprune.study.plan import check_name
    s = cfg.study
    check_name(s.name, "study.name")  # the default study root is runs/<study.name>
    for name in s.imported:
        check_name(name, "study.imported name")
    parse_tokens(s.pretrain_tokens)
    _check_choice("study.method_settings", s.method_settings, ("paper", "study"))
    if s.sheared_tokens is not None:
        parse_tokens(s.sheared_tokens)
    if s.retrain_from is not None:
        parse_tokens(s.retrain_from)
    for n in s.retrain_tokens:
        parse_tokens(n)
    if not s.seeds or any(not isinstance(seed, int) or seed < 0 for seed in s.seeds):
        raise MaxpruneError(f"study.seeds={s.seeds} must be a non-empty tuple of integers >= 0")
    if s.variants:
        from maxprune.study.plan import parse_variant
        for variant in s.variants:
            parse_variant(variant)


def _eval_section() -> dict[str, Any]:
    from maxprune.eval import schema
    return schema.section()


def _check_eval(cfg: ConfigDict) -> None:
    from maxprune.eval import schema
    schema.check(cfg)


class Section(NamedTuple):
    build: Callable[[], Any]  # a dict of defaults (a section) or a plain default (a top-level key)
    check: Callable[[ConfigDict], None]  # raises MaxpruneError; sees the whole config


SECTIONS: dict[str, Section] = {
    "model": Section(_model_section, _check_model),
    "mesh": Section(_mesh_section, _check_mesh),
    "seed": Section(lambda: 0, _check_seed),
    "data": Section(_data_section, _check_data),
    "train": Section(_train_section, _check_train),
    "prune": Section(_prune_section, _check_prune),
    "study": Section(_study_section, _check_study),
    "eval": Section(_eval_section, _check_eval),
}


def _check_choice(key: str, value: Any, valid: Sequence[str]) -> None:
    if value not in valid:
        raise MaxpruneError(f"{key}={value!r} is not valid; choose one of {', '.join(valid)}")


# ------------------------------------------------------------------ public API
def default_config() -> ConfigDict:
    """The schema: every known key with its default; the type of each default is enforced."""
    return ConfigDict({name: section.build() for name, section in SECTIONS.items()})


def validate(cfg: ConfigDict) -> None:
    """Range and choice checks of every section (types were checked on assignment)."""
    for section in SECTIONS.values():
        section.check(cfg)


def load_config(spec: str | None, overrides: Sequence[str] = ()) -> ConfigDict:
    """Defaults <- `path.py[:arg]`'s get_config() <- `--config.a.b=value` overrides; validated, frozen."""
    cfg = default_config()
    if spec:
        path, user = _read_file(spec)
        _assign(cfg, "", user, f"in {path}")
    for override in overrides:
        key, value, raw = _parse_override(override)
        _assign(cfg, key, value, f"in override {override!r}", raw)
    validate(cfg)
    # lock() only stops new keys; freezing also stops silent changes after validation.
    return ml_collections.FrozenConfigDict(cfg)


def override(cfg, changes: Mapping[str, Any], source: str = "derived by the study") -> ml_collections.FrozenConfigDict:
    """A validated, frozen copy of `cfg` with dotted-key `changes` applied through the same type checks as
    ``--config.a.b=VALUE`` (a section given as a mapping sets each of its keys)."""
    # deepcopy: FrozenConfigDict.as_configdict() shares its nodes between calls
    mutable = copy.deepcopy(cfg.as_configdict() if hasattr(cfg, "as_configdict") else ConfigDict(cfg))
    for key, value in changes.items():
        _assign(mutable, key, value, f"({source})")
    validate(mutable)
    return ml_collections.FrozenConfigDict(mutable)


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


def config_arg(arg: str | None, valid: Sequence[str], default: str | None = None) -> str | None:
    """A config file's `:ARG` (`default` when absent), which must be one of `valid`."""
    value = arg or default
    if value is not None and value not in valid:
        raise MaxpruneError(f"ARG {value!r} is not valid; choose one of {', '.join(valid)}")
    return value


def to_dict(cfg: ConfigDict) -> dict[str, Any]:
    """Plain nested dict (JSON-able) for provenance files."""
    return cfg.to_dict()


# ------------------------------------------------------------------ internals
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


_SPEC = re.compile(r"(?P<path>.+?\.py)(?::(?P<arg>.*))?")


def _read_file(spec: str) -> tuple[Path, Any]:
    """Import `path.py` and call its get_config (with `arg` if the spec gave one)."""
    match = _SPEC.fullmatch(spec)
    if not match:
        raise MaxpruneError(f"config {spec!r} is not of the form path/to/file.py[:arg]")
    path, arg = Path(match["path"]), match["arg"]
    if not path.is_file():
        raise MaxpruneError(f"config file {path} does not exist")
    module_spec = importlib.util.spec_from_file_location(f"_maxprune_config_{path.stem}", path)
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except Exception as e:
        raise MaxpruneError(f"config file {path} failed to import: {_describe(e)}") from e
    get_config = getattr(module, "get_config", None)
    if not callable(get_config):
        raise MaxpruneError(f"config file {path} does not define get_config(arg=None)")
    if arg is not None and not _takes_arg(get_config):
        raise MaxpruneError(f"config file {path} takes no :ARG (got {arg!r}): its get_config() has no parameter")
    try:
        user = get_config() if arg is None else get_config(arg)
    except MaxpruneError as e:  # e.g. config_arg: already names the bad value
        raise MaxpruneError(f"config {spec}: {e}") from e
    except Exception as e:
        call = "get_config()" if arg is None else f"get_config({arg!r})"
        raise MaxpruneError(f"config file {path}: {call} raised {_describe(e)}") from e
    if not isinstance(user, (Mapping, ConfigDict)):
        raise MaxpruneError(f"config file {path}: get_config returned {type(user).__name__}, "
                            f"expected a ConfigDict or dict")
    return path, user


def _takes_arg(fn: Callable) -> bool:
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):  # no signature to read: let the call decide
        return True
    return any(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.VAR_POSITIONAL) for p in params)


def _parse_override(text: str) -> tuple[str, Any, str]:
    """`--config.a.b=value` -> ("a.b", literal value or the raw string, raw string)."""
    body = text.removeprefix("--")
    key, eq, raw = body.removeprefix("config.").partition("=")
    if not body.startswith("config.") or not key:
        raise MaxpruneError(f"override {text!r} is not of the form --config.a.b=VALUE")
    if not eq:
        raise MaxpruneError(f"override {text!r} has no value; write --config.{key}=VALUE")
    try:
        return key, ast.literal_eval(raw), raw
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return key, raw, raw


# Mappings whose entries the user names (e.g. budgets): str -> str, replaced or extended freely.
OPEN_MAPPINGS = frozenset({"data.budgets", "study.imported", "study.calibration"})


def _assign_open(cfg: ConfigDict, key: str, value: Any, source: str, raw: str | None) -> bool:
    """Handle `key` if it is an open mapping or one of its entries; False otherwise."""
    head, _, entry = key.rpartition(".")
    if key in OPEN_MAPPINGS:
        if not isinstance(value, (Mapping, ConfigDict)):
            raise MaxpruneError(f"config key {key!r} {source} must be a mapping of names to strings, "
                                f"got {value!r}")
        parent, name = _resolve(cfg, key, source)
        parent[name] = ConfigDict({})
        for sub, sub_value in value.items():
            _set_entry(parent[name], key, sub, sub_value, source, None)
        return True
    if head in OPEN_MAPPINGS:
        parent, name = _resolve(cfg, head, source)
        _set_entry(parent[name], head, entry, value, source, raw)
        return True
    return False


def _set_entry(mapping: ConfigDict, key: str, entry: Any, value: Any, source: str, raw: str | None) -> None:
    """Entry `entry` of the open mapping `key` (a name -> string mapping)."""
    if not isinstance(entry, str) or not entry or "." in entry:
        raise MaxpruneError(f"{key} name {entry!r} {source} must be a non-empty string without '.'")
    value = raw if raw is not None and not isinstance(value, str) else value
    if not isinstance(value, str):
        raise MaxpruneError(f"config key '{key}.{entry}' {source} expects a string, got {value!r}")
    mapping[entry] = value


def _assign(cfg: ConfigDict, key: str, value: Any, source: str, raw: str | None = None) -> None:
    """Set `key` (dotted; "" is the root) to `value`, recursing into mappings for sections."""
    if _assign_open(cfg, key, value, source, raw):
        return
    parent, name = _resolve(cfg, key, source)
    target = parent[name] if name else cfg
    if isinstance(target, ConfigDict):
        if not isinstance(value, (Mapping, ConfigDict)):
            raise MaxpruneError(f"config key {key!r} {source} is a section, got {value!r}; set its "
                                f"keys instead: {', '.join(target.keys())}")
        for sub, sub_value in value.items():
            _assign(cfg, f"{key}.{sub}" if key else sub, sub_value, source)
        return
    expected = parent.get_type(name)
    if raw is not None and expected is str and not isinstance(value, str) and value is not None:
        value = raw  # e.g. --config.x=123 for a str field means "123"
    parent[name] = _coerce(key, value, expected, source)


def _resolve(cfg: ConfigDict, key: str, source: str) -> tuple[ConfigDict, str]:
    """The ConfigDict holding `key` and its last name; an unknown key raises with a suggestion."""
    if not key:
        return cfg, ""
    *path, name = key.split(".")
    node, at = cfg, []
    for part in [*path, name]:
        if not isinstance(node, ConfigDict) or part not in node:
            raise _unknown_key(cfg, key, source, node, ".".join(at))
        parent, node = node, node[part]
        at.append(part)
    return parent, name


def _unknown_key(cfg: ConfigDict, key: str, source: str, node: Any, at: str) -> MaxpruneError:
    close = difflib.get_close_matches(key, [k for k, _ in _walk(cfg)], n=1)
    if close:
        hint = f"did you mean {close[0]!r}?"
    elif isinstance(node, ConfigDict):
        hint = f"valid keys{f' of {at!r}' if at else ''}: {', '.join(node.keys())}"
    else:
        hint = f"{at!r} is a value, not a section"
    return MaxpruneError(f"unknown config key {key!r} {source}; {hint}")


def _walk(cfg: ConfigDict, prefix: str = ""):
    """(dotted key, value) of every section and value, depth first."""
    for name, value in cfg.items():
        yield prefix + name, value
        if isinstance(value, ConfigDict):
            yield from _walk(value, f"{prefix}{name}.")


@functools.cache
def _nullable_keys() -> frozenset[str]:
    """Keys whose default is None (placeholders): None stays a valid value for them."""
    return frozenset(key for key, value in _walk(default_config()) if value is None)


def _coerce(key: str, value: Any, expected: type, source: str) -> Any:
    """`value` as the schema's type: ints widen to floats; bools are not ints; None only for placeholders."""
    if value is None and key in _nullable_keys():
        return None
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, expected) and (expected is bool or not isinstance(value, bool)):
        return value
    wanted = expected.__name__ + (" or None" if key in _nullable_keys() else "")
    raise MaxpruneError(f"config key {key!r} {source} expects {wanted}, got {value!r} "
                        f"({type(value).__name__})")


def _describe(e: BaseException) -> str:
    return f"{type(e).__name__}: {' '.join(str(e).split())}"
