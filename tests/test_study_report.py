"""The study report: seed aggregation (mean ± std, Δ of means, `~` within noise), CSV layout, the roles
lookup and Figures 1, 3, 4, 5."""

import csv
import io
import json
import struct

import matplotlib.colors
import numpy as np
import pytest
from matplotlib.container import BarContainer, ErrorbarContainer

from maxprune.model.arch import preset
from maxprune.model.schema import arch_from_config
from maxprune.schema import load_config
from maxprune.study import plan as plan_lib
from maxprune.study import report as report_lib
from maxprune.study.plan import Plan, Run, Variant

B = 10**9
SEEDS = (0, 1, 2)
EVAL_STD = 1.0  # lm-eval stderr of acc_avg on every run
# per-seed offsets, uneven so that mean and std are not trivial
OFFSETS = {"retrain": {"loss": (-0.1, 0.02, 0.11), "acc_avg": (-4.0, 1.0, 3.5)},
           "scratch": {"loss": (-0.01, 0.0, 0.02), "acc_avg": (-0.3, 0.1, 0.5)}}
# (loss, acc_avg) before the seed offsets
BASE = {"P500K-R125K.minitron_depth-r50": (3.0, 34.0), "S125K.minitron_depth-r50": (3.5, 25.0),
        "S625K-total.minitron_depth-r50": (3.05, 32.0),
        "P500K-R250K.minitron_depth-r50": (2.9, 36.0), "S250K.minitron_depth-r50": (3.3, 28.0),
        "S750K-total.minitron_depth-r50": (2.95, 35.0),
        "P500K-R125K.minitron_depth-r75": (3.4, 30.0), "S125K.minitron_depth-r75": (3.6, 26.0),
        "S625K-total.minitron_depth-r75": (3.3, 31.0),
        "P500K-R250K.minitron_depth-r75": (3.3, 33.0), "S250K.minitron_depth-r75": (3.45, 29.0),
        "S750K-total.minitron_depth-r75": (3.2, 40.0)}
DROPPED = "S250K.minitron_depth-r75.s2"  # not evaluated: its group has 2 seeds
NAMES = {"minitron_depth 50%": "minitron_depth-r50", "minitron_depth 75%": "minitron_depth-r75"}


def _row(loss, acc):
    return {"values": {"loss": loss, "ppl_wiki": 10 * loss, "acc_avg": acc}, "stds": {"acc_avg": EVAL_STD}}


def _seeded_plan_and_status():
    cfg = load_config("configs/study/mini.py", [
        "--config.study.seeds=(0,1,2)", "--config.study.retrain_tokens=('125K','250K')",
        "--config.study.variants=('minitron_depth@0.5','minitron_depth@0.75')"])
    plan = plan_lib.plan_study(cfg, arch_from_config(cfg), 128)
    runs = {}
    for run in plan.runs:
        if run.kind in ("retrain", "scratch"):
            loss, acc = BASE[run.name.rsplit(".s", 1)[0]]
            off = OFFSETS[run.kind]
            e = _row(loss + off["loss"][run.seed], acc + off["acc_avg"][run.seed])
        else:
            e = _row(3.0 if run.kind == "pretrain" else 4.0, 40.0 if run.kind == "pretrain" else 20.0)
        runs[run.name] = {"status": "running" if run.name == DROPPED else "complete", "eval": e}
    return cfg, plan, {"runs": runs}


def _seed_values(status, prefix, column):
    """The evaluated seeds' values of one run group, straight from the status."""
    return np.array([e["eval"]["values"][column] for name, e in status["runs"].items()
                     if name.rsplit(".s", 1)[0] == prefix and e["status"] == "complete"])


def _prefix(group, label):
    vid = NAMES[group]
    return f"{label}.{vid}" if label.startswith("P") or label in ("S125K", "S250K") else \
        f"{label}-total.{vid}"


def _rows(table):
    return {(g, label): cells for g, label, cells in table.rows}


def test_seeded_cells_are_mean_and_sample_std_over_seeds():
    _, plan, status = _seeded_plan_and_status()
    tables, _ = report_lib.build_tables(plan, status)
    main = tables[0]
    assert main.markdown().splitlines()[2] == "| variant | run | seeds | loss | ppl_wiki | acc_avg |"
    checked = 0
    for (group, label), cells in _rows(main).items():
        if label.startswith("Δ"):
            continue
        prefix = _prefix(group, label)
        for column, digits in (("loss", 3), ("ppl_wiki", 2), ("acc_avg", 2)):
            xs = _seed_values(status, prefix, column)
            assert cells[column] == f"{xs.mean():.{digits}f} ± {xs.std(ddof=1):.{digits}f}", (prefix, column)
        assert cells["seeds"] == str(len(_seed_values(status, prefix, "loss")))
        checked += 1
    assert checked == 12  # 2 variants x 2 N x (P-R_N, S_N, S_M+N)
    assert _rows(tables[1])[("minitron_depth 75%", "S250K")]["seeds"] == "2"  # the unevaluated seed is left out


def test_delta_is_the_difference_of_means_and_tilde_counts_the_seed_spread():
    _, plan, status = _seeded_plan_and_status()
    rows = _rows(report_lib.build_tables(plan, status)[0][0])
    p = lambda c: _seed_values(status, "P500K-R125K.minitron_depth-r50", c)
    total = lambda c: _seed_values(status, "S625K-total.minitron_depth-r50", c)
    scratch = lambda c: _seed_values(status, "S125K.minitron_depth-r50", c)
    # accuracy: S_{M+N}'s Δ is outside the eval std (1.0) but inside P-R_N's seed spread -> grey
    d = total("acc_avg").mean() - p("acc_avg").mean()
    assert EVAL_STD < abs(d) <= p("acc_avg").std(ddof=1)
    assert rows[("minitron_depth 50%", "Δ S625K over P500K-R125K")]["acc_avg"] == f"~{d:+.2f}"
    # loss (no eval std at all): inside the seed spread, so marked by the seed std alone
    d = p("loss").mean() - total("loss").mean()  # lower is better: scratch's advantage
    assert abs(d) <= p("loss").std(ddof=1)
    assert rows[("minitron_depth 50%", "Δ S625K over P500K-R125K")]["loss"] == f"~{d:+.3f}"
    # S_N: well outside both spreads -> plain
    for column, digits, sign in (("loss", 3, -1), ("acc_avg", 2, 1)):
        d = sign * (scratch(column).mean() - p(column).mean())
        spread = max(p(column).std(ddof=1), scratch(column).std(ddof=1), EVAL_STD if column == "acc_avg" else 0)
        assert abs(d) > spread
        assert rows[("minitron_depth 50%", "Δ S125K over P500K-R125K")][column] == f"{d:+.{digits}f}"


def test_seeded_csv_has_mean_std_and_seeds_columns(tmp_path):
    cfg, plan, status = _seeded_plan_and_status()
    (tmp_path / "study.json").write_text(json.dumps(status))
    report_lib.write_report(cfg, tmp_path, plan)
    text = (tmp_path / "report" / "prune_vs_scratch.csv").read_text()
    reader = csv.DictReader(io.StringIO(text))
    assert reader.fieldnames == ["variant", "run", "seeds", "loss", "loss_std", "ppl_wiki", "ppl_wiki_std",
                                 "acc_avg", "acc_avg_std"]
    rows = {(r["variant"], r["run"]): r for r in reader}
    xs = _seed_values(status, "P500K-R250K.minitron_depth-r75", "acc_avg")
    row = rows[("minitron_depth 75%", "P500K-R250K")]
    assert (row["seeds"], row["acc_avg"], row["acc_avg_std"]) == ("3", f"{xs.mean():.2f}", f"{xs.std(ddof=1):.2f}")
    delta_row = rows[("minitron_depth 75%", "Δ S750K over P500K-R250K")]
    assert delta_row["seeds"] == delta_row["acc_avg_std"] == "" and delta_row["acc_avg"].startswith("+")
    after = (tmp_path / "report" / "after_pruning.csv").read_text().splitlines()
    assert after[0] == "variant,run,loss,ppl_wiki,acc_avg"  # pruned models are never repeated per seed
    header = (tmp_path / "report" / "report.md").read_text().splitlines()[2]
    assert "`~`" in header and "seed std-dev" in header and "mean ± sample std-dev" in header


def _single_seed_fixture():
    cfg = load_config(None, [
        "--config.study.pretrain_tokens=64K", "--config.study.retrain_tokens=('16K',)",
        "--config.study.variants=('magnitude/unstructured@0.5',)"])
    plan = plan_lib.plan_study(cfg, preset("tiny"), 32)
    row = lambda loss, acc: {"values": {"loss": loss, "acc_avg": acc}, "stds": {"acc_avg": 1.0}}
    evals = {"P64K": row(3.0, 40.0), "P64K.prune.magnitude-u-r50": row(4.0, 30.0),
             "P64K-R16K.magnitude-u-r50": row(3.2, 38.0), "S16K.magnitude-u-r50": row(3.6, 33.0),
             "S80K-total.magnitude-u-r50": row(3.1, 38.5)}
    return cfg, plan, {"runs": {name: {"status": "complete", "eval": e} for name, e in evals.items()}}


def test_single_seed_tables_keep_their_form(tmp_path):
    cfg, plan, status = _single_seed_fixture()
    assert report_lib.build_tables(plan, status)[0][0].markdown() == (
        "### Pruning + retraining vs. training from scratch (paper Tables 2/16; Δ = scratch's advantage)\n\n"
        "| variant | run | loss | acc_avg |\n|---|---|---|---|\n"
        "| magnitude_unstructured | P64K-R16K | 3.200 | 38.00 |\n"
        "| magnitude_unstructured | S16K | 3.600 | 33.00 |\n"
        "| magnitude_unstructured | Δ S16K over P64K-R16K | -0.400 | -5.00 |\n"
        "| magnitude_unstructured | S80K | 3.100 | 38.50 |\n"
        "| magnitude_unstructured | Δ S80K over P64K-R16K | +0.100 | ~+0.50 |\n")
    (tmp_path / "study.json").write_text(json.dumps(status))
    written = report_lib.write_report(cfg, tmp_path, plan)
    assert (tmp_path / "report" / "prune_vs_scratch.csv").read_text().splitlines()[:2] == [
        "variant,run,loss,acc_avg", "magnitude_unstructured,P64K-R16K,3.200,38.00"]
    assert "±" not in (tmp_path / "report" / "report.md").read_text()
    # one ratio and one N: no Figure 3 or 4
    assert sorted(p.name for p in written if p.suffix == ".png") == ["fig_equal_total.png",
                                                                    "fig_prune_vs_scratch.png"]


def _png_size(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


def test_figures_1_3_4_5_are_written_with_the_right_content(tmp_path, monkeypatch):
    cfg, plan, status = _seeded_plan_and_status()
    (tmp_path / "study.json").write_text(json.dumps(status))
    drawn = {}
    save = report_lib._save

    def record(plt, fig, stem):  # per panel: its y label, bar groups and error-bar lines
        drawn[stem.name] = [(ax.get_ylabel(), [c for c in ax.containers if isinstance(c, BarContainer)],
                             [c for c in ax.containers if isinstance(c, ErrorbarContainer)]) for ax in fig.axes]
        return save(plt, fig, stem)

    monkeypatch.setattr(report_lib, "_save", record)
    written = report_lib.write_report(cfg, tmp_path, plan)
    stems = ["fig_prune_vs_scratch", "fig_token_scaling_minitron_depth-r50", "fig_token_scaling_minitron_depth-r75",
             "fig_gain_vs_size", "fig_equal_total"]
    assert sorted(p.name for p in written if p.suffix in (".png", ".svg")) == sorted(
        f"{s}{ext}" for s in stems for ext in (".png", ".svg"))
    for stem in stems:
        png, svg = tmp_path / "report" / f"{stem}.png", tmp_path / "report" / f"{stem}.svg"
        width, height = _png_size(png)
        assert width >= 500 and height >= 400 and png.stat().st_size > 10_000
        assert svg.read_text().lstrip().startswith("<?xml") and "<svg" in svg.read_text()[:2000]

    # Figure 1: three bar groups with seed error bars
    (_, bars, _), = drawn["fig_prune_vs_scratch"]
    assert len(bars) == 3 and all(b.errorbar is not None for b in bars)
    # Figure 3: a loss panel and an accuracy panel, S_N and P-R_N over both N
    panels = drawn["fig_token_scaling_minitron_depth-r50"]
    assert [label for label, *_ in panels] == ["validation loss", "average accuracy (%)"]
    line = panels[1][2][1].lines[0]  # P500K-R_N on the accuracy panel
    expected = [_seed_values(status, f"P500K-R{n}.minitron_depth-r50", "acc_avg").mean() for n in ("125K", "250K")]
    np.testing.assert_allclose(np.asarray(line.get_xdata(), float), [125_000, 250_000])
    np.testing.assert_allclose(np.asarray(line.get_ydata(), float), expected)
    # Figure 4: per N, the pruned run's advantage over S_N against the pruned parameter count
    (loss_label, _, loss_lines), (_, _, acc_lines) = drawn["fig_gain_vs_size"]
    assert "validation loss" in loss_label and len(acc_lines) == 2
    sizes = [plan[f"P500K-R125K.minitron_depth-r{r}.s0"].arch.num_params() for r in (50, 75)]
    gain = [_seed_values(status, f"P500K-R125K.minitron_depth-r{r}", "acc_avg").mean()
            - _seed_values(status, f"S125K.minitron_depth-r{r}", "acc_avg").mean() for r in (50, 75)]
    np.testing.assert_allclose(np.asarray(acc_lines[0].lines[0].get_xdata(), float), sizes)
    np.testing.assert_allclose(np.asarray(acc_lines[0].lines[0].get_ydata(), float), gain)
    loss_gain = [_seed_values(status, f"S125K.minitron_depth-r{r}", "loss").mean()
                 - _seed_values(status, f"P500K-R125K.minitron_depth-r{r}", "loss").mean() for r in (50, 75)]
    np.testing.assert_allclose(np.asarray(loss_lines[0].lines[0].get_ydata(), float), loss_gain)
    assert sizes[0] > sizes[1]
    # Figure 5: Δ(S_{M+N} over P-R_N) at N=250K, grey inside the noise, scratch's colour where scratch is better
    (_, top, _), (_, bottom, _) = drawn["fig_equal_total"]
    heights = [patch.get_height() for patch in bottom[0].patches]
    for r, height in zip((50, 75), heights):
        p = _seed_values(status, f"P500K-R250K.minitron_depth-r{r}", "acc_avg")
        s = _seed_values(status, f"S750K-total.minitron_depth-r{r}", "acc_avg")
        assert height == pytest.approx(s.mean() - p.mean())
    colors = [patch.get_facecolor() for patch in bottom[0].patches]
    assert abs(heights[0]) < _seed_values(status, "P500K-R250K.minitron_depth-r50", "acc_avg").std(ddof=1)
    assert colors[0] == matplotlib.colors.to_rgba(report_lib.COLORS["within"])
    assert heights[1] > 5 and colors[1] == matplotlib.colors.to_rgba(report_lib.COLORS["S_M+N"])
    assert len(top) == 2


def _hand_plan():
    """S250B serves as S_N of N=250B and S_{M+N} of N=50B (one run, the paper's S250)."""
    v = Variant("minitron_depth", 0.5)
    runs = [Run("P200B", "pretrain", None, 0, "pretrain", (), nominal=200 * B),
            Run("P200B-R50B.x", "retrain", None, 0, None, (), v, "P200B", nominal=50 * B),
            Run("P200B-R250B.x", "retrain", None, 0, None, (), v, "P200B", nominal=250 * B),
            Run("S50B.x", "scratch", None, 0, None, (), v, extra={"baseline": "S_N", "retrain_tokens": 50 * B},
                nominal=50 * B),
            Run("S250B.x", "scratch", None, 0, None, (), v, extra={"roles": (("S_N", 250e9), ("S_M+N", 50e9))},
                nominal=250 * B)]
    return v, Plan(runs, 200 * B, (50 * B, 250 * B), {}, 8192)


def test_one_scratch_run_can_serve_two_baselines():
    v, plan = _hand_plan()
    names = lambda baseline, n: [r.name for r in report_lib.scratch_runs(plan, v, baseline, n)]
    assert names("S_N", 250 * B) == names("S_M+N", 50 * B) == ["S250B.x"]
    assert names("S_N", 50 * B) == ["S50B.x"]  # the older extra["baseline"] layout
    assert names("S_M+N", 250 * B) == []
    assert [r.name for r in report_lib.retrain_runs(plan, v, "P200B", 250 * B)] == ["P200B-R250B.x"]
    row = lambda loss: {"status": "complete", "eval": {"values": {"loss": loss}, "stds": {}}}
    status = {"runs": {"P200B-R50B.x": row(2.5), "P200B-R250B.x": row(2.2), "S50B.x": row(2.9),
                       "S250B.x": row(2.4)}}
    main, scaling = report_lib.build_tables(plan, status)[0][:2]
    assert [label for _, label, _ in main.rows] == [
        "P200B-R50B", "S50B", "Δ S50B over P200B-R50B", "S250B", "Δ S250B over P200B-R50B",
        "P200B-R250B", "S250B", "Δ S250B over P200B-R250B"]
    assert _rows(main)[("minitron_depth", "Δ S250B over P200B-R50B")]["loss"] == "+0.100"
    assert _rows(scaling)[("minitron_depth", "Δ P200B-R250B vs S250B")]["loss"] == "+0.200"
