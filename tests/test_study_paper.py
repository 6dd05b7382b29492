"""The paper study's plan carries each method's paper settings: Table 1 shapes, Appendix D.2 calibration,
Sheared LLaMA's schedule, one S250 per method, KD variants, and `study plan --show/--resolved`."""

import csv
import subprocess
import sys
from pathlib import Path

import pytest

from maxprune.errors import MaxpruneError
from maxprune.model.arch import preset
from maxprune.schema import load_config
from maxprune.study import plan as plan_lib

B = 10**9
TABLE1 = Path(__file__).parents[1] / "maxprune" / "study" / "paper_tables" / "table01_architectures.csv"
SMOL = dict(vocab_size=49152, hidden_size=576, num_layers=30, num_heads=9, num_kv_heads=3, head_dim=64,
            ffn_size=1536, tie_embeddings=True, rope_scaling=None, rope_theta=1e5)


@pytest.fixture(scope="module")
def paper_plan():
    cfg = load_config("configs/study/paper.py", ["--config.data.train=gs://bucket/dclm-llama3-8192"])
    return plan_lib.plan_study(cfg, preset("llama3.1-8b"), 8192)


def _table1():
    with open(TABLE1) as f:
        return [row for row in csv.DictReader(f) if row["method"] != "base"]


def test_every_prune_run_has_table1_shape(paper_plan):
    prunes = [r for r in paper_plan.runs if r.kind == "prune"]
    checked = set()
    for row in _table1():
        ratio = float(row["pruning_ratio"])
        matching = [r for r in prunes if r.variant.method == row["method"] and abs(r.variant.ratio - ratio) < 1e-3]
        assert matching, row
        for run in matching:
            a = run.arch
            assert (a.num_layers, a.num_heads, a.hidden_size, a.ffn_size) == (
                int(row["num_layers"]), int(row["num_attention_heads"]), int(row["hidden_size"]),
                int(row["ffn_size"])), run.name
            assert run.sparsity == float(row["sparsity"])
            assert run.extra["config"].prune.paper_shapes
            checked.add(run.name)
    assert checked == {r.name for r in prunes}  # every prune run is a Table 1 row


def test_calibration_follows_appendix_d2(paper_plan):
    wikitext = "hf:Salesforce/wikitext?config=wikitext-103-raw-v1&split=train"
    c4 = "hf:allenai/c4?config=en&streaming=true&split=train"
    for run in (r for r in paper_plan.runs if r.kind == "prune"):
        p = run.extra["config"].prune
        method = run.variant.method
        if method.startswith("minitron"):
            assert (p.calibration, p.n_samples, p.calibration_sampling) == (wikitext, 1024, "stream")
            assert run.extra["calibration_tokens"] == 1024 * 8192
        elif method == "sheared_llama":
            assert p.calibration == "gs://bucket/dclm-llama3-8192"  # the training data (data.train)
            s = p.sheared_llama
            assert (s.global_batch, p.seq_len, int(s.tokens)) == (32, 4096, 3200 * 32 * 4096)
            assert (s.lagrangian_warmup, s.remat, s.lr, s.mask_lr, s.lambda_lr) == (320, "full", 1e-4, 1.0, -1.0)
            assert run.extra["mask_learning_tokens"] == 3200 * 32 * 4096
        else:
            assert (p.calibration, p.n_samples, p.calibration_sampling) == (c4, 128, "random")
            assert run.extra["calibration_tokens"] == 128 * 8192
    flap = paper_plan["P200B.prune.flap-r50"].extra["config"].prune.flap
    assert (flap.structure, flap.metric) == ("UL-MM", "WIFV")


def test_one_s250_per_method_serves_both_tables(paper_plan):
    for variant in ("minitron_depth-r50", "minitron_width-r50", "flap-r50", "sheared_llama-r50"):
        s250 = paper_plan[f"S250B.{variant}"]
        assert set(s250.extra["roles"]) == {("S_N", 250 * B), ("S_M+N", 50 * B)}
        assert s250.data_range == "total_250B"  # S_{M+N} must see exactly pretrain ∪ retrain_50B
    for variant in ("wanda-u-r50", "sparsegpt-2of4-r50"):
        assert paper_plan[f"S250B-total.{variant}"].extra["roles"] == (("S_M+N", 50 * B),)


def test_merge_scratch_off_keeps_two_runs():
    cfg = load_config("configs/study/paper.py", ["--config.study.merge_scratch=False"])
    plan = plan_lib.plan_study(cfg, preset("llama3.1-8b"), 8192)
    assert plan["S250B.flap-r50"].data_range == "retrain_250B"
    assert plan["S250B-total.flap-r50"].data_range == "total_250B"


def test_method_settings_study_uses_the_study_prune_section():
    cfg = load_config("configs/study/paper.py", ["--config.study.method_settings=study"])
    plan = plan_lib.plan_study(cfg, preset("llama3.1-8b"), 8192)
    p = plan["P200B.prune.minitron_width-r50"].extra["config"].prune
    assert (p.n_samples, p.paper_shapes) == (128, False)
    assert plan["S50B.flap-r50"].arch.num_heads == 24  # the ratio's median candidate, not Table 1's 20


def test_variant_overrides_config_kd_and_calibration(tmp_path):
    own = tmp_path / "my_wanda.py"
    own.write_text("def get_config(arg=None):\n    return {'prune': {'n_samples': 64, 'batch_size': 4}}\n")
    cfg = load_config("configs/study/paper.py", ["--config.study.variants=("
                             "'flap@0.5 prune.n_samples=256 prune.flap.num_heads=24 calibration=wikitext103',"
                             "'minitron_width@0.5 retrain=50B teacher=parent',"
                             "'minitron_width@0.5 retrain=50B',"
                             f"'wanda/2:4@0.5 retrain=50B config={own} name=w24')"])
    plan = plan_lib.plan_study(cfg, preset("llama3.1-8b"), 8192)
    flap = plan["P200B.prune.flap-r50"]
    assert flap.extra["config"].prune.n_samples == 256 and flap.arch.num_heads == 24
    assert flap.extra["config"].prune.calibration.startswith("hf:Salesforce/wikitext")
    kd = plan["P200B-R50B.minitron_width-r50-kd"]
    assert kd.extra["teacher"] == "P200B" and "P200B" in kd.deps
    assert kd.deps[0] == "P200B.prune.minitron_width-r50"  # shares the prune and the scratch baselines
    assert "S50B.minitron_width-r50-kd" not in {r.name for r in plan.runs}
    own_run = plan["P200B.prune.w24"].extra["config"].prune
    assert (own_run.pattern, own_run.n_samples, own_run.batch_size, own_run.paper_shapes) == ("2:4", 64, 4, False)


@pytest.mark.parametrize("variants, match", [
    ("('flap@0.5 prune.n_samples=2', 'flap@0.5 prune.n_samples=3')", "share the name"),
    ("('flap@0.5 teacher=student',)", "teacher=student is not valid"),
    ("('flap@0.5 prune.flap.num_heads=7',)", "whole KV groups"),
    ("('flap@0.5 prune.flap.bogus=1',)", "unknown config key"),
    ("('flap@0.5 calibration=c5',)", None),
])
def test_bad_variants(variants, match):
    plan = lambda: plan_lib.plan_study(load_config("configs/study/paper.py", [
        f"--config.study.variants={variants}"]), preset("llama3.1-8b"), 8192)
    if match is None:  # an unknown corpus name is taken as a source spec
        assert plan()["P200B.prune.flap-r50"].extra["config"].prune.calibration == "c5"
        return
    with pytest.raises(MaxpruneError, match=match):
        plan()


def test_paper_settings_adapt_to_a_small_parent():
    cfg = load_config("configs/study/paper.py", ["--config.study.imported={}", "--config.study.variants=("
                             "'minitron_depth@0.5','minitron_width@0.5','flap@0.5','sheared_llama@0.5',"
                             "'wanda/2:4@0.5')"])
    plan = plan_lib.plan_study(cfg, preset("llama3.1-8b").replace(**SMOL), 256)
    for run in (r for r in plan.runs if r.kind == "prune"):
        assert run.arch.num_params(sparsity=run.sparsity) <= 0.62 * 134_515_008, run.name  # ~ half the prunable
        if run.variant.method in ("flap", "sheared_llama"):
            assert run.arch.num_heads % 3 == 0 and run.arch.num_kv_heads * 3 == run.arch.num_heads


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "maxprune", "study", "plan", "--config", "configs/study/paper.py",
                           *args], capture_output=True, text=True, timeout=300)


def test_plan_show_and_resolved():
    out = _cli("--show", "P200B.prune.flap-r50")
    assert out.returncode == 0, out.stderr
    assert "num_heads: 20" in out.stdout and "ffn_size: 6656" in out.stdout and "n_samples: 128" in out.stdout
    assert "shape: 32 layers" in out.stdout
    resolved = _cli("--resolved")
    assert resolved.returncode == 0, resolved.stderr
    lines = [line for line in resolved.stdout.splitlines() if line.startswith("P200B.prune.")]
    assert len(lines) == 14 and any("3072" in line and "9216" in line for line in lines)
    bad = _cli("--show", "nope")
    assert bad.returncode == 2 and bad.stderr.startswith("maxprune: error: no run named 'nope'")


def test_runner_executes_the_resolved_configs(tmp_path):
    from maxprune.study.runner import StudyRunner
    cfg = load_config("configs/study/paper.py", [
        "--config.data.train=/data/dclm", "--config.study.variants=('minitron_width@0.5 retrain=50B teacher=parent',"
        "'flap@0.5 retrain=50B')"])
    plan = plan_lib.plan_study(cfg, preset("llama3.1-8b"), 8192)
    runner = StudyRunner(cfg, tmp_path, plan, progress=False)
    kd = runner.run_config(plan["P200B-R50B.minitron_width-r50-kd"])
    assert kd.train.teacher == str(tmp_path / "P200B" / "model")
    assert kd.train.init == str(tmp_path / "P200B.prune.minitron_width-r50" / "model")
    assert runner.run_config(plan["P200B-R50B.flap-r50"]).train.teacher is None
    prune = runner.run_config(plan["P200B.prune.flap-r50"])
    assert (prune.prune.input, prune.prune.output) == (str(tmp_path / "P200B" / "model"),
                                                       str(tmp_path / "P200B.prune.flap-r50" / "model"))
    assert prune.model.dtype == "float32" and prune.prune.flap.num_heads is None  # pinned at prune time
    scratch = runner.run_config(plan["S50B.flap-r50"])
    assert (scratch.model.arch.num_heads, scratch.model.arch.ffn_size, scratch.model.arch.out_bias) == (20, 6656, True)
    total = runner.run_config(plan["S250B-total.flap-r50"])
    assert total.data.range == "total_250B" and total.data.budgets["total_250B"] == "pretrain+retrain_50B"


def test_imported_parent_only_plans_ext_runs_and_s_n():
    cfg = load_config(None, [
        "--config.study.pretrain_tokens=0", "--config.study.retrain_tokens=('64K',)",
        "--config.study.imported.Smol=/models/smol", "--config.study.method_settings=study",
        "--config.study.variants=('flap@0.5 parents=Smol', 'wanda/2:4@0.5 parents=Smol')"])
    plan = plan_lib.plan_study(cfg, preset("llama3.1-8b").replace(**SMOL), 32)
    assert {r.kind for r in plan.runs} == {"import", "prune", "retrain", "scratch"}
    assert {r.name for r in plan.runs if r.kind == "scratch"} == {"S64K.flap-r50", "S64K.wanda-2of4-r50"}
    assert plan["Smol-R64K.flap-r50"].data_range == plan["S64K.flap-r50"].data_range == "retrain_64K"
    assert plan.budgets == {"retrain_64K": "0:64000"}
    bad = load_config(None, ["--config.study.pretrain_tokens=0", "--config.study.imported.Smol=/m",
                                    "--config.study.variants=('flap@0.5',)"])
    with pytest.raises(MaxpruneError, match="prunes parent P, but study.pretrain_tokens=0"):
        plan_lib.plan_study(bad, preset("tiny"), 32)
