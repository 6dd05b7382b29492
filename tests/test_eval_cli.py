"""`maxprune eval`: a tiny model through all eight offline tasks (a subset of each) and perplexity into
metrics.json; comparisons; user mistakes exit 2 with one line.

The full run (every document of every task) is the same command without --limit:
    maxprune eval MODEL_DIR --config configs/eval/offline.py
"""

import json
import math

import pytest
from eval_helpers import make_model_dir
from test_cli import assert_user_error

from maxprune.cli import main
from maxprune.eval import summary
from maxprune.eval.tasks import PAPER_TASK_NAMES

LIMIT = 4


@pytest.fixture(scope="module")
def evaluated(tiny_corpus, tmp_path_factory):
    """One `maxprune eval` run of a tiny model: all eight tasks (first LIMIT docs), one corpus, val loss."""
    root = tmp_path_factory.mktemp("eval_cli")
    docs = [(tiny_corpus["root"] / "validation" / f"{i:04d}.txt").read_text() for i in range(20)]
    (root / "docs.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    model_dir = make_model_dir(root / "model", tiny_corpus["root"] / "tokenizer")
    argv = ["eval", str(model_dir), "--config", "configs/eval/offline.py", "--limit", str(LIMIT),
            "--perplexity", f"local=jsonl:{root / 'docs.jsonl'}", "--config.eval.perplexity.seq_len=64",
            "--config.eval.perplexity.n_seqs=4", f"--config.eval.validation={tiny_corpus['validation']}",
            "--config.eval.validation_sequences=8", "--config.eval.max_length=1024",
            "--config.eval.batch_size=8", "--no-progress"]
    assert main(argv) == 0
    return {"root": root, "model_dir": model_dir, "argv": argv,
            "metrics": json.loads((model_dir / "metrics.json").read_text())}


def test_metrics_hold_every_number(evaluated):
    m = evaluated["metrics"]
    assert list(m["tasks"]) == list(PAPER_TASK_NAMES)
    for name, r in m["tasks"].items():
        assert r["n"] == LIMIT and r["split"] == "validation" and r["task"] == f"{name}_offline"
        assert 0 <= r["value"] <= 1 and r["value"] == r[r["metric"]]
        assert r["std"] == pytest.approx(math.sqrt(r["value"] * (1 - r["value"]) / LIMIT))
        assert ("acc_norm" in r) == (name not in ("winogrande", "boolq"))
    average = m["average"]
    assert average["complete"] and average["value"] == pytest.approx(
        sum(100 * r["value"] for r in m["tasks"].values()) / 8)
    local = m["perplexity"]["local"]
    assert local["sequences"] == 4 and local["tokens"] == 4 * 63 and local["ppl"] > 1
    assert m["validation"]["sequences"] == 8 and m["validation"]["loss"] > 0
    assert m["config"]["limit"] == LIMIT and m["config"]["tasks"] == list(PAPER_TASK_NAMES)
    assert m["tasks_info"]["max_length"] == 1024  # longer BoolQ passages are left-truncated, as in hf
    assert m["tasks_info"]["compilations"] <= 2 * len(m["tasks_info"]["buckets"])
    assert m["model"]["tokenizer"]["vocab_size"] == 300
    protocol = m["protocol"]  # which protocol the numbers follow, in one place
    assert protocol["name"] == "offline" and protocol["tasks"]["source"] == "offline"
    assert protocol["perplexity"]["split"] == "test" and protocol["validation"].endswith("validation_ds")


def test_protocol_names_the_papers():
    from maxprune.schema import load_config
    paper = load_config("configs/study/paper.py").eval
    assert summary.protocol(paper, "/data/dclm-val")["name"] == "paper"
    assert summary.protocol(paper, None)["name"] == "custom"  # no validation loss: not the paper's protocol
    offline = load_config("configs/eval/offline.py").eval
    assert summary.protocol(offline, None)["name"] == "offline"


def test_existing_metrics_need_overwrite(evaluated, capsys):
    assert_user_error(capsys, evaluated["argv"], "metrics.json exists; pass --overwrite")


def test_compare_marks_deltas_within_std(evaluated, tmp_path, capsys):
    other = json.loads(json.dumps(evaluated["metrics"]))
    other["tasks"]["piqa"]["value"] += 0.01  # well within PIQA's std on 4 docs
    other["tasks"]["boolq"]["value"] = other["tasks"]["boolq"]["value"] + 1.0  # far outside it
    other["perplexity"]["local"]["ppl"] *= 2
    (tmp_path / "metrics.json").write_text(json.dumps(other))
    assert main(["eval", "--compare", str(evaluated["model_dir"]), str(tmp_path / "metrics.json")]) == 0
    out = capsys.readouterr().out
    lines = {line.split("  ")[0]: line for line in out.splitlines()}
    assert "+1.0 ~" in lines["PIQA (acc_norm)"] and "+100.0  " in lines["BoolQ (acc)"]
    assert "ppl local" in out and "Avg (8 tasks)" in out


def test_default_output_is_the_run_dir(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "run.json").write_text("{}")
    assert summary.default_output(tmp_path / "run" / "model") == tmp_path / "run" / "metrics.json"
    assert summary.default_output(tmp_path / "m") == tmp_path / "m" / "metrics.json"


def test_user_errors_exit_2(evaluated, tiny_corpus, tmp_path, capsys):
    model_dir = str(evaluated["model_dir"])
    assert_user_error(capsys, ["eval", model_dir, "--tasks", "piqa,hellaswag2"], "unknown task 'hellaswag2'")
    assert_user_error(capsys, ["eval", model_dir, "--perplexity", "c5"], "unknown perplexity corpus 'c5'")
    assert_user_error(capsys, ["eval", model_dir, "--out", str(tmp_path / "m.json"), "--perplexity", "none",
                               "--tasks", "piqa", f"--config.eval.task_data_dir={tmp_path}"],
                      "offline data for task piqa is missing")
    bare = make_model_dir(tmp_path / "bare", None)
    assert_user_error(capsys, ["eval", str(bare), "--perplexity", "none"], "has no tokenizer reference")
    assert_user_error(capsys, ["eval", "--compare", model_dir], "--compare needs at least two runs")
    assert_user_error(capsys, ["eval", model_dir, "--config.eval.task_source=web"],
                      "eval.task_source='web' is not valid")
