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

A Δ whose size is within one std-dev of either run's evaluation (the paper's
grey cells) is marked with `~`. Figures (PNG and SVG) follow Figures 1, 3, 4, 5.
"""

from __future__ import annotations

import csv
import io
import math
from collections import defaultdict
from pathlib import Path

from maxprune.errors import MaxpruneError
from maxprune.model.model_dir import commit_dir, staging_dir
from maxprune.study.plan import Plan, Run, fmt_tokens
from maxprune.study.runner import read_status

def lower_is_better(column: str) -> bool:
    return column == "loss" or column.startswith("ppl_")


# ------------------------------------------------------------------- rows
def collect(plan: Plan, status: dict) -> dict[str, dict]:
    """run name -> {"values", "stds"} for every evaluated run."""
    rows = {}
    for run in plan.runs:
        entry = status.get("runs", {}).get(run.name, {})
        if entry.get("status") == "complete" and entry.get("eval"):
            rows[run.name] = entry["eval"]
    return rows


def columns_of(rows: dict[str, dict]) -> list[str]:
    seen: dict[str, None] = {}
    for row in rows.values():
        for key in row["values"]:
            seen.setdefault(key, None)
    order = lambda c: (0 if c == "loss" else 1 if c.startswith("ppl_") else 3 if c == "acc_avg" else 2)
    return sorted(seen, key=lambda c: (order(c), list(seen).index(c)))


def delta(base: dict, other: dict, column: str, advantage_of_other: bool) -> tuple[float, bool] | None:
    """Δ on `column` as the advantage of `other` over `base` (or of base over other); within-std flag."""
    if column not in base["values"] or column not in other["values"]:
        return None
    a, b = base["values"][column], other["values"][column]
    gain = (a - b) if lower_is_better(column) else (b - a)  # other's advantage
    value = gain if advantage_of_other else -gain
    std = max(base["stds"].get(column, 0.0), other["stds"].get(column, 0.0))
    return value, std > 0 and abs(value) <= std


# ----------------------------------------------------------------- tables
class Table:
    def __init__(self, title: str, columns: list[str]):
        self.title, self.columns, self.rows = title, columns, []

    def add(self, group: str, label: str, cells: dict[str, str]) -> None:
        self.rows.append((group, label, cells))

    def markdown(self) -> str:
        head = ["variant", "run", *self.columns]
        out = [f"### {self.title}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for group, label, cells in self.rows:
            out.append("| " + " | ".join([group, label] + [cells.get(c, "") for c in self.columns]) + " |")
        return "\n".join(out) + "\n"

    def csv(self) -> str:
        buf = io.StringIO()
        writer = csv.writer(buf)
        writer.writerow(["variant", "run", *self.columns])
        for group, label, cells in self.rows:
            writer.writerow([group, label] + [cells.get(c, "") for c in self.columns])
        return buf.getvalue()


def _cells(row: dict, columns: list[str]) -> dict[str, str]:
    return {c: _fmt(c, row["values"][c]) for c in columns if c in row["values"]}


def _delta_cells(base: dict, other: dict, columns: list[str], advantage_of_other: bool) -> dict[str, str]:
    cells = {}
    for c in columns:
        d = delta(base, other, c, advantage_of_other)
        if d is not None:
            cells[c] = ("~" if d[1] else "") + _fmt(c, d[0], signed=True)
    return cells


def _fmt(column: str, value: float, signed: bool = False) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    digits = 2 if column != "loss" else 3
    return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"


def _find(plan: Plan, rows: dict, **match) -> tuple[Run, dict] | tuple[None, None]:
    for run in plan.runs:
        if all(getattr(run, k) == v if k != "baseline" else run.extra.get("baseline") == v
               for k, v in match.items()) and run.name in rows and run.seed == plan_first_seed(plan):
            return run, rows[run.name]
    return None, None


def plan_first_seed(plan: Plan) -> int:
    return min((r.seed for r in plan.runs), default=0)


def prune_vs_scratch(plan: Plan, rows: dict, columns: list[str]) -> Table:
    table = Table("Pruning + retraining vs. training from scratch (paper Tables 2/16; Δ = scratch's advantage)",
                  columns)
    parent = plan.runs[0].name
    for variant in _variants(plan):
        for n in plan.retrain_tokens:
            _, p = _find(plan, rows, kind="retrain", variant=variant, parent=parent, nominal=n)
            if p is None:
                continue
            table.add(variant.label, f"{parent}-R{fmt_tokens(n)}", _cells(p, columns))
            for baseline, tokens in (("S_N", n), ("S_M+N", plan.pretrain_tokens + n)):
                run, s = _find(plan, rows, kind="scratch", variant=variant, baseline=baseline, nominal=tokens)
                if s is None:
                    continue
                name = f"S{fmt_tokens(tokens)}"
                table.add(variant.label, name, _cells(s, columns))
                table.add(variant.label, f"Δ {name} over {parent}-R{fmt_tokens(n)}",
                          _delta_cells(p, s, columns, advantage_of_other=True))
    return table


def token_scaling(plan: Plan, rows: dict, columns: list[str]) -> Table:
    table = Table("Retraining-token scaling (paper Tables 12-15; Δ = pruned run's advantage)", columns)
    parents = [r.name for r in plan.runs if r.kind in ("pretrain", "import")]
    for variant in _variants(plan):
        for n in plan.retrain_tokens:
            _, s = _find(plan, rows, kind="scratch", variant=variant, baseline="S_N", nominal=n)
            if s is None:
                continue
            table.add(variant.label, f"S{fmt_tokens(n)}", _cells(s, columns))
            for parent in parents:
                _, p = _find(plan, rows, kind="retrain", variant=variant, parent=parent, nominal=n)
                if p is None:
                    continue
                label = f"{parent}-R{fmt_tokens(n)}"
                table.add(variant.label, label, _cells(p, columns))
                table.add(variant.label, f"Δ {label} vs S{fmt_tokens(n)}",
                          _delta_cells(s, p, columns, advantage_of_other=True))
    return table


def ratio_ablation(plan: Plan, rows: dict, columns: list[str]) -> Table:
    table = Table("Pruning-ratio ablation (paper Table 11; Δ = pruned run's advantage)", columns)
    by_method = defaultdict(list)
    for variant in _variants(plan):
        by_method[(variant.method, variant.pattern)].append(variant)
    parent = plan.runs[0].name
    for variants in by_method.values():
        if len({v.ratio for v in variants}) < 2:
            continue
        for variant in sorted(variants, key=lambda v: v.ratio):
            for n in plan.retrain_tokens:
                _, s = _find(plan, rows, kind="scratch", variant=variant, baseline="S_N", nominal=n)
                _, p = _find(plan, rows, kind="retrain", variant=variant, parent=parent, nominal=n)
                if s is None or p is None:
                    continue
                group = f"{variant.label} {100 * variant.ratio:g}%"
                table.add(group, f"S{fmt_tokens(n)}", _cells(s, columns))
                table.add(group, f"{parent}-R{fmt_tokens(n)}", _cells(p, columns))
                table.add(group, "Δ", _delta_cells(s, p, columns, advantage_of_other=True))
    return table


def after_pruning(plan: Plan, rows: dict, columns: list[str]) -> Table:
    table = Table("Right after pruning, before retraining (paper Table 10)", columns)
    for parent in (r for r in plan.runs if r.kind in ("pretrain", "import")):
        if parent.name in rows:
            table.add(parent.name, "unpruned", _cells(rows[parent.name], columns))
        for run in plan.runs:
            if run.kind == "prune" and run.parent == parent.name and run.name in rows:
                table.add(parent.name, run.variant.label + f" {100 * run.variant.ratio:g}%",
                          _cells(rows[run.name], columns))
    return table


def _variants(plan: Plan):
    seen = {}
    for run in plan.runs:
        if run.variant is not None:
            seen.setdefault(run.variant.id, run.variant)
    return list(seen.values())


# ---------------------------------------------------------------- figures
def figures(plan: Plan, rows: dict, out: Path) -> list[Path]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    parent = plan.runs[0].name
    metric = "acc_avg" if any("acc_avg" in r["values"] for r in rows.values()) else "loss"
    # Figures 1/5: per variant, P-R_N vs S_N vs S_{M+N} at the largest common N.
    labels, groups = [], defaultdict(list)
    for variant in _variants(plan):
        n = max(plan.retrain_tokens)
        for n in sorted(plan.retrain_tokens, reverse=True):
            if _find(plan, rows, kind="retrain", variant=variant, parent=parent, nominal=n)[1] is not None:
                break
        trio = [_find(plan, rows, kind="retrain", variant=variant, parent=parent, nominal=n)[1],
                _find(plan, rows, kind="scratch", variant=variant, baseline="S_N", nominal=n)[1],
                _find(plan, rows, kind="scratch", variant=variant, baseline="S_M+N",
                      nominal=plan.pretrain_tokens + n)[1]]
        if trio[0] is None:
            continue
        labels.append(f"{variant.label}\n{100 * variant.ratio:g}% R{fmt_tokens(n)}")
        for key, row in zip(("P-R_N", "S_N", "S_M+N"), trio):
            groups[key].append(row["values"].get(metric, math.nan) if row else math.nan)
    if labels:
        fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(labels)), 4))
        width = 0.27
        for i, (key, color) in enumerate((("P-R_N", "#8e6bbf"), ("S_N", "#2b5d9c"), ("S_M+N", "#7fb3e6"))):
            ax.bar([x + (i - 1) * width for x in range(len(labels))], groups[key], width, label=key, color=color)
        ax.set_xticks(range(len(labels)), labels, fontsize=8)
        ax.set_ylabel(_axis_label(metric))
        ax.set_title("Pruning + retraining vs. scratch (equal training tokens, equal total tokens)")
        ax.legend()
        written += _save(fig, out / "fig_prune_vs_scratch")
        plt.close(fig)
    # Figure 3: metric vs retraining tokens N, per variant with more than one N.
    for variant in _variants(plan):
        series = defaultdict(list)
        for n in plan.retrain_tokens:
            for key, (kind, extra) in {"S_N": ("scratch", {"baseline": "S_N", "tokens": n}),
                                       **{f"{p.name}-R_N": ("retrain", {"parent": p.name, "tokens": n})
                                          for p in plan.runs if p.kind in ("pretrain", "import")}}.items():
                row = _find(plan, rows, kind=kind, variant=variant, **extra)[1]
                if row is not None and metric in row["values"]:
                    series[key].append((n, row["values"][metric]))
        if max((len(v) for v in series.values()), default=0) < 2:
            continue
        fig, ax = plt.subplots(figsize=(5, 3.5))
        for key, points in series.items():
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=key)
        ax.set_xscale("log")
        ax.set_xlabel("retraining tokens N")
        ax.set_ylabel(_axis_label(metric))
        ax.set_title(f"{variant.label} {100 * variant.ratio:g}%")
        ax.legend()
        written += _save(fig, out / f"fig_token_scaling_{variant.id}")
        plt.close(fig)
    return written


def _axis_label(metric: str) -> str:
    return "average accuracy (%)" if metric == "acc_avg" else "validation loss"


def _save(fig, stem: Path) -> list[Path]:
    fig.tight_layout()
    paths = [stem.with_suffix(".png"), stem.with_suffix(".svg")]
    for path in paths:
        fig.savefig(path, dpi=130)
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
    from maxprune.study.runner import make_plan
    root = Path(root)
    plan = plan or make_plan(cfg)
    tables, rows = build_tables(plan, read_status(root))
    out = root / "report"
    tmp = staging_dir(out)  # written whole, then renamed: a killed report never looks complete
    written = []
    markdown = [f"# Study {cfg.study.name}", ""]
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
