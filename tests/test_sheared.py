"""Sheared LLaMA: hard-concrete gates, expected sizes, the gated model, convergence, sharding, the cut model."""

import functools
import json
import math
from pathlib import Path

import hf_helpers as H
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from maxprune import sharding
from maxprune.errors import MaxpruneError
from maxprune.model import layers, llama
from maxprune.model.arch import preset
from maxprune.prune import api
from maxprune.prune.engine.options import run_options
from maxprune.prune.sheared import data as sheared_data
from maxprune.prune.sheared import gates as sheared_gates
from maxprune.prune.sheared import method as sheared
from maxprune.prune.sheared import plan as sheared_plan
from maxprune.prune.sheared import step as sheared_step
from maxprune.schema import load_config

ARCH = preset("tiny").replace(vocab_size=300, num_layers=4, num_heads=8, num_kv_heads=4)  # groups of 2 heads
TARGET = dict(hidden_size=48, num_heads=4, num_layers=3, ffn_size=96)  # 48 % 4 == 0 for transformers' export
BATCH, SEQ = 8, 32
SHORT = 10  # steps of the end-to-end run (8 fake devices: ~50 ms a step on 2 cores)
SHEARED = ["--config.prune.method=sheared_llama", f"--config.prune.sheared_llama.tokens={SHORT * BATCH * SEQ}",
           f"--config.prune.sheared_llama.global_batch={BATCH}",
           *(f"--config.prune.sheared_llama.{k}={v}" for k, v in TARGET.items())]
COMMON = ["--config.model.dtype=float32", "--config.model.arch.vocab_size=300"]
PARAMS = H.random_params(ARCH)
CALIB = np.random.RandomState(0).randint(0, 300, (64, SEQ)).astype(np.int32)
F32 = llama.ModelOptions(dtype="float32")
sample_gates, keep_probability = jax.jit(sheared_gates.sample_gates), jax.jit(sheared_gates.keep_probability)


@functools.partial(jax.jit, static_argnums=3)
def gated_logits(params, gates, tokens_BT, arch):
    return sheared_gates.gated_logits(params, gates, tokens_BT, arch, F32)


def prune_cfg(*overrides):
    return load_config(None, [*SHEARED, *overrides]).prune


def random_log_alpha(arch, seed=0, std=2.0):
    rng = np.random.default_rng(seed)
    return {name: jnp.asarray(rng.normal(0.0, std, shape), jnp.float32)
            for name, shape in sheared_gates.mask_shapes(arch).items()}


# ------------------------------------------------------------- hard concrete
def test_gates_follow_the_original_hard_concrete_formulas():
    log_alpha = random_log_alpha(ARCH)
    u = sheared_gates.gate_noise(ARCH, jax.random.key(3))
    z = sample_gates(log_alpha, u)
    for name in sheared_gates.MASKS:
        a, uu = np.asarray(log_alpha[name], np.float64), np.asarray(u[name], np.float64)
        s = 1 / (1 + np.exp(-(np.log(uu) - np.log(1 - uu) + a) / (2 / 3)))
        np.testing.assert_allclose(z[name], np.clip(s * 1.2 - 0.1, 0, 1), atol=1e-6)
        xn = 0.1 / 1.2
        p = 1 - np.clip(1 / (1 + np.exp(-((2 / 3) * np.log(xn / (1 - xn)) - a))), 1e-6, 1 - 1e-6)
        np.testing.assert_allclose(keep_probability(log_alpha)[name], p, rtol=1e-5, atol=1e-7)
    # P(z > 0) is what the sampler does: frequency over 4000 draws of one gate per log-alpha value
    a = jnp.linspace(-3.0, 3.0, 7)
    draws = jax.random.uniform(jax.random.key(0), (4000, 7), minval=1e-6, maxval=1 - 1e-6)
    freq = np.mean(np.asarray(sample_gates({"g": a}, {"g": draws})["g"]) > 0, axis=0)
    np.testing.assert_allclose(freq, keep_probability({"g": a})["g"], atol=0.03)


def test_gates_start_open_and_log_alpha_is_clamped():
    log_alpha = sheared_gates.init_log_alpha(ARCH, jax.random.key(0))
    for name, shape in sheared_gates.mask_shapes(ARCH).items():
        assert log_alpha[name].shape == shape  # N(5, 0.01) lies above ln 100: clamped as the original's first use
        np.testing.assert_allclose(log_alpha[name], math.log(100), rtol=1e-6)
    assert float(jnp.min(keep_probability(log_alpha)["ffn"])) > 0.99
    clamped = sheared_gates.clamp_log_alpha({"g": jnp.array([-9.0, 0.5, 9.0])})["g"]
    np.testing.assert_allclose(clamped, [math.log(1e-2), 0.5, math.log(1e2)], rtol=1e-6)


# --------------------------------------------------------------------- sizes
def test_expected_size_is_the_parent_count_when_open_and_the_cut_count_when_binary():
    ones = {name: jnp.ones(shape) for name, shape in sheared_gates.mask_shapes(ARCH).items()}
    assert int(sheared_gates.expected_params(ones, ARCH)) == ARCH.num_prunable_params()
    rng = np.random.default_rng(0)
    binary = {"layer": np.isin(np.arange(4), [0, 2, 3]),
              "head": np.stack([np.isin(np.arange(4), rng.choice(4, 2, replace=False)) for _ in range(4)]),
              "ffn": np.stack([np.isin(np.arange(192), rng.choice(192, 96, replace=False)) for _ in range(4)]),
              "hidden": np.isin(np.arange(64), rng.choice(64, 48, replace=False))}
    cut = ARCH.replace(num_layers=3, num_heads=4, num_kv_heads=2, ffn_size=96, hidden_size=48)
    binary = {k: jnp.asarray(v, jnp.float32) for k, v in binary.items()}
    assert int(sheared_gates.expected_params(binary, ARCH)) == cut.num_prunable_params()
    # at the start every gate is open with P = 0.998: the expectation is the parent's count to 1 %
    start = keep_probability(sheared_gates.init_log_alpha(ARCH, jax.random.key(0)))
    assert 0.99 < float(sheared_gates.expected_params(start, ARCH)) / ARCH.num_prunable_params() < 1.0


def test_deterministic_gates_keep_the_target_count_in_every_row():
    target = ARCH.replace(**{**TARGET, "num_kv_heads": 2})
    log_alpha = random_log_alpha(ARCH)
    gates, keep = sheared_gates.deterministic_gates(log_alpha, ARCH, target)
    for name, count in sheared_gates.unit_counts(target).items():
        rows = gates[name].reshape(-1, gates[name].shape[-1])
        clamped = np.clip(np.asarray(log_alpha[name]), math.log(1e-2), math.log(1e2)).reshape(rows.shape)
        score = 1 / (1 + np.exp(-clamped / (2 / 3) * 0.8))
        assert (np.count_nonzero(rows, axis=-1) == count).all() and keep[name].shape[-1] == count
        np.testing.assert_allclose(rows[rows > 0], score[rows > 0], rtol=1e-6)  # soft scores kept, to be folded
        for row, s in zip(rows, score):  # the lowest scores go
            assert s[row > 0].min() >= s[row == 0].max()


# ---------------------------------------------------------------- the model
def reference_logits(params, gates, tokens_BT, arch):
    """The original's gated model, literally: gates on activations, RMSNorm statistics over kept channels."""
    B, T = tokens_BT.shape
    hz, kept = gates["hidden"], gates["hidden"] != 0

    def norm(x, scale):
        var = jnp.sum(jnp.where(kept, x * x, 0.0), -1, keepdims=True) / jnp.sum(kept)
        return scale * x * jax.lax.rsqrt(var + arch.norm_eps) * hz

    inv_freq = layers.rope_inv_freq(arch.head_dim, arch.rope_theta, arch.rope_scaling)
    cos, sin = layers.rope_cos_sin(jnp.broadcast_to(jnp.arange(T), (B, T)), inv_freq)
    x = params["embed"]["embedding"][tokens_BT] * hz
    for i in range(arch.num_layers):
        p = jax.tree.map(lambda a: a[i], params["layers"])
        out = lambda y, block, name: (y @ p[block][name]["kernel"] + p[block][name].get("bias", 0.0)) \
            * gates["layer"][i] * hz
        h = norm(x, p["attn_norm"]["scale"])
        q = (h @ p["attn"]["q"]["kernel"]).reshape(B, T, arch.num_heads, -1)
        k = (h @ p["attn"]["k"]["kernel"]).reshape(B, T, arch.num_kv_heads, -1)
        v = (h @ p["attn"]["v"]["kernel"]).reshape(B, T, arch.num_kv_heads, -1)
        ctx = layers.gqa_attention(layers.apply_rope(q, cos, sin), layers.apply_rope(k, cos, sin), v, "einsum")
        ctx = ctx * jnp.repeat(gates["head"][i], arch.group_size)[None, None, :, None]  # head n is in group n // G
        x = x + out(ctx.reshape(B, T, -1), "attn", "o")
        h = norm(x, p["mlp_norm"]["scale"])
        up = (h @ p["mlp"]["up"]["kernel"]) * gates["ffn"][i]
        x = x + out(jax.nn.silu(h @ p["mlp"]["gate"]["kernel"]) * up, "mlp", "down")
    h = norm(x, params["final_norm"]["scale"])
    head = params["embed"]["embedding"].T if arch.tie_embeddings else params["lm_head"]["kernel"]
    return h @ head


VARIANTS = [ARCH, ARCH.replace(tie_embeddings=True, out_bias=True)]


@pytest.mark.parametrize("arch", VARIANTS, ids=["untied", "tied+bias"])
def test_gated_forward_is_the_original_activation_gating(arch):
    params = H.random_params(arch)
    gates = sample_gates(random_log_alpha(arch, 1), sheared_gates.gate_noise(arch, jax.random.key(5)))
    assert 0 < int(jnp.sum(gates["hidden"] == 0)) < arch.hidden_size  # soft gates and real zeros
    assert 0 < float(jnp.mean((gates["ffn"] > 0) & (gates["ffn"] < 1)))
    tokens = H.tokens(300, length=24)
    ours = gated_logits(params, gates, tokens, arch)
    np.testing.assert_allclose(ours, jax.jit(reference_logits, static_argnums=3)(params, gates, tokens, arch),
                               atol=1e-4, rtol=0)


@pytest.mark.parametrize("arch", VARIANTS, ids=["untied", "tied+bias"])
def test_finalised_model_equals_the_gated_model_with_the_final_gates(arch):
    params, log_alpha = H.random_params(arch), random_log_alpha(arch, 2)
    target = arch.replace(**{**TARGET, "num_kv_heads": 2})
    new_params, new_arch, final = sheared.finalize(params, log_alpha, arch, target)
    assert new_arch == target
    tokens = H.tokens(300, length=24)
    gated = gated_logits(params, final["gates"], tokens, arch)
    cut = jax.jit(llama.forward, static_argnums=(2, 4))(new_params, tokens, new_arch, None, F32)
    np.testing.assert_allclose(cut, gated, atol=1e-4, rtol=0)
    assert float(jnp.max(jnp.abs(gated))) > 0.1  # not trivially zero


# ------------------------------------------------------------ end to end
@pytest.fixture(scope="module")
def pruned(tmp_path_factory, tiny_corpus):
    """Parent dir → `prune_model_dir` on the prepared corpus (8 devices, sharded) → pruned dir and report."""
    from maxprune.model.model_dir import load_model_dir, save_model_dir
    from maxprune.prune.run import REPORT_FILE, prune_model_dir

    root = tmp_path_factory.mktemp("sheared")
    save_model_dir(root / "parent", ARCH, PARAMS, tokenizer_dir=tiny_corpus["root"] / "tokenizer")
    cfg = load_config(None, COMMON + SHEARED + [
        f"--config.prune.input={root / 'parent'}", f"--config.prune.output={root / 'pruned'}",
        f"--config.prune.calibration={tiny_corpus['train']}", "--config.prune.n_samples=8"])
    prune_model_dir(cfg, progress=False)
    report = json.loads((root / "pruned" / REPORT_FILE).read_text())
    return {"root": root, "md": load_model_dir(root / "pruned"), "report": report, "cfg": cfg}


def test_expected_sparsity_reaches_the_target():
    """240 steps at the original's learning rates, one device, cycling the calibration tokens."""
    steps = 240
    with run_options(dtype="float32", progress=False):
        result = api.prune(PARAMS, ARCH, CALIB, prune_cfg(f"--config.prune.sheared_llama.tokens={steps * BATCH * SEQ}"))
    report = result.report
    assert result.arch == ARCH.replace(**TARGET, num_kv_heads=2)
    assert report["training"]["data"] == {"kind": "calibration", "sequences": 64}
    assert report["training"]["steps"] == steps and report["summary"]["mask_learning_tokens"] == steps * BATCH * SEQ
    last = report["trajectory"][-1]
    for name, stats in last["masks"].items():
        assert stats["target"] == pytest.approx(report["final"]["target_sparsity"][name])
        assert abs(stats["expected"] - stats["target"]) < 0.03, (name, stats)
    assert report["final"]["expected_params"] == pytest.approx(report["final"]["target_params"], rel=0.05)
    first = report["trajectory"][0]
    assert first["expected_sparsity"] < 0.1 < last["expected_sparsity"]  # gates start open, then close
    assert len(report["kept"]["layers"]) == 3 and np.shape(report["kept"]["kv_groups"]) == (4, 2)


def test_pruned_model_dir_records_the_run(pruned):
    report, md = pruned["report"], pruned["md"]
    assert md.arch == ARCH.replace(**TARGET, num_kv_heads=2) and md.provenance["method"] == "sheared_llama"
    assert report["training"]["data"]["kind"] == "prepared" and report["training"]["steps"] == SHORT
    assert md.provenance["report"]["mask_learning_tokens"] == SHORT * BATCH * SEQ


def test_sharded_step_equals_the_single_device_step(pruned, devices8):
    """Three steps of the end-to-end run's plan, params sharded over 8 devices vs on one (its compiled step)."""
    p = pruned["cfg"].prune
    plan = sheared_plan.make_plan(ARCH, p, SEQ)
    h = sheared_step.Hyper.from_config(p.sheared_llama, "float32")
    mesh = sharding.make_mesh(None, devices8)
    batches = [np.random.RandomState(i).randint(0, 300, (BATCH, SEQ)).astype(np.int32) for i in range(3)]
    states = {}
    for name, mesh_or_none, params in (("one", None, PARAMS), ("eight", mesh, sharding.shard_tree(PARAMS, mesh))):
        prog = sheared_step.programs(ARCH, plan, h, p.seed, mesh_or_none, mesh_or_none is not None)
        with sharding.mesh_scope(mesh_or_none):
            state = prog.init(params)
            for batch in batches:
                state, metrics = prog.step(state, sheared_data.place_batch(batch, prog.batch_sharding))
        states[name] = (jax.device_get(state.variables), jax.device_get(metrics))
    (v1, m1), (v8, m8) = states["one"], states["eight"]
    assert float(m1["ce"]) == pytest.approx(float(m8["ce"]), rel=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), v1, v8)
    assert not np.allclose(v1["log_alpha"]["ffn"], math.log(100))  # the gates did move


def test_pruned_model_retrains_and_exports_with_logits_parity(pruned, tiny_corpus):
    from maxprune.convert import hf
    from maxprune.model.model_dir import load_model_dir
    from maxprune.train import trainer

    root = pruned["root"]
    cfg = load_config(None, COMMON + [
        f"--config.train.init={root / 'pruned'}", f"--config.data.train={tiny_corpus['train']}",
        "--config.train.tokens=512", "--config.train.tensorboard=False", "--config.train.async_checkpoint=False"])
    trained = trainer.train(cfg, root / "run", progress=False)
    assert trained.status == "complete" and trained.steps == 2
    md, retrained = pruned["md"], load_model_dir(trained.model_dir)
    assert retrained.arch == md.arch
    assert not jax.tree.all(jax.tree.map(np.array_equal, retrained.params, md.params))
    hf.to_hf(root / "pruned", root / "hf")  # the same shape as the retrained model's
    tokens = H.tokens(300, length=32)
    np.testing.assert_allclose(H.our_logits(md.params, md.arch, tokens), H.hf_logits(root / "hf", tokens),
                               atol=1e-4, rtol=0)


# ------------------------------------------------------------------- errors
@pytest.mark.parametrize("overrides, fragment", [
    (("--config.prune.sheared_llama.hidden_size=128",), "larger than the parent"),
    (("--config.prune.sheared_llama.num_heads=3",), "whole KV groups"),
    (("--config.prune.sheared_llama.num_heads=16",), "larger than the parent"),
    (("--config.prune.sheared_llama.tokens=2560", "--config.prune.sheared_llama.lagrangian_warmup=10"),
     "never be reached"),
    (("--config.prune.sheared_llama.tokens=100",), "smaller than one step"),
])
def test_bad_target_or_budget_is_a_clear_error(overrides, fragment):
    with pytest.raises(MaxpruneError, match=fragment):
        with run_options(dtype="float32", progress=False):
            api.prune(PARAMS, ARCH, CALIB, prune_cfg(*overrides))


def test_bad_config_is_a_clear_error():
    with pytest.raises(MaxpruneError, match="gradient ascent"):
        prune_cfg("--config.prune.sheared_llama.lambda_lr=1.0")
    with pytest.raises(MaxpruneError, match="set prune.calibration"):
        api.prune(PARAMS, ARCH, None, prune_cfg())


def test_default_target_is_the_planned_shape_and_the_paper_config_the_original_run():
    """Without a shape the pruner makes what the study planner expects (`shapes.target_arch`)."""
    from maxprune.prune.structured import shapes
    cfg = load_config(None, ["--config.prune.method=sheared_llama"]).prune
    assert sheared_plan.check(ARCH, cfg) == shapes.target_arch("sheared_llama", ARCH, 0.5)
    llama8b = preset("llama3.1-8b")
    table1 = {"num_layers": 32, "hidden_size": 3456, "num_heads": 32, "num_kv_heads": 8, "ffn_size": 7552}
    assert {k: v for k, v in shapes.describe(sheared_plan.check(llama8b, cfg)).items() if k in table1} == table1
    paper = load_config(str(Path(__file__).parents[1] / "configs/prune/sheared_llama.py"), []).prune
    plan = sheared_plan.make_plan(llama8b, paper, paper.seq_len)
    assert (plan.steps, plan.global_batch, plan.seq_len, plan.lagrangian_warmup) == (3200, 32, 4096, 320)
    assert {k: v for k, v in shapes.describe(plan.target).items() if k in table1} == table1
