"""Minitron depth and width against brute force and an independent NumPy computation."""

import functools

import jax
import numpy as np
import pytest

from maxprune import config
from maxprune.errors import MaxpruneError
from maxprune.model import llama
from maxprune.model.arch import preset
from maxprune.prune import api, engine, minitron, search, shapes
from maxprune.prune.surgery import Keep, slice_model

import hf_helpers as H

ARCH = preset("tiny").replace(vocab_size=300, num_layers=5)
OPTIONS = engine.EngineOptions(batch_size=4, dtype="float32", progress=False)
CALIB = np.random.RandomState(0).randint(0, 300, (8, 24)).astype(np.int32)
PARAMS = H.random_params(ARCH)


def prune_cfg(*overrides):
    return config.load_config(None, ["--config.prune.batch_size=4", *overrides]).prune


def run(method, *overrides):
    with engine.run_options(dtype="float32", progress=False):
        return api.prune(PARAMS, ARCH, CALIB, prune_cfg(f"--config.prune.method={method}", *overrides))


@functools.cache
def hidden_states():
    """Every layer's input and the last output, and each layer's captured sites (fp32, a plain loop)."""
    layer_fn = jax.jit(functools.partial(llama.apply_layer, arch=ARCH, options=llama.ModelOptions(dtype="float32"),
                                         capture=True))
    x = np.asarray(PARAMS["embed"]["embedding"])[CALIB]
    states, sites = [x], []
    for i in range(ARCH.num_layers):
        x, inter = layer_fn(jax.tree.map(lambda a: a[i], PARAMS["layers"]), x)
        states.append(np.asarray(x, np.float64))
        sites.append({"attn_norm": inter["attn_norm"]["output"][0], "mlp_norm": inter["mlp_norm"]["output"][0],
                      "o": inter["attn"]["o"]["input"][0], "down": inter["mlp"]["down"]["input"][0]})
    return states, [{k: np.asarray(v, np.float64) for k, v in s.items()} for s in sites]


# --------------------------------------------------------------------- depth
def test_depth_loss_curve_equals_brute_force():
    k = 2
    scores = minitron.depth_scores(PARAMS, ARCH, CALIB, k, "loss", OPTIONS)
    brute = []
    for i in range(ARCH.num_layers - k + 1):
        kept = [j for j in range(ARCH.num_layers) if not i <= j < i + k]
        params, arch, _ = slice_model(PARAMS, ARCH, Keep(layers=np.array(kept)))
        brute.append(search.calibration_loss(params, arch, CALIB, OPTIONS))
    np.testing.assert_allclose(scores.loss_I, brute, rtol=2e-5)
    assert scores.loss_dense == pytest.approx(search.calibration_loss(PARAMS, ARCH, CALIB, OPTIONS), rel=2e-5)
    L = ARCH.num_layers
    assert scores.layer_applications == 2 * (L + (L - k) * (L - k + 1) // 2)  # 2 chunks, prefix shared


def test_depth_prunes_the_brute_force_best_block():
    result = run("minitron_depth", "--config.prune.minitron_depth.layers_removed=2")
    curve = [row["loss"] for row in result.report["curve"]]
    best = int(np.argmin(curve))
    assert result.report["summary"]["removed"] == [best, best + 2] and result.arch.num_layers == 3
    expected, _, _ = slice_model(PARAMS, ARCH, Keep(layers=np.array([j for j in range(5) if not best <= j < best + 2])))
    assert jax.tree.all(jax.tree.map(np.array_equal, result.params, expected))
    assert result.report["summary"]["loss_pruned"] == pytest.approx(min(curve))


def test_depth_block_influence_equals_numpy():
    k = 2
    states, _ = hidden_states()
    cos = lambda a, b: np.sum(a * b, -1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))
    expected = [1 - np.mean(cos(states[i], states[i + k])) for i in range(ARCH.num_layers - k + 1)]
    scores = minitron.depth_scores(PARAMS, ARCH, CALIB, k, "block_influence", OPTIONS)
    np.testing.assert_allclose(scores.influence_I, expected, rtol=1e-5, atol=1e-7)
    result = run("minitron_depth", "--config.prune.minitron_depth.criterion=block_influence",
                 "--config.prune.minitron_depth.layers_removed=2")
    assert result.report["summary"]["removed"][0] == int(np.argmin(expected))


def test_depth_layers_from_the_ratio():
    # 0.5 of the prunable weights of 5 layers: keep the most layers whose count fits, 2 (2.5 would not)
    assert run("minitron_depth", "--config.prune.ratio=0.5").arch.num_layers == 2


@pytest.mark.parametrize("k", [5, 7])
def test_depth_removing_every_layer_is_an_error(k):
    with pytest.raises(MaxpruneError, match="layers_removed"):
        run("minitron_depth", f"--config.prune.minitron_depth.layers_removed={k}")


# --------------------------------------------------------------------- width
def numpy_width_scores():
    """FFN: sqrt Σ_n (mean_t |a|)²; hidden: Σ over 2L norms of the same; heads: L2 over head channels."""
    _, sites = hidden_states()
    stat = lambda x: np.sqrt(np.sum(np.mean(np.abs(x), axis=1) ** 2, axis=0))
    hidden = sum(stat(s["attn_norm"]) + stat(s["mlp_norm"]) for s in sites)
    ffn = np.stack([stat(s["down"]) for s in sites])
    heads = np.stack([np.linalg.norm(stat(s["o"]).reshape(ARCH.num_heads, -1), axis=-1) for s in sites])
    return hidden, ffn, heads


def test_width_scores_equal_numpy():
    scores = minitron.width_scores(PARAMS, ARCH, CALIB, OPTIONS)
    hidden, ffn, heads = numpy_width_scores()
    np.testing.assert_allclose(scores.hidden_D, hidden, rtol=1e-5)
    np.testing.assert_allclose(scores.ffn_LF, ffn, rtol=1e-5)
    np.testing.assert_allclose(scores.head_LN, heads, rtol=1e-5)


def test_width_keeps_top_k_in_descending_order_and_best_heads_per_group():
    result = run("minitron_width", "--config.prune.minitron_width.hidden_size=48",
                 "--config.prune.minitron_width.ffn_size=96", "--config.prune.minitron_width.num_heads=2")
    hidden, ffn, heads = numpy_width_scores()
    keep = Keep(hidden_D=np.argsort(-hidden)[:48], ffn_LF=np.argsort(-ffn, axis=1)[:, :96],
                heads_LKG=np.argsort(-heads.reshape(5, 2, 2), axis=-1)[..., :1])
    expected, arch, _ = slice_model(PARAMS, ARCH, keep)
    assert result.arch == arch
    assert (arch.hidden_size, arch.ffn_size, arch.num_heads, arch.num_kv_heads) == (48, 96, 2, 2)
    assert jax.tree.all(jax.tree.map(np.array_equal, result.params, expected))


def test_width_ffn_fills_the_ratio_when_unset():
    result = run("minitron_width", "--config.prune.minitron_width.hidden_size=48", "--config.prune.ratio=0.3")
    target = ARCH.num_params() - 0.3 * ARCH.num_prunable_params()
    step = 3 * ARCH.num_layers * 48 * 4  # one rounding step (multiple 4 for hidden 64)
    assert 0 <= target - result.arch.num_params() < step


def test_width_search_picks_the_lowest_loss():
    result = run("minitron_width", "--config.prune.search.enabled=True", "--config.prune.ratio=0.3",
                 "--config.prune.minitron_width.multiple=8")
    rows = result.report["search"]["candidates"]
    assert len(rows) >= 2 and all(2 * r["hidden_size"] <= r["ffn_size"] <= 4 * r["hidden_size"] for r in rows)
    best = min(rows, key=lambda r: r["loss"])
    assert best["selected"] and result.arch.hidden_size == best["hidden_size"]
    assert search.calibration_loss(result.params, result.arch, CALIB, OPTIONS) == pytest.approx(best["loss"])


def test_width_default_shape_is_the_median_candidate():
    candidates = shapes.minitron_width_candidates(ARCH, 0.5)
    assert run("minitron_width").arch == candidates[(len(candidates) - 1) // 2]


@pytest.mark.parametrize("overrides, fragment", [
    (("--config.prune.minitron_width.hidden_size=48", "--config.prune.minitron_width.num_heads=3"),
     "same number of query heads"),
    (("--config.prune.minitron_width.hidden_size=80",), "must fit"),
])
def test_width_bad_shape_is_a_clear_error(overrides, fragment):
    with pytest.raises(MaxpruneError, match=fragment):
        run("minitron_width", *overrides)


@pytest.mark.parametrize("overrides, fragment", [
    (("--config.prune.method=minitron_width", "--config.prune.search.enabled=True",
      "--config.prune.minitron_width.hidden_size=48"), "unset prune.minitron_width.hidden_size"),
    (("--config.prune.method=minitron_depth", "--config.prune.search.enabled=True"), "search.enabled is for"),
    (("--config.prune.minitron_depth.criterion=cosine",), "criterion"),
    (("--config.prune.minitron_width.ratio_of=layers",), "ratio_of"),
])
def test_bad_config_is_a_clear_error(overrides, fragment):
    with pytest.raises(MaxpruneError, match=fragment):
        prune_cfg(*overrides)


# ------------------------------------------------------------ end to end
@pytest.mark.parametrize("overrides", [
    ["--config.prune.method=minitron_depth", "--config.prune.minitron_depth.layers_removed=2"],
    ["--config.prune.method=minitron_width", "--config.prune.minitron_width.hidden_size=48"],
], ids=["depth", "width"])
@pytest.mark.parametrize("train", [False, pytest.param(True, marks=pytest.mark.slow)], ids=["export", "retrain"])
def test_pruned_model_dir_exports_and_retrains(tmp_path, tiny_corpus, overrides, train):
    """As FLAP's (test_flap.py), which also retrains in the fast suite; retraining these is in the slow one."""
    from test_flap import prune_train_export
    dirs = prune_train_export(tmp_path, tiny_corpus, overrides, ARCH, PARAMS, train=train)
    assert dirs["pruned"].arch.num_params() < ARCH.num_params()
