"""The config loader: a schema of sections, merged with a config file and overrides, validated once.

Every key a user can set is declared in a section (its package's ``schema.py``;
`maxprune.schema` assembles them) with its default and type, so a typo or a
wrong type fails at load with a one-line message naming the key, not deep
inside a run. A config file (`get_config(arg=None)`) may be partial: it is
merged onto the defaults, then `--config.a.b=value` overrides apply, then the
section checks run, and the result is frozen so nothing changes it mid-run.
The checks share the helpers here (`choice`, `at_least`), so every message
reads the same.
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


class Section(NamedTuple):
    build: Callable[[], Any]  # a dict of defaults (a section) or a plain default (a top-level key)
    check: Callable[[ConfigDict], None]  # raises MaxpruneError; sees the whole config
    open_mappings: tuple[str, ...] = ()  # keys of mappings whose entries the user names (str -> str)


class Schema:
    """Sections by name; `load` and `override` are the only ways a config is made."""

    def __init__(self, sections: Mapping[str, Section]):
        self.sections = dict(sections)
        self.open_mappings = frozenset(f"{name}.{key}" for name, section in self.sections.items()
                                       for key in section.open_mappings)

    def defaults(self) -> ConfigDict:
        """Every known key with its default; the type of each default is enforced."""
        return ConfigDict({name: section.build() for name, section in self.sections.items()})

    @functools.cached_property
    def nullable_keys(self) -> frozenset[str]:
        """Keys whose default is None (placeholders): None stays a valid value for them."""
        return frozenset(key for key, value in _walk(self.defaults()) if value is None)

    def validate(self, cfg: ConfigDict) -> None:
        """Range and choice checks of every section (types were checked on assignment)."""
        for section in self.sections.values():
            section.check(cfg)

    def load(self, spec: str | None, overrides: Sequence[str] = ()) -> ml_collections.FrozenConfigDict:
        """Defaults <- `path.py[:arg]`'s get_config() <- `--config.a.b=value` overrides; validated, frozen."""
        cfg = self.defaults()
        if spec:
            path, user = _read_file(spec)
            _assign(self, cfg, "", user, f"in {path}")
        for override in overrides:
            key, value, raw = _parse_override(override)
            _assign(self, cfg, key, value, f"in override {override!r}", raw)
        self.validate(cfg)
        # lock() only stops new keys; freezing also stops silent changes after validation.
        return ml_collections.FrozenConfigDict(cfg)

    def override(self, cfg, changes: Mapping[str, Any], source: str) -> ml_collections.FrozenConfigDict:
        """A validated, frozen copy of `cfg` with dotted-key `changes` applied through the same type checks as
        ``--config.a.b=VALUE`` (a section given as a mapping sets each of its keys)."""
        # deepcopy: FrozenConfigDict.as_configdict() shares its nodes between calls
        mutable = copy.deepcopy(cfg.as_configdict() if hasattr(cfg, "as_configdict") else ConfigDict(cfg))
        for key, value in changes.items():
            _assign(self, mutable, key, value, f"({source})")
        self.validate(mutable)
        return ml_collections.FrozenConfigDict(mutable)


# ------------------------------------------------------- helpers for sections
def typed_placeholders(cls, skip=()) -> dict[str, Any]:
    """Each dataclass field as a typed placeholder: None means "keep the preset's value"."""
    hints = typing.get_type_hints(cls)
    return {f.name: placeholder(hints[f.name]) for f in dataclasses.fields(cls) if f.name not in skip}


def choice(key: str, value: Any, valid: Sequence[str]) -> None:
    """`value` must be one of `valid`."""
    if value not in valid:
        raise MaxpruneError(f"{key}={value!r} is not valid; choose one of {', '.join(valid)}")


def at_least(key: str, value: Any, minimum: int | float) -> None:
    """`value` must be >= `minimum`."""
    if value < minimum:
        raise MaxpruneError(f"{key}={value} must be >= {minimum}")


def config_arg(arg: str | None, valid: Sequence[str], default: str | None = None) -> str | None:
    """A config file's `:ARG` (`default` when absent), which must be one of `valid`."""
    value = arg or default
    if value is not None and value not in valid:
        raise MaxpruneError(f"ARG {value!r} is not valid; choose one of {', '.join(valid)}")
    return value


# ------------------------------------------------------------------ internals
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


def _assign_open(schema: Schema, cfg: ConfigDict, key: str, value: Any, source: str, raw: str | None) -> bool:
    """Handle `key` if it is an open mapping or one of its entries; False otherwise."""
    head, _, entry = key.rpartition(".")
    if key in schema.open_mappings:
        if not isinstance(value, (Mapping, ConfigDict)):
            raise MaxpruneError(f"config key {key!r} {source} must be a mapping of names to strings, "
                                f"got {value!r}")
        parent, name = _resolve(cfg, key, source)
        parent[name] = ConfigDict({})
        for sub, sub_value in value.items():
            _set_entry(parent[name], key, sub, sub_value, source, None)
        return True
    if head in schema.open_mappings:
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


def _assign(schema: Schema, cfg: ConfigDict, key: str, value: Any, source: str, raw: str | None = None) -> None:
    """Set `key` (dotted; "" is the root) to `value`, recursing into mappings for sections."""
    if _assign_open(schema, cfg, key, value, source, raw):
        return
    parent, name = _resolve(cfg, key, source)
    target = parent[name] if name else cfg
    if isinstance(target, ConfigDict):
        if not isinstance(value, (Mapping, ConfigDict)):
            raise MaxpruneError(f"config key {key!r} {source} is a section, got {value!r}; set its "
                                f"keys instead: {', '.join(target.keys())}")
        for sub, sub_value in value.items():
            _assign(schema, cfg, f"{key}.{sub}" if key else sub, sub_value, source)
        return
    expected = parent.get_type(name)
    if raw is not None and expected is str and not isinstance(value, str) and value is not None:
        value = raw  # e.g. --config.x=123 for a str field means "123"
    parent[name] = _coerce(key, value, expected, source, schema.nullable_keys)


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


def _coerce(key: str, value: Any, expected: type, source: str, nullable: frozenset[str]) -> Any:
    """`value` as the schema's type: ints widen to floats; bools are not ints; None only for placeholders."""
    if value is None and key in nullable:
        return None
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, expected) and (expected is bool or not isinstance(value, bool)):
        return value
    wanted = expected.__name__ + (" or None" if key in nullable else "")
    raise MaxpruneError(f"config key {key!r} {source} expects {wanted}, got {value!r} "
                        f"({type(value).__name__})")


def _describe(e: BaseException) -> str:
    return f"{type(e).__name__}: {' '.join(str(e).split())}"
