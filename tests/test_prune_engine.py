"""The layer loop (engine) and the model-dir plumbing (run) every pruner shares."""

import dataclasses
import functools

import hf_helpers as H
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from maxprune import sharding
from maxprune.errors import MaxpruneError
from maxprune.model import llama, model_dir
from maxprune.model import masks as masks_lib
from maxprune.model.arch import preset
from maxprune.prune import run
from maxprune.prune.engine import stack_writer
from maxprune.prune.engine.layer import (
    ALL_LINEARS,
    SEQUENTIAL_GROUPS,
    SITES,
    check_reference_groups,
    get_linear,
    run_layer,
    set_linears,
)
from maxprune.prune.engine.loop import collect_stats, prune_layerwise
from maxprune.prune.engine.options import EngineOptions, options_for, run_options
from maxprune.prune.sparse import wanda
from maxprune.schema import load_config

ARCH = preset("tiny").replace(vocab_size=300)
FP32 = llama.ModelOptions(dtype="float32")


# Llama-style random params (normal 0.02, unit norm scales) without compiling an init
random_params = functools.partial(H.random_params, ARCH, std=0.02, scale_noise=0.0)
OPTS = EngineOptions(batch_size=4, progress=False)  # 6 sequences: chunks of 4 and 2
_layer = jax.jit(lambda layer, x: llama.apply_layer(layer, x, ARCH, options=FP32, capture=True))


@pytest.fixture(scope="module")
def setup():
    params = random_params(0)
    calibration = np.random.default_rng(0).integers(0, 300, (6, 16))
    return params, calibration


def _manual_sites(params, calibration):
    """Per layer: every site's activation, by running the dense layers one after another."""
    x = np.asarray(params["embed"]["embedding"])[calibration]
    out = []
    for i in range(ARCH.num_layers):
        y, sites = run_layer(jax.tree.map(lambda a: a[i], params["layers"]), jnp.asarray(x), ARCH, FP32)
        out.append({k: np.asarray(v, np.float64) for k, v in sites.items()})
        x = np.asarray(y)
    return out


@dataclasses.dataclass(frozen=True)
class Sums:
    """Σ over tokens of each site, / n_sequences."""

    sites: tuple = SITES

    def init(self, dims):
        return {s: jnp.zeros((d,), jnp.float32) for s, d in dims.items()}

    def update(self, stats, inputs):
        return {s: stats[s] + jnp.sum(inputs[s].astype(jnp.float32), axis=(0, 1)) for s in stats}

    def finalize(self, stats, n_sequences):
        return {s: v / n_sequences for s, v in stats.items()}


class Keep:
    """Prunes nothing; records what it was given."""

    def __init__(self, accumulator=None, prune=None):
        self.accumulator, self.prune, self.calls = accumulator, prune, []

    def prune_layer(self, layers, i, stats, linears):
        self.calls.append((tuple(linears), stats))
        masks = {}
        if self.prune is not None:
            masks = {n: self.prune(get_linear(layers, n)[i]) for n in linears}
        return {}, masks, {n: {"seen": True} for n in linears}


def test_collect_stats_sees_every_site_of_the_dense_model(setup):
    params, calibration = setup
    stats = collect_stats(params, ARCH, calibration, Sums(), OPTS)
    for i, expected in enumerate(_manual_sites(params, calibration)):
        for site in SITES:
            np.testing.assert_allclose(stats[i][site], expected[site].sum(axis=(0, 1)) / 6, rtol=1e-4, atol=1e-5,
                                       err_msg=f"layer {i} {site}")
    # chunking does not change the statistics
    again = collect_stats(params, ARCH, calibration, Sums(), dataclasses.replace(OPTS, batch_size=1))
    np.testing.assert_allclose(again[1]["mlp_hidden"], stats[1]["mlp_hidden"], rtol=1e-4, atol=1e-6)


def test_a_pruner_that_keeps_everything_changes_nothing(setup):
    params, calibration = setup
    keep = Keep(accumulator=Sums())
    result = prune_layerwise(params, ARCH, calibration, keep, OPTS)
    assert result.masks is None
    for a, b in zip(jax.tree.leaves(result.params), jax.tree.leaves(params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    rows = result.report["layers"]
    assert [r["layer"] for r in rows] == [0, 1] and all(r["seconds"] > 0 for r in rows)
    assert all(r["linears"]["down"]["rel_error"] == 0 and r["linears"]["q"]["seen"] for r in rows)
    assert result.report["calibration_tokens"] == 6 * 16
    # reference order: one call per layer, all seven linears, dense statistics of every linear site
    assert [c[0] for c in keep.calls] == [ALL_LINEARS] * 2
    assert set(keep.calls[0][1]) == {"attn_in", "attn_out", "mlp_in", "mlp_hidden"}


def test_pruning_everything_has_relative_error_one_and_zeroes_the_kernels(setup):
    params, calibration = setup
    result = prune_layerwise(params, ARCH, calibration, Keep(prune=lambda w: jnp.zeros(w.shape, bool)), OPTS)
    assert all(v["rel_error"] == pytest.approx(1.0) and v["sparsity"] == 1.0
               for r in result.report["layers"] for v in r["linears"].values())
    assert masks_lib.count_nonzero_prunable(result.params) == 0


def test_sequential_order_takes_stats_from_the_partly_pruned_layer(setup):
    params, calibration = setup
    half = lambda w: jnp.abs(w) > jnp.median(jnp.abs(w))
    keep = Keep(accumulator=Sums(), prune=half)
    result = prune_layerwise(params, ARCH, calibration, keep, dataclasses.replace(OPTS, order="sequential"))
    assert [c[0] for c in keep.calls[:4]] == list(SEQUENTIAL_GROUPS)
    assert [set(c[1]) for c in keep.calls[:4]] == [{"attn_in"}, {"attn_out"}, {"mlp_in"}, {"mlp_hidden"}]
    # o's statistics: the attention output of layer 0 with q, k, v already pruned
    layer0 = jax.tree.map(lambda a: a[0], params["layers"])
    qkv = {n: get_linear(layer0, n) * half(get_linear(layer0, n)) for n in "qkv"}
    x = jnp.asarray(np.asarray(params["embed"]["embedding"])[calibration])
    _, sites = run_layer(set_linears(layer0, qkv), x, ARCH, FP32)
    np.testing.assert_allclose(keep.calls[1][1]["attn_out"], np.asarray(sites["attn_out"]).sum((0, 1)) / 6,
                               rtol=1e-4, atol=1e-5)
    assert result.report["order"] == "sequential"


def test_reference_groups_last_site_first_see_the_dense_layer(setup):
    """A pruner may take reference order in groups (back to front): each group's stats are still the dense layer's."""
    params, calibration = setup
    half = lambda w: jnp.abs(w) > jnp.median(jnp.abs(w))
    keep = Keep(accumulator=Sums(), prune=half)
    keep.reference_groups = (("down",), ("gate", "up"), ("o",), ("q", "k", "v"))
    grouped = prune_layerwise(params, ARCH, calibration, keep, OPTS)
    assert [c[0] for c in keep.calls[:4]] == list(keep.reference_groups)
    for (_, stats), site in zip(keep.calls[:4], ("mlp_hidden", "mlp_in", "attn_out", "attn_in")):
        np.testing.assert_allclose(stats[site], _manual_sites(params, calibration)[0][site].sum((0, 1)) / 6,
                                   rtol=1e-4, atol=1e-5, err_msg=site)
    whole = prune_layerwise(params, ARCH, calibration, Keep(accumulator=Sums(), prune=half), OPTS)
    for a, b in zip(jax.tree.leaves((grouped.params, grouped.masks)), jax.tree.leaves((whole.params, whole.masks))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    for a, b in zip(grouped.report["layers"], whole.report["layers"]):
        for name in ALL_LINEARS:
            assert a["linears"][name]["sparsity"] == b["linears"][name]["sparsity"]
            assert a["linears"][name]["rel_error"] == pytest.approx(b["linears"][name]["rel_error"], rel=1e-5)
    with pytest.raises(MaxpruneError, match="reads a site after"):
        check_reference_groups((("q", "k", "v"), ("o", "gate", "up", "down")))
    with pytest.raises(MaxpruneError, match="once"):
        check_reference_groups((("down",), ("q", "k", "v")))


def test_in_place_helpers_work_block_by_block():
    rng = np.random.default_rng(3)
    stack = jnp.asarray(rng.standard_normal((3, 10, 7)).astype(np.float32))
    keep = jnp.asarray(rng.random((10, 7)) > 0.5)
    expected = stack.at[1].set(jnp.where(keep, stack[1], 0.0))
    for block_elements in (7 * 4, 7 * 5, 1 << 20):  # blocks of 4 rows and a tail of 2; of 5; all at once
        np.testing.assert_array_equal(np.asarray(stack_writer.zero_in_place(stack, keep, 1, block_elements)),
                                      np.asarray(expected))
    big = rng.random((1100, 1000)) > 0.3  # over a block of rows: a loop and a tail
    assert int(stack_writer.count_kept({"k": jnp.asarray(big)})["k"]) == int(big.sum())


def test_sharded_params_prune_alike_keep_their_shardings_and_survive_unless_donated(setup, devices8):
    params, calibration = setup
    mesh = sharding.make_mesh(None, devices8)
    cfg = load_config(None, ["--config.prune.batch_size=4"]).prune
    plain = wanda.prune(params, ARCH, calibration, cfg)
    sharded = sharding.shard_tree(params, mesh)
    with run_options(progress=False):
        result = wanda.prune(sharded, ARCH, calibration, cfg)
    for a, b in zip(jax.tree.leaves(plain.masks), jax.tree.leaves(result.masks)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    q_in, q_out = (t["layers"]["attn"]["q"]["kernel"] for t in (sharded, result.params))
    assert q_out.sharding.is_equivalent_to(q_in.sharding, 3) and q_out.sharding.spec[1] == "fsdp"
    assert result.masks["layers"]["attn"]["q"]["kernel"].sharding.is_equivalent_to(q_in.sharding, 3)
    assert not q_in.is_deleted()  # the caller's params are intact without donate
    own = sharding.shard_tree(jax.tree.map(jnp.copy, params), mesh)  # device_put may alias `params`
    with run_options(progress=False, donate=True):
        wanda.prune(own, ARCH, calibration, cfg)
    assert own["layers"]["attn"]["q"]["kernel"].is_deleted()


def test_a_sparse_parents_masks_are_baked_in(setup):
    params, calibration = setup
    rng = np.random.default_rng(1)
    parent = masks_lib.from_kernels({k: rng.random(masks_lib.get_kernel(params, *k).shape) > 0.3
                                     for k in masks_lib.PRUNABLE})
    result = prune_layerwise(params, ARCH, calibration, Keep(), OPTS, masks=parent)
    expected = masks_lib.apply_masks(params, parent)
    for a, b in zip(jax.tree.leaves(result.params), jax.tree.leaves(expected)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("tokens,match", [
    (np.full((2, 8), 300), r"\[0, 300\)"), (np.zeros((2, 8), np.float32), "int"),
    (np.zeros((2, 4096), np.int32), "max_position_embeddings"), (np.zeros(8, np.int32), r"\[n_samples, seq_len\]"),
])
def test_bad_calibration_tokens(setup, tokens, match):
    with pytest.raises(MaxpruneError, match=match):
        prune_layerwise(setup[0], ARCH, tokens, Keep(), OPTS)


def test_options_come_from_the_config_and_run_options():
    cfg = load_config(None, ["--config.prune.batch_size=3", "--config.prune.order=sequential"]).prune
    with run_options(dtype="bfloat16", progress=False):
        opts = options_for(cfg)
        assert (opts.batch_size, opts.order, opts.dtype, opts.progress) == (3, "sequential", "bfloat16", False)
    assert options_for().dtype == "float32"
    with pytest.raises(MaxpruneError, match="prune.order"):
        EngineOptions(order="random")


# ------------------------------------------------------------------ run.py
@pytest.fixture(scope="module")
def parent(tmp_path_factory, tiny_corpus):
    root = tmp_path_factory.mktemp("engine_parent")
    params = random_params(1)
    with_tok = model_dir.save_model_dir(root / "with_tok", ARCH, params,
                                        provenance={"tokenizer_hash": tiny_corpus["tokenizer"].hash},
                                        tokenizer_dir=tiny_corpus["root"] / "tokenizer")
    bare = model_dir.save_model_dir(root / "bare", ARCH, params, provenance={"tokenizer_hash": "0" * 64})
    return model_dir.load_model_dir(with_tok), model_dir.load_model_dir(bare)


def _p(**values):
    overrides = [f"--config.prune.{k}={v}" for k, v in values.items()]
    return load_config(None, overrides).prune


def test_calibration_from_npy_prepared_and_source(tmp_path, parent, tiny_corpus):
    md, bare = parent
    tokens = np.random.default_rng(0).integers(0, 300, (10, 20)).astype(np.int64)
    np.save(tmp_path / "c.npy", tokens)
    cal = run.load_calibration(_p(calibration=tmp_path / "c.npy", n_samples=4, seq_len=16), md)
    np.testing.assert_array_equal(cal.tokens_NL, tokens[:4, :16])
    assert cal.tokens == 64 and cal.info["kind"] == "npy"

    cal = run.load_calibration(_p(calibration=tiny_corpus["train"], n_samples=5), md)
    assert cal.tokens_NL.shape == (5, 32) and cal.info["tokenizer_hash"] == tiny_corpus["tokenizer"].hash
    with pytest.raises(MaxpruneError, match="tokenized with tokenizer"):
        run.load_calibration(_p(calibration=tiny_corpus["train"], n_samples=5), bare)

    source = f"txt:{tiny_corpus['root'] / 'train'}/*.txt"
    cal = run.load_calibration(_p(calibration=source, n_samples=3, seq_len=24), md)
    assert cal.tokens_NL.shape == (3, 24) and cal.info["kind"] == "source"
    with pytest.raises(MaxpruneError, match="no tokenizer/"):
        run.load_calibration(_p(calibration=source, n_samples=3, seq_len=24), bare)
    assert run.load_calibration(_p(), md).tokens_NL is None  # unset: magnitude needs none
