"""Launch scripts: exact --dry-run commands for a v4-256 job, the same commands when run for real
(against a fake gcloud), and one-line errors for a missing variable or a missing gcloud."""

import os
import shlex
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LAUNCH = REPO / "launch"
SCRIPTS = sorted(p for p in LAUNCH.glob("*/*.sh") if p.name != "common.sh")
WHERE = ["--name", "pod", "--zone", "us-central2-b", "--project", "my-proj"]
TRAIN = ["train", "gs://my-bkt/runs/P200", "--config", "configs/train/paper.py:pretrain",
         "--config.data.train=gs://my-bkt/data/dclm-8192/train", "--config.train.lr_sweep=(1e-4, 3e-4)"]


def sh(script, *args, env=None, path=None, cwd=None):
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("MAXPRUNE_") and k != "XLA_FLAGS"}
    full_env.update(env or {})
    if path is not None:
        full_env["PATH"] = path
    return subprocess.run(["bash", str(LAUNCH / script), *args], capture_output=True, text=True,
                          env=full_env, timeout=30, cwd=cwd)


def lines(*argvs):
    return [shlex.join(argv) for argv in argvs]


@pytest.fixture
def wheel(tmp_path):
    path = tmp_path / "maxprune-0.1.0-py3-none-any.whl"
    path.write_bytes(b"")
    return path


def v4_256_job(wheel):
    """(script, args, expected argvs) of a whole v4-256 job, create to delete."""
    ssh = ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "pod", "--zone", "us-central2-b", "--project", "my-proj"]
    scp = ["gcloud", "compute", "tpus", "tpu-vm", "scp"]
    where = ["--zone", "us-central2-b", "--project", "my-proj"]
    prepare = ("set -euo pipefail; mkdir -p ~/maxprune-logs; if ! python3.11 -c 'import ensurepip' 2>/dev/null; "
               "then sudo apt-get update -qq && sudo apt-get install -y -qq python3.11 python3.11-venv; fi; "
               "python3.11 -m venv ~/maxprune-venv; ~/maxprune-venv/bin/pip install -q -U pip; mkdir -p ~/maxprune; "
               "if ! command -v gcsfuse >/dev/null; then curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg"
               " | sudo tee /usr/share/keyrings/cloud.google.asc >/dev/null; echo \"deb [signed-by=/usr/share/keyrings/"
               "cloud.google.asc] https://packages.cloud.google.com/apt gcsfuse-$(lsb_release -cs) main\" | sudo tee "
               "/etc/apt/sources.list.d/gcsfuse.list >/dev/null; sudo apt-get update -qq && "
               "sudo apt-get install -y -qq gcsfuse; fi; if ! mountpoint -q /gcs/my-bkt; then "
               "sudo mkdir -p /gcs/my-bkt && sudo chown $USER /gcs/my-bkt && "
               "gcsfuse --implicit-dirs my-bkt /gcs/my-bkt; fi")
    install = ("set -euo pipefail; ~/maxprune-venv/bin/pip install -q ~/maxprune/"
               "'maxprune-0.1.0-py3-none-any.whl[eval]' 'jax[tpu]==0.10.2'; ~/maxprune-venv/bin/maxprune --version")
    train = ("set -euo pipefail; mkdir -p ~/maxprune-logs; cd ~/maxprune; export MAXPRUNE_DISTRIBUTED=1; "
             "~/maxprune-venv/bin/maxprune train /gcs/my-bkt/runs/P200 --config configs/train/paper.py:pretrain "
             "--config.data.train=/gcs/my-bkt/data/dclm-8192/train '--config.train.lr_sweep=(1e-4, 3e-4)' "
             "2>&1 | tee -a ~/maxprune-logs/p200.log")
    return [
        ("tpu/create.sh", [*WHERE, "--type", "v4-256", "--queued", "--spot"],
         [["gcloud", "compute", "tpus", "queued-resources", "create", "pod", "--node-id", "pod", *where,
           "--accelerator-type", "v4-256", "--runtime-version", "tpu-ubuntu2204-base", "--spot"]]),
        ("tpu/setup.sh", [*WHERE, "--wheel", str(wheel), "--extras", "eval", "--bucket", "gs://my-bkt"],
         [[*ssh, "--worker", "all", "--command", prepare],
          [*scp, str(wheel), "pod:maxprune/", *where, "--worker", "all"],
          [*scp, "--recurse", str(REPO / "configs"), "pod:maxprune/", *where, "--worker", "all"],
          [*ssh, "--worker", "all", "--command", install]]),
        ("tpu/run.sh", [*WHERE, "--job", "p200", "--", *TRAIN],
         [[*ssh, "--worker", "all", "--command", train]]),
        ("tpu/logs.sh", [*WHERE, "--job", "p200", "--fetch", "logs", "--type", "v4-256"],
         [["mkdir", "-p", "logs/p200"]]
         + [[*scp, "pod:maxprune-logs/p200.log", f"logs/p200/worker-{w}.log", *where, "--worker", str(w)]
            for w in range(32)]),
        ("tpu/delete.sh", [*WHERE, "--queued"],
         [["gcloud", "compute", "tpus", "queued-resources", "delete", "pod", *where, "--quiet", "--force"]]),
    ]


def test_v4_256_job_dry_run_prints_the_exact_commands(wheel):
    for script, args, expected in v4_256_job(wheel):
        out = sh(script, "--dry-run", *args)
        assert out.returncode == 0, (script, out.stderr)
        assert out.stdout.splitlines() == lines(*expected), script


def test_scripts_run_what_their_dry_run_prints(tmp_path, wheel):
    """With a fake gcloud that records its argv, a real run makes exactly the dry-run's calls."""
    bin_dir, record = tmp_path / "bin", tmp_path / "calls"
    bin_dir.mkdir()
    (bin_dir / "gcloud").write_text(f'#!/usr/bin/env bash\nprintf "%s\\0" "$@" >> {record}\necho >> {record}\n')
    (bin_dir / "gcloud").chmod(0o755)
    for script, args, expected in v4_256_job(wheel):
        record.write_text("")
        out = sh(script, *args, path=f"{bin_dir}:{os.environ['PATH']}", cwd=tmp_path)
        assert out.returncode == 0, (script, out.stderr)
        calls = [call.split("\0") for call in record.read_text().split("\0\n") if call]
        assert calls == [argv[1:] for argv in expected if argv[0] == "gcloud"], script


def test_env_variables_stand_in_for_flags():
    env = {"MAXPRUNE_TPU_NAME": "pod", "MAXPRUNE_TPU_ZONE": "z", "MAXPRUNE_GCP_PROJECT": "p",
           "MAXPRUNE_TPU_TYPE": "v5e-16"}
    out = sh("tpu/create.sh", "--dry-run", env=env)
    assert out.stdout.splitlines() == lines(
        ["gcloud", "compute", "tpus", "tpu-vm", "create", "pod", "--zone", "z", "--project", "p",
         "--accelerator-type", "v5litepod-16", "--version", "v2-alpha-tpuv5-lite"])


@pytest.mark.parametrize("script, args, message", [
    ("tpu/create.sh", ["--name", "pod", "--project", "p", "--type", "v4-8"],
     "--zone (or MAXPRUNE_TPU_ZONE) is required"),
    ("tpu/create.sh", [*WHERE], "--type (or MAXPRUNE_TPU_TYPE) is required"),
    ("tpu/create.sh", [*WHERE, "--type", "v3-8"], "unknown accelerator type 'v3-8'"),
    ("tpu/setup.sh", [*WHERE], "--wheel FILE or --git URL is required"),
    ("tpu/run.sh", [*WHERE, "--", "train", "r"], "--job is required"),
    ("tpu/run.sh", [*WHERE, "--job", "j"], "no maxprune command given"),
    ("tpu/logs.sh", [*WHERE, "--job", "j", "--fetch", "out"], "--type (or MAXPRUNE_TPU_TYPE) or --workers"),
    ("tpu/delete.sh", ["--zone", "z", "--project", "p"], "--name (or MAXPRUNE_TPU_NAME) is required"),
    ("local/run.sh", ["--processes", "0", "--", "true"], "--processes '0' must be a positive integer"),
    ("gpu/run.sh", ["--gpus", "x", "--", "train"], "--gpus 'x' must be a positive integer"),
])
def test_missing_or_bad_variable_is_one_line_exit_2(script, args, message):
    out = sh(script, "--dry-run", *args)
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.count("\n") == 1 and message in out.stderr, out.stderr


def test_missing_gcloud_is_one_line_exit_2(tmp_path):
    """PATH keeps everything but gcloud."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for directory in os.environ["PATH"].split(":"):
        for tool in Path(directory).glob("*") if Path(directory).is_dir() else ():
            if tool.name != "gcloud" and not (bin_dir / tool.name).exists():
                (bin_dir / tool.name).symlink_to(tool)
    for script, args in (("tpu/create.sh", [*WHERE, "--type", "v4-8"]), ("tpu/delete.sh", WHERE),
                         ("tpu/run.sh", [*WHERE, "--job", "j", "--", "train", "r"])):
        out = sh(script, *args, path=str(bin_dir))
        assert out.returncode == 2 and out.stderr.count("\n") == 1, (script, out.stderr)
        assert "gcloud not found on PATH" in out.stderr


def test_every_script_has_help_and_dry_run():
    for script in SCRIPTS:
        out = sh(str(script.relative_to(LAUNCH)), "--help")
        assert out.returncode == 0 and "Usage:" in out.stdout and "--dry-run" in out.stdout, script
        assert "set -euo pipefail" in script.read_text(), script


def test_local_launcher_dry_run():
    out = sh("local/run.sh", "--processes", "3", "--devices", "4", "--port", "4321", "--timeout", "30",
             "--dry-run", "--", "maxprune", "train", "run dir",
             env={"XLA_FLAGS": "--xla_foo=1 --xla_force_host_platform_device_count=8"})
    assert out.stdout.splitlines() == lines(*(
        ["env", "JAX_PLATFORMS=cpu", "XLA_FLAGS=--xla_foo=1 --xla_force_host_platform_device_count=4",
         "MAXPRUNE_COORDINATOR=127.0.0.1:4321", "MAXPRUNE_NUM_PROCESSES=3", f"MAXPRUNE_PROCESS_ID={i}",
         "MAXPRUNE_INIT_TIMEOUT=30", "maxprune", "train", "run dir"] for i in range(3)))


def test_gpu_mfu_script_runs_bench_step_for_llama_1b():
    out = sh("gpu/mfu_1b.sh", "--dry-run", "--", "--config.train.global_batch=16")
    assert out.returncode == 0, out.stderr
    (line,) = out.stdout.splitlines()
    argv = shlex.split(line)
    assert argv[:4] == ["env", "XLA_PYTHON_CLIENT_MEM_FRACTION=0.90",
                        "XLA_FLAGS=--xla_gpu_enable_latency_hiding_scheduler=true", "CUDA_VISIBLE_DEVICES=0"]
    assert argv[4:7] == ["maxprune", "bench", "step"]
    assert f"{REPO}/configs/model/llama_1b.py" in argv and "--config.model.dtype=bfloat16" in argv
    assert argv[-1] == "--config.train.global_batch=16"  # extra overrides come last and win


def test_local_launcher_reports_the_failing_process(tmp_path):
    out = sh("local/run.sh", "--processes", "2", "--log-dir", str(tmp_path), "--",
             "bash", "-c", 'echo "I am $MAXPRUNE_PROCESS_ID"; [ "$MAXPRUNE_PROCESS_ID" = 0 ] || { sleep 1; exit 3; }')
    assert out.returncode == 3
    assert "I am 0" in out.stdout  # process 0 streams to the terminal
    assert (tmp_path / "process-1.log").read_text() == "I am 1\n"
    assert "process 1 failed with exit status 3" in out.stderr
