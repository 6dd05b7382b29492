"""Logits parity with transformers' LlamaForCausalLM (torch fp32, CPU), both conversion directions."""

import hf_helpers as H
import numpy as np
import pytest

from maxprune.convert import hf
from maxprune.model import masks as masks_lib
from maxprune.model.arch import Arch, RopeScaling
from maxprune.model.model_dir import load_model_dir, save_model_dir

TOL = 1e-4

# name -> hf_helpers.hf_config kwargs. Tokens are 80 long, past the llama3 rope's
# original_max_position_embeddings=32, so the frequency scaling matters.
CASES = {
    "mha": dict(heads=4, kv_heads=4),
    "gqa2": dict(heads=4, kv_heads=2),
    "gqa4": dict(heads=4, kv_heads=1),
    "head_dim32": dict(hidden=64, heads=4, kv_heads=2, head_dim=32),
    "llama31_rope": dict(llama3_rope=True, rope_theta=500000.0),
    "tied": dict(tie=True),
    "flap_bias": dict(bias=True),
}


def _arch(case) -> Arch:
    return hf.arch_from_hf_config(H.hf_config(**CASES[case]).to_dict())


@pytest.mark.parametrize("case", CASES)
def test_from_hf_matches_transformers(case, tmp_path):
    model = H.random_hf_model(H.hf_config(**CASES[case]))
    H.save_hf_model(model, tmp_path / "hf")
    hf.from_hf(tmp_path / "hf", tmp_path / "md")
    md = load_model_dir(tmp_path / "md")
    tokens = H.tokens(md.arch.vocab_size)
    ref = H.hf_logits(model, tokens)
    assert np.abs(ref).max() > 0.5  # weights big enough that parity means something
    np.testing.assert_allclose(H.our_logits(md.params, md.arch, tokens), ref, atol=TOL, rtol=0)


def _random_masks(params, seed=0):
    rng = np.random.default_rng(seed)
    return masks_lib.from_kernels({(b, n): rng.random(masks_lib.get_kernel(params, b, n).shape) < 0.5
                                   for b, n in masks_lib.PRUNABLE})


@pytest.mark.parametrize("case", CASES)
def test_to_hf_with_masks_matches_transformers(case, tmp_path):
    """Export bakes the masks in: HF with the masked weights zeroed == our masked forward."""
    arch = _arch(case)
    params = H.random_params(arch)
    masks = _random_masks(params)
    save_model_dir(tmp_path / "md", arch, params, masks)
    hf.to_hf(tmp_path / "md", tmp_path / "hf")
    q_proj = H.read_safetensors(tmp_path / "hf")["model.layers.0.self_attn.q_proj.weight"]
    assert 0.4 < np.mean(q_proj == 0) < 0.6
    tokens = H.tokens(arch.vocab_size)
    ref = H.hf_logits(tmp_path / "hf", tokens)
    assert np.abs(ref).max() > 0.5
    np.testing.assert_allclose(H.our_logits(params, arch, tokens, masks), ref, atol=TOL, rtol=0)


def test_llama31_rope_scaling_matters():
    """Guard for the rope case above: at these lengths scaled and unscaled rope differ."""
    arch = _arch("llama31_rope")
    assert arch.rope_scaling == RopeScaling(8.0, 1.0, 4.0, 32)
    params = H.random_params(arch)
    tokens = H.tokens(arch.vocab_size)
    unscaled = arch.replace(rope_scaling=None)
    diff = H.our_logits(params, arch, tokens) - H.our_logits(params, unscaled, tokens)
    assert np.abs(diff).max() > 1e-2
