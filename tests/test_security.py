"""No pickles, no remote code, and names from configs cannot leave their output root (README: Security)."""

import re
from pathlib import Path

import pytest

import maxprune
from maxprune.cli import main
from maxprune.errors import MaxpruneError
from maxprune.model.arch import preset
from maxprune.schema import load_config
from maxprune.study import plan as plan_lib
from maxprune.study import variants

PACKAGE = Path(maxprune.__file__).parent
FORBIDDEN = ("trust_remote_code=True", "allow_pickle=True", "pickle.load", "torch.load(")
BAD_NAMES = ("../../etc", "a/b", "..", ".hidden", "a\\b", "a\x00b", "a b", "", "x..y")


def _sources() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def test_package_source_loads_no_pickles_and_no_remote_code():
    found = [f"{path.relative_to(PACKAGE)}: {needle}" for path in _sources()
             for needle in FORBIDDEN if needle in path.read_text()]
    assert not found


def test_every_np_load_refuses_pickles():
    calls = [(path, m.group(0)) for path in _sources()
             for m in re.finditer(r"np\.load\([^)]*\)", path.read_text())]
    assert calls  # calibration .npy files are read somewhere
    assert all("allow_pickle=False" in call for _, call in calls), calls


@pytest.mark.parametrize("name", BAD_NAMES)
def test_bad_names_are_refused(name):
    with pytest.raises(MaxpruneError, match="cannot name a directory inside the output root"):
        variants.check_name(name, "run name")


@pytest.mark.parametrize("name", ["P200B", "Meta", "P8K.prune.wanda-2of4-r50", "S1.25M-total.flap-r62.5.s1",
                                  "llama@3+x_y"])
def test_good_names_pass(name):
    assert variants.check_name(name, "run name") == name


@pytest.mark.parametrize("name", ["../../etc", "a/b"])
def test_study_name_cannot_escape_the_runs_dir(name, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # the default root is ./runs/<study.name>
    assert main(["study", "run", f"--config.study.name={name}", "--config.study.variants=('wanda@0.5',)"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"maxprune: error: study.name {name!r} cannot name a directory") and err.count("\n") == 1
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("name, message", [("a/b", "cannot name a directory"), ("a\\b", "cannot name a directory"),
                                           ("../../etc", "without '.'")])
def test_imported_parent_names_cannot_escape_the_study_root(name, message, tmp_path, monkeypatch, capsys):
    cfg = tmp_path / "evil.py"
    study = {"imported": {name: "/x"}, "variants": (f"wanda@0.5 parents={name}",)}
    cfg.write_text(f"def get_config(arg=None):\n    return {{'study': {study!r}}}\n")
    monkeypatch.chdir(tmp_path)
    assert main(["study", "run", "--root", str(tmp_path / "root"), f"--config={cfg}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("maxprune: error: study.imported name") and message in err and err.count("\n") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["evil.py"]


def test_every_planned_run_name_is_checked(monkeypatch):
    cfg = load_config(None, ["--config.study.variants=('wanda@0.5',)"])
    plan = plan_lib.plan_study(cfg, preset("tiny"), 32)
    assert all(variants.check_name(run.name, "run") for run in plan.runs)
    monkeypatch.setattr(plan_lib, "fmt_tokens", lambda n: "../x")  # a name that would leave the root
    with pytest.raises(MaxpruneError, match="run name '.*\\.\\./x.*' cannot name a directory"):
        plan_lib.plan_study(cfg, preset("tiny"), 32)


def test_hf_import_refuses_pickle_only_checkpoints(tmp_path):
    from maxprune.convert import hf
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04 not unpickled")
    with pytest.raises(MaxpruneError, match="only PyTorch pickle weights \\(pytorch_model.bin\\)"):
        hf.safetensors_files(tmp_path)
