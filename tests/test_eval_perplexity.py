"""Perplexity and validation loss: the stream and windows as documented, and the numbers equal an
independent transformers computation on the exported model."""

import json
import math

import jax
import numpy as np
import pytest
import torch
from eval_helpers import make_model_dir
from transformers import AutoTokenizer, LlamaForCausalLM

from maxprune.convert.hf import to_hf
from maxprune.errors import MaxpruneError
from maxprune.eval import perplexity as ppl_lib
from maxprune.eval.loading import load_for_eval
from maxprune.model import masks as masks_lib


@pytest.fixture(scope="module")
def setup(tiny_corpus, tmp_path_factory):
    root = tmp_path_factory.mktemp("eval_ppl")
    docs = [(tiny_corpus["root"] / "validation" / f"{i:04d}.txt").read_text() for i in range(50)]
    (root / "docs.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    model_dir = make_model_dir(root / "model", tiny_corpus["root"] / "tokenizer")
    return {"root": root, "docs": docs, "model_dir": model_dir, "source": f"local=jsonl:{root / 'docs.jsonl'}"}


def test_stream_has_one_bos_and_joins_documents(tiny_corpus):
    tok = tiny_corpus["tokenizer"]
    docs = ["the cat sat", "on a mat", "far away"]
    stream, n_docs = ppl_lib.token_stream(iter(docs), tok, 10_000)
    assert n_docs == 3 and stream[0] == tok.bos_id and list(stream).count(tok.bos_id) == 1
    assert tok.decode(stream[1:]) == "the cat sat\n\non a mat\n\nfar away"
    eos_stream, _ = ppl_lib.token_stream(iter(docs), tok, 10_000, join="eos")
    assert list(eos_stream).count(tok.eos_id) == 2
    cut, read = ppl_lib.token_stream(iter(docs * 100), tok, 7)
    assert len(cut) == 7 and read < 300  # stops reading once long enough
    windows = ppl_lib.windows(np.arange(25), 8, 256)
    assert windows.shape == (3, 8) and windows[2, 0] == 16  # non-overlapping; tail dropped


def _hf_perplexity(hf_dir, docs, seq_len, n_seqs):
    """The documented protocol, written independently: HF tokenizer + torch cross-entropy."""
    hf_tok = AutoTokenizer.from_pretrained(hf_dir)
    ids = [hf_tok.bos_token_id]
    for i, doc in enumerate(docs):
        ids += hf_tok.encode(doc if i == 0 else "\n\n" + doc, add_special_tokens=False)
    n = min(n_seqs, len(ids) // seq_len)
    batch = torch.tensor(ids[:n * seq_len]).view(n, seq_len)
    model = LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(batch).logits[:, :-1]
    nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
    return math.exp(float(nll)), n * (seq_len - 1)


def test_perplexity_equals_transformers_on_export(setup, tmp_path):
    hf_dir = to_hf(setup["model_dir"], tmp_path / "hf")
    result = ppl_lib.perplexity(load_for_eval(setup["model_dir"]), setup["source"], seq_len=64, n_seqs=10,
                                batch_size=4, progress=False)
    expected, tokens = _hf_perplexity(hf_dir, setup["docs"], 64, 10)
    assert result["sequences"] == 10 and result["tokens"] == tokens == 630
    assert result["ppl"] == pytest.approx(expected, rel=1e-4)


def test_masked_model_equals_export_with_masks_baked_in(setup, tmp_path):
    """Sparse models: the forward multiplies by the masks; the export zeroes the weights."""
    from eval_helpers import tiny_arch
    from hf_helpers import random_params
    params = random_params(tiny_arch(), 0)
    rng = np.random.default_rng(0)
    masks = {"layers": {"mlp": {name: rng.random(params["layers"]["mlp"][name]["kernel"].shape) > 0.5
                                for name in ("gate", "up", "down")}}}
    masks = {"layers": {"mlp": {k: {"kernel": v} for k, v in masks["layers"]["mlp"].items()}}}
    masks_lib.validate_masks(params, masks)
    model_dir = make_model_dir(tmp_path / "sparse", setup["model_dir"] / "tokenizer", masks=masks)
    hf_dir = to_hf(model_dir, tmp_path / "sparse_hf")
    result = ppl_lib.perplexity(load_for_eval(model_dir), setup["source"], seq_len=32, n_seqs=8,
                                batch_size=8, progress=False)
    assert result["ppl"] == pytest.approx(_hf_perplexity(hf_dir, setup["docs"], 32, 8)[0], rel=1e-4)


def test_validation_loss_equals_direct_loss(setup, tiny_corpus):
    from maxprune.data.prepared import open_prepared
    from maxprune.model import llama
    model = load_for_eval(setup["model_dir"])
    result = ppl_lib.validation_loss(model, str(tiny_corpus["validation"]), n_seqs=12, batch_size=8,
                                     progress=False)
    tokens_BL = np.stack(open_prepared(tiny_corpus["validation"]).__getitems__(range(12)))
    forward = jax.jit(lambda p, t: llama.forward(p, t, model.arch, options=llama.ModelOptions(dtype="float32")))
    logits = forward(model.model.params, tokens_BL)
    assert result["sequences"] == 12 and result["tokens"] == 12 * 31
    assert result["loss"] == pytest.approx(float(llama.next_token_loss(logits, tokens_BL)), rel=1e-5)


def test_corpora_and_errors(setup, tmp_path):
    assert ppl_lib.resolve_corpus("wikitext2", "test").source.endswith("split=test")
    assert "split=validation" in ppl_lib.resolve_corpus("c4", "test").source  # C4 has no test split
    assert "split=train" in ppl_lib.resolve_corpus("cnn_dm", "train").source
    with pytest.raises(MaxpruneError, match="unknown perplexity corpus 'c5'"):
        ppl_lib.resolve_corpus("c5")
    model = load_for_eval(setup["model_dir"])
    with pytest.raises(MaxpruneError, match="exceeds the model's max_position_embeddings=2048"):
        ppl_lib.perplexity(model, setup["source"], seq_len=4096, progress=False)
    (tmp_path / "short.jsonl").write_text('{"text": "the cat sat"}\n')
    with pytest.raises(MaxpruneError, match="fewer than eval.perplexity.seq_len=64"):
        ppl_lib.perplexity(model, f"short=jsonl:{tmp_path / 'short.jsonl'}", seq_len=64, progress=False)


def test_same_perplexity_on_any_mesh(setup):
    """Params sharded over fsdp and tensor, the batch over data x fsdp: the numbers do not move."""
    from ml_collections import ConfigDict

    from maxprune import sharding
    kwargs = dict(seq_len=32, n_seqs=16, batch_size=8, progress=False)
    default = ppl_lib.perplexity(load_for_eval(setup["model_dir"]), setup["source"], **kwargs)
    mesh = sharding.make_mesh(ConfigDict({"data": 2, "fsdp": 2, "tensor": 2}))
    model = load_for_eval(setup["model_dir"], mesh=mesh)
    assert model.model.params["lm_head"]["kernel"].sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
    assert ppl_lib.perplexity(model, setup["source"], **kwargs)["ppl"] == pytest.approx(default["ppl"], rel=1e-5)


@pytest.mark.parametrize("pack_length, batch_size", [(64, 4), (16, 2)])  # few rows; a row per tree
def test_packed_scoring_equals_scoring_each_sequence_alone(pack_length, batch_size):
    """Questions with shared contexts and 1..9-token answers, some too many to fit one row
    (trees split), a context longer than `pack_length`, and several calls."""
    from eval_helpers import tiny_arch
    from hf_helpers import random_params

    from maxprune import sharding
    from maxprune.eval.scoring import Scorer
    from maxprune.model import llama

    arch = tiny_arch()
    mesh = sharding.make_mesh(None, devices=jax.devices()[:1])
    scorer = Scorer(arch, random_params(arch, 3), None, mesh, llama.ModelOptions(dtype="float32"),
                    batch_size=batch_size, buckets=(16, 32, 64))
    rng = np.random.default_rng(1)
    seqs, tails = [], []
    for question in range(12):
        context = rng.integers(0, 300, int(rng.integers(1, 40))).astype(np.int32)
        for _ in range(int(rng.integers(1, 6))):
            answer = rng.integers(0, 300, int(rng.integers(1, 10))).astype(np.int32)
            seqs.append(np.concatenate([context, answer]))
            tails.append(len(answer))
    seqs.append(rng.integers(0, 300, 60).astype(np.int32))  # longer than pack_length=16
    tails.append(20)
    inputs, targets = [s[:-1] for s in seqs], [s[1:] for s in seqs]
    packed = scorer.score_packed(inputs, targets, tails, pack_length=pack_length)
    for x, y, t, (lp, greedy) in zip(inputs, targets, tails, packed):
        (lp_alone, greedy_alone), = scorer.score_batch([x], [y])
        assert lp.shape == greedy.shape == (t,)
        np.testing.assert_allclose(lp, lp_alone[-t:], rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(greedy, greedy_alone[-t:])


def test_packed_calls_keep_their_logits_under_the_budget(monkeypatch):
    """A tiny logits budget: calls shrink to the shard count, and the scores do not change."""
    from eval_helpers import tiny_arch
    from hf_helpers import random_params

    from maxprune import sharding
    from maxprune.eval import scoring
    from maxprune.model import llama

    arch = tiny_arch()
    mesh = sharding.make_mesh(None, devices=jax.devices()[:2])
    scorer = scoring.Scorer(arch, random_params(arch, 3), None, mesh, llama.ModelOptions(dtype="float32"),
                            batch_size=8, buckets=(32, 64))
    rng = np.random.default_rng(4)
    seqs = [rng.integers(0, 300, int(n)).astype(np.int32) for n in rng.integers(10, 30, 40)]
    inputs, targets, tails = [s[:-1] for s in seqs], [s[1:] for s in seqs], [5] * len(seqs)
    roomy = scorer.score_packed(inputs, targets, tails, pack_length=32)
    assert {key[2][0] for key in scorer._compiled} >= {8}  # full calls of 8 rows
    monkeypatch.setattr(scoring, "LOGITS_BYTES", 3 * 8 * arch.vocab_size * 4)  # room for < 4 rows of 8
    scorer._compiled.clear()
    tight = scorer.score_packed(inputs, targets, tails, pack_length=32)
    assert {key[2][0] for key in scorer._compiled} == {2}  # the shard count: the fewest rows a call takes
    for (lp, greedy), (lp_t, greedy_t) in zip(roomy, tight):
        np.testing.assert_allclose(lp_t, lp, rtol=1e-6, atol=1e-6)
        np.testing.assert_array_equal(greedy_t, greedy)


def test_packing_fills_rows_without_overflow():
    from maxprune.eval.scoring import _pack
    rng = np.random.default_rng(2)
    lengths = [int(n) for n in rng.integers(1, 100, 500)]
    rows = _pack(lengths, 128)
    assert sorted(i for row in rows for i in row) == list(range(500))
    assert all(sum(lengths[i] for i in row) <= 128 for row in rows)
    assert len(rows) <= 1.1 * sum(lengths) / 128 + 1  # best fit: near the lower bound
