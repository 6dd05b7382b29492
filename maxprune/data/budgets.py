"""Token budgets: named, checkable slices of one prepared token stream.

The paper's fairness is arithmetic on index ranges: the 200B pretraining and
50B retraining tokens are disjoint slices of one stream and S250 sees exactly
their union. So budgets are sequence-index ranges over a prepared dataset,
parsed from a mapping such as::

    {"pretrain": "0:~200B", "retrain": "~200B:~250B",
     "union": "pretrain+retrain", "validation": "-~100M:"}

Grammar of a value: terms joined by `+` (set union); a term is a budget name
or `START:END` in tokens, half-open. A bound is a plain integer (`_` allowed)
or a decimal with unit K/M/B/T (10^3..10^12); empty START is 0 and empty END
the end of the dataset; a negative bound counts from the end. Bounds must be
multiples of seq_len: an unaligned bound is an error that names the nearest
valid values, unless written `~200B`, which rounds to the nearest sequence
boundary (halves up). Rounding is a function of the written value only, so
ranges that share a written bound stay adjacent and disjoint.

Pure arithmetic, no I/O: the loader and the study planner both use it.
"""

from __future__ import annotations

import dataclasses
import decimal
import itertools
import math
import re
from typing import Iterable, Mapping, Sequence

from maxprune.errors import MaxpruneError

UNITS = {"": 1, "K": 10**3, "M": 10**6, "B": 10**9, "T": 10**12}
_BOUND = re.compile(r"(~)?(-)?(\d[\d_]*(?:\.\d+)?)([KMBT]?)", re.I)
_NAME = re.compile(r"[A-Za-z_][\w.-]*")

SequenceRanges = list[tuple[int, int]]  # half-open [start, end) sequence indices, sorted and merged


@dataclasses.dataclass(frozen=True, order=True)
class TokenRange:
    """Half-open token interval [start, end) of the stream; bounds are multiples of seq_len."""

    start: int
    end: int

    def __post_init__(self):
        if not 0 <= self.start < self.end:
            raise MaxpruneError(f"token range {self.start}:{self.end} must satisfy 0 <= start < end")

    @property
    def num_tokens(self) -> int:
        return self.end - self.start

    def sequences(self, seq_len: int) -> tuple[int, int]:
        for value in (self.start, self.end):
            _check_aligned(value, seq_len, f"token range {self.start}:{self.end}", str(value))
        return self.start // seq_len, self.end // seq_len


@dataclasses.dataclass(frozen=True)
class Plan:
    """A training budget drawn from one named range.

    `ranges` are the sequences drawn from; `num_sequences` are produced in total,
    i.e. `epochs` passes over `ranges` (fractional: the last pass is partial; the
    loader reshuffles each pass).
    """

    ranges: tuple[tuple[int, int], ...]
    num_sequences: int
    epochs: float
    name: str = ""
    seq_len: int = 0

    @property
    def num_tokens(self) -> int:
        return self.num_sequences * self.seq_len

    @property
    def range_sequences(self) -> int:
        return sum(end - start for start, end in self.ranges)


class Budgets:
    """Named sequence ranges over a dataset of `total_sequences` x `seq_len` tokens."""

    def __init__(self, ranges: Mapping[str, Iterable[tuple[int, int]]], total_sequences: int, seq_len: int):
        self.seq_len = seq_len
        self.total_sequences = total_sequences  # of the whole dataset
        self._ranges = {name: _merge(r) for name, r in ranges.items()}

    @property
    def names(self) -> list[str]:
        return list(self._ranges)

    def __contains__(self, name: str) -> bool:
        return name in self._ranges

    def sequences(self, name: str) -> SequenceRanges:
        """Half-open sequence index ranges of budget `name`, sorted and merged."""
        if name not in self._ranges:
            raise MaxpruneError(f"unknown budget {name!r}; defined: {', '.join(self._ranges) or 'none'}")
        return list(self._ranges[name])

    def num_sequences(self, name: str) -> int:
        return sum(end - start for start, end in self.sequences(name))

    def num_tokens(self, name: str) -> int:
        return self.num_sequences(name) * self.seq_len

    def token_ranges(self, name: str) -> list[TokenRange]:
        return [TokenRange(s * self.seq_len, e * self.seq_len) for s, e in self.sequences(name)]

    def check_disjoint(self, names: Sequence[str]) -> None:
        """Error naming the first overlapping pair (and where they overlap) among `names`."""
        for a, b in itertools.combinations(names, 2):
            overlap = _intersect(self.sequences(a), self.sequences(b))
            if overlap:
                start, end = overlap[0]
                total = sum(e - s for s, e in overlap) * self.seq_len
                raise MaxpruneError(
                    f"budgets {a!r} and {b!r} overlap in {total:,} tokens, first at sequences "
                    f"[{start}, {end}) = tokens {start * self.seq_len}:{end * self.seq_len}")

    def take(self, name: str, tokens: int | str | None = None, allow_repeat: bool = False) -> Plan:
        """Draw a training budget of `tokens` from range `name` (None: exactly the whole range).

        Tokens round up to whole sequences. Fewer than the range holds take its
        first sequences, so a smaller budget is a prefix of a larger one. More is
        an error unless `allow_repeat`, which repeats the range for `epochs` passes.
        """
        ranges = self.sequences(name)
        available = self.num_sequences(name)
        if tokens is None:
            return Plan(tuple(ranges), available, 1.0, name, self.seq_len)
        count = parse_tokens(tokens) if isinstance(tokens, str) else int(tokens)
        if count <= 0:
            raise MaxpruneError(f"a budget of {tokens} tokens from {name!r} must be > 0")
        needed = -(-count // self.seq_len)
        if needed <= available:
            return Plan(tuple(_prefix(ranges, needed)), needed, 1.0, name, self.seq_len)
        if not allow_repeat:
            raise MaxpruneError(
                f"budget {name!r} holds {available * self.seq_len:,} tokens but {count:,} were asked for; "
                f"allow repeating it ({needed / available:.3g} epochs) or use a larger range")
        return Plan(tuple(ranges), needed, needed / available, name, self.seq_len)

    def to_dict(self) -> dict[str, list[list[int]]]:
        """{name: [[start_token, end_token], ...]}: what a run records as its data provenance."""
        return {name: [[r.start, r.end] for r in self.token_ranges(name)] for name in self._ranges}

    def __repr__(self) -> str:
        sizes = ", ".join(f"{n}={self.num_tokens(n):,}" for n in self._ranges)
        return f"Budgets({sizes}; seq_len={self.seq_len})"


# ---------------------------------------------------------------- parsing
def parse_budgets(spec: Mapping[str, str | TokenRange | tuple[int, int]], num_tokens: int,
                  seq_len: int) -> Budgets:
    """Budgets from {name: "START:END" | "name+name+..." | TokenRange | (start, end)}."""
    if seq_len <= 1 or num_tokens % seq_len:
        raise MaxpruneError(f"a dataset of {num_tokens} tokens in sequences of {seq_len} is not whole "
                            f"sequences (seq_len must be > 1 and divide num_tokens)")
    for name in spec:
        if not _NAME.fullmatch(str(name)):
            raise MaxpruneError(f"budget name {name!r} must be an identifier (letters, digits, _ . -)")
    parser = _Parser(spec, num_tokens, seq_len)
    return Budgets({name: parser.resolve(name, ()) for name in spec}, num_tokens // seq_len, seq_len)


def parse_tokens(text: str | int) -> int:
    """'200B' -> 200_000_000_000; '1.5K' -> 1500; '8_192' -> 8192. Decimal units, whole tokens only."""
    if isinstance(text, int):
        return text
    match = _BOUND.fullmatch(text.strip())
    if not match or match[1] or match[2]:
        raise MaxpruneError(f"token count {text!r} must be a number with an optional unit K, M, B or T")
    return _value(match, text)


def _value(match: re.Match, text: str) -> int:
    value = decimal.Decimal(match[3].replace("_", "")) * UNITS[match[4].upper()]
    if value != value.to_integral_value():
        raise MaxpruneError(f"{text!r} is not a whole number of tokens")
    return int(value)


class _Parser:
    def __init__(self, spec, num_tokens: int, seq_len: int):
        self.spec, self.num_tokens, self.seq_len = spec, num_tokens, seq_len

    def resolve(self, name: str, chain: tuple[str, ...]) -> SequenceRanges:
        if name in chain:
            raise MaxpruneError(f"budget {name!r} refers to itself: {' -> '.join(chain + (name,))}")
        value = self.spec[name]
        if isinstance(value, TokenRange):
            value = (value.start, value.end)
        if isinstance(value, tuple):
            return [self._range(name, str(value[0]), str(value[1]), f"{value[0]}:{value[1]}")]
        ranges: SequenceRanges = []
        for term in str(value).split("+"):
            ranges += self._term(name, term.strip(), chain + (name,))
        return _merge(ranges)

    def _term(self, name: str, term: str, chain: tuple[str, ...]) -> SequenceRanges:
        if ":" in term:
            start, end = term.split(":", 1)
            return [self._range(name, start.strip(), end.strip(), term)]
        if _NAME.fullmatch(term):
            if term not in self.spec:
                raise MaxpruneError(f"budget {name!r} refers to unknown budget {term!r}; defined: "
                                    f"{', '.join(self.spec)}")
            return self.resolve(term, chain)
        raise MaxpruneError(f"budget {name!r}: {term!r} is neither START:END (tokens) nor a budget name")

    def _range(self, name: str, start_text: str, end_text: str, term: str) -> tuple[int, int]:
        start = self._bound(name, start_text, 0, "start")
        end = self._bound(name, end_text, self.num_tokens, "end")
        if not 0 <= start < end <= self.num_tokens:
            raise MaxpruneError(
                f"budget {name!r} range {term} = tokens {start:,}:{end:,} is empty or outside the "
                f"dataset's {self.num_tokens:,} tokens ({self.num_tokens // self.seq_len:,} sequences "
                f"of {self.seq_len})")
        return start // self.seq_len, end // self.seq_len

    def _bound(self, name: str, text: str, default: int, which: str) -> int:
        if not text:
            return default
        match = _BOUND.fullmatch(text)
        if not match:
            raise MaxpruneError(f"budget {name!r}: {which} {text!r} must be a token count like 0, "
                                f"8192, 200B or ~200B (units K, M, B, T)")
        value = _value(match, text)
        if match[1]:  # ~: nearest sequence boundary
            value = math.floor(decimal.Decimal(value) / self.seq_len + decimal.Decimal("0.5")) * self.seq_len
        value = self.num_tokens - value if match[2] else value
        _check_aligned(value, self.seq_len, f"budget {name!r}", text)
        return value


def _check_aligned(value: int, seq_len: int, what: str, text: str) -> None:
    if value % seq_len:
        lower = value - value % seq_len
        raise MaxpruneError(f"{what}: {text} = {value:,} tokens is not a multiple of seq_len {seq_len}; "
                            f"nearest valid: {lower:,} or {lower + seq_len:,} (or write ~{text.lstrip('~')} "
                            f"to round to the nearest sequence)")


# ---------------------------------------------------------------- interval arithmetic
def _merge(ranges: Iterable[tuple[int, int]]) -> SequenceRanges:
    merged: SequenceRanges = []
    for start, end in sorted((int(s), int(e)) for s, e in ranges):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        elif end > start:
            merged.append((start, end))
    return merged


def _intersect(a: SequenceRanges, b: SequenceRanges) -> SequenceRanges:
    out, i, j = [], 0, 0
    while i < len(a) and j < len(b):
        start, end = max(a[i][0], b[j][0]), min(a[i][1], b[j][1])
        if start < end:
            out.append((start, end))
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return out


def _prefix(ranges: SequenceRanges, count: int) -> SequenceRanges:
    out = []
    for start, end in ranges:
        if count <= 0:
            break
        out.append((start, min(end, start + count)))
        count -= out[-1][1] - out[-1][0]
    return out
