"""Tables and figures in the paper's forms, from a study's evaluated runs.

Tables (Markdown + CSV, one file each):
- `prune_vs_scratch` (paper Tables 2/16): per variant and retraining budget N:
  P-R_N, S_N, Δ(S_N over P-R_N), S_{M+N}, Δ(S_{M+N} over P-R_N). As in Table 16
  a Δ is the scratch run's advantage: negative means pruning is better.
- `token_scaling` (Tables 12–15): per variant, for every N: S_N, P-R_N,
  Δ(P-R_N vs S_N), and each imported parent's Ext-R_N with its Δ. As in Tables
  12–15 a Δ here is the pruned run's advantage: positive means pruning is better.
- `ratio_ablation` (Table 11): per method with several ratios: S_N, P-R_N, Δ.
- `after_pruning` (Table 10): each parent and its pruned models before retraining.

Seeds: a run group is one retrain or scratch run repeated over `study.seeds`.
Each cell is the mean over the group's evaluated seeds; with several seeds the
Markdown shows "mean ± std" (sample std-dev over seeds, ddof=1) and the CSV has
`<column>` (mean), `<column>_std` and a `seeds` count. A Δ is the difference of
the means. A Δ marked `~` (the paper's grey cells) is within the noise:
|Δ| <= the largest of either side's evaluation std-dev (lm-eval's stderr, the
mean over seeds) and either side's seed std-dev.

Figures (PNG and SVG each):
- `fig_prune_vs_scratch` (Figure 1): per variant, P-R_N vs S_N vs S_{M+N}.
- `fig_token_scaling_<variant>` (Figure 3): loss and average accuracy vs N.
- `fig_gain_vs_size` (Figure 4): P-R_N's gain over S_N vs the pruned model's
  parameter count, one line per method across its ratios.
- `fig_equal_total` (Figure 5): P-R_N vs S_{M+N}, and the signed Δ of S_{M+N}
  over P-R_N (greyed when marked `~`).
Error bars are the seed std-dev when the study has several seeds.
"""

from __future__ import annotations

import csv
import io
import math
import statistics
from collections import defaultdict
from pathlib import Path

from maxprune.errors import MaxpruneError
from maxprune.fs.staged import commit_dir, staging_dir
from maxprune.study.plan import Plan, Run, fmt_tokens
from maxprune.study.runner import make_plan, read_status
from maxprune.study.variants import Variant

TILDE_NOTE = ("Δ marked `~`: |Δ| is within the largest of either side's evaluation std-dev (lm-eval stderr) "
              "and seed std-dev (the paper's grey cells).")
SEEDS_NOTE = "Cells with several seeds are mean ± sample std-dev over seeds; a Δ is the difference of the means."
COLORS = {"P-R_N": "#8e6bbf", "S_N": "#2b5d9c", "S_M+N": "#7fb3e6", "within": "#b0b0b0"}


def lower_is_better(column: str) -> bool:
    return column == "loss" or column.startswith("ppl_")


# ----------------------------------------------------------------- lookup
def roles(run: Run) -> tuple[tuple[str, int], ...]:
    """The (baseline, N) pairs a scratch run serves, e.g. (("S_N", 250B), ("S_M+N", 50B))."""
    if "roles" in run.extra:
        return tuple((baseline, int(n)) for baseline, n in run.extra["roles"])
    return ((run.extra["baseline"], int(run.extra["retrain_tokens"])),)


def scratch_runs(plan: Plan, variant: Variant, baseline: str, n: int) -> list[Run]:
    """Every seed of the scratch baseline `baseline` ("S_N" or "S_M+N") of retraining budget `n`."""
    return [r for r in plan.runs if r.kind == "scratch" and _same(r.variant, variant)
            and (baseline, int(n)) in roles(r)]


def retrain_runs(plan: Plan, variant: Variant, parent: str, n: int) -> list[Run]:
    """Every seed of {parent}-R{n}.{variant}."""
    return [r for r in plan.runs if r.kind == "retrain" and _same(r.variant, variant)
            and r.parent == parent and r.nominal == n]


def _same(a: Variant | None, b: Variant) -> bool:
    return a is not None and a.id == b.id


def is_seeded(plan: Plan) -> bool:
    return len({r.seed for r in plan.runs if r.kind in ("retrain", "scratch")}) > 1


# ------------------------------------------------------------------- rows
def collect(plan: Plan, status: dict) -> dict[str, dict]:
    """run name -> {"values", "stds"} for every evaluated run."""
    rows = {}
    for run in plan.runs:
        entry = status.get("runs", {}).get(run.name, {})
        if entry.get("status") == "complete" and entry.get("eval"):
            rows[run.name] = entry["eval"]
    return rows


def aggregate(evals: list[dict]) -> dict | None:
    """A run group's row over its seeds: mean values, mean eval stds, seed std-devs (ddof=1), seed count."""
    if not evals:
        return None
    values, stds, seed_stds = {}, {}, {}
    for column in dict.fromkeys(c for e in evals for c in e["values"]):
        xs = [e["values"][column] for e in evals if column in e["values"]]
        values[column] = statistics.fmean(xs)
        if len(xs) > 1:
            seed_stds[column] = statistics.stdev(xs)
        es = [e["stds"][column] for e in evals if column in e.get("stds", {})]
        if es:
            stds[column] = statistics.fmean(es)
    return {"values": values, "stds": stds, "seed_stds": seed_stds, "seeds": len(evals)}


def group(rows: dict[str, dict], runs: list[Run]) -> dict | None:
    """The aggregate of the evaluated runs among `runs` (None when none is evaluated)."""
    return aggregate([rows[r.name] for r in runs if r.name in rows])


def columns_of(rows: dict[str, dict]) -> list[str]:
    seen: dict[str, None] = {}
    for row in rows.values():
        for key in row["values"]:
            seen.setdefault(key, None)
    order = lambda c: (0 if c == "loss" else 1 if c.startswith("ppl_") else 3 if c == "acc_avg" else 2)
    return sorted(seen, key=lambda c: (order(c), list(seen).index(c)))


def noise(row: dict, column: str) -> float:
    """The larger of the row's evaluation std-dev and its seed std-dev on `column` (0 when neither is known)."""
    return max(row["stds"].get(column, 0.0), row.get("seed_stds", {}).get(column, 0.0))


def delta(base: dict, other: dict, column: str, advantage_of_other: bool) -> tuple[float, bool] | None:
    """Δ of the means on `column` as the advantage of `other` over `base` (or of base over other); within-noise flag."""
    if column not in base["values"] or column not in other["values"]:
        return None
    a, b = base["values"][column], other["values"][column]
    gain = (a - b) if lower_is_better(column) else (b - a)  # other's advantage
    value = gain if advantage_of_other else -gain
    std = max(noise(base, column), noise(other, column))
    return value, std > 0 and abs(value) <= std


# ----------------------------------------------------------------- tables
class Table:
    """Rows of run groups and Δs; `seeded` adds a seeds column, "mean ± std" cells and `<column>_std` CSV columns."""

    def __init__(self, title: str, columns: list[str], seeded: bool = False):
        self.title, self.columns, self.seeded = title, columns, seeded
        self.rows: list[tuple[str, str, dict[str, str]]] = []      # Markdown cells
        self.csv_rows: list[tuple[str, str, dict[str, str]]] = []  # CSV cells

    def add_run(self, group_name: str, label: str, row: dict) -> None:
        cells, csv_cells = {}, {}
        for c in self.columns:
            if c not in row["values"]:
                continue
            mean, std = _fmt(c, row["values"][c]), row.get("seed_stds", {}).get(c)
            cells[c] = mean if std is None or not self.seeded else f"{mean} ± {_fmt(c, std)}"
            csv_cells[c] = mean
            csv_cells[f"{c}_std"] = "" if std is None else _fmt(c, std)
        if self.seeded:
            cells["seeds"] = csv_cells["seeds"] = str(row.get("seeds", 1))
        self._append(group_name, label, cells, csv_cells)

    def add_delta(self, group_name: str, label: str, base: dict, other: dict, advantage_of_other: bool) -> None:
        cells = {}
        for c in self.columns:
            d = delta(base, other, c, advantage_of_other)
            if d is not None:
                cells[c] = ("~" if d[1] else "") + _fmt(c, d[0], signed=True)
        self._append(group_name, label, cells, dict(cells))

    def _append(self, group_name: str, label: str, cells: dict, csv_cells: dict) -> None:
        self.rows.append((group_name, label, cells))
        self.csv_rows.append((group_name, label, csv_cells))

    def markdown(self) -> str:
        head = ["variant", "run", *(["seeds"] if self.seeded else []), *self.columns]
        out = [f"### {self.title}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for group_name, label, cells in self.rows:
            out.append("| " + " | ".join([group_name, label] + [cells.get(c, "") for c in head[2:]]) + " |")
        return "\n".join(out) + "\n"

    def csv(self) -> str:
        keys = [*(["seeds"] if self.seeded else []),
                *(k for c in self.columns for k in ((c, f"{c}_std") if self.seeded else (c,)))]
        buf = io.StringIO()
        writer = csv.writer(buf)
        writer.writerow(["variant", "run", *keys])
        for group_name, label, cells in self.csv_rows:
            writer.writerow([group_name, label] + [cells.get(k, "") for k in keys])
        return buf.getvalue()


def _fmt(column: str, value: float, signed: bool = False) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    digits = 2 if column != "loss" else 3
    return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"


def _parent(plan: Plan) -> str:
    return plan.runs[0].name


def prune_vs_scratch(plan: Plan, rows: dict, columns: list[str]) -> Table:
    table = Table("Pruning + retraining vs. training from scratch (paper Tables 2/16; Δ = scratch's advantage)",
                  columns, is_seeded(plan))
    parent = _parent(plan)
    for variant in _variants(plan):
        name = _name(plan, variant)
        for n in plan.retrain_tokens:
            p = group(rows, retrain_runs(plan, variant, parent, n))
            if p is None:
                continue
            table.add_run(name, f"{parent}-R{fmt_tokens(n)}", p)
            for baseline, tokens in (("S_N", n), ("S_M+N", plan.pretrain_tokens + n)):
                s = group(rows, scratch_runs(plan, variant, baseline, n))
                if s is None:
                    continue
                label = f"S{fmt_tokens(tokens)}"
                table.add_run(name, label, s)
                table.add_delta(name, f"Δ {label} over {parent}-R{fmt_tokens(n)}", p, s,
                                advantage_of_other=True)
    return table


def token_scaling(plan: Plan, rows: dict, columns: list[str]) -> Table:
    table = Table("Retraining-token scaling (paper Tables 12-15; Δ = pruned run's advantage)", columns,
                  is_seeded(plan))
    for variant in _variants(plan):
        name = _name(plan, variant)
        for n in plan.retrain_tokens:
            s = group(rows, scratch_runs(plan, variant, "S_N", n))
            if s is None:
                continue
            table.add_run(name, f"S{fmt_tokens(n)}", s)
            for parent in _parents(plan):
                p = group(rows, retrain_runs(plan, variant, parent, n))
                if p is None:
                    continue
                label = f"{parent}-R{fmt_tokens(n)}"
                table.add_run(name, label, p)
                table.add_delta(name, f"Δ {label} vs S{fmt_tokens(n)}", s, p, advantage_of_other=True)
    return table


def ratio_ablation(plan: Plan, rows: dict, columns: list[str]) -> Table:
    table = Table("Pruning-ratio ablation (paper Table 11; Δ = pruned run's advantage)", columns, is_seeded(plan))
    parent = _parent(plan)
    for variants in _ratio_methods(plan):
        for variant in variants:
            for n in plan.retrain_tokens:
                s = group(rows, scratch_runs(plan, variant, "S_N", n))
                p = group(rows, retrain_runs(plan, variant, parent, n))
                if s is None or p is None:
                    continue
                group_name = f"{variant.label} {100 * variant.ratio:g}%"
                table.add_run(group_name, f"S{fmt_tokens(n)}", s)
                table.add_run(group_name, f"{parent}-R{fmt_tokens(n)}", p)
                table.add_delta(group_name, "Δ", s, p, advantage_of_other=True)
    return table


def after_pruning(plan: Plan, rows: dict, columns: list[str]) -> Table:
    table = Table("Right after pruning, before retraining (paper Table 10)", columns)  # never repeated per seed
    for parent in (r for r in plan.runs if r.kind in ("pretrain", "import")):
        if parent.name in rows:
            table.add_run(parent.name, "unpruned", aggregate([rows[parent.name]]))
        for run in plan.runs:
            if run.kind == "prune" and run.parent == parent.name and run.name in rows:
                table.add_run(parent.name, run.variant.label + f" {100 * run.variant.ratio:g}%",
                              aggregate([rows[run.name]]))
    return table


def _name(plan: Plan, variant: Variant) -> str:
    """The variant's row label; with the ratio when the study has the same method at several ratios."""
    if any(v.label == variant.label and v.ratio != variant.ratio for v in _variants(plan)):
        return f"{variant.label} {100 * variant.ratio:g}%"
    return variant.label


def _variants(plan: Plan) -> list[Variant]:
    seen = {}
    for run in plan.runs:
        if run.variant is not None:
            seen.setdefault(run.variant.id, run.variant)
    return list(seen.values())


def _parents(plan: Plan) -> list[str]:
    return [r.name for r in plan.runs if r.kind in ("pretrain", "import")]


def _ratio_methods(plan: Plan) -> list[list[Variant]]:
    """Per (method, pattern) with several ratios, its variants by ratio (the Table 11 ablation)."""
    by_method = defaultdict(list)
    for variant in _variants(plan):
        by_method[(variant.method, variant.pattern)].append(variant)
    return [sorted(vs, key=lambda v: v.ratio) for vs in by_method.values() if len({v.ratio for v in vs}) > 1]


# ---------------------------------------------------------------- figures
def figures(plan: Plan, rows: dict, out: Path) -> list[Path]:
    """Figures 1, 3, 4 and 5 (each PNG and SVG) under `out`; the paths written."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = columns_of(rows)
    loss = "loss" if "loss" in columns else next((c for c in columns if c.startswith("ppl_")), None)
    acc = "acc_avg" if "acc_avg" in columns else None
    panels = [m for m in (loss, acc) if m is not None]
    headline = acc or loss or columns[0]  # Figures 1 and 5 plot one metric, accuracy as the paper does
    seeded = is_seeded(plan)
    written = []
    for draw in (lambda: fig_prune_vs_scratch(plt, plan, rows, headline, seeded, out),
                 lambda: fig_token_scaling(plt, plan, rows, panels, seeded, out),
                 lambda: fig_gain_vs_size(plt, plan, rows, panels, seeded, out),
                 lambda: fig_equal_total(plt, plan, rows, headline, seeded, out)):
        written += draw()
    return written


def _trio(plan: Plan, rows: dict, variant: Variant, n: int) -> dict[str, dict | None]:
    return {"P-R_N": group(rows, retrain_runs(plan, variant, _parent(plan), n)),
            "S_N": group(rows, scratch_runs(plan, variant, "S_N", n)),
            "S_M+N": group(rows, scratch_runs(plan, variant, "S_M+N", n))}


def _pick_budget(plan: Plan, rows: dict, variant: Variant, metric: str, need: tuple[str, ...],
                 fallback: bool) -> tuple[int, dict] | None:
    """The largest N at which every run group in `need` has `metric` (else, with `fallback`, where P-R_N has it)."""
    has = lambda g: g is not None and metric in g["values"]
    trios = [(n, _trio(plan, rows, variant, n)) for n in sorted(plan.retrain_tokens, reverse=True)]
    for n, trio in trios:
        if all(has(trio[k]) for k in need):
            return n, trio
    return next(((n, t) for n, t in trios if has(t["P-R_N"])), None) if fallback else None


def _value(g: dict | None, metric: str) -> float:
    return g["values"].get(metric, math.nan) if g else math.nan


def _spread(g: dict | None, metric: str) -> float:
    return g.get("seed_stds", {}).get(metric, math.nan) if g else math.nan


def _bar_label(variant: Variant, n: int) -> str:
    return f"{variant.label}\n{100 * variant.ratio:g}% R{fmt_tokens(n)}"


def fig_prune_vs_scratch(plt, plan: Plan, rows: dict, metric: str, seeded: bool, out: Path) -> list[Path]:
    """Figure 1: per variant, P-R_N vs S_N vs S_{M+N} at the largest N that has all three."""
    keys = ("P-R_N", "S_N", "S_M+N")
    labels, trios = [], []
    for variant in _variants(plan):
        picked = _pick_budget(plan, rows, variant, metric, keys, fallback=True)
        if picked is not None:
            labels.append(_bar_label(variant, picked[0]))
            trios.append(picked[1])
    if not labels:
        return []
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(labels)), 4))
    width = 0.27
    for i, key in enumerate(keys):
        ax.bar([x + (i - 1) * width for x in range(len(labels))], [_value(t[key], metric) for t in trios], width,
               yerr=[_spread(t[key], metric) for t in trios] if seeded else None, capsize=3, label=key,
               color=COLORS[key])
    ax.set_xticks(range(len(labels)), labels, fontsize=8)
    ax.set_ylabel(_axis_label(metric))
    ax.set_title("Pruning + retraining vs. scratch: equal training tokens (S_N), equal total tokens (S_M+N)",
                 fontsize=9)
    _legend_above_bars(ax)
    return _save(plt, fig, out / "fig_prune_vs_scratch")


def fig_token_scaling(plt, plan: Plan, rows: dict, panels: list[str], seeded: bool, out: Path) -> list[Path]:
    """Figure 3: per variant with several N, loss and average accuracy vs N for S_N and each parent's R_N."""
    written = []
    for variant in _variants(plan):
        points = _scaling_points(plan, rows, variant)
        if max(len(v) for v in points.values()) < 2:
            continue
        fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.5), squeeze=False)
        for metric, ax in zip(panels, axes[0]):
            for key, pts in points.items():
                pts = [(n, g) for n, g in pts if metric in g["values"]]
                if pts:
                    ax.errorbar([float(n) for n, _ in pts], [_value(g, metric) for _, g in pts],
                                yerr=[_spread(g, metric) for _, g in pts] if seeded else None,
                                marker="o", capsize=3, label=key)
            ax.set_xscale("log")
            ax.minorticks_off()
            ns = sorted({n for pts in points.values() for n, _ in pts})
            ax.set_xticks([float(n) for n in ns], [fmt_tokens(n) for n in ns])
            ax.set_xlabel("retraining tokens N")
            ax.set_ylabel(_axis_label(metric))
            ax.legend(fontsize=8)
        fig.suptitle(f"{variant.label} {100 * variant.ratio:g}%")
        written += _save(plt, fig, out / f"fig_token_scaling_{variant.id}")
    return written


def _scaling_points(plan: Plan, rows: dict, variant: Variant) -> dict[str, list[tuple[int, dict]]]:
    """Series name (S_N, {parent}-R_N) -> [(N, run group)] over the evaluated budgets."""
    series = {"S_N": lambda n: scratch_runs(plan, variant, "S_N", n),
              **{f"{p}-R_N": (lambda n, p=p: retrain_runs(plan, variant, p, n)) for p in _parents(plan)}}
    return {key: [(n, g) for n in plan.retrain_tokens if (g := group(rows, runs_at(n))) is not None]
            for key, runs_at in series.items()}


def fig_gain_vs_size(plt, plan: Plan, rows: dict, panels: list[str], seeded: bool, out: Path) -> list[Path]:
    """Figure 4: P-R_N's advantage over S_N vs the pruned model's parameter count, per method across its ratios."""
    from matplotlib.ticker import EngFormatter
    parent = _parent(plan)
    lines = {}
    for variants in _ratio_methods(plan):
        for n in plan.retrain_tokens:
            points = []
            for variant in variants:
                runs = retrain_runs(plan, variant, parent, n)
                p, s = group(rows, runs), group(rows, scratch_runs(plan, variant, "S_N", n))
                if p is not None and s is not None and runs[0].arch is not None:
                    points.append((runs[0].arch.num_params(sparsity=runs[0].sparsity), p, s))
            if len(points) > 1:
                lines[f"{variants[0].label} N={fmt_tokens(n)}"] = points
    if not lines:
        return []
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.5), squeeze=False)
    for metric, ax in zip(panels, axes[0]):
        for label, points in lines.items():
            gains = [(size, delta(s, p, metric, advantage_of_other=True), p, s) for size, p, s in points]
            gains = [(size, d[0], p, s) for size, d, p, s in gains if d is not None]
            if not gains:
                continue
            # a difference of two seed means: the seed std-devs add in quadrature
            yerr = [math.hypot(_spread(p, metric), _spread(s, metric)) for *_, p, s in gains] if seeded else None
            ax.errorbar([float(g[0]) for g in gains], [g[1] for g in gains], yerr=yerr, marker="o", capsize=3,
                        label=label)
        ax.axhline(0, color="black", linewidth=0.8)
        ax.xaxis.set_major_formatter(EngFormatter())
        ax.set_xlabel("parameters of the pruned model")
        ax.set_ylabel(f"gain of P-R_N over S_N\n({_axis_label(metric)})")
        ax.legend(fontsize=8)
    fig.suptitle("Pruning's advantage over scratch (same N) vs. model size")
    return _save(plt, fig, out / "fig_gain_vs_size")


def fig_equal_total(plt, plan: Plan, rows: dict, metric: str, seeded: bool, out: Path) -> list[Path]:
    """Figure 5: per variant, P-R_N vs S_{M+N} bars over a panel of Δ(S_{M+N} over P-R_N), greyed within noise."""
    labels, pairs = [], []
    for variant in _variants(plan):
        picked = _pick_budget(plan, rows, variant, metric, ("P-R_N", "S_M+N"), fallback=False)
        if picked is not None:
            labels.append(_bar_label(variant, picked[0]))
            pairs.append((picked[1]["P-R_N"], picked[1]["S_M+N"]))
    if not labels:
        return []
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(max(6, 1.3 * len(labels)), 6), sharex=True,
                                      gridspec_kw={"height_ratios": (2, 1)})
    width, xs = 0.38, range(len(labels))
    for i, key in enumerate(("P-R_N", "S_M+N")):
        top.bar([x + (i - 0.5) * width for x in xs], [_value(pair[i], metric) for pair in pairs], width,
                yerr=[_spread(pair[i], metric) for pair in pairs] if seeded else None, capsize=3, label=key,
                color=COLORS[key])
    top.set_ylabel(_axis_label(metric))
    top.set_title("Equal total tokens: pruning + retraining vs. scratch on M+N tokens", fontsize=9)
    _legend_above_bars(top)
    deltas = [delta(p, s, metric, advantage_of_other=True) for p, s in pairs]
    colors = [COLORS["within"] if within else COLORS["S_M+N" if d > 0 else "P-R_N"] for d, within in deltas]
    bottom.bar(xs, [d for d, _ in deltas], 0.5, color=colors)
    for x, (d, within) in zip(xs, deltas):
        bottom.annotate(("~" if within else "") + _fmt(metric, d, signed=True), (x, d), ha="center",
                        va="bottom" if d >= 0 else "top", fontsize=8)
    bottom.axhline(0, color="black", linewidth=0.8)
    bottom.margins(y=0.3)  # room for the value labels
    bottom.set_ylabel("Δ S_M+N over P-R_N\n(> 0: scratch better)")
    bottom.set_xticks(list(xs), labels, fontsize=8)
    return _save(plt, fig, out / "fig_equal_total")


def _legend_above_bars(ax) -> None:
    ax.margins(y=0.15)
    ax.legend(ncol=3, loc="upper left", fontsize=8)


def _axis_label(metric: str) -> str:
    if metric.startswith("ppl_"):
        return f"perplexity ({metric[4:]})"
    return {"acc_avg": "average accuracy (%)", "loss": "validation loss"}.get(metric, metric)


def _save(plt, fig, stem: Path) -> list[Path]:
    fig.tight_layout()
    paths = [stem.with_suffix(".png"), stem.with_suffix(".svg")]
    for path in paths:
        fig.savefig(path, dpi=130)
    plt.close(fig)
    return paths


# ------------------------------------------------------------------- entry
def build_tables(plan: Plan, status: dict) -> tuple[list[Table], dict]:
    rows = collect(plan, status)
    if not rows:
        raise MaxpruneError("no evaluated runs yet: run the study first (`maxprune study run`)")
    columns = columns_of(rows)
    tables = [prune_vs_scratch(plan, rows, columns), token_scaling(plan, rows, columns),
              ratio_ablation(plan, rows, columns), after_pruning(plan, rows, columns)]
    return [t for t in tables if t.rows], rows


def write_report(cfg, root: str | Path, plan: Plan | None = None) -> list[Path]:
    root = Path(root)
    plan = plan or make_plan(cfg)
    tables, rows = build_tables(plan, read_status(root))
    out = root / "report"
    tmp = staging_dir(out)  # written whole, then renamed: a killed report never looks complete
    written = []
    notes = TILDE_NOTE + (" " + SEEDS_NOTE if is_seeded(plan) else "")
    markdown = [f"# Study {cfg.study.name}", "", notes, ""]
    for table in tables:
        path = tmp / f"{_stem(table)}.csv"
        path.write_text(table.csv())
        written.append(path)
        markdown.append(table.markdown())
    (tmp / "report.md").write_text("\n".join(markdown))
    written += [tmp / "report.md", *figures(plan, rows, tmp)]
    commit_dir(tmp, out)
    return [out / p.name for p in written]


def _stem(table: Table) -> str:
    title = table.title.lower()
    for key, stem in (("vs. training", "prune_vs_scratch"), ("scaling", "token_scaling"),
                      ("ablation", "ratio_ablation"), ("after pruning", "after_pruning")):
        if key in title:
            return stem
    raise ValueError(table.title)
