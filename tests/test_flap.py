"""FLAP against a literal NumPy replay of the original's statistics, its keep rule and its bias compensation."""

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
from maxprune.prune.structured import flap, shapes
from maxprune.schema import load_config

ARCH = preset("tiny").replace(vocab_size=300, num_layers=3, num_heads=8, num_kv_heads=4)  # groups of 2 heads
OPTIONS = EngineOptions(batch_size=3, dtype="float32", progress=False)  # 8 = 3 + 3 + 2: uneven chunks
CALIB = np.random.RandomState(0).randint(0, 300, (8, 24)).astype(np.int32)
PARAMS = H.random_params(ARCH)


def run(*overrides):
    cfg = load_config(None, ["--config.prune.method=flap", "--config.prune.batch_size=4", *overrides]).prune
    with run_options(dtype="float32", progress=False):
        return api.prune(PARAMS, ARCH, CALIB, cfg)


@functools.cache
def dense_inputs():
    """Per layer, the o_proj and down_proj inputs of the dense model, ``[n, T, C]`` fp64."""
    layer_fn = jax.jit(functools.partial(llama.apply_layer, arch=ARCH, options=llama.ModelOptions(dtype="float32"),
                                         capture=True))
    x = np.asarray(PARAMS["embed"]["embedding"])[CALIB]
    out = []
    for i in range(ARCH.num_layers):
        x, inter = layer_fn(jax.tree.map(lambda a: a[i], PARAMS["layers"]), x)
        out.append({"attn_out": np.asarray(inter["attn"]["o"]["input"][0], np.float64),
                    "mlp_hidden": np.asarray(inter["mlp"]["down"]["input"][0], np.float64)})
    return out


def bias_gpt(samples_NTC):
    """The original BiasGPT.add_batch, one sequence at a time, in-place updates and aliasing kept."""
    C = samples_NTC.shape[-1]
    baseline, fluc, scaler, nsamples = np.zeros(C), np.zeros(C), np.zeros(C), 0
    for x in samples_NTC:
        inp = x.T  # [in, tokens]
        old_baseline = baseline  # an alias, not a copy: the quirk
        baseline *= nsamples / (nsamples + 1)
        baseline += np.mean(inp, axis=1) / (nsamples + 1)
        if nsamples == 0:
            fluc = np.zeros(C)
        else:
            fluc *= (nsamples - 1) / (nsamples + 1 - 1)
            fluc += np.sum((inp - baseline[:, None]) * (inp - old_baseline[:, None]), axis=1) / (nsamples + 1)
        scaler *= nsamples / (nsamples + 1)
        scaler += np.linalg.norm(inp, axis=1) ** 2 / (nsamples + 1)
        nsamples += 1
    return baseline, fluc, scaler


def numpy_scores(metric):
    """FLAP's metrics from `bias_gpt`; attention squared, group = mean of its channels; MLP as is."""
    groups, ffn = [], []
    for i, sites in enumerate(dense_inputs()):
        per_site = {}
        for site, (block, name) in flap.OUTPUT_OF.items():
            baseline, fluc, scaler = bias_gpt(sites[site])
            w = np.asarray(PARAMS["layers"][block][name]["kernel"][i], np.float64)  # [in, out]
            per_site[site] = {"IFV": fluc, "WIFV": fluc * np.sum(w ** 2, axis=1),
                              "WIFN": np.mean(np.abs(w) * np.sqrt(scaler)[:, None], axis=1)}[metric]
        groups.append((per_site["attn_out"] ** 2).reshape(ARCH.num_kv_heads, -1).mean(-1))
        ffn.append(per_site["mlp_hidden"])
    return np.stack(groups), np.stack(ffn)


@functools.cache
def our_stats():
    return flap.flap_stats(PARAMS, ARCH, CALIB, OPTIONS)


def test_statistics_equal_the_original_replayed_in_numpy():
    for i, sites in enumerate(dense_inputs()):
        for site in flap.SITES:
            baseline, fluc, scaler = bias_gpt(sites[site])
            ours = our_stats().sites[site]
            np.testing.assert_allclose(ours["baseline"][i], baseline, rtol=1e-5, atol=1e-7)
            np.testing.assert_allclose(ours["fluctuation"][i], fluc, rtol=1e-4, atol=1e-8)
            np.testing.assert_allclose(ours["scaler"][i], scaler, rtol=1e-5)
    # the quirks matter: the unbiased variance over sequences differs
    x = dense_inputs()[0]["mlp_hidden"]
    assert not np.allclose(bias_gpt(x)[1], np.var(x.mean(1), axis=0, ddof=1) * x.shape[1], rtol=1e-2)


@pytest.mark.parametrize("metric", ["WIFV", "IFV", "WIFN"])
def test_scores_equal_numpy(metric):
    group_LK, ffn_LF = flap.flap_scores(PARAMS, ARCH, our_stats(), metric)
    groups, ffn = numpy_scores(metric)
    np.testing.assert_allclose(group_LK, groups, rtol=2e-4)
    np.testing.assert_allclose(ffn_LF, ffn, rtol=2e-4)


def test_ul_mm_keeps_the_best_groups_and_channels_of_every_layer_in_order():
    result = run("--config.prune.flap.num_heads=4", "--config.prune.flap.ffn_size=96")
    groups, ffn = numpy_scores("WIFV")
    kv = np.sort(np.argsort(-groups, axis=1)[:, :2], axis=1)
    assert [row["kv_groups"] for row in result.report["layers"]] == kv.tolist()
    a = result.arch
    assert (a.num_heads, a.num_kv_heads, a.ffn_size, a.out_bias) == (4, 2, 96, True)
    keep_f = np.sort(np.argsort(-ffn, axis=1)[:, :96], axis=1)
    down = np.asarray(PARAMS["layers"]["mlp"]["down"]["kernel"])
    np.testing.assert_array_equal(result.params["layers"]["mlp"]["down"]["kernel"],
                                  np.take_along_axis(down, keep_f[:, :, None], axis=1))
    k = np.asarray(PARAMS["layers"]["attn"]["k"]["kernel"]).reshape(3, 64, 4, 16)
    np.testing.assert_array_equal(result.params["layers"]["attn"]["k"]["kernel"],
                                  np.take_along_axis(k, kv[:, None, :, None], axis=2).reshape(3, 64, 32))


def test_bias_compensation_is_exact_at_the_calibration_mean():
    """Removed inputs replaced by their baseline: dense o/down output == pruned output, on real activations."""
    result = run("--config.prune.flap.num_heads=4", "--config.prune.flap.ffn_size=96")
    stats = our_stats()
    groups, ffn = numpy_scores("WIFV")
    kept_groups = np.sort(np.argsort(-groups, 1)[:, :2], 1)  # 2 of 4 groups; a group is 2 heads x 16 channels
    kept = {"attn_out": (kept_groups[:, :, None] * 32 + np.arange(32)).reshape(3, 64),
            "mlp_hidden": np.sort(np.argsort(-ffn, 1)[:, :96], 1)}
    for site, (block, name) in flap.OUTPUT_OF.items():
        for i, sites in enumerate(dense_inputs()):
            x = sites[site].copy()
            removed = np.setdiff1d(np.arange(x.shape[-1]), kept[site][i])
            x[..., removed] = stats.sites[site]["baseline"][i][removed]
            dense = x @ np.asarray(PARAMS["layers"][block][name]["kernel"][i], np.float64) \
                + np.asarray(PARAMS["layers"][block][name].get("bias", np.zeros((3, 64)))[i])
            w = np.asarray(result.params["layers"][block][name]["kernel"][i], np.float64)
            pruned = x[..., kept[site][i]] @ w + np.asarray(result.params["layers"][block][name]["bias"][i])
            np.testing.assert_allclose(pruned, dense, rtol=1e-5, atol=1e-5)


def test_ffn_fills_the_ratio_and_ul_um_halves_both():
    result = run("--config.prune.flap.num_heads=4", "--config.prune.ratio=0.5")
    assert result.arch.num_params() - 2 * 64 * 3 <= ARCH.num_params(sparsity=0.5)
    uniform = run("--config.prune.flap.structure=UL-UM", "--config.prune.ratio=0.5")
    assert (uniform.arch.num_kv_heads, uniform.arch.ffn_size) == (2, 96)


def test_default_shape_is_the_median_candidate():
    assert run().arch == shapes.kv_group_candidates(ARCH, 0.5)[1].replace(out_bias=True)  # of 2, 3, 4 groups


def test_search_picks_the_lowest_loss_among_kv_group_counts():
    result = run("--config.prune.search.enabled=True", "--config.prune.ratio=0.4")
    rows = result.report["search"]["candidates"]
    assert [r["num_kv_heads"] for r in rows] == [2, 3, 4]  # at least half the groups
    best = min(rows, key=lambda r: r["loss"])
    assert best["selected"] and result.arch.num_kv_heads == best["num_kv_heads"]


@pytest.mark.parametrize("overrides, fragment", [
    (("--config.prune.flap.num_heads=3",), "whole KV groups"),
    (("--config.prune.flap.num_heads=4", "--config.prune.flap.ffn_size=500"), "ffn_size 500"),
])
def test_bad_shape_is_a_clear_error(overrides, fragment):
    with pytest.raises(MaxpruneError, match=fragment):
        run(*overrides)


@pytest.mark.parametrize("overrides, fragment", [
    (("--config.prune.flap.structure=AL-AM",), "not implemented"),
    (("--config.prune.flap.structure=UL-UM", "--config.prune.flap.num_heads=4"), "derives the shape"),
    (("--config.prune.flap.metric=L2",), "metric"),
    (("--config.prune.search.enabled=True", "--config.prune.flap.num_heads=4"), "unset prune.flap.num_heads"),
])
def test_bad_config_is_a_clear_error(overrides, fragment):
    with pytest.raises(MaxpruneError, match=fragment):
        load_config(None, ["--config.prune.method=flap", *overrides])


# ------------------------------------------------------------ end to end
def prune_train_export(tmp_path, corpus, method_overrides, arch=ARCH, params=PARAMS, train=True):
    """Parent dir → `prune_model_dir` → 2 training steps from it → HF export; logits of both vs transformers."""
    from maxprune.convert import hf
    from maxprune.model.model_dir import load_model_dir, save_model_dir
    from maxprune.prune.run import prune_model_dir

    save_model_dir(tmp_path / "parent", arch, params, tokenizer_dir=corpus["root"] / "tokenizer")
    common = ["--config.model.dtype=float32", "--config.model.arch.vocab_size=300"]
    cfg = load_config(None, common + [
        f"--config.prune.input={tmp_path / 'parent'}", f"--config.prune.output={tmp_path / 'pruned'}",
        f"--config.prune.calibration={corpus['validation']}", "--config.prune.n_samples=8", *method_overrides])
    prune_model_dir(cfg, progress=False)
    dirs = {"pruned": tmp_path / "pruned"}
    if train:
        dirs["trained"] = _train_two_steps(tmp_path, corpus, common)
    tokens = H.tokens(300, length=32)
    out = {}
    for name, path in dirs.items():
        md = load_model_dir(path)
        hf.to_hf(path, tmp_path / f"hf_{name}")
        reference = H.hf_logits(tmp_path / f"hf_{name}", tokens)
        np.testing.assert_allclose(H.our_logits(md.params, md.arch, tokens), reference, atol=1e-4, rtol=0)
        out[name] = md
    return out


def _train_two_steps(tmp_path, corpus, common):
    from maxprune.train import trainer

    cfg = load_config(None, common + [
        f"--config.train.init={tmp_path / 'pruned'}", f"--config.data.train={corpus['train']}",
        "--config.train.tokens=512", "--config.train.tensorboard=False", "--config.train.async_checkpoint=False"])
    trained = trainer.train(cfg, tmp_path / "run", progress=False)
    assert trained.status == "complete" and trained.steps == 2
    return trained.model_dir


def test_pruned_model_dir_retrains_and_exports_with_its_biases(tmp_path, tiny_corpus):
    dirs = prune_train_export(tmp_path, tiny_corpus, ["--config.prune.method=flap", "--config.prune.flap.num_heads=4"])
    pruned = dirs["pruned"]
    assert pruned.arch.out_bias and pruned.provenance["method"] == "flap"
    assert np.abs(np.asarray(pruned.params["layers"]["mlp"]["down"]["bias"])).max() > 1e-3
    tensors = H.read_safetensors(tmp_path / "hf_pruned")
    np.testing.assert_array_equal(tensors["model.layers.1.mlp.down_proj.bias"],
                                  np.asarray(pruned.params["layers"]["mlp"]["down"]["bias"][1]))
    assert not jax.tree.all(jax.tree.map(np.array_equal, dirs["trained"].params, pruned.params))
