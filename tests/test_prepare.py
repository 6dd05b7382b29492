import json
import pickle
from operator import attrgetter

import numpy as np
import pytest

from maxprune.cli import main
from maxprune.data import packing
from maxprune.data import shards as shards_lib
from maxprune.data.prepare import prepare
from maxprune.data.prepared import open_prepared
from maxprune.data.tokenizer import Tokenizer, train_bpe
from maxprune.errors import MaxpruneError

L = 16  # seq_len
WORDS = "the of and to in is was for on that with as by at from his her it an be are this".split()


def make_docs(seed: int, count: int) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=rng.integers(3, 25))) for _ in range(count)]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return train_bpe(iter(make_docs(0, 50)), 300, tmp_path_factory.mktemp("tok") / "bpe300")


@pytest.fixture
def corpus(tmp_path):
    """Three JSONL files (written out of name order) and their documents in sorted-file order."""
    src = tmp_path / "src"
    src.mkdir()
    docs = {name: make_docs(seed, 12) for seed, name in enumerate(["c.jsonl", "a.jsonl", "b.jsonl"], 1)}
    for name, texts in docs.items():
        (src / name).write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return src, [t for name in sorted(docs) for t in docs[name]]


def expected_stream(tok, docs):
    """The BOS doc EOS stream, one document at a time (not through prepare's batch packing)."""
    return [i for doc in docs for i in [tok.bos_id, *tok.encode(doc), tok.eos_id]]


def run(src, out, tok, **kwargs):
    kwargs = {"workers": 1, "sequences_per_shard": 7, "progress": False} | kwargs
    return prepare(f"{src}/*.jsonl", tok, out, L, **kwargs)


def recording(fn, log, key):
    """fn, also appending key(job) to log on each call."""
    return lambda job: log.append(key(job)) or fn(job)


def shard_bytes(out):
    return {p.name: p.read_bytes() for p in sorted(out.glob("*.array_record"))}


def test_packing_is_exact(corpus, tok, tmp_path):
    src, docs = corpus
    manifest = run(src, tmp_path / "out", tok)
    stream = expected_stream(tok, docs)
    n = len(stream) // L
    assert (manifest.num_sequences, manifest.num_tokens) == (n, n * L)
    assert manifest.tokens_dropped == len(stream) % L > 0
    dataset = open_prepared(tmp_path / "out")
    got = np.concatenate([dataset[i] for i in range(len(dataset))])
    assert got.dtype == np.int32 and got.tolist() == stream[:n * L]
    assert [s["first_sequence"] for s in manifest.shards] == list(range(0, n, 7))
    assert sum(s["num_sequences"] for s in manifest.shards) == n
    assert manifest.shards[0]["file"] == f"seqs-00000-of-{len(manifest.shards):05d}.array_record"
    assert [f["path"].rsplit("/", 1)[1] for f in manifest.files] == ["a.jsonl", "b.jsonl", "c.jsonl"]
    assert sum(f["tokens"] for f in manifest.files) == len(stream)
    assert manifest.tokenizer == tok.info() and manifest.complete
    assert list(json.loads((tmp_path / "out" / "manifest.json").read_text()))[-1] == "complete"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]  # no staging left behind


def test_random_access_api(corpus, tok, tmp_path):
    src, _ = corpus
    run(src, tmp_path / "out", tok)
    dataset = open_prepared(tmp_path / "out")
    batch = dataset.__getitems__([len(dataset) - 1, 0, 8])
    assert [b.tolist() for b in batch] == [dataset[-1].tolist(), dataset[0].tolist(), dataset[8].tolist()]
    assert dataset[0][0] == tok.bos_id and dataset[0].shape == (L,)
    with pytest.raises(IndexError):
        dataset[len(dataset)]
    clone = pickle.loads(pickle.dumps(dataset))
    assert clone[5].tolist() == dataset[5].tolist()


def test_workers_do_not_change_the_stream(corpus, tok, tmp_path):
    src, _ = corpus
    with open(src / "a.jsonl", "a") as f:  # the first file finishes last with 2 workers
        f.writelines(json.dumps({"text": t}) + "\n" for t in make_docs(9, 5000))
    run(src, tmp_path / "w1", tok, workers=1, sequences_per_shard=1000)
    run(src, tmp_path / "w2", tok, workers=2, sequences_per_shard=1000)
    assert shard_bytes(tmp_path / "w1") == shard_bytes(tmp_path / "w2") != {}


def test_interrupted_prepare_is_incomplete_then_resumes(corpus, tok, tmp_path, monkeypatch):
    src, _ = corpus
    run(src, tmp_path / "clean", tok)
    out = tmp_path / "out"
    real_tokenize, calls = packing._tokenize_file, []

    def dies_on_second_file(job):
        if job.index == 1:
            raise KeyboardInterrupt  # a kill mid-run
        return real_tokenize(job)

    monkeypatch.setattr(packing, "_tokenize_file", dies_on_second_file)
    with pytest.raises(KeyboardInterrupt):
        run(src, out, tok)
    staging = tmp_path / ".out.partial"
    assert staging.is_dir() and not out.exists()
    with pytest.raises(MaxpruneError, match="no prepared dataset at .*an interrupted prepare left"):
        open_prepared(out)
    with pytest.raises(MaxpruneError, match="incomplete prepared dataset"):
        open_prepared(staging)

    monkeypatch.setattr(packing, "_tokenize_file", recording(real_tokenize, calls, attrgetter("index")))
    run(src, out, tok)
    assert calls == [1, 2]  # file 0 came from the cache
    assert shard_bytes(out) == shard_bytes(tmp_path / "clean") and not staging.exists()


def test_interrupted_shard_writing_resumes_per_shard(corpus, tok, tmp_path, monkeypatch):
    src, _ = corpus
    real_write, written = shards_lib._write_shard, []

    def dies_on_third_shard(job):
        if job.first_sequence == 14:
            raise KeyboardInterrupt
        written.append(job.first_sequence)
        return real_write(job)

    monkeypatch.setattr(shards_lib, "_write_shard", dies_on_third_shard)
    with pytest.raises(KeyboardInterrupt):
        run(src, tmp_path / "out", tok)
    monkeypatch.setattr(packing, "_tokenize_file", lambda job: pytest.fail("re-tokenized"))
    record_write = recording(real_write, written, attrgetter("first_sequence"))
    monkeypatch.setattr(shards_lib, "_write_shard", record_write)
    manifest = run(src, tmp_path / "out", tok)
    assert written == [0, 7] + [s["first_sequence"] for s in manifest.shards[2:]]


def test_changed_arguments_discard_the_partial_output(corpus, tok, tmp_path, monkeypatch):
    src, docs = corpus
    real_tokenize, real_write, calls = packing._tokenize_file, shards_lib._write_shard, []
    monkeypatch.setattr(shards_lib, "_write_shard", lambda job: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        run(src, tmp_path / "out", tok)
    monkeypatch.setattr(shards_lib, "_write_shard", real_write)
    monkeypatch.setattr(packing, "_tokenize_file", recording(real_tokenize, calls, attrgetter("index")))
    manifest = run(src, tmp_path / "out", tok, on_missing_field="skip")  # another argument: start afresh
    assert calls == [0, 1, 2]
    assert manifest.num_sequences == len(expected_stream(tok, docs)) // L


def test_bad_files_are_skipped_and_counted(tok, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_text(" ".join(WORDS * 3))
    (src / "b.txt").write_bytes(b"")
    (src / "c.txt").write_bytes(b"\xff\xfe not utf-8")
    manifest = prepare(f"{src}/*.txt", tok, tmp_path / "out", L, workers=1, progress=False)
    keys = ("documents", "skipped_empty", "skipped_undecodable", "tokens")
    stats = {f["path"].rsplit("/", 1)[1]: tuple(f[k] for k in keys) for f in manifest.files}
    assert stats["b.txt"] == (0, 1, 0, 0) and stats["c.txt"] == (0, 0, 1, 0) and stats["a.txt"][0] == 1
    assert manifest.files[2]["sha256"] is not None and manifest.files[2]["size"] == 12


def test_missing_text_field_stops_prepare(tok, tmp_path):
    (tmp_path / "a.jsonl").write_text('{"text": "fine words"}\n{"content": "elsewhere"}\n')
    with pytest.raises(MaxpruneError, match=r"a.jsonl:2: no text field 'text'"):
        prepare(f"{tmp_path}/a.jsonl", tok, tmp_path / "out", 2, workers=1, progress=False)
    manifest = prepare(f"{tmp_path}/a.jsonl", tok, tmp_path / "out", 2, workers=1, progress=False,
                       on_missing_field="skip")
    assert manifest.files[0]["skipped_missing_field"] == 1


def test_output_is_never_overwritten_unasked(corpus, tok, tmp_path):
    src, _ = corpus
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    with pytest.raises(MaxpruneError, match="exists and is not empty; pass --overwrite"):
        run(src, out, tok)
    assert [p.name for p in out.iterdir()] == ["precious.txt"]
    run(src, out, tok, overwrite=True)
    assert not (out / "precious.txt").exists() and open_prepared(out).manifest.complete


@pytest.mark.parametrize("kwargs, message", [
    ({"seq_len": 1}, "seq_len=1 must be an integer > 1"),
    ({"seq_len": 10**6}, "fewer than one sequence of seq_len=1000000"),
    ({"workers": 0}, "workers=0 must be >= 1"),
    ({"on_missing_field": "ignore"}, "on_missing_field='ignore'"),
])
def test_bad_arguments(corpus, tok, tmp_path, kwargs, message):
    src, _ = corpus
    kwargs = {"seq_len": L, "workers": 1, "progress": False} | kwargs
    with pytest.raises(MaxpruneError, match=message):
        prepare(f"{src}/*.jsonl", tok, tmp_path / "out", **kwargs)


def test_tokenizer_hash_mismatch_and_incomplete_manifest(corpus, tok, tmp_path):
    src, _ = corpus
    run(src, tmp_path / "out", tok)
    dataset = open_prepared(tmp_path / "out")
    dataset.check_tokenizer(tok)
    dataset.check_tokenizer(tok.hash)
    with pytest.raises(MaxpruneError, match=f"tokenized with tokenizer {tok.hash[:8]} \\(bpe300\\) "
                                            f"but the model uses 0123abcd"):
        dataset.check_tokenizer("0123abcd" * 8)
    manifest = tmp_path / "out" / "manifest.json"
    manifest.write_text(manifest.read_text().replace('"complete": true', '"complete": false'))
    with pytest.raises(MaxpruneError, match="incomplete prepared dataset"):
        open_prepared(tmp_path / "out")
    manifest.unlink()
    with pytest.raises(MaxpruneError, match="incomplete prepared dataset"):
        open_prepared(tmp_path / "out")


# ------------------------------------------------------------------ CLI
def test_cli_missing_source_is_one_line_exit_2(tok, tmp_path, capsys):
    argv = ["data", "prepare", f"{tmp_path}/nothing/*.jsonl", str(tmp_path / "out"),
            "--tokenizer", str(tmp_path / "none")]
    assert main(argv) == 2
    assert capsys.readouterr().err == f"maxprune: error: no tokenizer at {tmp_path}/none: expected a " \
                                      f"tokenizer.json file or a dir containing one, or 'llama3'\n"
    argv[-1] = str(tok_dir(tok, tmp_path))
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"maxprune: error: no files match {tmp_path}/nothing/*.jsonl")
    assert err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def tok_dir(tok, tmp_path):
    return tok.save(tmp_path / "tok")


def test_cli_prepare_inspect_and_train_tokenizer(corpus, tok, tmp_path, capsys):
    src, docs = corpus
    assert main(["data", "train-tokenizer", f"{src}/*.jsonl", str(tmp_path / "bpe"), "--vocab-size=280"]) == 0
    assert Tokenizer.load(tmp_path / "bpe").vocab_size <= 280
    out = str(tmp_path / "out")
    assert main(["data", "prepare", f"jsonl:{src}?field=text", out, f"--tokenizer={tok_dir(tok, tmp_path)}",
                 f"--seq-len={L}", "--workers=1"]) == 0
    n = len(expected_stream(tok, docs)) // L
    assert f"wrote {out}: {n:,} sequences x {L}" in capsys.readouterr().out
    assert main(["data", "inspect", out, "--sequence", "0", "--tokenizer", str(tmp_path / "tok")]) == 0
    shown = capsys.readouterr().out
    assert f"sequences  {n:,} x {L}" in shown and "tokenizer  bpe300" in shown and "36 documents" in shown
    assert "sequence 0: '<|begin_of_text|>" in shown
    assert main(["data", "inspect", out, "--sequence", "0", "--tokenizer", "llama3"]) == 2
    assert "but the model uses c05a3c21" in capsys.readouterr().err
