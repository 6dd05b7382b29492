"""Minitron depth and width against brute force and an independent NumPy computation."""

import functools

import hf_helpers as H
import jax
import numpy as np
import pytest

from maxprune.errors import MaxpruneError
from maxprune.model import llama
from maxprune.model.arch import preset
from maxprune.prune import api
from maxprune.prune.engine.options import EngineOptions, run_options
from maxprune.prune.structured import minitron, search, shapes
from maxprune.prune.structured.surgery import Keep, slice_model
from maxprune.schema import load_config

ARCH = preset("tiny").replace(vocab_size=300, num_layers=5)
OPTIONS = EngineOptions(batch_size=4, dtype="float32", progress=False)
CALIB = np.random.RandomState(0).randint(0, 300, (8, 24)).astype(np.int32)
PARAMS = H.random_params(ARCH)


def prune_cfg(*overrides):
    return load_config(None, ["--config.prune.batch_size=4", *overrides]).prune


def run(method, *overrides):
    with run_options(dtype="float32", progress=False):
        return api.prune(PARAMS, ARCH, CALIB, prune_cfg(f"--config.prune.method={method}", *overrides))


@functools.cache
def hidden_states():
    """Every layer's input and the last output, and each layer's captured sites (fp32, a plain loop)."""
    layer_fn = jax.jit(functools.partial(llama.apply_layer, arch=ARCH, options=llama.ModelOptions(dtype="float32"),
                                         capture=True))
    x = np.asarray(PARAMS["embed"]["embedding"])[CALIB]
    states, sites = [x], []
    for i in range(ARCH.num_layers):
        x, inter = layer_fn(jax.tree.map(lambda a, i=i: a[i], PARAMS["layers"]), x)
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
AGGREGATIONS = ("paper", "nemo")


def numpy_site_stat(x_NTC, aggregation):
    """Per channel: paper Σ_{n,t} x² (its L2 over tokens before the root); nemo sqrt Σ_n (mean_t |x|)²."""
    x = np.asarray(x_NTC, np.float64)
    return np.sum(x ** 2, axis=(0, 1)) if aggregation == "paper" else np.sqrt(np.sum(np.mean(np.abs(x), 1) ** 2, 0))


def numpy_scores(sites, aggregation):
    """(hidden, ffn, heads) from each layer's site activations ``{attn_norm, mlp_norm, o, down}``."""
    stat = functools.partial(numpy_site_stat, aggregation=aggregation)
    norms = sum(stat(s["attn_norm"]) + stat(s["mlp_norm"]) for s in sites)
    ffn = np.stack([stat(s["down"]) for s in sites])
    o = np.stack([stat(s["o"]).reshape(ARCH.num_heads, -1) for s in sites])
    if aggregation == "paper":  # squares added across the 2L norms, one root at the end
        return np.sqrt(norms), np.sqrt(ffn), np.sqrt(np.sum(o, -1))
    return norms, ffn, np.linalg.norm(o, axis=-1)


def numpy_width_scores(aggregation="paper"):
    return numpy_scores(hidden_states()[1], aggregation)


@pytest.fixture(scope="module")
def hf_hook_sites(tmp_path_factory):
    """Each layer's site activations from transformers' forward (hooks as the paper's collection), fp32."""
    import torch
    from transformers import LlamaForCausalLM

    from maxprune.convert import hf
    from maxprune.model.model_dir import save_model_dir
    tmp_dir = tmp_path_factory.mktemp("hooks")
    save_model_dir(tmp_dir / "md", ARCH, PARAMS)
    hf.to_hf(tmp_dir / "md", tmp_dir / "hf")
    model = LlamaForCausalLM.from_pretrained(tmp_dir / "hf", dtype=torch.float32).eval()
    sites = [{k: [] for k in ("attn_norm", "mlp_norm", "o", "down")} for _ in range(ARCH.num_layers)]
    keep = lambda i, k, output: lambda m, args, out: sites[i][k].append((out if output else args[0]).numpy())
    for i, layer in enumerate(model.model.layers):
        layer.input_layernorm.register_forward_hook(keep(i, "attn_norm", True))
        layer.post_attention_layernorm.register_forward_hook(keep(i, "mlp_norm", True))
        layer.self_attn.o_proj.register_forward_hook(keep(i, "o", False))
        layer.mlp.down_proj.register_forward_hook(keep(i, "down", False))
    with torch.no_grad():
        for seq in CALIB:  # batch size 1, as the paper's collection ran it
            model(torch.as_tensor(seq[None]))
    return [{k: np.concatenate(v) for k, v in s.items()} for s in sites]


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_accumulator_over_chunks_equals_numpy(aggregation, dtype):
    """Statistics summed chunk by chunk (uneven batches, heavy-tailed values) == NumPy on all sequences at once."""
    rng = np.random.default_rng(1)
    dims = {"attn_in": 8, "attn_out": 6, "mlp_in": 8, "mlp_hidden": 12}
    acts = {s: (rng.standard_t(2, (9, 7, d)) * rng.uniform(0.1, 5, d)).astype(dtype) for s, d in dims.items()}
    acc = minitron.ACCUMULATORS[aggregation]
    update = jax.jit(acc.update)
    stats = acc.init(dims)
    for lo, hi in ((0, 2), (2, 3), (3, 9)):
        stats = update(stats, {s: jax.numpy.asarray(x[lo:hi]) for s, x in acts.items()})
    out = acc.finalize(stats, 9)
    for site, x in acts.items():
        assert out[site].dtype == np.float32
        np.testing.assert_allclose(out[site], numpy_site_stat(x.astype(np.float64), aggregation), rtol=2e-6)


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
def test_width_scores_equal_numpy(aggregation):
    scores = minitron.width_scores(PARAMS, ARCH, CALIB, OPTIONS, aggregation)
    hidden, ffn, heads = numpy_width_scores(aggregation)
    np.testing.assert_allclose(scores.hidden_D, hidden, rtol=1e-5)
    np.testing.assert_allclose(scores.ffn_LF, ffn, rtol=1e-5)
    np.testing.assert_allclose(scores.head_LN, heads, rtol=1e-5)


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
def test_width_scores_equal_transformers_hooks(aggregation, hf_hook_sites):
    """Against activations hooked out of transformers' own forward of the exported model."""
    hidden, ffn, heads = numpy_scores(hf_hook_sites, aggregation)
    scores = minitron.width_scores(PARAMS, ARCH, CALIB, OPTIONS, aggregation)
    np.testing.assert_allclose(scores.hidden_D, hidden, rtol=2e-4)
    np.testing.assert_allclose(scores.ffn_LF, ffn, rtol=2e-4)
    np.testing.assert_allclose(scores.head_LN, heads, rtol=2e-4)


def test_aggregations_rank_channels_differently():
    """Channel 0 fires hard on one token, channel 1 moderately on every token: eq. 4 prefers 0, NeMo 1."""
    arch = ARCH.replace(num_layers=1)
    dims = {"attn_in": 64, "attn_out": 64, "mlp_in": 64, "mlp_hidden": 192}
    acts = {s: np.full((4, 16, d), 0.01, np.float32) for s, d in dims.items()}
    for x in acts.values():
        x[:, :, 0], x[0, 3, 0], x[:, :, 1] = 0.0, 20.0, 1.0  # paper: 400 vs 64; nemo: 1.25 vs 2
    scores = {}
    for aggregation in AGGREGATIONS:
        acc = minitron.ACCUMULATORS[aggregation]
        stats = acc.finalize(acc.update(acc.init(dims), acts), 4)
        scores[aggregation] = minitron.combine_width_stats(
            {s: np.asarray(v, np.float64)[None] for s, v in stats.items()}, arch, aggregation)
    shape = arch.replace(hidden_size=1, ffn_size=1)
    paper, nemo = (minitron.width_keep(scores[a], arch, shape) for a in AGGREGATIONS)
    assert paper.hidden_D.tolist() == [0] and paper.ffn_LF.tolist() == [[0]]
    assert nemo.hidden_D.tolist() == [1] and nemo.ffn_LF.tolist() == [[1]]
    assert np.argmax(scores["paper"].head_LN[0]) == np.argmax(scores["nemo"].head_LN[0]) == 0  # head 0 holds both


def test_width_scores_bad_aggregation_is_a_clear_error():
    with pytest.raises(MaxpruneError, match=r"aggregation='l2' is not valid; choose one of paper, nemo"):
        minitron.width_scores(PARAMS, ARCH, CALIB, OPTIONS, "l2")


@pytest.mark.parametrize("aggregation", [None, *AGGREGATIONS])
def test_width_keeps_top_k_in_descending_order_and_best_heads_per_group(aggregation):
    chosen = [] if aggregation is None else [f"--config.prune.minitron_width.aggregation={aggregation}"]
    result = run("minitron_width", "--config.prune.minitron_width.hidden_size=48",
                 "--config.prune.minitron_width.ffn_size=96", "--config.prune.minitron_width.num_heads=2", *chosen)
    hidden, ffn, heads = numpy_width_scores(aggregation or "paper")  # the paper's is the default
    keep = Keep(hidden_D=np.argsort(-hidden)[:48], ffn_LF=np.argsort(-ffn, axis=1)[:, :96],
                heads_LKG=np.argsort(-heads.reshape(5, 2, 2), axis=-1)[..., :1])
    expected, arch, _ = slice_model(PARAMS, ARCH, keep)
    assert result.arch == arch
    assert (arch.hidden_size, arch.ffn_size, arch.num_heads, arch.num_kv_heads) == (48, 96, 2, 2)
    assert jax.tree.all(jax.tree.map(np.array_equal, result.params, expected))
    assert result.report["summary"]["aggregation"] == (aggregation or "paper")


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
    (("--config.prune.minitron_width.aggregation=l2",),
     "prune.minitron_width.aggregation='l2' is not valid; choose one of paper, nemo"),
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
