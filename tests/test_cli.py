import math
import subprocess
import sys
from pathlib import Path

from maxprune import __version__, schema
from maxprune.cli import main, split_overrides

REPO = Path(__file__).resolve().parents[1]


def assert_user_error(capsys, argv, *expected):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("maxprune: error:") and err.count("\n") == 1 and "Traceback" not in err
    for text in expected:
        assert text in err


def test_config_error_is_one_line(capsys):
    assert_user_error(capsys, ["forward", "--config.model.remat=bogus"], "model.remat='bogus'")


def test_missing_config_file(capsys):
    assert_user_error(capsys, ["init", "out", "--config=missing.py"], "missing.py does not exist")


def test_unrecognized_arguments_exit_2(capsys):
    assert main(["forward", "--bogus"]) == 2
    assert "unrecognized arguments: --bogus" in capsys.readouterr().err
    assert main(["inspect", "dir", "--config.seed=1"]) == 2  # inspect takes no config
    assert "unrecognized arguments: --config.seed=1" in capsys.readouterr().err


def test_split_overrides():
    argv = ["forward", "d", "--config.seed", "3", "config.mesh.data=2", "--config=x.py", "--batch", "1"]
    assert split_overrides(argv) == (["--config.seed=3", "config.mesh.data=2"],
                                     ["forward", "d", "--config=x.py", "--batch", "1"])


def test_help_lists_commands(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in ("forward", "init", "inspect", "convert"))


def test_keyboard_interrupt_exits_130(monkeypatch, capsys):
    def interrupt(*args):
        raise KeyboardInterrupt
    monkeypatch.setattr(schema, "load_config", interrupt)
    assert main(["forward"]) == 130


def test_forward_smoke(capsys):
    argv = ["forward", f"--config={REPO}/configs/model/tiny.py", "--config.model.dtype", "float32",
            "--batch=1", "--seq-len=8"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "logits   (1, 8, 512) float32" in out
    loss = float(out.split("loss")[1].split()[0])
    assert abs(loss - math.log(512)) < 0.5  # random init predicts ~uniformly


def test_forward_rejects_bad_shape(capsys):
    assert_user_error(capsys, ["forward", "--seq-len=1"], "--seq-len=1")


def test_init_refuses_existing_dir(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    assert_user_error(capsys, ["init", str(tmp_path)], "pass --overwrite")


def test_init_convert_round_trip_inspect(tmp_path, capsys):
    model, hf, back = (str(tmp_path / name) for name in ("model", "hf", "back"))
    assert main(["init", model, "--config.model.arch.num_layers=1"]) == 0
    assert main(["convert", "to-hf", model, hf, "--dtype=bfloat16"]) == 0
    assert main(["convert", "from-hf", hf, back]) == 0
    capsys.readouterr()
    assert main(["inspect", back]) == 0
    text = capsys.readouterr().out
    assert "num_layers                 1" in text and "0.00% sparse" in text and "absent (dense)" in text
    assert '"hf_dtype": "bfloat16"' in text  # --dtype reached the export


def test_convert_missing_source(tmp_path, capsys):
    assert main(["convert", "from-hf", str(tmp_path / "nope"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("maxprune: error:") and "nope" in err and "Traceback" not in err


def test_python_m_version():
    result = subprocess.run([sys.executable, "-m", "maxprune", "--version"], cwd=REPO,
                            capture_output=True, text=True, check=True)
    assert result.stdout.strip() == f"maxprune {__version__}"
