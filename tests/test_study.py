"""The study: the paper grid's plan, exact data unions, the report, resuming, and bad input."""

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter

import pytest

from maxprune.data.budgets import parse_budgets
from maxprune.errors import MaxpruneError
from maxprune.model.arch import preset
from maxprune.schema import load_config, override
from maxprune.study import plan as plan_lib
from maxprune.study import report as report_lib

B = 10**9


def _paper_plan():
    cfg = load_config("configs/study/paper.py")
    return plan_lib.plan_study(cfg, preset("llama3.1-8b"), 8192)


def test_paper_grid_has_exactly_the_papers_runs():
    plan = _paper_plan()
    kinds = Counter(r.kind for r in plan.runs)
    # P200 + Meta; 4 structured x 2 parents + 4 sparse x 2 parents + 6 ablation prunes;
    # retrain: 4 x 5 N x 2 parents + 4 sparse + 6 ablation; scratch: 4 x 5 S_N (S250 is also S_{M+N} of
    # N=50B, one run as in the paper) + 4 x (S50 + S250) + 6
    assert kinds == {"pretrain": 1, "import": 1, "prune": 22, "retrain": 50, "scratch": 34}
    names = {r.name for r in plan.runs}
    for variant in ("minitron_depth-r50", "minitron_width-r50", "flap-r50", "sheared_llama-r50"):
        assert {f"P200B-R50B.{variant}", f"S50B.{variant}", f"S250B.{variant}"} <= names  # Tables 12-16
        assert f"S250B-total.{variant}" not in names
    for variant in ("wanda-2of4-r50", "wanda-u-r50", "sparsegpt-2of4-r50", "sparsegpt-u-r50"):
        assert {f"P200B-R50B.{variant}", f"S50B.{variant}", f"S250B-total.{variant}"} <= names  # Table 2/16
    for n in ("10B", "30B", "50B", "250B", "500B"):  # Tables 12-15
        assert {f"S{n}.flap-r50", f"P200B-R{n}.flap-r50", f"Meta-R{n}.flap-r50"} <= names
    for r in ("62.5", "75", "81.25"):  # Table 11
        assert {f"P200B-R50B.minitron_width-r{r}", f"S50B.minitron_width-r{r}"} <= names
    assert "Meta-R50B.wanda-u-r50" not in names and "Meta.prune.wanda-u-r50" in names  # Table 10 only


def test_paper_grid_budgets_and_shapes():
    plan = _paper_plan()
    step = 512 * 8192  # tokens are whole steps of the paper's global batch
    whole = lambda n: -(-n // step) * step
    assert plan["P200B"].tokens == whole(200 * B) and plan["P200B"].data_range == "pretrain"
    r50 = plan["P200B-R50B.minitron_depth-r50"]
    assert (r50.tokens, r50.data_range, r50.deps) == (whole(50 * B), "retrain_50B", ("P200B.prune.minitron_depth-r50",))
    total = plan["S250B-total.wanda-2of4-r50"]
    assert (total.tokens, total.data_range) == (whole(200 * B) + whole(50 * B), "total_250B")
    assert plan.budgets == {"pretrain": f"0:{whole(200 * B)}", "retrain_50B": f"{whole(200 * B)}:{total.tokens}",
                            **{k: v for k, v in plan.budgets.items() if k not in ("pretrain", "retrain_50B")}}
    assert plan["S50B.wanda-2of4-r50"].sparsity == 0.5
    # Table 1's shapes
    assert plan["S50B.minitron_depth-r50"].arch.num_layers == 16
    width = plan["S50B.minitron_width-r50"].arch
    assert (width.hidden_size, width.ffn_size, width.num_heads) == (3072, 9216, 32)
    flap = plan["S50B.flap-r50"].arch
    assert (flap.num_heads, flap.num_kv_heads, flap.ffn_size) == (20, 5, 6656)
    layers = {r: plan[f"S50B.minitron_depth-r{r}"].arch.num_layers for r in ("62.5", "75", "81.25")}
    assert layers == {"62.5": 8, "75": 4, "81.25": 2}  # Table 11 / Table 1


def test_scratch_total_sees_exactly_the_union():
    plan = plan_lib.plan_study(load_config(None, [
        "--config.study.pretrain_tokens=64K", "--config.study.retrain_tokens=('16K','32K')",
        "--config.study.variants=('magnitude/unstructured@0.5',)"]), preset("tiny"), 32)
    budgets = parse_budgets(plan.budgets, 200_000 // 32 * 32, 32)
    seqs = lambda name: {i for a, b in budgets.sequences(name) for i in range(a, b)}
    for n in ("16K", "32K"):
        pre, ret = seqs("pretrain"), seqs(f"retrain_{n}")
        total = seqs(plan_lib.range_name("total", 64_000 + plan_lib.parse_tokens(n)))
        assert not pre & ret and total == pre | ret
        run = plan[f"S{plan_lib.fmt_tokens(64_000 + plan_lib.parse_tokens(n))}-total.magnitude-u-r50"]
        assert run.tokens == len(total) * 32  # the S_{M+N} run consumes exactly the union
    plan_lib.check_budgets(plan, 200_000 // 32 * 32)


def _fixture_plan_and_status():
    cfg = load_config(None, [
        "--config.study.pretrain_tokens=64K", "--config.study.retrain_tokens=('16K',)",
        "--config.study.variants=('magnitude/unstructured@0.5',)"])
    plan = plan_lib.plan_study(cfg, preset("tiny"), 32)
    row = lambda loss, acc: {"values": {"loss": loss, "ppl_wiki": 2.718 ** loss, "acc_avg": acc},
                             "stds": {"acc_avg": 1.0}}
    evals = {"P64K": row(3.0, 40.0), "P64K.prune.magnitude-u-r50": row(4.0, 30.0),
             "P64K-R16K.magnitude-u-r50": row(3.2, 38.0), "S16K.magnitude-u-r50": row(3.6, 33.0),
             "S80K-total.magnitude-u-r50": row(3.1, 38.5)}
    status = {"runs": {name: {"status": "complete", "eval": e} for name, e in evals.items()}}
    return cfg, plan, status


def test_report_reproduces_fixture_numbers_in_the_papers_layout(tmp_path):
    cfg, plan, status = _fixture_plan_and_status()
    tables, _ = report_lib.build_tables(plan, status)
    main = tables[0]
    rows = {(group, label): cells for group, label, cells in main.rows}
    assert rows[("magnitude_unstructured", "P64K-R16K")]["loss"] == "3.200"
    assert rows[("magnitude_unstructured", "S16K")]["acc_avg"] == "33.00"
    # Table 16 sign: the scratch run's advantage; negative = pruning better
    assert rows[("magnitude_unstructured", "Δ S16K over P64K-R16K")]["loss"] == "-0.400"
    assert rows[("magnitude_unstructured", "Δ S16K over P64K-R16K")]["acc_avg"] == "-5.00"
    # within one std-dev (1.0) is marked like the paper's grey cells
    assert rows[("magnitude_unstructured", "Δ S80K over P64K-R16K")]["acc_avg"] == "~+0.50"
    after = {(g, l): c for g, l, c in tables[-1].rows}
    assert after[("P64K", "unpruned")]["acc_avg"] == "40.00"
    (tmp_path / "study.json").write_text(json.dumps(status))
    written = report_lib.write_report(cfg, tmp_path, plan)
    csv_text = (tmp_path / "report" / "prune_vs_scratch.csv").read_text().splitlines()
    assert csv_text[0] == "variant,run,loss,ppl_wiki,acc_avg"
    figures = [p for p in written if p.suffix in (".png", ".svg")]
    assert figures and all(p.stat().st_size > 1000 for p in figures)


def test_report_without_results_is_a_clear_error(tmp_path):
    cfg, plan, _ = _fixture_plan_and_status()
    with pytest.raises(MaxpruneError, match="no evaluated runs"):
        report_lib.write_report(cfg, tmp_path, plan)


@pytest.mark.parametrize("overrides, fragment", [
    (["--config.study.variants=('wanda/2:4@0.5',)", "--config.study.retrain_from=32K"], "overlap"),
    (["--config.study.variants=('minitron_depth/2:4@0.5',)"], "does not exist for minitron_depth"),
    (["--config.study.variants=('wanda/2:4@0.3',)"], "prunes 2/4"),
    (["--config.study.variants=('prunezilla@0.5',)"], "unknown method"),
    (["--config.study.variants=('wanda/2:4@0.5 parents=Meta',)"], "not 'P' or a key of study.imported"),
])
def test_bad_study_configs(overrides, fragment):
    with pytest.raises(MaxpruneError, match=fragment):
        cfg = load_config(None, ["--config.study.pretrain_tokens=64K",
                                        "--config.study.retrain_tokens=('16K',)", *overrides])
        plan = plan_lib.plan_study(cfg, preset("tiny"), 32)
        plan_lib.check_budgets(plan, 200_000 // 32 * 32)


def test_budget_that_does_not_fit_the_data():
    cfg = load_config(None, ["--config.study.pretrain_tokens=64K", "--config.study.retrain_tokens=('1M',)",
                                    "--config.study.variants=('wanda/2:4@0.5',)"])
    plan = plan_lib.plan_study(cfg, preset("tiny"), 32)
    with pytest.raises(MaxpruneError, match="retrain_1M"):
        plan_lib.check_budgets(plan, 200_000 // 32 * 32)


def test_second_runner_on_the_same_study_is_refused(tmp_path):
    from maxprune.study.runner import study_lock
    with study_lock(tmp_path):
        with pytest.raises(MaxpruneError, match="is in use by pid"):
            with study_lock(tmp_path):
                pass
    with study_lock(tmp_path):  # released: a later runner gets it
        pass


def test_derived_run_configs_do_not_leak_into_each_other():
    base = load_config(None)
    retrain = override(base, {"train.init": "/runs/pruned"})
    scratch = override(base, {"train.masks_from": "/runs/pruned"})
    assert (base.train.init, retrain.train.init, scratch.train.init) == (None, "/runs/pruned", None)
    assert scratch.train.masks_from == "/runs/pruned" and retrain.train.masks_from is None


def _demo(root, *extra, timeout=900):
    args = [sys.executable, "-m", "maxprune", "demo", "--root", str(root), "--quiet",
            "--config.study.pretrain_tokens=16K", "--config.study.retrain_tokens=('8K',)",
            "--config.study.variants=('magnitude/unstructured@0.5',)", "--config.eval.tasks=()",
            "--config.eval.perplexity.corpora=('builtin_wiki',)", "--config.eval.perplexity.n_seqs=2",
            "--config.eval.validation_sequences=8", "--config.train.global_batch=8", *extra]
    env = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"}
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)


def test_killed_study_resumes_without_redoing_finished_runs(tmp_path):
    root = tmp_path / "study"
    proc = _demo(root)
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:  # kill it once the parent run is done
        status = json.loads((root / "study.json").read_text()) if (root / "study.json").exists() else {}
        if status.get("runs", {}).get("P16K", {}).get("status") == "complete":
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.5)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, proc.stdout.read()[-3000:]
    done = json.loads((root / "study.json").read_text())["runs"]
    assert done["P16K"]["status"] == "complete"
    parent_metrics = (root / "P16K" / "metrics.jsonl").read_text()
    second = _demo(root)
    out, _ = second.communicate(timeout=900)
    assert second.returncode == 0, out[-3000:]
    final = json.loads((root / "study.json").read_text())["runs"]
    assert all(entry["status"] == "complete" for entry in final.values()) and len(final) == 5
    assert final["P16K"]["seconds"] == done["P16K"]["seconds"]  # not redone
    assert (root / "P16K" / "metrics.jsonl").read_text() == parent_metrics
    assert "S24K" in out and (root / "report" / "prune_vs_scratch.csv").exists()
