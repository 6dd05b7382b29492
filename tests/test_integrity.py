"""Manifests catch a truncated, edited, missing or stray file at load, naming it; clean and old dirs load."""

import json
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest

from maxprune.cli import main
from maxprune.data.prepared import open_prepared
from maxprune.errors import MaxpruneError
from maxprune.fs import integrity
from maxprune.model import llama, model_dir
from maxprune.model import masks as masks_lib
from maxprune.model.arch import preset


# ------------------------------------------------------------------ helpers
def flip_byte(path, offset=None):
    data = bytearray(path.read_bytes())
    offset = len(data) // 2 if offset is None else offset
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def truncate(path):
    path.write_bytes(path.read_bytes()[:-1])


def largest(root, sub):
    return max((p for p in (root / sub).rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("maxprune: error: ") and err.count("\n") == 1, err
    return err


# ------------------------------------------------------------------ model dirs
@pytest.fixture(scope="module")
def saved(tmp_path_factory, tiny_corpus):
    """A sparse model dir with a tokenizer, written once; tests corrupt copies of it."""
    arch = preset("tiny")
    params = llama.init_params(arch, jax.random.key(0))
    masks = masks_lib.from_kernels({("mlp", "up"): np.random.default_rng(0).random((2, 64, 192)) > 0.3})
    params = masks_lib.apply_masks(params, masks)  # as a pruner leaves them: `inspect` checks
    path = tmp_path_factory.mktemp("integrity") / "m"
    model_dir.save_model_dir(path, arch, params, masks, provenance={"method": "test"},
                             tokenizer_dir=tiny_corpus["root"] / "tokenizer")
    return path


@pytest.fixture
def copy(saved, tmp_path):
    return shutil.copytree(saved, tmp_path / "m")


def test_manifest_covers_every_file_and_a_clean_dir_loads(copy):
    files = json.loads((copy / "manifest.json").read_text())["files"]
    assert list(files) == [rel for rel in integrity.list_files(copy) if rel != "manifest.json"]
    assert {rel.split("/")[0] for rel in files} == {"arch.json", "provenance.json", "params", "masks", "tokenizer"}
    assert all(set(entry) == {"size", "sha256"} for entry in files.values())
    md = model_dir.load_model_dir(copy)
    assert md.masks is not None and md.provenance["method"] == "test"
    assert model_dir.verify_model_dir(copy)  # loading wrote nothing into the dir


def _edit(name, old, new):
    def edit(d):
        text = (d / name).read_text()
        assert old in text
        (d / name).write_text(text.replace(old, new))
        return d / name
    return edit


def _done(action, path):
    action(path)
    return path


def _stray(path):
    path.write_text("{}")
    return path


# name: (corrupt(dir) -> the file the error must name, what the error says). One distinct corruption each.
MODEL_CORRUPTIONS = {
    "truncated params data": (lambda d: _done(truncate, largest(d, "params")), "truncated"),
    "flipped byte in params data": (lambda d: _done(flip_byte, largest(d, "params")), "hash differs"),
    "flipped byte in masks data": (lambda d: _done(flip_byte, largest(d, "masks")), "hash differs"),
    "deleted params/_METADATA": (lambda d: _done(Path.unlink, d / "params" / "_METADATA"), "missing"),
    "deleted masks data": (lambda d: _done(Path.unlink, largest(d, "masks")), "missing"),
    "stray file in params": (lambda d: _stray(d / "params" / "d" / "0123abcd"), "not in its manifest"),
    "stray file in tokenizer": (lambda d: _stray(d / "tokenizer" / "special_tokens_map.json"),
                                "not in its manifest"),
    "arch.json edited, same size": (_edit("arch.json", '"num_layers": 2', '"num_layers": 3'), "hash differs"),
    "arch.json edited, new size": (_edit("arch.json", '"num_layers": 2', '"num_layers": 20'), "appended to"),
    "provenance.json edited": (_edit("provenance.json", '"test"', '"tent"'), "hash differs"),
    "tokenizer.json truncated": (lambda d: _done(truncate, d / "tokenizer" / "tokenizer.json"), "truncated"),
    "manifest.json garbled": (lambda d: _stray(d / "manifest.json"), "unreadable"),
}


@pytest.mark.parametrize("name", MODEL_CORRUPTIONS)
def test_model_dir_corruption_is_detected_naming_the_file(copy, name):
    corrupt, says = MODEL_CORRUPTIONS[name]
    rel = corrupt(copy).relative_to(copy).as_posix()
    with pytest.raises(MaxpruneError, match=says) as info:
        model_dir.load_model_dir(copy)
    assert str(info.value).startswith(f"model dir {copy} is corrupt: {rel} ")
    assert "\n" not in str(info.value)


def test_read_arch_and_read_provenance_check_their_file(copy):
    _edit("arch.json", '"num_layers": 2', '"num_layers": 3')(copy)
    with pytest.raises(MaxpruneError, match="arch.json content hash differs"):
        model_dir.read_arch(copy)
    _edit("provenance.json", '"test"', '"tent"')(copy)
    with pytest.raises(MaxpruneError, match="provenance.json content hash differs"):
        model_dir.read_provenance(copy)


def test_old_dir_without_manifest_loads_unchecked(copy):
    (copy / "manifest.json").unlink()
    (copy / "params" / "d" / "0123abcd").write_bytes(b"x")  # would be an error with a manifest
    assert not model_dir.verify_model_dir(copy)
    assert model_dir.load_model_dir(copy).masks is not None
    assert model_dir.read_arch(copy) == preset("tiny")


def test_verify_false_skips_the_full_check_and_top_level_extras_are_allowed(copy):
    (copy / "prune_report.json").write_text("{}")  # what `prune` writes next to a finished model
    model_dir.load_model_dir(copy)
    (copy / "params" / "d" / "0123abcd").write_bytes(b"x")
    model_dir.load_model_dir(copy, verify=False)
    with pytest.raises(MaxpruneError, match="params/d/0123abcd"):
        model_dir.load_model_dir(copy)


def test_cli_inspect_of_a_corrupt_model_dir_is_one_line_exit_2(copy, capsys):
    assert main(["inspect", str(copy)]) == 0
    capsys.readouterr()
    victim = largest(copy, "params")
    truncate(victim)
    assert main(["inspect", str(copy)]) == 2
    assert victim.relative_to(copy).as_posix() in one_line_error(capsys)


@pytest.mark.parametrize("breaks", ["hashing", "tokenizer copy"])
def test_a_write_that_raises_midway_leaves_nothing_complete_looking(tmp_path, tiny_corpus, monkeypatch, breaks):
    arch = preset("tiny")
    params = llama.init_params(arch, jax.random.key(0))
    real_digest, hashed = integrity.digest, []

    def dies_on_fourth_file(path):
        hashed.append(path)
        if len(hashed) == 4:
            raise OSError("disk gone")
        return real_digest(path)

    def dies(*_):
        raise OSError("disk full")

    if breaks == "hashing":  # a few files hashed, the manifest not yet written
        monkeypatch.setattr(integrity, "digest", dies_on_fourth_file)
    else:
        monkeypatch.setattr(model_dir.shutil, "copytree", dies)
    with pytest.raises(OSError):
        model_dir.save_model_dir(tmp_path / "m", arch, params, tokenizer_dir=tiny_corpus["root"] / "tokenizer")
    assert not (tmp_path / "m").exists()
    assert list(tmp_path.iterdir()) == []  # the staging dir is gone too: no manifest anywhere
    assert not list(tmp_path.rglob("manifest.json"))


# ------------------------------------------------------------------ prepared datasets
@pytest.fixture
def dataset(tiny_corpus, tmp_path):
    """A copy of the prepared train set (never corrupt the session fixture itself)."""
    return shutil.copytree(tiny_corpus["train"], tmp_path / "ds")


def shard(ds):
    return ds / json.loads((ds / "manifest.json").read_text())["shards"][0]["file"]


def read_all(ds):
    data = open_prepared(ds)
    return [row.tolist() for row in data.__getitems__(list(range(len(data))))]


def test_shard_sizes_and_hashes_are_recorded_and_a_clean_dataset_verifies(dataset):
    data = open_prepared(dataset)
    for entry in data.manifest.shards:
        assert integrity.digest(dataset / entry["file"]) == {k: entry[k] for k in ("size", "sha256")}
    assert data.verify() == len(data.manifest.shards)


def test_shards_written_before_an_interruption_are_hashed_on_resume(tiny_corpus, tmp_path, monkeypatch):
    from maxprune.data import prepare as prepare_lib
    from maxprune.data import shards as shards_lib

    real_write = shards_lib._write_shard

    def dies_on_third_shard(job):
        if job.first_sequence == 80:
            raise KeyboardInterrupt
        return real_write(job)

    args = (f"txt:{tiny_corpus['root'] / 'validation'}/*.txt", tiny_corpus["tokenizer"], tmp_path / "ds", 32)
    kwargs = dict(workers=1, sequences_per_shard=40, progress=False)
    monkeypatch.setattr(shards_lib, "_write_shard", dies_on_third_shard)
    with pytest.raises(KeyboardInterrupt):
        prepare_lib.prepare(*args, **kwargs)
    monkeypatch.setattr(shards_lib, "_write_shard", real_write)
    manifest = prepare_lib.prepare(*args, **kwargs)
    assert len(manifest.shards) > 2 and all("sha256" in s for s in manifest.shards)
    assert open_prepared(tmp_path / "ds").verify() == len(manifest.shards)


@pytest.mark.parametrize("change", ["truncated", "appended to", "emptied"])
def test_a_shard_of_the_wrong_size_fails_at_open_naming_it(dataset, change):
    victim = shard(dataset)
    data = victim.read_bytes()
    victim.write_bytes({"truncated": data[:-100], "appended to": data + b"\0", "emptied": b""}[change])
    with pytest.raises(MaxpruneError, match=f"{victim.name} is .* bytes, expected {len(data)}"):
        open_prepared(dataset)


def test_a_deleted_shard_fails_at_open_naming_it(dataset):
    victim = shard(dataset)
    victim.unlink()
    with pytest.raises(MaxpruneError, match=f"missing shard {victim.name}"):
        open_prepared(dataset)


def test_flipped_bytes_in_a_shard_are_caught_by_reads_or_verify(dataset):
    """Riegeli's chunk hashes make a read of a flipped chunk fail (never return garbage); a flip in
    padding no read touches is only caught by `verify`."""
    victim = shard(dataset)
    clean_bytes, clean_rows = victim.read_bytes(), read_all(dataset)
    raised = 0
    for offset in range(0, len(clean_bytes), max(1, len(clean_bytes) // 16)):
        flip_byte(victim, offset)
        try:
            assert read_all(dataset) == clean_rows, f"byte {offset}: garbage read back"
        except MaxpruneError as e:
            assert f"prepared dataset shard {victim} is corrupt: " in str(e) and "\n" not in str(e)
            raised += 1
        with pytest.raises(MaxpruneError, match=f"{victim.name} content hash differs"):
            open_prepared(dataset).verify()
        victim.write_bytes(clean_bytes)
    assert raised > 0


def test_single_reads_of_a_corrupt_chunk_name_the_shard(dataset):
    victim = shard(dataset)
    clean_bytes = victim.read_bytes()
    data = open_prepared(dataset)
    for offset in range(64, len(clean_bytes), 97):  # the first flip a read notices
        flip_byte(victim, offset)
        fresh = open_prepared(dataset)
        try:
            for i in range(len(data)):
                fresh[i]
        except MaxpruneError as e:
            assert f"shard {victim} is corrupt" in str(e) and "sequence" in str(e)
            return
        victim.write_bytes(clean_bytes)
    pytest.fail("no flipped byte made a read fail")


def test_a_stray_file_in_a_dataset_is_harmless(dataset):
    (dataset / "seqs-99999-of-99999.array_record").write_bytes(b"junk")  # not listed, so never read
    data = open_prepared(dataset)
    assert data.verify() == len(data.manifest.shards)


def test_dataset_prepared_before_shard_hashes_still_opens(dataset):
    manifest = json.loads((dataset / "manifest.json").read_text())
    for entry in manifest["shards"]:
        del entry["size"], entry["sha256"]
    (dataset / "manifest.json").write_text(json.dumps(manifest))
    truncate(shard(dataset))  # undetectable at open without a recorded size
    data = open_prepared(dataset)
    assert data.verify() == 0


def test_cli_data_inspect_verify(dataset, capsys):
    assert main(["data", "inspect", "--verify", str(dataset)]) == 0
    shards = len(open_prepared(dataset).manifest.shards)
    assert f"verified   {shards} shards: sizes and sha256 match the manifest" in capsys.readouterr().out
    victim = shard(dataset)
    flip_byte(victim, victim.stat().st_size - 1)
    assert main(["data", "inspect", str(dataset)]) == 0  # size unchanged: only --verify reads the bytes
    capsys.readouterr()
    assert main(["data", "inspect", "--verify", str(dataset)]) == 2
    assert f"{victim.name} content hash differs" in one_line_error(capsys)
    truncate(victim)
    assert main(["data", "inspect", str(dataset)]) == 2
    assert f"{victim.name} is " in one_line_error(capsys)
