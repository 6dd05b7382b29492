"""The native lm-eval adapter gives lm-eval's `hf` backend's numbers on the same exported model, and
compiles at most once per length bucket."""

import os
import subprocess
import sys

import lm_eval
import pytest
from eval_helpers import QUESTIONS, make_model_dir, write_mc_task
from lm_eval.api.instance import Instance
from lm_eval.api.registry import get_model
from lm_eval.tasks import TaskManager

import maxprune.eval.lm_eval_adapter as adapter
from maxprune.convert.hf import to_hf
from maxprune.eval.loading import load_for_eval
from maxprune.eval.scoring import bucket_lengths


@pytest.fixture(scope="module")
def models(tiny_corpus, tmp_path_factory):
    root = tmp_path_factory.mktemp("eval_lm")
    model_dir = make_model_dir(root / "model", tiny_corpus["root"] / "tokenizer")
    hf_dir = to_hf(model_dir, root / "hf")
    ours = adapter.MaxpruneLM(model=load_for_eval(model_dir), batch_size=4, min_bucket=8)
    hf = get_model("hf")(pretrained=str(hf_dir), dtype="float32", add_bos_token=True, batch_size=4,
                         device="cpu")
    return {"root": root, "model_dir": model_dir, "ours": ours, "hf": hf}


def _requests(kind, args):
    return [Instance(request_type=kind, doc={}, arguments=a, idx=i) for i, a in enumerate(args)]


def test_both_models_registered_in_a_fresh_interpreter():
    """Importing the adapter first must not hide lm-eval's own models (the registration-order pitfall:
    lm-eval 0.4.13 loads its built-ins only into an empty registry)."""
    code = ("import maxprune.eval.lm_eval_adapter as a; from lm_eval.api.registry import get_model; "
            "assert get_model('maxprune') is a.MaxpruneLM; assert get_model('hf').__name__ == 'HFLM'")
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})


def test_loglikelihoods_equal_hf_backend(models):
    pairs = [(q, " " + c) for q, choices, _ in QUESTIONS for c in choices]
    # An empty context; a trailing space that moves into the continuation. (Not "the dog " + "ran far":
    # the hf backend's one-token logits cache then misreads the one-token requests on "the dog ran far",
    # an lm-eval 0.4.13 quirk; with logits_cache=False it agrees with us there too.)
    pairs += [("", "the cat sat"), ("the fire ", "sat on a warm mat")]
    ours = models["ours"].loglikelihood(_requests("loglikelihood", pairs), disable_tqdm=True)
    hf = models["hf"].loglikelihood(_requests("loglikelihood", pairs), disable_tqdm=True)
    for (ll, greedy), (hf_ll, hf_greedy) in zip(ours, hf):
        assert ll == pytest.approx(hf_ll, rel=1e-4, abs=1e-4) and greedy == hf_greedy
    # choices of one question differ clearly, so accuracies cannot flip on rounding noise
    assert min(abs(a[0] - b[0]) for a, b in zip(ours[0:4], ours[1:4])) > 1e-3


def test_rolling_and_generation_equal_hf_backend(models):
    texts = [(" ".join(QUESTIONS[i][0] for i in range(8)) * 3,), ("far away into green fields",)]
    ours = models["ours"].loglikelihood_rolling(_requests("loglikelihood_rolling", texts), disable_tqdm=True)
    hf = models["hf"].loglikelihood_rolling(_requests("loglikelihood_rolling", texts), disable_tqdm=True)
    assert ours == pytest.approx(hf, rel=1e-4)
    gen = [("the cat sat on", {"until": ["\n\n"], "max_gen_toks": 6, "do_sample": False}),
           ("then came home", {"until": ["fire"], "max_gen_toks": 12, "do_sample": False})]
    assert (models["ours"].generate_until(_requests("generate_until", gen), disable_tqdm=True)
            == models["hf"].generate_until(_requests("generate_until", gen), disable_tqdm=True))


def test_simple_evaluate_matches_hf_backend(models):
    """End to end through lm-eval on a local multiple-choice task: same per-doc scores, same accuracy."""
    task = write_mc_task(models["root"] / "tasks")
    manager = TaskManager(include_path=str(models["root"] / "tasks"), include_defaults=False)
    runs = [lm_eval.simple_evaluate(model=models[name], tasks=[task], task_manager=manager, log_samples=True)
            for name in ("ours", "hf")]
    ours, hf = (r["results"][task] for r in runs)
    assert ours["acc,none"] == hf["acc,none"] and ours["acc_norm,none"] == hf["acc_norm,none"]
    for a, b in zip(runs[0]["samples"][task], runs[1]["samples"][task]):
        assert [r[0] for r in a["filtered_resps"]] == pytest.approx([r[0] for r in b["filtered_resps"]],
                                                                    rel=1e-4, abs=1e-4)


def test_compilations_bounded_by_buckets(models):
    assert bucket_lengths(100, 8) == (8, 16, 32, 64, 100)
    assert bucket_lengths(64, 8) == (8, 16, 32, 64)
    lm = adapter.MaxpruneLM(model=models["ours"].model, batch_size=3, max_length=64, min_bucket=8)
    assert lm.scorer.rows == 8  # a multiple of the 8 batch shards
    pairs = [("the cat sat " * n, " on a mat" * (1 + n % 3)) for n in range(1, 40)]  # 39 distinct lengths
    lm.loglikelihood(_requests("loglikelihood", pairs), disable_tqdm=True)
    lengths = {len(lm.tok_encode(c + x)) for c, x in pairs}
    assert len(lengths) > 20 and lm.compile_count <= len(lm.scorer.buckets) == 4
    before = lm.compile_count
    lm.loglikelihood(_requests("loglikelihood", pairs[::-1]), disable_tqdm=True)
    assert lm.compile_count == before  # nothing new to compile


def test_model_args_string_constructs_from_path(models):
    lm = adapter.MaxpruneLM.create_from_arg_string(f"path={models['model_dir']},add_bos_token=False",
                                                   {"batch_size": "auto", "device": "cpu"})
    assert lm.tok_encode("the cat")[0] != lm.prefix_token_id and not lm.add_bos_token
    assert models["ours"].tok_encode("the cat")[0] == models["ours"].prefix_token_id


def test_a_continuation_longer_than_the_window_is_scored_on_its_tail():
    from maxprune.eval.lm_eval_adapter import _Scored
    s = _Scored.of([1, 2, 3], [10, 11, 12, 13, 14, 15], max_length=4)
    assert s.inputs.tolist() == [11, 12, 13, 14] and s.targets.tolist() == [12, 13, 14, 15]
    assert s.n_cont == 4
    s = _Scored.of([1, 2, 3, 4, 5], [10, 11], max_length=4)  # fits: the context is left-truncated
    assert s.inputs.tolist() == [3, 4, 5, 10] and s.targets.tolist() == [4, 5, 10, 11] and s.n_cont == 2
    with pytest.raises(ValueError, match="non-empty"):
        _Scored.of([1], [], max_length=4)
