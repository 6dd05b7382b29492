"""Model dir: exact round trip, sharded restore, no overwrite, no half-written dirs."""

import json

import jax
import ml_collections
import numpy as np
import pytest

from maxprune import sharding
from maxprune.errors import MaxpruneError
from maxprune.model import llama, model_dir
from maxprune.model import masks as masks_lib
from maxprune.model.arch import preset


@pytest.fixture(scope="module")
def tiny():
    arch = preset("tiny").replace(out_bias=True)
    params = llama.init_params(arch, jax.random.key(0))
    rng = np.random.default_rng(0)
    masks = masks_lib.from_kernels({("mlp", "up"): rng.random((2, 64, 192)) > 0.3})
    return arch, params, masks


def _assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert np.asarray(x).dtype == np.asarray(y).dtype
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_round_trip_is_exact(tmp_path, tiny):
    arch, params, masks = tiny
    model_dir.save_model_dir(tmp_path / "m", arch, params, masks, provenance={"method": "test", "ratio": 0.5})
    md = model_dir.load_model_dir(tmp_path / "m")
    assert md.arch == arch
    _assert_trees_equal(md.params, params)
    _assert_trees_equal(md.masks, masks)
    assert md.provenance["method"] == "test" and md.provenance["ratio"] == 0.5
    assert "code_version" in md.provenance
    host = model_dir.load_model_dir(tmp_path / "m", as_numpy=True)
    assert isinstance(host.params["embed"]["embedding"], np.ndarray)
    _assert_trees_equal(host.params, params)


def test_restore_onto_mesh_is_sharded(tmp_path, tiny, devices8):
    arch, params, masks = tiny
    model_dir.save_model_dir(tmp_path / "m", arch, params, masks)
    mesh = sharding.make_mesh(ml_collections.ConfigDict(dict(data=1, fsdp=4, tensor=2)), devices8)
    md = model_dir.load_model_dir(tmp_path / "m", mesh)
    up = md.params["layers"]["mlp"]["up"]["kernel"]
    assert up.addressable_shards[0].data.shape == (2, 64 // 4, 192 // 2)
    assert md.masks["layers"]["mlp"]["up"]["kernel"].sharding.spec == up.sharding.spec
    _assert_trees_equal(md.params, params)


def test_dense_model_has_no_masks(tmp_path, tiny):
    arch, params, _ = tiny
    model_dir.save_model_dir(tmp_path / "m", arch, params)
    assert model_dir.load_model_dir(tmp_path / "m").masks is None
    assert not (tmp_path / "m" / "masks").exists()


def test_refuses_to_overwrite_and_leaves_dir_untouched(tmp_path, tiny):
    arch, params, _ = tiny
    out = tmp_path / "m"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(MaxpruneError, match="--overwrite"):
        model_dir.save_model_dir(out, arch, params)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    model_dir.save_model_dir(out, arch, params, overwrite=True)
    assert not (out / "keep.txt").exists() and model_dir.read_arch(out) == arch
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no staging leftovers


def test_interrupted_write_never_looks_complete(tmp_path, tiny, monkeypatch):
    arch, params, _ = tiny

    def boom(*_, **__):
        raise RuntimeError("disk full")

    monkeypatch.setattr(model_dir, "_write_json", boom)
    with pytest.raises(RuntimeError):
        model_dir.save_model_dir(tmp_path / "m", arch, params)
    assert not (tmp_path / "m").exists()
    assert list(tmp_path.iterdir()) == []  # the staging dir is cleaned up too
    with pytest.raises(MaxpruneError, match="does not exist"):
        model_dir.load_model_dir(tmp_path / "m")


@pytest.mark.parametrize("breakage, fragment", [
    (lambda d: (d / "arch.json").unlink(), "missing arch.json"),
    (lambda d: (d / "arch.json").write_text("{not json"), "not valid JSON"),
    (lambda d: (d / "arch.json").write_text(json.dumps({"vocab_size": 3})), "missing required"),
])
def test_broken_model_dirs_are_clear_errors(tmp_path, tiny, breakage, fragment):
    arch, params, _ = tiny
    model_dir.save_model_dir(tmp_path / "m", arch, params)
    (tmp_path / "m" / "manifest.json").unlink()  # a pre-manifest dir: the parse errors themselves
    breakage(tmp_path / "m")
    with pytest.raises(MaxpruneError, match=fragment):
        model_dir.load_model_dir(tmp_path / "m")


def test_masks_must_match_kernels(tmp_path, tiny):
    arch, params, _ = tiny
    bad = masks_lib.from_kernels({("attn", "q"): np.ones((2, 3, 3), bool)})
    with pytest.raises(MaxpruneError, match="shape"):
        model_dir.save_model_dir(tmp_path / "m", arch, params, bad)
    not_bool = masks_lib.from_kernels({("attn", "q"): np.ones((2, 64, 64), np.float32)})
    with pytest.raises(MaxpruneError, match="bool"):
        model_dir.save_model_dir(tmp_path / "m", arch, params, not_bool)
