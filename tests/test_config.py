import json
from pathlib import Path

import pytest

from maxprune.errors import MaxpruneError
from maxprune.model.schema import arch_from_config
from maxprune.schema import default_config, load_config

REPO = Path(__file__).resolve().parents[1]


def write(tmp_path, body, name="cfg.py"):
    path = tmp_path / name
    path.write_text("import ml_collections\n" + body)
    return str(path)


def error(spec=None, overrides=()):
    """The MaxpruneError message of a failing load, checked to be one line."""
    with pytest.raises(MaxpruneError) as info:
        load_config(spec, overrides)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_file_with_arg_and_overrides(tmp_path):
    spec = write(tmp_path, "def get_config(arg=None):\n"
                 "    return ml_collections.ConfigDict({'model': {'preset': arg}, 'mesh': {'data': 2}})\n")
    cfg = load_config(spec + ":tiny-llama31", ["--config.model.remat=full", "config.mesh.fsdp=4",
                                               "--config.model.arch.num_layers=3"])
    assert (cfg.model.preset, cfg.model.remat, cfg.mesh.data, cfg.mesh.fsdp) == ("tiny-llama31", "full", 2, 4)
    arch = arch_from_config(cfg)
    assert arch.num_layers == 3 and arch.head_dim == 32  # override on top of the preset
    assert arch.rope_scaling.original_max_position_embeddings == 64


def test_partial_file_merges_onto_defaults(tmp_path):
    spec = write(tmp_path, "def get_config():\n    return {'seed': 7}\n")
    cfg = load_config(spec)
    expected = default_config()
    expected.seed = 7
    assert cfg.to_dict() == expected.to_dict()
    json.dumps(cfg.to_dict())  # provenance files need it JSON-able


def test_override_values_are_coerced():
    cfg = load_config(None, ["--config.model.arch.rope_theta=10000", "--config.model.preset='tiny'",
                             "--config.model.arch.num_layers=None"])
    assert isinstance(cfg.model.arch.rope_theta, float) and cfg.model.preset == "tiny"
    assert arch_from_config(cfg).rope_theta == 10000.0


def test_rope_scaling_overrides():
    cfg = load_config(None, ["--config.model.arch.rope_scaling.factor=4"])
    assert arch_from_config(cfg).rope_scaling.factor == 4.0  # tiny has none: defaults + factor
    cfg = load_config(None, ["--config.model.preset=tiny-llama31",
                             "--config.model.arch.rope_scaling.enabled=False"])
    assert arch_from_config(cfg).rope_scaling is None


@pytest.mark.parametrize("repo_config", sorted((REPO / "configs/model").glob("*.py")), ids=lambda p: p.stem)
def test_repo_model_configs_load(repo_config):
    cfg = load_config(str(repo_config))
    assert arch_from_config(cfg).num_params() > 0


def test_unknown_key_in_file_suggests(tmp_path):
    spec = write(tmp_path, "def get_config(arg=None):\n    return {'model': {'remta': 'full'}}\n")
    message = error(spec)
    assert "'model.remta'" in message and "did you mean 'model.remat'" in message and "cfg.py" in message


@pytest.mark.parametrize("override, expected", [
    ("--config.mesh.fdsp=2", "did you mean 'mesh.fsdp'"),
    ("--config.mesh.zzzzz=1", "valid keys of 'mesh': data, fsdp, tensor"),
    ("--config.model=3", "'model' in override '--config.model=3' is a section"),
    ("--config.model.remat", "has no value"),
])
def test_bad_override_keys(override, expected):
    assert expected in error(None, [override])


@pytest.mark.parametrize("override, expected", [
    ("--config.mesh.data=abc", "'mesh.data' in override '--config.mesh.data=abc' expects int, got 'abc'"),
    ("--config.model.scan_unroll=1.5", "'model.scan_unroll' in override '--config.model.scan_unroll=1.5' "
                                       "expects int, got 1.5"),
    ("--config.seed=True", "'seed' in override '--config.seed=True' expects int, got True"),
    ("--config.model.arch.num_heads=2.0", "expects int or None, got 2.0"),
    ("--config.model.dtype=None", "'model.dtype' in override '--config.model.dtype=None' expects str, "
                                  "got None"),
])
def test_wrong_types(override, expected):
    assert expected in error(None, [override])


def test_wrong_type_in_file_names_key(tmp_path):
    spec = write(tmp_path, "def get_config(arg=None):\n    return {'mesh': {'tensor': '2'}}\n")
    assert "'mesh.tensor' in " in error(spec) and "expects int, got '2'" in error(spec)


@pytest.mark.parametrize("overrides, expected", [
    (["--config.model.remat=bogus"], "model.remat='bogus' is not valid; choose one of none, full, "
                                     "dots_saveable"),
    (["--config.model.preset=llama9"], "model.preset='llama9' is not valid; choose one of"),
    (["--config.mesh.data=-1"], "at most one mesh axis may be -1, got -1 for mesh.data, mesh.fsdp"),
    (["--config.mesh.tensor=0"], "mesh.tensor=0 must be >= 1, or -1"),
    (["--config.model.scan_unroll=0"], "model.scan_unroll=0 must be >= 1"),
    (["--config.model.arch.num_heads=5"], "model.arch.num_heads=5 is not a valid architecture"),
    (["--config.model.arch.rope_scaling.enabled=False", "--config.model.arch.rope_scaling.factor=2"],
     "model.arch.rope_scaling.enabled=False contradicts"),
])
def test_impossible_values(overrides, expected):
    assert expected in error(None, overrides)


@pytest.mark.parametrize("body, expected", [
    ("x = 1\n", "does not define get_config"),
    ("def get_config(arg=None):\n    raise ValueError('no such\\nvariant')\n",
     "get_config() raised ValueError: no such variant"),
    ("def get_config(arg=None):\n    return 3\n", "get_config returned int"),
    ("def get_config(:\n", "failed to import: SyntaxError"),
])
def test_broken_files(tmp_path, body, expected):
    spec = write(tmp_path, body, name="broken.py")
    assert "broken.py" in error(spec) and expected in error(spec)


def test_missing_file_and_bad_spec(tmp_path):
    assert "nope.py does not exist" in error(str(tmp_path / "nope.py"))
    assert "path/to/file.py[:arg]" in error("config.yaml")


def test_locked_after_load():
    cfg = load_config(None)
    with pytest.raises(AttributeError):
        cfg.model.dtype = "float32"
    with pytest.raises(AttributeError):
        cfg.new_key = 1
