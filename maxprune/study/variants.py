"""A study's pruning variants: the `Variant` record and its one-line grammar (``study.variants``).

    wanda/2:4@0.5 retrain=50B parents=P,Meta retrain_parents=P prune.n_samples=256
"""

from __future__ import annotations

import ast
import dataclasses
import re
from typing import Any

from maxprune.errors import MaxpruneError
from maxprune.prune.api import SPARSE_METHODS, pruner_names
from maxprune.prune.schema import parse_pattern


@dataclasses.dataclass(frozen=True)
class Variant:
    """One pruning setting: method, sparsity pattern (sparse methods), ratio, and how it is run."""

    method: str
    ratio: float
    pattern: str = "unstructured"
    retrain: tuple[str, ...] | None = None  # None: every study.retrain_tokens
    parents: tuple[str, ...] = ("P",)       # parents pruned: "P" = the pretrained parent, else study.imported
    retrain_parents: tuple[str, ...] | None = None  # parents whose pruned model is retrained (None: all)
    scratch: tuple[str, ...] = ("S_N", "S_M+N")
    total_for: tuple[str, ...] | None = None  # retrain budgets N that get an S_{M+N} baseline (None: all)
    ratio_of: str | None = None  # structured methods: "prunable" (default) or "params" (see prune.shapes)
    config: str | None = None    # FILE.py[:ARG] whose prune section replaces the method's paper settings
    calibration: str | None = None  # a corpus name of study.calibration ("train": data.train) or a source spec
    teacher: str | None = None   # "parent": retrain with the unpruned parent as teacher (KD)
    name: str | None = None      # the prune id, when two variants of one method/ratio differ in settings
    overrides: tuple[tuple[str, Any], ...] = ()  # ("prune.n_samples", 256), ... from prune.KEY=VALUE
    spec: str = dataclasses.field(default="", compare=False)

    @property
    def sparse(self) -> bool:
        return self.method in SPARSE_METHODS

    @property
    def prune_id(self) -> str:
        """Directory-safe name of the pruned model, e.g. wanda-2of4-r50, minitron_depth-r62.5."""
        if self.name:
            return self.name
        nm = parse_pattern(self.pattern)
        pattern = "" if not self.sparse else ("-u" if nm is None else f"-{nm[0]}of{nm[1]}")
        return f"{self.method}{pattern}-r{100 * self.ratio:g}"

    @property
    def id(self) -> str:
        """The prune id, plus -kd when retraining distils from the parent."""
        return self.prune_id + ("-kd" if self.teacher else "")

    @property
    def label(self) -> str:
        """The paper's way of naming it, e.g. wanda_2:4, minitron_depth (+KD)."""
        base = f"{self.method}_{self.pattern}" if self.sparse else self.method
        return base + ("+KD" if self.teacher else "")

    def prune_settings(self) -> tuple:
        """What decides the pruned model: variants sharing a prune id must agree on it."""
        return (self.method, self.pattern, self.ratio, self.ratio_of, self.config, self.calibration, self.overrides)


_SAFE_NAME = re.compile(r"[A-Za-z0-9_@+-][A-Za-z0-9._@+-]*")


def check_name(name: str, what: str) -> str:
    """`name` if it can be one directory inside an output root: no separator, `..`, leading dot or odd byte."""
    if not isinstance(name, str) or not _SAFE_NAME.fullmatch(name) or ".." in name:
        raise MaxpruneError(f"{what} {name!r} cannot name a directory inside the output root: use letters, "
                            f"digits and . _ @ + - only (no '/', '\\', '..' or leading '.')")
    return name


LIST_KEYS = ("retrain", "parents", "retrain_parents", "scratch", "total_for")
VALUE_KEYS = ("ratio_of", "config", "calibration", "teacher", "name")


def parse_variant(spec: str) -> Variant:
    """A variant from ``METHOD[/PATTERN]@RATIO [key=value ...]``.

    e.g. ``"wanda/2:4@0.5 retrain=50B parents=P,Meta retrain_parents=P"``; keys:
    retrain, parents, retrain_parents, scratch (S_N, S_M+N), total_for (lists);
    ratio_of, config (FILE.py[:ARG]), calibration (corpus or source), teacher
    (parent), name (prune id); and ``prune.KEY=VALUE`` overrides of the method's
    settings, e.g. ``prune.n_samples=256``.
    """
    head, *options = str(spec).split()
    method_pattern, at, ratio = head.partition("@")
    method, _, pattern = method_pattern.partition("/")
    if not at:
        raise MaxpruneError(f"study variant {spec!r} must start with METHOD[/PATTERN]@RATIO, e.g. wanda/2:4@0.5")
    try:
        fields: dict[str, Any] = {"method": method, "ratio": float(ratio), "pattern": pattern or "unstructured"}
    except ValueError:
        raise MaxpruneError(f"study variant {spec!r}: ratio {ratio!r} is not a number") from None
    overrides = []
    for option in options:
        key, eq, value = option.partition("=")
        if key.startswith("prune.") and eq and value:
            overrides.append((key, _literal(value)))
        elif key in LIST_KEYS and eq:
            fields[key] = tuple(v for v in value.split(",") if v)
        elif key in VALUE_KEYS and eq and value:
            fields[key] = value
        else:
            raise MaxpruneError(f"study variant {spec!r}: {option!r} is not KEY=A,B with KEY one of "
                                f"{', '.join(LIST_KEYS)}, KEY=VALUE with KEY one of {', '.join(VALUE_KEYS)}, "
                                f"or prune.KEY=VALUE")
    return _check_variant(Variant(**fields, overrides=tuple(overrides), spec=str(spec)), spec)


def _literal(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return text


def _check_variant(variant: Variant, spec: str) -> Variant:
    if variant.method not in pruner_names():
        raise MaxpruneError(f"study variant {spec!r}: unknown method {variant.method!r}; "
                            f"valid: {', '.join(pruner_names())}")
    if not 0 < variant.ratio < 1:
        raise MaxpruneError(f"study variant {spec!r}: ratio {variant.ratio} must be in (0, 1)")
    nm = parse_pattern(variant.pattern)
    if (variant.pattern != "unstructured" or nm is not None) and not variant.sparse and variant.pattern:
        if nm is not None:
            raise MaxpruneError(f"study variant {spec!r}: pattern {variant.pattern} does not exist for "
                                f"{variant.method}; N:M patterns are for {', '.join(SPARSE_METHODS)}")
    if nm is not None and abs(variant.ratio - nm[0] / nm[1]) > 1e-9:
        raise MaxpruneError(f"study variant {spec!r}: {variant.pattern} prunes {nm[0]}/{nm[1]} of the weights, "
                            f"not {variant.ratio}")
    if variant.ratio_of not in (None, "prunable", "params"):
        raise MaxpruneError(f"study variant {spec!r}: ratio_of={variant.ratio_of} is not prunable or params")
    if variant.ratio_of and variant.sparse:
        raise MaxpruneError(f"study variant {spec!r}: ratio_of is for structured methods, not {variant.method}")
    if variant.teacher not in (None, "parent"):
        raise MaxpruneError(f"study variant {spec!r}: teacher={variant.teacher} is not valid; choose parent")
    if variant.name is not None:
        check_name(variant.name, f"study variant {spec!r}: name")
    bad = set(variant.scratch) - {"S_N", "S_M+N"}
    if bad:
        raise MaxpruneError(f"study variant {spec!r}: scratch {sorted(bad)} is not valid; choose S_N and/or S_M+N")
    return variant
