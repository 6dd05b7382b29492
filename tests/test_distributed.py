"""Multi-host: the environment -> join plan, an unreachable coordinator, and a real 2-process
training run on localhost (CPU collectives) that stops, resumes and matches one process."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from maxprune import distributed
from maxprune.errors import MaxpruneError

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------- plan
def test_plan_from_the_environment():
    assert distributed.plan({}) is None
    assert distributed.plan({"TPU_WORKER_HOSTNAMES": "localhost"}) is None  # one host: nothing to join
    explicit = distributed.plan({"MAXPRUNE_COORDINATOR": "10.0.0.2:8476", "MAXPRUNE_NUM_PROCESSES": "4",
                                 "MAXPRUNE_PROCESS_ID": "3", "MAXPRUNE_INIT_TIMEOUT": "7"})
    assert explicit == distributed.Plan("10.0.0.2:8476", 4, 3, 7) and not explicit.auto
    for env in ({"MAXPRUNE_DISTRIBUTED": "1"}, {"TPU_WORKER_HOSTNAMES": "t1,t2,t3,t4"},
                {"MEGASCALE_COORDINATOR_ADDRESS": "10.0.0.2:8080"}):
        assert distributed.plan(env) == distributed.Plan(None, None, None, distributed.DEFAULT_TIMEOUT_S)
    assert distributed.plan({"MAXPRUNE_DISTRIBUTED": "0", "TPU_WORKER_HOSTNAMES": "t1,t2"}) is None


@pytest.mark.parametrize("env, message", [
    ({"MAXPRUNE_COORDINATOR": "10.0.0.2:8476"}, "needs MAXPRUNE_NUM_PROCESSES and MAXPRUNE_PROCESS_ID"),
    ({"MAXPRUNE_COORDINATOR": "10.0.0.2", "MAXPRUNE_NUM_PROCESSES": "2", "MAXPRUNE_PROCESS_ID": "0"},
     "must be host:port"),
    ({"MAXPRUNE_COORDINATOR": "h:1", "MAXPRUNE_NUM_PROCESSES": "2", "MAXPRUNE_PROCESS_ID": "2"},
     "MAXPRUNE_PROCESS_ID=2 must be < MAXPRUNE_NUM_PROCESSES=2"),
    ({"MAXPRUNE_DISTRIBUTED": "1", "MAXPRUNE_INIT_TIMEOUT": "soon"}, "MAXPRUNE_INIT_TIMEOUT='soon' must be an integer"),
    ({"MAXPRUNE_DISTRIBUTED": "maybe"}, "MAXPRUNE_DISTRIBUTED='maybe' must be 1"),
])
def test_bad_environment_is_a_clear_error(env, message):
    with pytest.raises(MaxpruneError, match=message):
        distributed.plan(env)


def test_asking_for_a_cluster_where_there_is_none():
    with pytest.raises(MaxpruneError, match="JAX detected no cluster .* or MAXPRUNE_DISTRIBUTED=0"):
        distributed.initialize({"MAXPRUNE_DISTRIBUTED": "1", "MAXPRUNE_INIT_TIMEOUT": "5"})
    assert distributed.initialize({}) is False  # nothing asked: single process, JAX untouched


def test_wait_for_coordinator():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        distributed.wait_for_coordinator(f"127.0.0.1:{server.getsockname()[1]}", 2)
    port = free_port()
    start = time.monotonic()
    with pytest.raises(MaxpruneError, match=f"coordinator at 127.0.0.1:{port} did not answer within 0.5 s"):
        distributed.wait_for_coordinator(f"127.0.0.1:{port}", 0.5)
    assert time.monotonic() - start < 3


def test_unreachable_coordinator_fails_the_cli_in_time():
    """Process 1 of 2 with nobody at the coordinator's port: one line, exit 2, after the timeout."""
    port = free_port()
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "MAXPRUNE_COORDINATOR": f"127.0.0.1:{port}",
           "MAXPRUNE_NUM_PROCESSES": "2", "MAXPRUNE_PROCESS_ID": "1", "MAXPRUNE_INIT_TIMEOUT": "3"}
    start = time.monotonic()
    out = subprocess.run([sys.executable, "-m", "maxprune", "forward", f"--config={REPO}/configs/model/tiny.py"],
                         env=env, capture_output=True, text=True, timeout=60)
    elapsed = time.monotonic() - start
    assert out.returncode == 2, out.stderr
    assert out.stderr == (f"maxprune: error: the JAX coordinator at 127.0.0.1:{port} did not answer within 3 s "
                          f"(Connection refused); start process 0 first, check the address and firewall, "
                          f"or raise MAXPRUNE_INIT_TIMEOUT\n")
    assert 3 <= elapsed < 30


# --------------------------------------------------------- 2 processes
def run_job(cmd, *, env, timeout=240):
    """Run a launcher/command in its own process group; kill the group if it overruns."""
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, cwd=REPO)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"{cmd[:3]} timed out:\n{out[-3000:]}")
    assert proc.returncode == 0, out[-3000:]
    return out


def train_args(run_dir, corpus, masks_dir, *extra):
    return [sys.executable, "-m", "maxprune", "train", str(run_dir), "--quiet",
            f"--config.data.train={corpus['train']}", f"--config.data.validation={corpus['validation']}",
            f"--config.train.masks_from={masks_dir}", "--config.model.arch.vocab_size=300",
            "--config.model.dtype=float32", "--config.train.tokens=2K", "--config.train.global_batch=8",
            "--config.train.lr=3e-3", "--config.train.log_every=1", "--config.train.tensorboard=False",
            "--config.train.checkpoint_every=100", "--config.train.eval_sequences=16", *extra]


@pytest.fixture(scope="module")
def sparse_donor(tmp_path_factory):
    """A model dir with random 50 % masks: the runs train a sparse scratch model under them."""
    from maxprune.model import llama, model_dir
    from maxprune.model import masks as masks_lib
    from maxprune.model.arch import preset

    arch = preset("tiny").replace(vocab_size=300)
    params = llama.init_params(arch, jax.random.key(1))
    rng = np.random.default_rng(0)
    masks = masks_lib.from_kernels({k: rng.random(masks_lib.get_kernel(params, *k).shape) > 0.5
                                    for k in masks_lib.PRUNABLE})
    path = tmp_path_factory.mktemp("donor") / "model"
    model_dir.save_model_dir(path, arch, masks_lib.apply_masks(params, masks), masks, {"method": "test"})
    return path


def test_two_processes_train_resume_and_match_one_process(tmp_path, tiny_corpus, sparse_donor):
    """2 processes x 2 CPU devices vs 1 process x 4 devices, same mesh (fsdp 4) and global batch 8.

    The 2-process run stops after 3 of 8 steps (checkpoint), resumes in a new job and
    finishes. Losses step by step and the final params must agree to float32 rounding:
    the programs are the same SPMD partitioning, only the cross-process all-reduces run
    through gloo instead of in-process, which may sum in another order (~1 ulp per
    reduction, grown a little by 8 AdamW steps). The data order must be identical: the
    first step's loss (identical random init) and the resumed loader state prove it.
    """
    from maxprune.model.model_dir import load_model_dir
    from maxprune.train.metrics import read_metrics

    env = {k: v for k, v in os.environ.items() if not k.startswith("MAXPRUNE_")}
    # Compile time dominates; LLVM's cheap mode halves it (both runs use it, so they stay comparable).
    env["XLA_FLAGS"] = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
    launcher = ["bash", str(REPO / "launch/local/run.sh"), "--processes", "2", "--devices", "2",
                "--timeout", "60", "--log-dir", str(tmp_path / "logs"), "--"]
    multi, single = tmp_path / "multi", tmp_path / "single"
    out = run_job(launcher + train_args(multi, tiny_corpus, sparse_donor, "--config.train.stop_after_steps=3"), env=env)
    assert "stopped at step 3" in out
    assert json.loads((multi / "run.json").read_text())["status"] == "stopped"
    out = run_job(launcher + train_args(multi, tiny_corpus, sparse_donor), env=env)
    assert "trained 8 steps" in out
    one_process = {**env, "JAX_PLATFORMS": "cpu",
                   "XLA_FLAGS": env["XLA_FLAGS"] + " --xla_force_host_platform_device_count=4"}
    run_job(train_args(single, tiny_corpus, sparse_donor), env=one_process)

    status = {name: json.loads((d / "run.json").read_text()) for name, d in (("multi", multi), ("single", single))}
    assert status["multi"]["status"] == status["single"]["status"] == "complete"
    assert status["multi"]["tokens_seen"] == status["single"]["tokens_seen"] == 8 * 8 * 32
    losses = {name: [r["loss"] for r in read_metrics(d, "train")] for name, d in (("multi", multi), ("single", single))}
    assert len(losses["multi"]) == len(losses["single"]) == 8
    np.testing.assert_allclose(losses["multi"], losses["single"], rtol=1e-6, atol=0)
    np.testing.assert_allclose(status["multi"]["validation_loss"], status["single"]["validation_loss"], rtol=1e-6)

    a, b = load_model_dir(multi / "model"), load_model_dir(single / "model")
    assert a.arch == b.arch
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a.params), jax.tree.leaves(b.params), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=0, atol=1e-6, err_msg=str(path))
    for (path, m), n in zip(jax.tree_util.tree_leaves_with_path(a.masks), jax.tree.leaves(b.masks), strict=True):
        np.testing.assert_array_equal(np.asarray(m), np.asarray(n), err_msg=str(path))
    # The stop's checkpoint holds the loader at batch 3, the last one at batch 8, in both runs.
    assert loader_positions(multi) == {3: 3, 8: 8} and loader_positions(single) == {8: 8}
    # Only process 0 writes metrics.jsonl: one validation record, not one per process.
    assert sum(1 for r in read_metrics(multi) if r["kind"] == "validation") == 1


def loader_positions(run_dir) -> dict[int, int]:
    """checkpoint step -> the saved loader's next global batch."""
    import orbax.checkpoint as ocp

    with ocp.CheckpointManager(run_dir / "checkpoints", item_names=("data",)) as manager:
        return {step: manager.restore(step, args=ocp.args.Composite(data=ocp.args.JsonRestore()))["data"]
                ["iterator"]["next_index"] for step in manager.all_steps()}
