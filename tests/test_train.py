"""The trainer: recipe, masks, accumulation, sharding, exact resume, sweep, distillation, bad input."""

import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from maxprune import sharding
from maxprune.errors import MaxpruneError
from maxprune.model import llama, model_dir
from maxprune.model import masks as masks_lib
from maxprune.model.arch import preset
from maxprune.schema import load_config
from maxprune.train import optimizer as opt_lib
from maxprune.train import trainer
from maxprune.train.metrics import CompileClock, read_metrics
from maxprune.train.run_dir import read_status
from maxprune.train.setup import setup
from maxprune.train.step import distill_loss, init_state, make_train_step
from maxprune.train.validation import validation_loss

ARCH = preset("tiny").replace(vocab_size=300)
FP32 = llama.ModelOptions(dtype="float32")


def _cfg(corpus, *overrides):
    base = [f"--config.data.train={corpus['train']}", "--config.model.arch.vocab_size=300",
            "--config.model.dtype=float32", "--config.train.tokens=8K", "--config.train.lr=3e-3",
            "--config.train.log_every=1", "--config.train.tensorboard=False"]
    return load_config(None, base + list(overrides))


def _recipe(**changes):
    values = dict(lr=1e-3, warmup_ratio=0.05, min_lr_ratio=0.1, grad_clip=1.0, b1=0.9, b2=0.95,
                  eps=1e-8, weight_decay=0.01)
    return ml_collections.ConfigDict({**values, **changes})


def _batch(b=8, l=32, seed=0):
    return jax.random.randint(jax.random.key(seed), (b, l), 0, ARCH.vocab_size)


def _run_steps(params, masks, batches, microbatches=1, total=100):
    optimizer = opt_lib.make_optimizer(_recipe(), total)
    step = jax.jit(make_train_step(ARCH, FP32, optimizer, opt_lib.make_schedule(1e-3, total),
                                   microbatches=microbatches))
    state = init_state(masks_lib.apply_masks(params, masks), optimizer)
    for tokens in batches:
        state, metrics = step(state, tokens, masks)
    return state, metrics


# ------------------------------------------------------------------ recipe
def test_schedule_matches_the_recipe():
    peak, total = 3e-4, 1000
    sched = opt_lib.make_schedule(peak, total, warmup_ratio=0.05, min_lr_ratio=0.1)
    warmup = 50
    assert float(sched(0)) == 0.0
    assert float(sched(warmup // 2)) == pytest.approx(peak / 2, rel=1e-5)
    assert float(sched(warmup)) == pytest.approx(peak, rel=1e-6)
    mid = warmup + (total - warmup) // 2  # cosine half-way: (peak + floor) / 2
    assert float(sched(mid)) == pytest.approx((peak + 0.1 * peak) / 2, rel=1e-3)
    assert float(sched(total)) == pytest.approx(0.1 * peak, rel=1e-6)


def test_weight_decay_skips_norms_and_biases():
    params = llama.init_params(ARCH.replace(out_bias=True), jax.random.key(0))
    mask = opt_lib.decay_mask(params)
    assert mask["layers"]["attn"]["q"]["kernel"] and mask["embed"]["embedding"]
    assert not mask["layers"]["attn_norm"]["scale"] and not mask["final_norm"]["scale"]
    assert not mask["layers"]["mlp"]["down"]["bias"]


# ------------------------------------------------------------------- step
def test_masked_weights_and_their_adam_moments_stay_exactly_zero():
    params = llama.init_params(ARCH, jax.random.key(0))
    rng = np.random.default_rng(0)
    masks = masks_lib.from_kernels({k: rng.random(masks_lib.get_kernel(params, *k).shape) > 0.5
                                    for k in masks_lib.PRUNABLE})
    state, _ = _run_steps(params, masks, [_batch(seed=i) for i in range(5)])
    adam = state.opt_state.inner_state[1][0]  # apply_if_finite(chain(clip, adamw))
    for block, name, mask in masks_lib.iter_masks(masks):
        off = ~np.asarray(mask)
        for tree in (state.params, adam.mu, adam.nu):
            w = np.asarray(masks_lib.get_kernel(tree, block, name))
            assert np.all(w[off] == 0.0), f"{block}/{name}"
        kept = np.asarray(masks_lib.get_kernel(state.params, block, name))[~off]
        assert np.count_nonzero(kept) == kept.size  # the kept weights did train


def test_accumulation_equals_one_big_batch():
    params = llama.init_params(ARCH, jax.random.key(0))
    batches = [_batch(seed=i) for i in range(3)]
    one, m1 = _run_steps(params, None, batches, microbatches=1)
    four, m4 = _run_steps(params, None, batches, microbatches=4)
    assert float(m4["loss"]) == pytest.approx(float(m1["loss"]), rel=1e-5)
    for a, b in zip(jax.tree.leaves(one.params), jax.tree.leaves(four.params)):
        np.testing.assert_allclose(a, b, atol=2e-6)


def test_sharded_step_equals_single_device(devices8):
    params = llama.init_params(ARCH.replace(num_heads=8, num_kv_heads=2), jax.random.key(0))
    arch = ARCH.replace(num_heads=8, num_kv_heads=2)
    optimizer = opt_lib.make_optimizer(_recipe(), 100)
    step_fn = make_train_step(arch, FP32, optimizer, opt_lib.make_schedule(1e-3, 100))
    tokens = _batch()
    ref_state, ref_metrics = jax.jit(step_fn)(init_state(params, optimizer), tokens, None)
    mesh = sharding.make_mesh(ml_collections.ConfigDict(dict(data=2, fsdp=2, tensor=2)), devices8)
    with sharding.use_mesh(mesh):
        state = init_state(sharding.shard_tree(params, mesh), optimizer)
        shardings = sharding.tree_shardings(state, mesh)
        state = jax.device_put(state, shardings)
        jitted = jax.jit(step_fn, in_shardings=(shardings, sharding.batch_sharding(mesh), None),
                         out_shardings=(shardings, None))
        out, metrics = jitted(state, jax.device_put(tokens, sharding.batch_sharding(mesh)), None)
    up = out.params["layers"]["mlp"]["up"]["kernel"]
    assert up.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
    assert float(metrics["loss"]) == pytest.approx(float(ref_metrics["loss"]), rel=1e-5)
    for a, b in zip(jax.tree.leaves(out.params), jax.tree.leaves(ref_state.params)):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_distill_loss_by_hand():
    s = np.log(np.array([[[0.7, 0.2, 0.1]]]))
    t = np.log(np.array([[[0.5, 0.3, 0.2]]]))
    p, q = np.exp(t[0, 0]), np.exp(s[0, 0])
    expected = np.sum(p * np.log(p / q))
    assert float(distill_loss(jnp.asarray(s), jnp.asarray(t), 1.0)) == pytest.approx(expected, rel=1e-5)
    assert float(distill_loss(jnp.asarray(t), jnp.asarray(t), 2.0)) == pytest.approx(0.0, abs=1e-7)


# --------------------------------------------------------------- the loop
def test_loss_falls_and_run_writes_a_model_dir(tmp_path, tiny_corpus):
    cfg = _cfg(tiny_corpus, f"--config.data.validation={tiny_corpus['validation']}",
               "--config.train.tokens=16K")
    result = trainer.train(cfg, tmp_path / "run", progress=False)
    losses = [r["loss"] for r in read_metrics(tmp_path / "run", "train")]
    assert result.status == "complete" and result.steps == len(losses) == 63  # ceil(16000 / 256)
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 1.0
    assert result.validation_loss is not None and result.validation_loss < np.log(300)
    md = model_dir.load_model_dir(result.model_dir)
    assert md.provenance["tokens_seen"] == 63 * 8 * 32
    assert md.provenance["tokenizer_hash"] == tiny_corpus["tokenizer"].hash
    # a finished run is not redone
    again = trainer.train(cfg, tmp_path / "run", progress=False)
    assert again.status == "complete" and len(read_metrics(tmp_path / "run", "train")) == 63


def test_periodic_validation_compiles_its_program_once(tiny_corpus):
    cfg = _cfg(tiny_corpus, f"--config.data.validation={tiny_corpus['validation']}")
    s = setup(cfg)
    first = validation_loss(cfg, s, s.params)
    with CompileClock() as clock:
        again = validation_loss(cfg, s, s.params)
    assert again == first and clock.programs == 0


def _cli_train(run_dir, corpus, *extra):
    args = [sys.executable, "-m", "maxprune", "train", str(run_dir), "--quiet",
            f"--config.data.train={corpus['train']}", "--config.model.arch.vocab_size=300",
            "--config.model.dtype=float32", "--config.train.tokens=6K", "--config.train.log_every=1",
            "--config.train.checkpoint_every=5", "--config.train.tensorboard=False", *extra]
    out = subprocess.run(args, capture_output=True, text=True, timeout=300,
                         env={**__import__("os").environ, "XLA_FLAGS": ""})
    assert out.returncode == 0, out.stderr[-2000:]
    return out


def test_resume_after_process_exit_is_bit_exact(tmp_path, tiny_corpus):
    # 24 steps straight, vs 12 steps, process exit, restart, 12 more
    _cli_train(tmp_path / "straight", tiny_corpus)
    _cli_train(tmp_path / "resumed", tiny_corpus, "--config.train.stop_after_steps=12")
    assert read_status(tmp_path / "resumed")["status"] == "stopped"
    _cli_train(tmp_path / "resumed", tiny_corpus)
    straight = model_dir.load_model_dir(tmp_path / "straight" / "model")
    resumed = model_dir.load_model_dir(tmp_path / "resumed" / "model")
    for a, b in zip(jax.tree.leaves(straight.params), jax.tree.leaves(resumed.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # identical per-step losses: the resumed run saw the same batches in the same order
    loss = lambda d: {r["step"]: r["loss"] for r in read_metrics(d, "train")}
    assert loss(tmp_path / "resumed") == loss(tmp_path / "straight")
    assert len(loss(tmp_path / "straight")) == 24


def test_sparse_scratch_trains_under_the_donor_masks(tmp_path, tiny_corpus):
    params = llama.init_params(ARCH, jax.random.key(5))
    rng = np.random.default_rng(1)
    masks = masks_lib.from_kernels({k: rng.random(masks_lib.get_kernel(params, *k).shape) > 0.5
                                    for k in masks_lib.PRUNABLE})
    model_dir.save_model_dir(tmp_path / "donor", ARCH, masks_lib.apply_masks(params, masks), masks)
    cfg = _cfg(tiny_corpus, f"--config.train.masks_from={tmp_path / 'donor'}", "--config.train.tokens=2K")
    result = trainer.train(cfg, tmp_path / "run", progress=False)
    md = model_dir.load_model_dir(result.model_dir)
    for block, name, mask in masks_lib.iter_masks(md.masks):
        w = np.asarray(masks_lib.get_kernel(md.params, block, name))
        assert np.all(w[~np.asarray(mask)] == 0)
    # a random init, not the donor's weights
    donor_q = np.asarray(params["layers"]["attn"]["q"]["kernel"])
    assert not np.allclose(np.asarray(md.params["layers"]["attn"]["q"]["kernel"]), donor_q * np.asarray(
        masks["layers"]["attn"]["q"]["kernel"]), atol=1e-3)


def test_distillation_from_a_teacher_runs(tmp_path, tiny_corpus):
    teacher = trainer.train(_cfg(tiny_corpus, "--config.train.tokens=2K"), tmp_path / "teacher", progress=False)
    cfg = _cfg(tiny_corpus, f"--config.train.teacher={teacher.model_dir}", "--config.train.tokens=2K",
               "--config.train.kd_weight=0.5")
    result = trainer.train(cfg, tmp_path / "student", progress=False)
    rows = read_metrics(tmp_path / "student", "train")
    assert result.status == "complete"
    assert all(r["loss"] != r["ce"] for r in rows)  # the KD term is in the loss


def test_lr_sweep_picks_the_lowest_loss(tmp_path, tiny_corpus):
    cfg = _cfg(tiny_corpus, "--config.train.lr_sweep=(1e-5, 3e-3)", "--config.train.sweep_fraction=0.5",
               "--config.train.tokens=4K")
    result = trainer.train(cfg, tmp_path / "run", progress=False)
    table = json.loads((tmp_path / "run" / "sweep.json").read_text())
    losses = {row["lr"]: row["loss"] for row in table["table"]}
    assert set(losses) == {1e-5, 3e-3}
    assert table["chosen_lr"] == min(losses, key=losses.get) == 3e-3 == result.lr
    assert all(row["prefix_steps"] == 8 for row in table["table"])  # half of 16 steps


# The paper's ratios: a 2 % prefix of a 782-step run is 16 steps, inside its 40-step warmup (5 %).
PAPER_SWEEP = ("--config.train.tokens=200K", "--config.data.allow_repeat=True", "--config.train.sweep_fraction=0.02",
               "--config.train.warmup_ratio=0.05", "--config.train.min_lr_ratio=0.1")


def _warmup_cosine(peak, total, warmup, floor_ratio, steps):
    """The recipe's LR at 0-based update `steps`, in NumPy: linear warmup, then cosine to floor_ratio * peak."""
    i = np.asarray(steps, np.float64)
    cos = floor_ratio * peak + (1 - floor_ratio) * peak * 0.5 * (1 + np.cos(np.pi * (i - warmup) / (total - warmup)))
    return np.where(i < warmup, peak * i / warmup, cos)


def _trial_rows(trial_dir):
    rows = read_metrics(trial_dir, "train")
    return [r["step"] for r in rows], np.array([r["lr"] for r in rows]), [r["loss"] for r in rows]


def _tail_loss(losses):
    return np.mean(losses[-max(1, len(losses) // 5):])


def test_compressed_sweep_trials_reach_their_peak_and_decay(tmp_path, tiny_corpus):
    cfg = _cfg(tiny_corpus, *PAPER_SWEEP, "--config.train.lr_sweep=(1e-4, 3e-3)")
    chosen, _ = trainer.sweep(cfg, tmp_path / "run", progress=False)
    saved = json.loads((tmp_path / "run" / "sweep.json").read_text())
    assert saved["schedule"] == "compressed"
    tails = {}
    for row in saved["table"]:
        lr = row["lr"]
        steps, lrs, losses = _trial_rows(tmp_path / "run" / "sweep" / "compressed" / f"lr_{lr:g}")
        assert steps == list(range(1, 17)) and row["prefix_steps"] == row["schedule_steps"] == 16
        # step k logs the LR of update k-1; the trial's own schedule: 1 warmup step of 16 (5 %)
        np.testing.assert_allclose(lrs, _warmup_cosine(lr, 16, 1, 0.1, np.arange(16)), rtol=1e-5)
        assert lrs.max() == pytest.approx(lr, rel=1e-6) and row["peak_lr"] == lrs.max()
        assert 0.1 * lr < lrs[-1] < 0.11 * lr and row["final_lr"] == lrs[-1]  # cosine(14/15) above the floor
        assert row["loss"] == pytest.approx(_tail_loss(losses), rel=1e-6) and row["diverged_at"] is None
        tails[lr] = _tail_loss(losses)
    assert chosen == saved["chosen_lr"] == min(tails, key=tails.get)
    # this run dir's sweep is the compressed one: asking for the other schedule is refused
    with pytest.raises(MaxpruneError, match=r"made with train.sweep_schedule='compressed', not 'prefix'"):
        trainer.sweep(_cfg(tiny_corpus, *PAPER_SWEEP, "--config.train.lr_sweep=(1e-4, 3e-3)",
                           "--config.train.sweep_schedule=prefix"), tmp_path / "run", progress=False)


def test_prefix_sweep_trials_never_leave_the_warmup(tmp_path, tiny_corpus):
    lr = 3e-3  # the compressed test's settings, one LR (its choice of the lowest loss is the same code)
    cfg = _cfg(tiny_corpus, *PAPER_SWEEP, f"--config.train.lr_sweep=({lr},)", "--config.train.sweep_schedule=prefix")
    _, (row,) = trainer.sweep(cfg, tmp_path / "run", progress=False)
    assert json.loads((tmp_path / "run" / "sweep.json").read_text())["schedule"] == "prefix"
    steps, lrs, losses = _trial_rows(tmp_path / "run" / "sweep" / f"lr_{lr:g}")  # the layout it always had
    assert steps == list(range(1, 17)) and row["schedule_steps"] == 782
    # the full run's schedule (40 warmup steps of 782), cut after 16: the trial never reaches its LR
    np.testing.assert_allclose(lrs, _warmup_cosine(lr, 782, 40, 0.1, np.arange(16)), rtol=1e-5)
    assert lrs.max() < lr and row["peak_lr"] == pytest.approx(15 / 40 * lr, rel=1e-6)
    assert row["loss"] == pytest.approx(_tail_loss(losses), rel=1e-6)


def test_a_stopped_sweep_trial_resumes_on_its_own_schedule(tmp_path, tiny_corpus):
    stopping = _cfg(tiny_corpus, *PAPER_SWEEP, "--config.train.lr_sweep=(3e-3,)", "--config.train.stop_after_steps=10")
    first = trainer.train(stopping, tmp_path / "run", progress=False)
    trial = tmp_path / "run" / "sweep" / "compressed" / "lr_0.003"
    assert first.status == "stopped" and first.steps == 10 and first.run_dir == trial
    assert not (tmp_path / "run" / "sweep.json").exists()  # no choice from a trial cut short
    chosen, table = trainer.sweep(stopping, tmp_path / "run", progress=False)  # the trial's last 6 steps
    assert chosen == 3e-3 and table[0]["prefix_steps"] == 16
    steps, lrs, _ = _trial_rows(trial)
    assert steps == list(range(1, 17))
    # across the resume at step 10 the trial kept its own 16-step schedule
    np.testing.assert_allclose(lrs, _warmup_cosine(3e-3, 16, 1, 0.1, np.arange(16)), rtol=1e-5)
    # its checkpoints hold that schedule: resuming them on the full run's is refused
    with pytest.raises(MaxpruneError, match="schedule_steps: 16 vs now 782"):
        trainer.run(stopping, trial, lr=3e-3, max_steps=16, write_model=False, progress=False)


def test_a_diverging_sweep_trial_loses(tmp_path, tiny_corpus):
    cfg = _cfg(tiny_corpus, "--config.train.tokens=4K", "--config.train.sweep_fraction=0.25",
               "--config.train.lr_sweep=(1e-3, 1e12)")  # 4-step trials; 1e12 overflows the logits
    chosen, table = trainer.sweep(cfg, tmp_path / "run", progress=False)
    rows = {row["lr"]: row for row in table}
    assert chosen == 1e-3 and rows[1e-3]["diverged_at"] is None and np.isfinite(rows[1e-3]["loss"])
    assert 1 <= rows[1e12]["diverged_at"] <= 4 and np.isnan(rows[1e12]["loss"])
    assert read_status(tmp_path / "run" / "sweep" / "compressed" / "lr_1e+12")["status"] == "diverged"


def test_checkpoints_older_than_schedule_steps_resume_on_the_runs_own_schedule(tmp_path):
    from maxprune.train.run_dir import check_resume
    now = {"steps": 782, "lr": 3e-3, "schedule_steps": 782}
    check_resume({"steps": 782, "lr": 3e-3}, now, tmp_path)  # no key: it spanned the run's steps
    with pytest.raises(MaxpruneError, match="schedule_steps: 782 vs now 16"):
        check_resume({"steps": 782, "lr": 3e-3}, {**now, "schedule_steps": 16}, tmp_path)


def test_sweep_prefix_shorter_than_its_warmup_is_refused(tmp_path, tiny_corpus):
    cfg = _cfg(tiny_corpus, "--config.train.tokens=4K", "--config.train.lr_sweep=(1e-3,)",
               "--config.train.sweep_fraction=0.1", "--config.train.warmup_ratio=0.6")  # 2-step trials
    with pytest.raises(MaxpruneError, match="gives 2-step sweep trials, too short to pass their 2-step warmup"):
        trainer.sweep(cfg, tmp_path / "run", progress=False)
    assert not (tmp_path / "run" / "sweep").exists()


def test_bad_sweep_schedule_is_refused(tiny_corpus):
    with pytest.raises(MaxpruneError, match=r"train.sweep_schedule='cosine' is not valid; choose one of "
                                            r"compressed, prefix"):
        _cfg(tiny_corpus, "--config.train.sweep_schedule=cosine")


# -------------------------------------------------------------- bad input
def test_global_batch_not_divisible_by_data_parallel(tmp_path, tiny_corpus, devices8):
    cfg = _cfg(tiny_corpus, "--config.train.global_batch=12")  # fsdp fills the 8 devices
    with pytest.raises(MaxpruneError, match=r"global_batch=12 does not divide over the 8 data-parallel devices "
                                            r"\(mesh data x fsdp\) of this mesh \(8 devices\)"):
        trainer.train(cfg, tmp_path / "run", progress=False)


def test_budget_smaller_than_one_step(tmp_path, tiny_corpus):
    with pytest.raises(MaxpruneError, match="smaller than one step"):
        trainer.train(_cfg(tiny_corpus, "--config.train.tokens=100"), tmp_path / "run", progress=False)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_budget_larger_than_its_range(tmp_path, tiny_corpus):
    with pytest.raises(MaxpruneError, match="allow repeating"):
        trainer.train(_cfg(tiny_corpus, "--config.train.tokens=10M"), tmp_path / "run", progress=False)


def test_resume_with_a_different_arch_or_mask_is_refused(tmp_path, tiny_corpus):
    cfg = _cfg(tiny_corpus, "--config.train.tokens=4K", "--config.train.stop_after_steps=4",
               "--config.train.checkpoint_every=2")
    trainer.train(cfg, tmp_path / "run", progress=False)
    other = _cfg(tiny_corpus, "--config.train.tokens=4K", "--config.model.arch.ffn_size=128")
    with pytest.raises(MaxpruneError, match="ffn_size=192 vs 128"):
        trainer.train(other, tmp_path / "run", progress=False)
    params = llama.init_params(ARCH, jax.random.key(0))
    masks = masks_lib.from_kernels({("attn", "q"): np.ones((2, 64, 64), bool)})
    model_dir.save_model_dir(tmp_path / "donor", ARCH, params, masks)
    masked = _cfg(tiny_corpus, "--config.train.tokens=4K", f"--config.train.masks_from={tmp_path / 'donor'}")
    with pytest.raises(MaxpruneError, match="masks_hash"):
        trainer.train(masked, tmp_path / "run", progress=False)
    # the run's checkpoints are untouched: it still resumes and finishes
    assert trainer.train(cfg, tmp_path / "run", progress=False).steps == 8


def test_teacher_with_another_vocab_is_refused(tmp_path, tiny_corpus):
    model_dir.save_model_dir(tmp_path / "t", preset("tiny"), llama.init_params(preset("tiny"), jax.random.key(0)))
    cfg = _cfg(tiny_corpus, f"--config.train.teacher={tmp_path / 't'}")
    with pytest.raises(MaxpruneError, match="same vocabulary"):
        trainer.train(cfg, tmp_path / "run", progress=False)


def test_cli_bad_train_config_exits_2(tmp_path, tiny_corpus, capsys):
    from maxprune.cli import main
    code = main(["train", str(tmp_path / "run"), f"--config.data.train={tiny_corpus['train']}",
                 "--config.model.arch.vocab_size=300", "--config.train.tokens=lots"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("maxprune: error:") and "Traceback" not in err


def test_compile_clock_counts_compilations_not_cached_calls():
    from maxprune.train.metrics import CompileClock
    f = jax.jit(lambda x: jnp.tanh(x) * 3.0 + 0.5)
    x = jnp.asarray(np.ones((7, 3), np.float32))
    with CompileClock() as clock:
        f(x)
        f(x)  # cached: not compiled again
    assert clock.programs == 1 and clock.seconds > 0
    with CompileClock() as again:
        f(x)
    assert again.programs == 0 and again.seconds == 0.0
