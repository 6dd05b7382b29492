"""HF safetensors <-> model dir: exact round trips, config reading, and clear errors."""

import json
import shutil
from pathlib import Path

import hf_helpers as H
import numpy as np
import pytest
import torch
from safetensors.numpy import save_file
from transformers import LlamaConfig, LlamaForCausalLM

from maxprune import cli
from maxprune.convert import hf
from maxprune.errors import MaxpruneError
from maxprune.model.arch import Arch, RopeScaling, preset
from maxprune.model.model_dir import load_model_dir, save_model_dir

TOKENIZER = {"tokenizer.json": '{"version": "1.0"}', "tokenizer_config.json": '{"bos_token": "<s>"}'}


def _hf_dir(path, dtype=torch.float32, max_shard_size=None, tokenizer=False, **config):
    H.save_hf_model(H.random_hf_model(H.hf_config(**config)), path, dtype, max_shard_size)
    for name, text in (TOKENIZER.items() if tokenizer else ()):
        (path / name).write_text(text)
    return path


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A small valid fp32 HF checkpoint; tests that damage it work on a copy."""
    return _hf_dir(tmp_path_factory.mktemp("hf") / "model", tokenizer=True)


def _copy(src, tmp_path):
    return shutil.copytree(src, tmp_path / "hf")


def _edit_config(hf_dir, **changes):
    config = json.loads((hf_dir / "config.json").read_text())
    config.update(changes)
    (hf_dir / "config.json").write_text(json.dumps(config))


def _snapshot(path):
    return {p.relative_to(path): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def _assert_same_tensors(a, b):
    ta, tb = H.read_safetensors(a), H.read_safetensors(b)
    assert sorted(ta) == sorted(tb)
    for name in ta:
        assert ta[name].dtype == tb[name].dtype, name
        np.testing.assert_array_equal(ta[name], tb[name], err_msg=name)


# ------------------------------------------------------------------ round trip
@pytest.mark.parametrize("dtype, shard, config", [
    (torch.float32, None, {}),
    (torch.bfloat16, None, {"bias": True}),
    (torch.float32, "20KB", {"tie": True, "llama3_rope": True}),
], ids=["fp32", "bf16-bias", "fp32-sharded-tied-rope"])
def test_round_trip_reproduces_every_tensor(tmp_path, dtype, shard, config):
    src = _hf_dir(tmp_path / "src", dtype, shard, tokenizer=True, **config)
    assert (src / hf.INDEX_FILE).exists() == bool(shard)
    hf.from_hf(src, tmp_path / "md")
    out = hf.to_hf(tmp_path / "md", tmp_path / "out", max_shard_bytes=30_000 if shard else 2**30)
    _assert_same_tensors(src, out)
    assert (out / hf.INDEX_FILE).exists() == bool(shard)
    for name, text in TOKENIZER.items():
        assert (out / name).read_text() == text
    model, info = LlamaForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not any(info.values()), info  # no missing, unexpected or mismatched keys
    loaded, original = model.config, LlamaConfig.from_pretrained(src)
    for key in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "intermediate_size", "rope_parameters",
                "rms_norm_eps", "tie_word_embeddings", "attention_bias", "mlp_bias", "dtype",
                "bos_token_id", "eos_token_id"):
        assert getattr(loaded, key) == getattr(original, key), key


def test_import_records_arch_dtype_and_provenance(hf_dir, tmp_path):
    hf.from_hf(hf_dir, tmp_path / "md")
    md = load_model_dir(tmp_path / "md", as_numpy=True)
    assert md.arch == Arch(vocab_size=96, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                           head_dim=16, ffn_size=96, rope_theta=10000.0, norm_eps=1e-5,
                           max_position_embeddings=256)
    assert md.params["layers"]["attn"]["q"]["kernel"].dtype == np.float32
    assert md.masks is None
    prov = md.provenance
    assert prov["method"] == "import" and prov["hf_dtype"] == "float32"
    assert prov["source"] == str(hf_dir.absolute())
    assert prov["hf_config"]["model_type"] == "llama"
    assert md.tokenizer_dir is not None and prov["tokenizer"] == str(md.tokenizer_dir)
    copied = sorted(p.name for p in md.tokenizer_dir.iterdir())
    assert copied == sorted([*TOKENIZER, "generation_config.json"])


def test_import_in_bfloat16_and_export_dtype(hf_dir, tmp_path):
    hf.from_hf(hf_dir, tmp_path / "md", dtype="bfloat16")
    md = load_model_dir(tmp_path / "md", as_numpy=True)
    assert md.params["embed"]["embedding"].dtype.name == "bfloat16"
    hf.to_hf(tmp_path / "md", tmp_path / "out", dtype="float16")
    tensors = H.read_safetensors(tmp_path / "out")
    assert {t.dtype.name for t in tensors.values()} == {"float16"}
    assert json.loads((tmp_path / "out" / "config.json").read_text())["torch_dtype"] == "float16"


def test_export_without_provenance_defaults_to_float32_single_file(tmp_path):
    arch = Arch(vocab_size=32, hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=1,
                head_dim=8, ffn_size=24, rope_scaling=RopeScaling(), out_bias=True)
    save_model_dir(tmp_path / "md", arch, H.random_params(arch))
    out = hf.to_hf(tmp_path / "md", tmp_path / "out")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    tensors = H.read_safetensors(out)
    assert {t.dtype.name for t in tensors.values()} == {"float32"}
    assert not tensors["model.layers.0.self_attn.q_proj.bias"].any()  # written as zeros
    assert hf.arch_from_hf_config(json.loads((out / "config.json").read_text())) == arch


# --------------------------------------------------------------- config.json
def test_reads_transformers4_style_config():
    """Meta's Llama-3.1 config.json: top-level rope_theta and a rope_scaling dict."""
    cfg = {"model_type": "llama", "vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336,
           "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
           "rope_theta": 500000.0, "max_position_embeddings": 131072, "rms_norm_eps": 1e-5,
           "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                            "original_max_position_embeddings": 8192, "rope_type": "llama3"}}
    assert hf.arch_from_hf_config(cfg) == preset("llama3.1-8b")


def test_hf_defaults_apply_to_absent_fields():
    cfg = {"model_type": "llama", "vocab_size": 10, "hidden_size": 8, "intermediate_size": 12,
           "num_hidden_layers": 1, "num_attention_heads": 2, "rope_scaling": None}
    arch = hf.arch_from_hf_config(cfg)
    assert (arch.num_kv_heads, arch.head_dim, arch.rope_theta, arch.rope_scaling, arch.norm_eps,
            arch.tie_embeddings, arch.out_bias) == (2, 4, 10000.0, None, 1e-6, False, False)


@pytest.mark.parametrize("changes, message", [
    ({"model_type": "mistral"}, "model_type='mistral'; only 'llama'"),
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}}, "rope_type='yarn'"),
    ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 1e4, "factor": 8.0}},
     "missing ['low_freq_factor'"),
    ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
    ({"num_attention_heads": 3}, "not divisible"),
])
def test_bad_config_is_named(hf_dir, tmp_path, changes, message):
    src = _copy(hf_dir, tmp_path)
    _edit_config(src, **changes)
    with pytest.raises(MaxpruneError, match=message.replace("[", r"\[").replace("(", r"\(")):
        hf.from_hf(src, tmp_path / "md")
    assert not (tmp_path / "md").exists()


# -------------------------------------------------------------- bad checkpoints
def test_missing_dir_config_or_weights(hf_dir, tmp_path):
    with pytest.raises(MaxpruneError, match="does not exist"):
        hf.from_hf(tmp_path / "nope", tmp_path / "md")
    src = _copy(hf_dir, tmp_path)
    (src / "model.safetensors").unlink()
    with pytest.raises(MaxpruneError, match="no model.safetensors or model.safetensors.index.json"):
        hf.from_hf(src, tmp_path / "md")
    (src / "config.json").unlink()
    with pytest.raises(MaxpruneError, match="no config.json"):
        hf.from_hf(src, tmp_path / "md")


def test_tensor_shape_disagreeing_with_config(hf_dir, tmp_path):
    src = _copy(hf_dir, tmp_path)
    _edit_config(src, intermediate_size=80)
    message = r"'model.layers.0.mlp.down_proj.weight' has shape \(64, 96\) but config.json implies \(64, 80\)"
    with pytest.raises(MaxpruneError, match=message):
        hf.from_hf(src, tmp_path / "md")


def _rewrite_weights(src, edit):
    tensors = H.read_safetensors(src)
    edit(tensors)
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})


def test_missing_and_unexpected_tensors(hf_dir, tmp_path):
    src = _copy(hf_dir, tmp_path)
    _rewrite_weights(src, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(MaxpruneError, match="missing 1 tensor.*model.layers.1.mlp.up_proj.weight"):
        hf.from_hf(src, tmp_path / "md")
    up_proj = np.zeros((96, 64), np.float32)
    _rewrite_weights(src, lambda t: t.update({"model.layers.1.mlp.up_proj.weight": up_proj,
                                              "model.layers.2.mlp.up_proj.weight": up_proj}))
    with pytest.raises(MaxpruneError, match="unexpected tensor 'model.layers.2.mlp.up_proj.weight'"):
        hf.from_hf(src, tmp_path / "md")


def test_tied_checkpoint_may_store_lm_head(tmp_path):
    """Some tied checkpoints also store lm_head.weight; as in transformers, the embedding wins."""
    src = _hf_dir(tmp_path / "src", tie=True)
    _rewrite_weights(src, lambda t: t.update({"lm_head.weight": np.ones((96, 64), np.float32)}))
    hf.from_hf(src, tmp_path / "md")
    out = hf.to_hf(tmp_path / "md", tmp_path / "out")
    assert "lm_head.weight" not in H.read_safetensors(out)
    np.testing.assert_array_equal(H.read_safetensors(out)["model.embed_tokens.weight"],
                                  H.read_safetensors(src)["model.embed_tokens.weight"])


def test_nonzero_qkv_bias_is_refused(tmp_path):
    src = _hf_dir(tmp_path / "src", bias=True)
    _rewrite_weights(src, lambda t: t["model.layers.0.self_attn.k_proj.bias"].__setitem__(0, 1.0))
    with pytest.raises(MaxpruneError, match="non-zero bias 'model.layers.0.self_attn.k_proj.bias'"):
        hf.from_hf(src, tmp_path / "md")


def test_export_refuses_what_transformers5_cannot_load(tmp_path):
    arch = Arch(vocab_size=32, hidden_size=64, num_layers=1, num_heads=6, num_kv_heads=2,
                head_dim=16, ffn_size=24)
    save_model_dir(tmp_path / "md", arch, H.random_params(arch))
    with pytest.raises(MaxpruneError, match="hidden_size=64 is not a multiple of num_heads=6"):
        hf.to_hf(tmp_path / "md", tmp_path / "out")
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------ out dirs
def test_existing_output_dirs_are_left_alone(hf_dir, tmp_path):
    hf.from_hf(hf_dir, tmp_path / "md")
    for out in (tmp_path / "a", tmp_path / "b"):
        out.mkdir()
        (out / "keep.txt").write_text("mine")
    before = _snapshot(tmp_path / "md")
    with pytest.raises(MaxpruneError, match="exists and is not empty; pass --overwrite"):
        hf.from_hf(hf_dir, tmp_path / "md")
    with pytest.raises(MaxpruneError, match="exists and is not empty; pass --overwrite"):
        hf.to_hf(tmp_path / "md", tmp_path / "a")
    assert _snapshot(tmp_path / "md") == before
    assert _snapshot(tmp_path / "a") == {Path("keep.txt"): b"mine"}
    hf.to_hf(tmp_path / "md", tmp_path / "b", overwrite=True)
    assert not (tmp_path / "b" / "keep.txt").exists() and (tmp_path / "b" / "model.safetensors").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "md"]  # no staging dirs left


# ------------------------------------------------------------------------ CLI
def test_cli_round_trip(hf_dir, tmp_path, capsys):
    assert cli.main(["convert", "from-hf", str(hf_dir), str(tmp_path / "md")]) == 0
    assert cli.main(["convert", "to-hf", str(tmp_path / "md"), str(tmp_path / "out")]) == 0
    _assert_same_tensors(hf_dir, tmp_path / "out")


@pytest.mark.parametrize("make_args, message", [
    (lambda hf_dir, tmp: [str(tmp / "nope"), str(tmp / "md")], "does not exist"),
    (lambda hf_dir, tmp: [str(hf_dir), str(tmp)], "exists and is not empty"),
])
def test_cli_errors_exit_2_with_one_line(hf_dir, tmp_path, capsys, make_args, message):
    (tmp_path / "x").write_text("")
    assert cli.main(["convert", "from-hf", *make_args(hf_dir, tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and "Traceback" not in err
