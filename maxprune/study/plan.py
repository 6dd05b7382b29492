"""The study plan: every run a token-matched comparison needs, derived from the study config.

Runs (M = pretraining tokens, N = a retraining budget, X = a method variant):

    P{M}                      pretrain the parent on [0, M)
    {parent}.prune.X          prune a parent (P{M} or an imported one, e.g. Meta) with X
    {parent}-R{N}.X           retrain the pruned model for N tokens on the retrain range [M, M+N)
    S{N}.X                    scratch, the pruned Arch (or, for sparse X, the same fixed mask from
                              random init) for N tokens on the same [M, M+N) the retraining sees
    S{M+N}.X                  scratch for M+N tokens on exactly [0, M+N) = pretrain ∪ retrain

Every run names the runs it depends on; `plan` only describes, it runs nothing.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from maxprune.data.budgets import parse_budgets, parse_tokens
from maxprune.errors import MaxpruneError
from maxprune.model.arch import Arch
from maxprune.prune import api, paper
from maxprune.study import resolve
from maxprune.study.variants import Variant, check_name, parse_variant


@dataclasses.dataclass
class Run:
    name: str
    kind: str                      # pretrain | import | prune | retrain | scratch
    arch: Arch | None              # None when only known once a dependency has run
    tokens: int                    # training tokens (prune: calibration + mask-learning tokens)
    data_range: str | None         # budget name the run trains on
    deps: tuple[str, ...]
    variant: Variant | None = None
    parent: str | None = None      # P{M} or an imported parent's name
    sparsity: float = 0.0
    seed: int = 0
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)
    nominal: int = 0               # the budget as written (names, tables); `tokens` is it in whole steps

    def flops(self, seq_len: int) -> float:
        if self.arch is None or self.kind == "import":
            return 0.0
        per_token = self.arch.train_flops_per_token(seq_len)
        if self.kind == "prune":  # forward passes over calibration tokens
            per_token /= 3.0
        return per_token * self.tokens


def fmt_tokens(n: int) -> str:
    """200_000_000_000 -> "200B"; exact when the unit divides, else 3 significant digits."""
    for unit, size in (("T", 10**12), ("B", 10**9), ("M", 10**6), ("K", 10**3)):
        if n >= size:
            return f"{n // size}{unit}" if n % size == 0 else f"{n / size:.3g}{unit}"
    return str(n)


# ---------------------------------------------------------------- planning
@dataclasses.dataclass
class Plan:
    runs: list[Run]
    pretrain_tokens: int
    retrain_tokens: tuple[int, ...]
    budgets: dict[str, str]       # data.budgets for every run of the study
    seq_len: int

    def __getitem__(self, name: str) -> Run:
        for run in self.runs:
            if run.name == name:
                return run
        raise MaxpruneError(f"no run named {name!r} in this study; runs: {', '.join(r.name for r in self.runs)}")

    def total_flops(self) -> float:
        return sum(run.flops(self.seq_len) for run in self.runs)

    def total_tokens(self, kinds=("pretrain", "retrain", "scratch", "prune")) -> int:
        return sum(run.tokens for run in self.runs if run.kind in kinds)


def range_name(prefix: str, tokens: int) -> str:
    """A budget name (no dots: config keys cannot hold them), e.g. total_1p25M."""
    return f"{prefix}_{fmt_tokens(tokens).replace('.', 'p')}"


def study_budgets(m: int, retrain: tuple[int, ...], whole, start: int | None = None) -> dict[str, str]:
    """pretrain = [0, M), retrain_N = [R, R + N) with R = M by default, total_{M+N} = pretrain ∪ retrain_N.

    Bounds are whole training steps (`whole`), so every run consumes exactly its range.
    """
    r = whole(m) if start is None else whole(start)
    budgets = {"pretrain": f"0:{whole(m)}"} if m else {}
    for n in retrain:
        budgets[range_name("retrain", n)] = f"{r}:{r + whole(n)}"
        if m:
            budgets[range_name("total", m + n)] = f"pretrain+{range_name('retrain', n)}"
    return budgets


def check_budgets(plan: "Plan", num_tokens: int) -> None:
    """Every range fits the dataset, and retraining data never overlaps pretraining data."""
    budgets = parse_budgets(plan.budgets, num_tokens, plan.seq_len)
    for n in plan.retrain_tokens if plan.pretrain_tokens else ():
        budgets.check_disjoint(["pretrain", range_name("retrain", n)])


def plan_study(cfg, parent_arch: Arch, seq_len: int) -> Plan:
    """Every run of the study described by `cfg.study`, in dependency order.

    Run names carry the nominal budgets (P200B, S50B); their token counts are
    rounded up to whole steps of `train.global_batch` x `seq_len`, as the
    trainer rounds them, and the data ranges are cut at those same bounds. Each
    prune run carries the config it will execute (`maxprune.study.resolve`).
    """
    s = cfg.study
    step = cfg.train.global_batch * seq_len
    whole = lambda tokens: -(-tokens // step) * step
    m = parse_tokens(s.pretrain_tokens)
    retrain_all = tuple(parse_tokens(n) for n in s.retrain_tokens)
    if not retrain_all:
        raise MaxpruneError("study.retrain_tokens is empty: give at least one retraining budget, e.g. ('50B',)")
    variants = [parse_variant(v) for v in s.variants]
    if not variants:
        raise MaxpruneError("study.variants is empty: give at least one {method, ratio} to compare")
    _check_prune_ids(variants)
    seeds = tuple(s.seeds)
    runs: dict[str, Run] = {}

    def add(run: Run) -> None:
        runs.setdefault(run.name, run)

    parent_name = f"P{fmt_tokens(m)}"
    if m:
        add(Run(parent_name, "pretrain", parent_arch, whole(m), "pretrain", (), nominal=m))
    else:  # imported parents only (their M is unknown): Ext-R_N vs S_N, no S_{M+N}
        _check_imported_only(variants, s)
    for name in s.imported:
        add(Run(name, "import", None, 0, None, (), extra={"path": s.imported[name]}))
    for variant in variants:
        prune_cfg, origin = resolve.prune_section(cfg, variant)
        arch = _pruned_arch(parent_arch, prune_cfg.prune, variant)
        origin["shape_from"] = "-" if variant.sparse else api.resolve(prune_cfg.prune, parent_arch)[1]
        origin["pinned"] = paper.pin_shapes(prune_cfg.prune, parent_arch)[0]  # Table 1 keys set at prune time
        sparsity = variant.ratio if variant.sparse else 0.0
        p = prune_cfg.prune
        calib_tokens = p.n_samples * (p.seq_len or seq_len)
        mask_tokens = parse_tokens(p.sheared_llama.tokens) if variant.method == "sheared_llama" else 0
        retrain = tuple(parse_tokens(n) for n in variant.retrain) if variant.retrain else retrain_all
        unknown = set(retrain) - set(retrain_all)
        if unknown:
            raise MaxpruneError(f"variant {variant.id} retrains {sorted(map(fmt_tokens, unknown))} tokens, which is "
                                f"not in study.retrain_tokens {list(s.retrain_tokens)}")
        for parent in variant.parents:
            source = parent_name if parent == "P" else parent
            if source not in runs:
                raise MaxpruneError(f"variant {variant.id} names parent {parent!r}, which is not 'P' or a key of "
                                    f"study.imported {list(s.imported)}")
            prune_name = f"{source}.prune.{variant.prune_id}"
            add(Run(prune_name, "prune", arch, calib_tokens + mask_tokens, None, (source,), variant, source,
                    sparsity, extra={"calibration_tokens": calib_tokens, "mask_learning_tokens": mask_tokens,
                                     "config": prune_cfg, **origin}))
            if variant.retrain_parents is not None and parent not in variant.retrain_parents:
                continue
            teacher = {"teacher": source} if variant.teacher else {}
            for n in retrain:
                for seed in seeds:
                    add(Run(_seeded(f"{source}-R{fmt_tokens(n)}.{variant.id}", seed, seeds), "retrain", arch,
                            whole(n), range_name("retrain", n), (prune_name, *teacher.values()), variant, source,
                            sparsity, seed, extra=dict(teacher), nominal=n))
        _add_scratch(add, runs, variant, arch, sparsity, retrain, m, whole, seeds, parent_name, s.merge_scratch)
    for name in runs:  # run dirs are root / name: none may leave the root
        check_name(name, "run name")
    start = parse_tokens(s.retrain_from) if s.retrain_from else None
    return Plan(list(runs.values()), m, retrain_all, study_budgets(m, retrain_all, whole, start), seq_len)


def _pruned_arch(parent: Arch, p, variant: Variant) -> Arch | None:
    """The Arch the variant's prune produces from `parent` (None when a search decides it at run time)."""
    try:
        return api.target_shape(parent, p)
    except MaxpruneError as e:
        raise MaxpruneError(f"study variant {variant.spec!r}: {e}") from None


def _check_imported_only(variants: list[Variant], s) -> None:
    if not s.imported:
        raise MaxpruneError("study.pretrain_tokens=0 pretrains no parent, and study.imported names none: give an "
                            "imported parent (e.g. study.imported.SmolLM2=MODEL_DIR) or a pretraining budget")
    for variant in variants:
        if "P" in variant.parents:
            raise MaxpruneError(f"study variant {variant.spec!r} prunes parent P, but study.pretrain_tokens=0 "
                                f"pretrains none; give parents={','.join(s.imported)}")


def _check_prune_ids(variants: list[Variant]) -> None:
    seen: dict[str, Variant] = {}
    for variant in variants:
        other = seen.setdefault(variant.prune_id, variant)
        if other.prune_settings() != variant.prune_settings():
            raise MaxpruneError(f"study variants {other.spec!r} and {variant.spec!r} prune differently but share the "
                                f"name {variant.prune_id}; give one of them name=NAME")


def _add_scratch(add, runs, variant: Variant, arch, sparsity, retrain, m, whole, seeds, parent_name, merge) -> None:
    """S_N and S_{M+N} baselines; one run where an S_N and an S_{M+N} budget coincide (if `merge`).

    They take the Arch (or fixed mask) of the first parent's pruned model and the
    variant's prune id, so a KD variant shares the baselines of its plain twin.
    """
    first = parent_name if variant.parents[0] == "P" else variant.parents[0]
    prune_p = f"{first}.prune.{variant.prune_id}"
    total_for = retrain if variant.total_for is None else tuple(map(parse_tokens, variant.total_for))
    wanted = []  # (baseline, N, nominal tokens, tokens, range)
    for n in retrain:
        if "S_N" in variant.scratch:
            wanted.append(("S_N", n, n, whole(n), range_name("retrain", n)))
        if "S_M+N" in variant.scratch and n in total_for:
            wanted.append(("S_M+N", n, m + n, whole(m) + whole(n), range_name("total", m + n)))
    groups: dict[tuple, list] = {}
    wanted = [w for w in wanted if m or w[0] == "S_N"]  # no S_{M+N} without a pretraining budget
    for w in wanted:  # merged runs: same tokens; the union range serves both (S_{M+N} needs exactly it)
        groups.setdefault((w[3],) if merge else (w[0], w[1]), []).append(w)
    for group in groups.values():
        group.sort(key=lambda w: w[0] != "S_M+N")
        total = group[0] if group[0][0] == "S_M+N" else None
        named = next((w for w in group if w[0] == "S_N"), group[0])
        roles = tuple((w[0], w[1]) for w in group)
        _, n, nominal, tokens, rng = total or named
        suffix = "" if named[0] == "S_N" else "-total"
        for seed in seeds:
            name = _seeded(f"S{fmt_tokens(named[2])}{suffix}.{variant.prune_id}", seed, seeds)
            add(Run(name, "scratch", arch, tokens, rng, (prune_p,), variant, None, sparsity, seed,
                    extra={"baseline": roles[0][0], "retrain_tokens": roles[0][1], "roles": roles},
                    nominal=named[2]))


def _seeded(name: str, seed: int, seeds: tuple[int, ...]) -> str:
    return name if len(seeds) == 1 else f"{name}.s{seed}"
