"""Every shipped prune config runs on a real-model shape without shape flags.

The parent is shaped like SmolLM2-135M (hidden 576, 9 query / 3 KV heads, head_dim 64,
FFN 1536, tied embeddings), with 2 layers and random weights. Only budgets are lowered
(calibration rows, Sheared LLaMA's mask-learning tokens) so that the test is quick;
no shape key is set, so the shape comes from each config's ratio.
"""

import numpy as np
import pytest
from hf_helpers import random_params

from maxprune.model.arch import preset
from maxprune.model.model_dir import read_arch, save_model_dir
from maxprune.prune import api
from maxprune.prune.run import prune_model_dir
from maxprune.schema import load_config

SMOL = preset("tiny").replace(vocab_size=512, hidden_size=576, num_layers=2, num_heads=9, num_kv_heads=3,
                              head_dim=64, ffn_size=1536, tie_embeddings=True, rope_theta=1e5, rope_scaling=None,
                              max_position_embeddings=256)
SEQ = 32
# SparseGPT keeps the dense shape (as Wanda, checked in the default suite) and takes minutes here: slow suite
CONFIGS = ["minitron_depth.py", "minitron_width.py", "minitron_width.py:0.75", "flap.py", "sheared_llama.py",
           "wanda.py", "wanda.py:2:4", "magnitude.py",
           *(pytest.param(spec, marks=pytest.mark.slow) for spec in ("sparsegpt.py", "sparsegpt.py:2:4"))]


@pytest.fixture(scope="module")
def parent(tmp_path_factory):
    root = tmp_path_factory.mktemp("smol")
    model = save_model_dir(root / "parent", SMOL, random_params(SMOL, 0), provenance={"method": "test"})
    calibration = root / "calibration.npy"
    np.save(calibration, np.random.default_rng(0).integers(0, SMOL.vocab_size, (256, SEQ), dtype=np.int32))
    return model, calibration


@pytest.mark.parametrize("spec", CONFIGS)
def test_shipped_config_prunes_a_smollm2_shaped_model(parent, tmp_path, spec):
    model, calibration = parent
    budget = ["--config.prune.n_samples=16", f"--config.prune.seq_len={SEQ}", "--config.prune.batch_size=16"]
    if spec.startswith("sheared"):
        budget += ["--config.prune.sheared_llama.tokens=512", "--config.prune.sheared_llama.global_batch=4",
                   "--config.prune.sheared_llama.lagrangian_warmup=1", "--config.prune.sheared_llama.remat=none"]
    cfg = load_config(f"configs/prune/{spec}", [
        f"--config.prune.input={model}", f"--config.prune.output={tmp_path / 'out'}",
        f"--config.prune.calibration={calibration}", *budget])
    expected = api.target_shape(SMOL, cfg.prune)
    out = prune_model_dir(cfg, progress=False)
    arch = read_arch(out)
    assert arch == expected
    if cfg.prune.method in api.SPARSE_METHODS:
        assert arch == SMOL
        return
    assert arch.num_params() < SMOL.num_params()
    if cfg.prune.method in ("flap", "sheared_llama"):  # whole KV groups: still a valid GQA model
        assert arch.num_heads == 3 * arch.num_kv_heads
    if cfg.prune.method != "minitron_depth":
        assert arch.hidden_size % 32 == 0 and arch.ffn_size % 32 == 0  # the multiple scales with the model
