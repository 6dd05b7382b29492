"""Surgery: keeping everything is the identity; removing dead units is exact; permutations are free."""

import functools

import hf_helpers as H
import jax
import numpy as np
import pytest

from maxprune.errors import MaxpruneError
from maxprune.model import llama
from maxprune.model import masks as masks_lib
from maxprune.model.arch import preset
from maxprune.prune.structured.surgery import Keep, slice_model, uniform

ARCH = preset("tiny").replace(vocab_size=300, num_layers=3, out_bias=True)  # 4 heads / 2 KV, hidden 64, ffn 192
FP32 = llama.ModelOptions(dtype="float32")
TOKENS = np.random.RandomState(0).randint(0, 300, (2, 24)).astype(np.int32)


# weights large enough that the logits depend clearly on every unit; norm scales 1 + noise
random_params = functools.partial(H.random_params, std=0.1)


_forward = jax.jit(llama.forward, static_argnames=("arch", "options"))


def logits(params, arch, masks=None):
    return np.asarray(_forward(params, TOKENS, arch=arch, masks=masks, options=FP32))


def test_keep_everything_is_the_identity():
    params = random_params(ARCH)
    L, K, G = ARCH.num_layers, ARCH.num_kv_heads, ARCH.group_size
    keep = Keep(layers=np.arange(L), hidden_D=np.arange(ARCH.hidden_size), ffn_LF=uniform(np.arange(192), L),
                kv_LK=uniform(np.arange(K), L), heads_LKG=uniform(np.tile(np.arange(G), (K, 1)), L))
    new, arch, _ = slice_model(params, ARCH, keep)
    assert arch == ARCH
    np.testing.assert_array_equal(logits(new, arch), logits(params, ARCH))
    new, arch, _ = slice_model(params, ARCH, Keep())
    assert arch == ARCH and jax.tree.all(jax.tree.map(np.array_equal, new, params))


@pytest.mark.parametrize("tied", [False, True])
def test_permuting_hidden_channels_leaves_the_function_unchanged(tied):
    arch = ARCH.replace(tie_embeddings=tied)
    params = random_params(arch)
    perm = np.random.default_rng(1).permutation(arch.hidden_size)
    new, new_arch, _ = slice_model(params, arch, Keep(hidden_D=perm))
    assert new_arch == arch
    assert not np.array_equal(new["embed"]["embedding"], params["embed"]["embedding"])
    np.testing.assert_allclose(logits(new, arch), logits(params, arch), atol=2e-5, rtol=0)


def test_removing_dead_ffn_channels_is_exact():
    """Per layer, different FFN channels with zero down rows contribute nothing; cutting them changes nothing."""
    params = random_params(ARCH)
    rng = np.random.default_rng(2)
    keep_LF = np.stack([np.sort(rng.choice(192, 128, replace=False)) for _ in range(ARCH.num_layers)])
    down = np.array(params["layers"]["mlp"]["down"]["kernel"])
    for layer, keep in enumerate(keep_LF):
        down[layer, np.setdiff1d(np.arange(192), keep)] = 0.0
    params["layers"]["mlp"]["down"]["kernel"] = down
    new, arch, _ = slice_model(params, ARCH, Keep(ffn_LF=keep_LF[:, ::-1]))  # any order
    assert arch.ffn_size == 128 and new["layers"]["mlp"]["gate"]["kernel"].shape == (3, 64, 128)
    np.testing.assert_allclose(logits(new, arch), logits(params, ARCH), atol=1e-5, rtol=0)


def _zero_heads(params, dead_LN):
    """Zero the o_proj rows of query heads (layer, head) so they contribute nothing."""
    o = np.array(params["layers"]["attn"]["o"]["kernel"]).reshape(ARCH.num_layers, ARCH.num_heads, ARCH.head_dim, -1)
    for layer, head in dead_LN:
        o[layer, head] = 0.0
    params["layers"]["attn"]["o"]["kernel"] = o.reshape(params["layers"]["attn"]["o"]["kernel"].shape)


def test_removing_dead_query_heads_within_groups_is_exact():
    arch = ARCH.replace(num_heads=8, num_kv_heads=2)  # 4 query heads per group
    global_arch = ARCH
    params = random_params(arch)
    # keep 2 heads per group, different ones per layer and group, in scrambled order
    heads_LKG = np.array([[[3, 0], [1, 2]], [[2, 1], [0, 3]], [[0, 3], [3, 1]]])
    o = np.array(params["layers"]["attn"]["o"]["kernel"]).reshape(3, 2, 4, 16, 64)
    for layer in range(3):
        for group in range(2):
            o[layer, group, np.setdiff1d(np.arange(4), heads_LKG[layer, group])] = 0.0
    params["layers"]["attn"]["o"]["kernel"] = o.reshape(3, 128, 64)
    new, new_arch, _ = slice_model(params, arch, Keep(heads_LKG=heads_LKG))
    assert (new_arch.num_heads, new_arch.num_kv_heads) == (4, 2)
    assert new["layers"]["attn"]["q"]["kernel"].shape == (3, 64, 64)
    np.testing.assert_allclose(logits(new, new_arch), logits(params, arch), atol=1e-5, rtol=0)
    assert global_arch == ARCH


def test_removing_dead_kv_groups_is_exact():
    params = random_params(ARCH)
    kv_LK = np.array([[1], [0], [1]])
    _zero_heads(params, [(l, h) for l in range(3) for h in range(4) if h // 2 != kv_LK[l, 0]])
    new, arch, _ = slice_model(params, ARCH, Keep(kv_LK=kv_LK))
    assert (arch.num_heads, arch.num_kv_heads) == (2, 1)
    assert new["layers"]["attn"]["k"]["kernel"].shape == (3, 64, 16)
    np.testing.assert_allclose(logits(new, arch), logits(params, ARCH), atol=1e-5, rtol=0)


def test_removing_identity_layers_is_exact():
    params = random_params(ARCH)
    for name in ("o", "down"):
        block = "attn" if name == "o" else "mlp"
        for leaf in ("kernel", "bias"):
            x = np.array(params["layers"][block][name][leaf])
            x[1] = 0.0
            params["layers"][block][name][leaf] = x
    new, arch, _ = slice_model(params, ARCH, Keep(layers=np.array([0, 2])))
    assert arch.num_layers == 2
    np.testing.assert_allclose(logits(new, arch), logits(params, ARCH), atol=1e-5, rtol=0)


def test_masks_and_biases_are_sliced_with_their_weights():
    params = random_params(ARCH)
    rng = np.random.default_rng(3)
    masks = masks_lib.from_kernels({(b, n): rng.random(masks_lib.get_kernel(params, b, n).shape) < 0.7
                                    for b, n in masks_lib.PRUNABLE})
    keep = Keep(layers=np.array([2, 0]), hidden_D=rng.permutation(64)[:48],
                ffn_LF=np.stack([rng.permutation(192)[:96] for _ in range(3)]), kv_LK=np.array([[1], [0], [1]]))
    new, arch, new_masks = slice_model(params, ARCH, keep, masks)
    masks_lib.validate_masks(new, new_masks)
    assert (arch.num_layers, arch.hidden_size, arch.ffn_size, arch.num_heads) == (2, 48, 96, 2)
    assert new["layers"]["mlp"]["down"]["bias"].shape == (2, 48)
    # spot-check one entry of each kind against the parent
    h, f = keep.hidden_D[5], keep.ffn_LF[2, 7]
    np.testing.assert_array_equal(new["layers"]["mlp"]["down"]["kernel"][0, 7, 5],
                                  params["layers"]["mlp"]["down"]["kernel"][2, f, h])
    np.testing.assert_array_equal(new_masks["layers"]["mlp"]["up"]["kernel"][1, 5, :],
                                  np.asarray(masks["layers"]["mlp"]["up"]["kernel"])[0, h, keep.ffn_LF[0]])
    np.testing.assert_array_equal(new["layers"]["attn"]["v"]["kernel"][0, 5],
                                  params["layers"]["attn"]["v"]["kernel"][2, h, 16:32])
    np.testing.assert_array_equal(new["lm_head"]["kernel"], params["lm_head"]["kernel"][keep.hidden_D])
    masked = logits(*slice_model(masks_lib.apply_masks(params, masks), ARCH, keep)[:2])
    np.testing.assert_allclose(logits(new, arch, new_masks), masked, atol=1e-5, rtol=0)


@pytest.mark.parametrize("keep, fragment", [
    (Keep(hidden_D=np.array([0, 64])), "indices span"),
    (Keep(hidden_D=np.array([1, 1])), "repeats"),
    (Keep(ffn_LF=np.zeros((2, 4), int)), "3 layers"),
    (Keep(kv_LK=np.array([[0], [1], [0]]), heads_LKG=np.zeros((3, 2, 1), int)), "same number of query heads"),
    (Keep(layers=np.array([], int)), "non-empty"),
])
def test_bad_keep_is_a_clear_error(keep, fragment):
    with pytest.raises(MaxpruneError, match=fragment):
        slice_model(random_params(ARCH), ARCH, keep)
