"""Faults: SIGTERM, kill -9 at random moments, non-finite losses, a second writer on one run dir.

A killed or stopped run, resumed, must end bit-identical to an uninterrupted one.
"""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from maxprune.errors import Diverged, MaxpruneError
from maxprune.fs import locks
from maxprune.model import model_dir
from maxprune.model.arch import preset
from maxprune.model.llama import init_params
from maxprune.schema import load_config
from maxprune.train import build, trainer
from maxprune.train import optimizer as opt_lib
from maxprune.train.metrics import read_metrics
from maxprune.train.run_dir import read_status

ARCH = preset("tiny").replace(vocab_size=300)


def _train_args(run_dir, corpus, *extra):
    return [sys.executable, "-m", "maxprune", "train", str(run_dir), "--quiet",
            f"--config.data.train={corpus['train']}", "--config.model.arch.vocab_size=300",
            "--config.model.dtype=float32", "--config.train.tokens=32K", "--config.train.log_every=1",
            "--config.train.checkpoint_every=4", "--config.train.tensorboard=False",
            "--config.data.allow_repeat=True", *extra]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    # One persistent compilation cache: every restart reuses the first process's programs.
    cache = tmp_path_factory.mktemp("jax_cache")
    return {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu", "JAX_COMPILATION_CACHE_DIR": str(cache),
            "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}


@pytest.fixture(scope="module")
def straight(tmp_path_factory, tiny_corpus, env):
    """The uninterrupted run every interrupted one must reproduce."""
    run_dir = tmp_path_factory.mktemp("straight") / "run"
    out = subprocess.run(_train_args(run_dir, tiny_corpus), capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return run_dir


def _assert_same_run(a: Path, b: Path) -> None:
    pa = model_dir.load_model_dir(a / "model", as_numpy=True).params
    pb = model_dir.load_model_dir(b / "model", as_numpy=True).params
    for x, y in zip(jax.tree.leaves(pa), jax.tree.leaves(pb)):
        np.testing.assert_array_equal(x, y)
    loss = lambda d: {r["step"]: r["loss"] for r in read_metrics(d, "train")}
    assert loss(a) == loss(b)  # every step logged once, with the same loss


def _logged_step(run_dir: Path) -> int:
    rows = read_metrics(run_dir, "train") if (run_dir / "metrics.jsonl").exists() else []
    return max((r["step"] for r in rows), default=0)


def _wait_for_progress(proc, run_dir: Path, beyond: int, timeout: float = 120) -> bool:
    """True once the run has logged a step past `beyond`; False if the process ended first."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            return False
        try:
            if _logged_step(run_dir) > beyond:
                return True
        except (ValueError, OSError):  # a line being written
            pass
        time.sleep(0.02)
    raise AssertionError(f"no progress past step {beyond} in {timeout} s")


# -------------------------------------------------------------- preemption
def test_sigterm_saves_a_checkpoint_exits_143_and_resumes_bit_exact(tmp_path, tiny_corpus, env, straight):
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(_train_args(run_dir, tiny_corpus), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)
    assert _wait_for_progress(proc, run_dir, beyond=5)
    sent = time.time()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert time.time() - sent < 30  # one step and one checkpoint write, not the rest of the run
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("maxprune: stopped: SIGTERM: saved checkpoint step") and "Traceback" not in err
    status = read_status(run_dir)
    saved = int(last.split("checkpoint step ")[1].split()[0])
    assert status["status"] == "preempted" and status["steps"] == saved
    assert (run_dir / "checkpoints" / str(saved)).is_dir()
    out = subprocess.run(_train_args(run_dir, tiny_corpus), capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    _assert_same_run(straight, run_dir)


def test_kill9_at_random_moments_loses_nothing_and_ends_bit_exact(tmp_path, tiny_corpus, env, straight):
    """At least 10 SIGKILLs at random moments (steps, async checkpoint writes), then one resume to the end."""
    run_dir, rng = tmp_path / "run", random.Random(0)
    kills, during_write = 0, 0
    total = read_status(straight)["total_steps"]
    while kills < 12:
        logged = _logged_step(run_dir)
        proc = subprocess.Popen(_train_args(run_dir, tiny_corpus), stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True, env=env)
        if not _wait_for_progress(proc, run_dir, beyond=logged):  # past what the last attempt logged
            pytest.fail(f"the run ended before kill {kills + 1}: {proc.stderr.read()[-2000:]}")
        time.sleep(rng.uniform(0.0, 0.25))
        proc.kill()
        proc.wait()
        proc.stderr.close()
        kills += 1
        during_write += any(".orbax-checkpoint-tmp" in p.name for p in (run_dir / "checkpoints").iterdir())
        status = read_status(run_dir)
        latest = max((int(p.name) for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit()), default=0)
        assert latest <= _logged_step(run_dir) and status["status"] == "running"
        assert latest < total, "the run got too short for 12 kills"
    out = subprocess.run(_train_args(run_dir, tiny_corpus), capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    _assert_same_run(straight, run_dir)
    print(f"\nkill -9: {kills} kills survived ({during_write} during a checkpoint write), resumed bit-exact")


# ----------------------------------------------------------------- numerics
def _cfg(corpus, run_tokens="4K", *overrides):
    base = [f"--config.data.train={corpus['train']}", "--config.model.arch.vocab_size=300",
            "--config.model.dtype=float32", f"--config.train.tokens={run_tokens}", "--config.train.log_every=100",
            "--config.train.checkpoint_every=3", "--config.train.tensorboard=False",
            "--config.train.async_checkpoint=False"]
    return load_config(None, base + list(overrides))


@pytest.fixture
def poison_loss(monkeypatch):
    """Make the logged loss non-finite at the given (1-based) steps; the update itself is the real one."""
    def install(steps):
        real = build.make_train_step

        def make(*args, **kwargs):
            step = real(*args, **kwargs)

            def poisoned(state, tokens, masks, teacher_params=None):
                new, metrics = step(state, tokens, masks, teacher_params)
                bad = jnp.isin(state.step + 1, jnp.asarray(steps))
                return new, {**metrics, "loss": jnp.where(bad, jnp.nan, metrics["loss"])}
            return poisoned
        monkeypatch.setattr(build, "make_train_step", make)
    return install


def test_nonfinite_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(tmp_path, tiny_corpus,
                                                                                    poison_loss):
    poison_loss([8])
    run_dir = tmp_path / "run"
    with pytest.raises(Diverged, match=r"loss nan .* at step 8; the last good checkpoint is step 6"):
        trainer.run(_cfg(tiny_corpus), run_dir, progress=False)
    steps = sorted(int(p.name) for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit())
    assert steps == [3, 6]  # nothing saved at or after the bad step
    assert read_status(run_dir) == {"status": "diverged", "steps": 8, "total_steps": 16,
                                            "last_checkpoint": 6}
    assert Diverged("x").exit_code == 3


def test_nonfinite_steps_are_skipped_up_to_the_limit(tmp_path, tiny_corpus, poison_loss, capsys):
    poison_loss([5, 6, 11])
    result = trainer.run(_cfg(tiny_corpus, "4K", "--config.train.skip_nonfinite=2"), tmp_path / "ok",
                         progress=False)
    assert result.status == "complete" and result.steps == 16
    assert capsys.readouterr().out.count("update skipped") == 3
    poison_loss([5, 6, 7])
    with pytest.raises(Diverged, match="at step 7 after 2 skipped in a row"):
        trainer.run(_cfg(tiny_corpus, "4K", "--config.train.skip_nonfinite=2"), tmp_path / "bad", progress=False)


def test_a_nan_weight_stops_at_step_1_with_exit_3(tmp_path, tiny_corpus, capsys):
    from maxprune.cli import main

    params = init_params(ARCH, jax.random.key(0))
    params["final_norm"]["scale"] = params["final_norm"]["scale"].at[3].set(jnp.nan)
    model_dir.save_model_dir(tmp_path / "nan", ARCH, params)
    code = main(["train", str(tmp_path / "run"), "--quiet", f"--config.train.init={tmp_path / 'nan'}",
                 f"--config.data.train={tiny_corpus['train']}", "--config.train.tokens=2K",
                 "--config.train.tensorboard=False"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 3 and len(err) == 1 and "at step 1" in err[0] and "no checkpoint was saved" in err[0]


def test_skipped_updates_leave_params_and_moments_unchanged():
    recipe = load_config(None, ["--config.train.skip_nonfinite=1"]).train
    opt = opt_lib.make_optimizer(recipe, 10)
    params = {"w": {"kernel": jnp.ones((2, 2))}}
    state = opt.init(params)
    nan = {"w": {"kernel": jnp.full((2, 2), jnp.nan)}}
    updates, skipped = opt.update(nan, state, params)
    assert float(jnp.abs(updates["w"]["kernel"]).max()) == 0.0
    assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.all(a == b)), skipped.inner_state, state.inner_state))
    updates, _ = opt.update(nan, skipped, params)  # a second one in a row passes the limit of 1
    assert bool(jnp.isnan(updates["w"]["kernel"]).all())
    assert isinstance(opt, optax.GradientTransformation)


# -------------------------------------------------------------- concurrency
def test_second_trainer_on_the_same_run_dir_is_refused(tmp_path, tiny_corpus):
    run_dir = tmp_path / "run"
    with locks.dir_lock(run_dir, f"run dir {run_dir}"):
        with pytest.raises(MaxpruneError, match=f"run dir {run_dir} is in use by pid {os.getpid()}"):
            trainer.run(_cfg(tiny_corpus), run_dir, progress=False)
    assert not (run_dir / "checkpoints").exists()


def test_a_dead_holders_lock_does_not_block(tmp_path):
    # flock: a process killed while holding the lock frees it
    code = (f"import sys, time; sys.path.insert(0, {str(Path(__file__).parents[1])!r}); "
            f"from maxprune.fs import locks; ctx = locks.dir_lock({str(tmp_path)!r}, 'x'); ctx.__enter__(); "
            f"print('held', flush=True); time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert proc.stdout.readline().strip() == "held"
    with pytest.raises(MaxpruneError, match=f"in use by pid {proc.pid}"):
        with locks.dir_lock(tmp_path, "x"):
            pass
    proc.kill()
    proc.wait()
    with locks.dir_lock(tmp_path, "x"):
        pass
    # without flock: an O_EXCL file naming a dead pid on this host is stale and taken over
    pidfile = tmp_path / "nf" / ".lock.pid"
    pidfile.parent.mkdir()
    pidfile.write_text(json.dumps({"pid": proc.pid, "host": __import__("socket").gethostname(), "since": "x"}))
    release = locks._acquire_exclusive_file(pidfile, "y")
    assert json.loads(pidfile.read_text())["pid"] == os.getpid()
    with pytest.raises(MaxpruneError, match=f"y is in use by pid {os.getpid()}"):
        locks._acquire_exclusive_file(pidfile, "y")
    release()
    assert not pidfile.exists()


# ------------------------------------------- kills during pruning and reports
def _tree_equal(a, b) -> None:
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(x, y)


def test_kill9_during_pruning_never_leaves_a_complete_looking_output(tmp_path, tiny_corpus, env):
    parent = tmp_path / "parent"
    model_dir.save_model_dir(parent, ARCH, init_params(ARCH, jax.random.key(1)),
                             provenance={"tokenizer_hash": tiny_corpus["tokenizer"].hash})

    def args(out):
        return [sys.executable, "-m", "maxprune", "prune", "--config=configs/prune/wanda.py", "--quiet",
                f"--config.prune.input={parent}", f"--config.prune.output={out}",
                f"--config.prune.calibration={tiny_corpus['train']}", "--config.prune.n_samples=8",
                "--config.prune.batch_size=4", "--config.model.arch.vocab_size=300"]
    repo = Path(__file__).parents[1]
    started = time.time()
    done = subprocess.run(args(tmp_path / "reference"), cwd=repo, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    full, reference = time.time() - started, model_dir.load_model_dir(tmp_path / "reference", as_numpy=True)
    rng, out, outcomes = random.Random(1), tmp_path / "out", []
    for _ in range(4):
        proc = subprocess.Popen(args(out), cwd=repo, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(0.2, 0.8) * full)  # startup, calibration, pruning or the write
        proc.kill()
        proc.wait()
        if out.exists():  # finished before the kill: then it is whole
            md = model_dir.load_model_dir(out, as_numpy=True)
            _tree_equal(md.params, reference.params)
            outcomes.append("finished")
            __import__("shutil").rmtree(out)
        else:
            outcomes.append("staging left" if (tmp_path / ".out.partial").exists() else "nothing written")
    done = subprocess.run(args(out), cwd=repo, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    final = model_dir.load_model_dir(out, as_numpy=True)
    _tree_equal(final.params, reference.params)
    _tree_equal(final.masks, reference.masks)
    assert not (tmp_path / ".out.partial").exists()
    print(f"\nprune kill -9 outcomes: {outcomes}")


def test_kill9_during_report_writing_never_leaves_half_a_report(tmp_path, env):
    from test_study import _fixture_plan_and_status

    _, _, status = _fixture_plan_and_status()
    (tmp_path / "study.json").write_text(json.dumps(status))
    script = ("import sys; sys.path.insert(0, 'tests'); from test_study import _fixture_plan_and_status; "
              "from maxprune.study import report; cfg, plan, _ = _fixture_plan_and_status(); "
              f"report.write_report(cfg, {str(tmp_path)!r}, plan)")
    repo = Path(__file__).parents[1]
    started = time.time()
    assert subprocess.run([sys.executable, "-c", script], cwd=repo, env=env, timeout=300).returncode == 0
    full = time.time() - started
    reference = {p.name: p.stat().st_size for p in (tmp_path / "report").iterdir()}
    rng, seen = random.Random(2), []
    for _ in range(5):
        __import__("shutil").rmtree(tmp_path / "report", ignore_errors=True)
        proc = subprocess.Popen([sys.executable, "-c", script], cwd=repo, env=env)
        time.sleep(rng.uniform(0.6 * full, 1.05 * full))
        proc.kill()
        proc.wait()
        if (tmp_path / "report").exists():
            assert {p.name for p in (tmp_path / "report").iterdir()} == set(reference)
            seen.append("whole")
        else:
            seen.append("absent")
    assert len(reference) >= 4
    print(f"\nreport kill -9 outcomes: {seen}")
