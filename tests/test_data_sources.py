import gzip
import json

import numpy as np
import pytest

from maxprune.data.sources import FileStats, iter_documents, iter_file, list_files, parse_source
from maxprune.errors import MaxpruneError

DOCS = ["first document", "second\nhas two lines", "third: ünïcödé ✓"]


def texts(spec, **kwargs):
    return [d.text for d in iter_documents(spec, **kwargs)]


def write_jsonl(path, records, opener=open):
    with opener(path, "wb") as f:
        for record in records:
            f.write((record if isinstance(record, bytes) else json.dumps(record).encode()) + b"\n")


# ------------------------------------------------------------------ spec parsing
def test_parse_source_prefixes_inference_and_options():
    spec = parse_source("jsonl:/d/*.jsonl.zst?field=content")
    assert (spec.kind, spec.path, spec.option("field")) == ("jsonl", "/d/*.jsonl.zst", "content")
    assert parse_source("/d/x.parquet").kind == "parquet"
    assert parse_source("/d/part-?.jsonl.gz").kind == "jsonl"  # "?" in a glob is not a query
    assert parse_source("/d/part-?.jsonl.gz").path == "/d/part-?.jsonl.gz"
    remote = parse_source("parquet:gs://b/c4/*.parquet?field=text")
    assert (remote.kind, remote.path) == ("parquet", "gs://b/c4/*.parquet")
    assert parse_source("gs://b/c4/x.array_record").kind == "arrayrecord"  # gs: is not a kind
    hf = parse_source("hf:wikitext?config=wikitext-103-raw-v1&split=test")
    assert [hf.option(k) for k in ("config", "split", "field")] == ["wikitext-103-raw-v1", "test", "text"]
    assert parse_source(str(hf)) == hf  # the canonical string round-trips
    assert parse_source("jsonl:/d/*.jsonl").with_options(field="body").option("field") == "body"


@pytest.mark.parametrize("spec, message", [
    ("csv:/d/x.csv", "unknown source kind 'csv'"),
    ("/d/*", "cannot tell the kind of source '/d/\\*'"),
    ("jsonl:/d/x.jsonl?feild=text", "unknown option 'feild'"),
    ("txt:/d/*.txt?field=text", "unknown option 'field'"),
    ("arrayrecord:/d/x?format=xml", "format='xml'"),
    ("hf:", "names no path"),
])
def test_bad_specs(spec, message):
    with pytest.raises(MaxpruneError, match=message):
        parse_source(spec)


# ------------------------------------------------------------------ listing
def test_missing_file_and_empty_glob_name_the_pattern(tmp_path):
    with pytest.raises(MaxpruneError, match=f"no files match {tmp_path}/\\*.jsonl"):
        list_files(f"{tmp_path}/*.jsonl")
    with pytest.raises(MaxpruneError, match=f"no such file or directory: {tmp_path}/a.txt"):
        list_files(f"{tmp_path}/a.txt")


def test_files_are_sorted_and_a_directory_expands_to_its_kind(tmp_path):
    for name in ["b.txt", "a.txt", "c.txt", "notes.md"]:
        (tmp_path / name).write_text(name)
    assert [p.rsplit("/", 1)[1] for p in list_files(f"txt:{tmp_path}/*.txt")] == ["a.txt", "b.txt", "c.txt"]
    assert [p.rsplit("/", 1)[1] for p in list_files(f"txt:{tmp_path}")] == ["a.txt", "b.txt", "c.txt"]
    assert texts(f"txt:{tmp_path}") == ["a.txt", "b.txt", "c.txt"]


# ------------------------------------------------------------------ txt
def test_txt_one_document_per_file_skips_and_counts_bad_files(tmp_path):
    (tmp_path / "1.txt").write_text(DOCS[0])
    (tmp_path / "2.txt").write_bytes(b"")  # empty
    (tmp_path / "3.txt").write_bytes(b"  \n\n")  # whitespace only counts as empty
    (tmp_path / "4.txt").write_bytes(b"caf\xe9 latin-1")  # not UTF-8
    (tmp_path / "5.txt").write_bytes("\ufeff".encode() + DOCS[2].encode())  # BOM dropped
    stats = {}
    assert texts(f"{tmp_path}/*.txt", stats=stats) == [DOCS[0], DOCS[2]]
    by_name = {p.rsplit("/", 1)[1]: s for p, s in stats.items()}
    assert by_name["2.txt"] == FileStats(skipped_empty=1)
    assert by_name["3.txt"] == FileStats(skipped_empty=1)
    assert by_name["4.txt"] == FileStats(skipped_undecodable=1)
    assert by_name["5.txt"] == FileStats(documents=1)


# ------------------------------------------------------------------ jsonl
@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.gz", ".jsonl.zst"])
def test_jsonl_plain_and_compressed(tmp_path, suffix):
    path = tmp_path / f"data{suffix}"
    records = [{"text": t, "id": i} for i, t in enumerate(DOCS)]
    if suffix == ".jsonl.zst":
        import zstandard
        raw = b"".join(json.dumps(r).encode() + b"\n" for r in records)
        path.write_bytes(zstandard.ZstdCompressor().compress(raw))
    else:
        write_jsonl(path, records, gzip.open if suffix == ".jsonl.gz" else open)
    docs = list(iter_documents(str(path)))
    assert [d.text for d in docs] == DOCS
    assert [d.index for d in docs] == [0, 1, 2] and docs[0].source == str(path)


def test_jsonl_missing_field_names_file_and_line(tmp_path):
    path = tmp_path / "a.jsonl"
    write_jsonl(path, [{"text": "ok"}, {"body": "no text here"}])
    with pytest.raises(MaxpruneError, match=f"{path}:2: no text field 'text' \\(record has: body\\)"):
        texts(str(path))
    stats = FileStats()
    assert [d.text for d in iter_file(str(path), str(path), stats=stats, on_missing_field="skip")] == ["ok"]
    assert stats == FileStats(documents=1, skipped_missing_field=1)
    assert texts(f"{path}?field=body", on_missing_field="skip") == ["no text here"]


def test_jsonl_bad_lines_are_skipped_and_counted(tmp_path):
    path = tmp_path / "a.jsonl"
    write_jsonl(path, [{"text": "one"}, b'{"text": "caf\xe9"}', b'{"text": "trunc', {"text": ""},
                       {"text": "lone \udc80 surrogate"}, {"text": "two"}])
    path.write_bytes(path.read_bytes() + b"\n\n")  # trailing blank lines are not records
    stats = FileStats()
    assert [d.text for d in iter_file(str(path), str(path), stats=stats)] == ["one", "two"]
    assert stats == FileStats(documents=2, skipped_empty=1, skipped_undecodable=3)


def test_corrupt_compressed_file_is_an_error_naming_it(tmp_path):
    path = tmp_path / "a.jsonl.gz"
    write_jsonl(path, [{"text": t} for t in DOCS * 50], gzip.open)
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(MaxpruneError, match=f"{path} is corrupt or truncated"):
        texts(str(path))


# ------------------------------------------------------------------ parquet, arrayrecord
def test_parquet_text_column(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "a.parquet"
    pq.write_table(pa.table({"content": [DOCS[0], None, DOCS[1]], "n": [1, 2, 3]}), path)
    stats = {}
    assert texts(f"parquet:{path}?field=content", stats=stats) == DOCS[:2]
    assert stats[str(path)] == FileStats(documents=2, skipped_empty=1)
    with pytest.raises(MaxpruneError, match="has no column 'text' \\(columns: content, n\\)"):
        texts(str(path))


def test_arrayrecord_text_and_json_records(tmp_path):
    from array_record.python.array_record_module import ArrayRecordWriter

    path = tmp_path / "a.array_record"
    writer = ArrayRecordWriter(str(path), "group_size:1")
    for record in [DOCS[0].encode(), json.dumps({"text": DOCS[1]}).encode(), b"{not json, just text",
                   b"\xff\xfe", b"[1, 2]"]:
        writer.write(record)
    writer.close()
    stats = FileStats()
    got = [d.text for d in iter_file(str(path), str(path), stats=stats)]
    assert got == [DOCS[0], DOCS[1], "{not json, just text", "[1, 2]"]
    assert stats.skipped_undecodable == 1
    assert texts(f"arrayrecord:{path}?format=text")[1] == json.dumps({"text": DOCS[1]})


# ------------------------------------------------------------------ dataset libraries
def test_tfds_array_record_dataset_by_name_and_by_directory(tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")

    class TinyCorpus(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(
                {"text": tfds.features.Text(), "id": tfds.features.Scalar(dtype=np.int32)}))

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples()}

        def _generate_examples(self):
            for i, text in enumerate(DOCS + [""]):
                yield i, {"text": text, "id": i}

    builder = TinyCorpus(data_dir=str(tmp_path), file_format="array_record")
    builder.download_and_prepare()
    by_name = texts(f"tfds:tiny_corpus?data_dir={tmp_path}&split=train")
    assert sorted(by_name) == sorted(DOCS)  # TFDS orders examples by key hash, not insertion
    assert texts(f"tfds:{builder.data_dir}") == by_name
    with pytest.raises(MaxpruneError, match="no feature 'body' \\(features: id, text\\)"):
        texts(f"tfds:{builder.data_dir}?field=body")
    with pytest.raises(MaxpruneError, match="cannot load TFDS source"):
        texts(f"tfds:no_such_corpus?data_dir={tmp_path}")


def test_hf_datasets_local_files_streaming_and_saved(tmp_path):
    datasets = pytest.importorskip("datasets")
    path = tmp_path / "a.jsonl"
    write_jsonl(path, [{"text": t} for t in DOCS])
    cache = tmp_path / "cache"
    assert texts(f"hf:json?data_files={path}&split=train&cache_dir={cache}") == DOCS
    assert texts(f"hf:json?data_files={path}&streaming=true") == DOCS
    datasets.Dataset.from_dict({"body": DOCS}).save_to_disk(str(tmp_path / "saved"))
    assert texts(f"hf:{tmp_path / 'saved'}?field=body") == DOCS
    with pytest.raises(MaxpruneError, match="has no column 'text'"):
        texts(f"hf:{tmp_path / 'saved'}")
    assert list_files(f"hf:json?data_files={path}") == [f"hf:json?data_files={path}"]
