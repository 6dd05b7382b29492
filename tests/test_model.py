"""The Flax Llama: masks, attention, layer-wise application, remat, sharded forward."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from maxprune import sharding
from maxprune.model import llama
from maxprune.model import masks as masks_lib
from maxprune.model.arch import Arch, preset
from maxprune.model.layers import gqa_attention

FP32 = llama.ModelOptions(dtype="float32")


def _fwd(params, tokens, arch, masks=None, options=FP32):
    """Jitted forward (tests compile once instead of dispatching op by op)."""
    return jax.jit(lambda p, t, m: llama.forward(p, t, arch, m, options))(params, tokens, masks)


def _params(arch, seed=0, scale=3.0):
    p = llama.init_params(arch, jax.random.key(seed))
    # larger weights so logits differ clearly between positions and tokens
    return jax.tree.map(lambda x: x * scale if x.ndim > 1 else x, p)


def _tokens(arch, b=2, l=24, seed=1):
    return jax.random.randint(jax.random.key(seed), (b, l), 0, arch.vocab_size)


def _random_masks(params, seed=0):
    rng = np.random.default_rng(seed)
    kernels = {(b, n): rng.random(masks_lib.get_kernel(params, b, n).shape) > 0.5
               for b, n in masks_lib.PRUNABLE}
    return masks_lib.from_kernels(kernels)


def test_param_layout_is_layer_stacked():
    a = preset("tiny").replace(out_bias=True)
    p = llama.init_params(a, jax.random.key(0))
    L, D, F = a.num_layers, a.hidden_size, a.ffn_size
    assert p["layers"]["attn"]["q"]["kernel"].shape == (L, D, a.q_dim)
    assert p["layers"]["attn"]["k"]["kernel"].shape == (L, D, a.kv_dim)
    assert p["layers"]["attn"]["o"]["kernel"].shape == (L, a.q_dim, D)
    assert p["layers"]["attn"]["o"]["bias"].shape == (L, D)
    assert p["layers"]["mlp"]["down"]["kernel"].shape == (L, F, D)
    assert p["lm_head"]["kernel"].shape == (D, a.vocab_size)
    n = sum(x.size for x in jax.tree.leaves(p))
    assert n == a.num_params()
    # layers get different random init
    q = p["layers"]["attn"]["q"]["kernel"]
    assert not np.allclose(q[0], q[1])


def test_tied_model_has_no_lm_head():
    a = preset("tiny").replace(tie_embeddings=True)
    p = llama.init_params(a, jax.random.key(0))
    assert "lm_head" not in p
    assert sum(x.size for x in jax.tree.leaves(p)) == a.num_params()


def test_masked_forward_equals_zeroed_weights():
    a = preset("tiny")
    p = _params(a)
    m = _random_masks(p)
    t = _tokens(a)
    masked = _fwd(p, t, a, m)
    zeroed = _fwd(masks_lib.apply_masks(p, m), t, a)
    dense = _fwd(p, t, a)
    np.testing.assert_allclose(masked, zeroed, atol=1e-5)
    assert np.abs(np.asarray(masked) - np.asarray(dense)).max() > 1e-2


def test_partial_masks_only_touch_their_kernel():
    a = preset("tiny")
    p = _params(a)
    down = masks_lib.get_kernel(p, "mlp", "down")
    m = masks_lib.from_kernels({("mlp", "down"): np.zeros(down.shape, bool)})
    t = _tokens(a)
    zeroed = jax.tree.map(lambda x: x, p)
    zeroed["layers"]["mlp"]["down"]["kernel"] = jnp.zeros_like(down)
    np.testing.assert_allclose(_fwd(p, t, a, m), _fwd(zeroed, t, a), atol=1e-5)


def _naive_attention(q, k, v):
    """Repeat K/V to every query head, causal softmax in float64."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    g = q.shape[2] // k.shape[2]
    k, v = np.repeat(k, g, axis=2), np.repeat(v, g, axis=2)
    s = np.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(q.shape[-1])
    t = q.shape[1]
    s = np.where(np.tril(np.ones((t, t), bool)), s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("bnts,bsnh->btnh", p, v)


@pytest.mark.parametrize("heads, kv", [(4, 4), (4, 2), (8, 2), (6, 1)])
@pytest.mark.parametrize("impl", ["einsum", "xla"])
def test_gqa_attention_matches_naive(heads, kv, impl):
    rng = np.random.default_rng(0)
    q = rng.normal(size=(2, 9, heads, 16)).astype(np.float32)
    k = rng.normal(size=(2, 9, kv, 16)).astype(np.float32)
    v = rng.normal(size=(2, 9, kv, 16)).astype(np.float32)
    out = gqa_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), impl)
    np.testing.assert_allclose(out, _naive_attention(q, k, v), atol=2e-5)


@pytest.mark.parametrize("length", [130, 1100])  # 64-row blocks, the last one short; 69-row blocks
def test_block_causal_attention_matches_naive(length):
    rng = np.random.default_rng(1)
    q = rng.normal(size=(1, length, 4, 8)).astype(np.float32)
    k = rng.normal(size=(1, length, 2, 8)).astype(np.float32)
    v = rng.normal(size=(1, length, 2, 8)).astype(np.float32)
    out = gqa_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), "einsum")
    np.testing.assert_allclose(out, _naive_attention(q, k, v), atol=2e-5)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_matmul_f32acc_gradients_match_autodiff(dtype):
    from maxprune.model.layers import matmul_f32acc
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.normal(size=(6, 5)), dtype)
    w = jnp.asarray(rng.normal(size=(5, 3)), dtype)
    g = jnp.asarray(rng.normal(size=(6, 3)), jnp.float32)
    out, vjp = jax.vjp(matmul_f32acc, x, w)
    assert out.dtype == jnp.float32
    dx, dw = vjp(g)
    assert dx.dtype == dtype and dw.dtype == dtype
    x64, w64, g64 = (np.asarray(a, np.float64) for a in (x, w, g))
    tol = 1e-5 if dtype == jnp.float32 else 5e-2  # bf16: the cotangent is rounded to bf16 first
    np.testing.assert_allclose(np.asarray(out, np.float64), x64 @ w64, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(dx, np.float64), g64 @ w64.T, rtol=tol, atol=tol)
    np.testing.assert_allclose(np.asarray(dw, np.float64), x64.T @ g64, rtol=tol, atol=tol)


def test_apply_layer_composes_to_full_forward():
    a = preset("tiny")
    p = _params(a)
    m = _random_masks(p)
    t = _tokens(a)
    x = p["embed"]["embedding"][t]
    for i in range(a.num_layers):
        layer_p = jax.tree.map(lambda w: w[i], p["layers"])
        layer_m = jax.tree.map(lambda w: w[i], m["layers"])
        x = llama.apply_layer(layer_p, x, a, layer_masks=layer_m, options=FP32)
    h = x.astype(jnp.float32)
    h = h * jax.lax.rsqrt(jnp.mean(h * h, -1, keepdims=True) + a.norm_eps) * p["final_norm"]["scale"]
    logits = h @ p["lm_head"]["kernel"]
    np.testing.assert_allclose(logits, _fwd(p, t, a, m), atol=1e-4)


@pytest.mark.parametrize("remat", ["full", "dots_saveable"])
def test_remat_changes_nothing_numerically(remat):
    a = preset("tiny")
    p = _params(a)
    t = _tokens(a)

    def loss(params, options):
        return llama.next_token_loss(llama.forward(params, t, a, None, options), t)

    grad = jax.jit(jax.value_and_grad(loss), static_argnums=1)
    base_l, base_g = grad(p, FP32)
    l, g = grad(p, llama.ModelOptions(dtype="float32", remat=remat))
    assert float(l) == pytest.approx(float(base_l), rel=1e-6)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=1e-6), g, base_g)


def test_bf16_forward_close_to_fp32():
    a = preset("tiny")
    p = _params(a, scale=1.0)
    t = _tokens(a)
    f32 = _fwd(p, t, a)
    bf16 = _fwd(p, t, a, None, llama.ModelOptions(dtype="bfloat16"))
    assert bf16.dtype == jnp.float32  # logits stay fp32
    assert np.abs(np.asarray(bf16) - np.asarray(f32)).max() < 0.05 * np.abs(np.asarray(f32)).max() + 0.05


def test_next_token_loss_by_hand():
    logits = jnp.log(jnp.array([[[0.5, 0.25, 0.25], [0.1, 0.8, 0.1], [1 / 3] * 3]]))
    tokens = jnp.array([[0, 1, 2]])
    expected = -(np.log(0.25) + np.log(0.1)) / 2
    assert float(llama.next_token_loss(logits, tokens)) == pytest.approx(expected, rel=1e-6)
    weights = jnp.array([[1, 1, 0]])
    assert float(llama.next_token_loss(logits, tokens, weights)) == pytest.approx(-np.log(0.25), rel=1e-6)


@pytest.mark.parametrize("shape", [(2, 2, 2), (1, 4, 2), (1, 8, 1), (8, 1, 1)])
def test_sharded_forward_equals_single_device(devices8, shape):
    import ml_collections
    a = preset("tiny").replace(num_heads=8, num_kv_heads=2)
    p = _params(a)
    m = _random_masks(p)
    t = _tokens(a, b=8)
    ref = _fwd(p, t, a, m)
    mesh = sharding.make_mesh(ml_collections.ConfigDict(dict(zip(("data", "fsdp", "tensor"), shape))), devices8)
    sp, sm = sharding.shard_tree(p, mesh), sharding.shard_tree(m, mesh)
    with sharding.use_mesh(mesh):
        fwd = jax.jit(lambda p, m, t: _fwd(p, t, a, m))
        out = fwd(sp, sm, jax.device_put(t, sharding.batch_sharding(mesh)))
    np.testing.assert_allclose(out, ref, atol=1e-5)
    # really sharded: each device holds a fraction of the q kernel and its mask
    q, q_mask = sp["layers"]["attn"]["q"]["kernel"], sm["layers"]["attn"]["q"]["kernel"]
    per_device = q.addressable_shards[0].data.size
    assert per_device == q.size // (shape[1] * shape[2])
    assert q_mask.sharding.spec == q.sharding.spec


@pytest.mark.parametrize("impl", ["einsum", "xla"])
def test_packed_rows_attend_as_if_each_sequence_were_alone(impl):
    """Segments: three sequences (one spanning the 64-row blocks) and padding in one row;
    branches: a shared prefix then two continuations, each seeing the prefix and itself."""
    from maxprune.model.layers import packed_visibility
    rng = np.random.default_rng(3)
    q, k, v = (rng.normal(size=(1, 100, h, 8)).astype(np.float32) for h in (4, 2, 2))
    segments = np.zeros((1, 100), np.int32)
    segments[0, :5], segments[0, 5:75], segments[0, 75:84] = 1, 2, 3  # 84.. padding
    branches = np.zeros((1, 100), np.int32)
    segments[0, 84:97], branches[0, 90:94], branches[0, 94:97] = 4, 1, 2  # prefix 84..89
    visible = packed_visibility(jnp.asarray(segments), jnp.asarray(branches))
    out = np.asarray(gqa_attention(*(jnp.asarray(x) for x in (q, k, v)), impl, visible))
    for span in (slice(0, 5), slice(5, 75), slice(75, 84)):
        alone = _naive_attention(q[:, span], k[:, span], v[:, span])
        np.testing.assert_allclose(out[:, span], alone, atol=2e-5)
    for branch in (np.r_[84:90, 90:94], np.r_[84:90, 94:97]):
        alone = _naive_attention(q[:, branch], k[:, branch], v[:, branch])
        np.testing.assert_allclose(out[:, branch[6:]], alone[:, 6:], atol=2e-5)


def test_packed_forward_gives_each_sequence_its_own_logits():
    """Positions restart per segment, so RoPE and attention see each sequence alone."""
    from hf_helpers import random_params
    a = Arch(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
             ffn_size=48, max_position_embeddings=128)
    p, opt = random_params(a, 5), llama.ModelOptions(dtype="float32")
    rng = np.random.default_rng(4)
    seqs = [rng.integers(0, 64, n).astype(np.int32) for n in (7, 80, 12)]
    tokens, positions, segments = (np.zeros((1, 112), np.int32) for _ in range(3))
    start = 0
    for s, x in enumerate(seqs, start=1):
        tokens[0, start:start + len(x)], positions[0, start:start + len(x)] = x, np.arange(len(x))
        segments[0, start:start + len(x)] = s
        start += len(x)
    packed = np.asarray(llama.forward(p, jnp.asarray(tokens), a, None, opt, positions_BL=jnp.asarray(positions),
                                      segments_BL=jnp.asarray(segments)))
    start = 0
    for x in seqs:
        alone = np.asarray(llama.forward(p, jnp.asarray(x[None]), a, None, opt))
        np.testing.assert_allclose(packed[:, start:start + len(x)], alone, atol=1e-4, rtol=1e-4)
        start += len(x)


def test_bf16_matmuls_under_fp32_activations_track_fp32():
    """`matmul_dtype=bfloat16` rounds only the linears' operands: logits and gradients stay
    within bf16 rounding of fp32's, and closer than all-bf16's logits."""
    from hf_helpers import random_params
    a = preset("tiny")
    p = random_params(a, 6)
    tokens = jnp.asarray(np.random.default_rng(7).integers(0, a.vocab_size, (2, 24)), jnp.int32)
    runs = {name: llama.ModelOptions(**kw) for name, kw in
            (("fp32", dict(dtype="float32")), ("mixed", dict(dtype="float32", matmul_dtype="bfloat16")),
             ("bf16", dict(dtype="bfloat16")))}
    logits = {n: np.asarray(llama.forward(p, tokens, a, None, o)) for n, o in runs.items()}
    mixed_err = np.abs(logits["mixed"] - logits["fp32"]).max()
    assert 0 < mixed_err < 0.05 * np.abs(logits["fp32"]).max()
    assert mixed_err <= np.abs(logits["bf16"] - logits["fp32"]).max()
    grads = {n: jax.grad(lambda p: llama.next_token_loss(llama.forward(p, tokens, a, None, o), tokens))(p)
             for n, o in runs.items() if n != "bf16"}
    for g32, gmix in zip(jax.tree.leaves(grads["fp32"]), jax.tree.leaves(grads["mixed"])):
        np.testing.assert_allclose(gmix, g32, atol=0.05 * float(np.abs(g32).max()) + 1e-6)
    with pytest.raises(Exception, match="matmul_dtype"):
        llama.ModelOptions(matmul_dtype="int8")


def test_auto_attention_picks_the_kernel_that_applies():
    from maxprune.model.layers import attention_impl
    bf16, fp32 = jnp.bfloat16, jnp.float32
    assert attention_impl("auto", bf16, 64) == "einsum"  # this CPU
    assert attention_impl("auto", bf16, 128, backend="gpu", capability=9.0) == "cudnn"  # H100/H200
    assert attention_impl("auto", jnp.float16, 64, backend="cuda", capability=8.0) == "cudnn"  # A100
    assert attention_impl("auto", fp32, 128, backend="gpu", capability=9.0) == "xla"  # cuDNN: 16-bit only
    assert attention_impl("auto", bf16, 256, backend="gpu", capability=9.0) == "xla"
    assert attention_impl("auto", bf16, 128, backend="gpu", capability=7.5) == "xla"  # pre-Ampere
    assert attention_impl("auto", bf16, 128, backend="tpu") == "xla"
    assert attention_impl("einsum", bf16, 128, backend="gpu", capability=9.0) == "einsum"  # as asked
    assert llama.ModelOptions().attention == "auto"
