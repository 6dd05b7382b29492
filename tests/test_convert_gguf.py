"""GGUF file -> model dir: params equal the (dequantized) source, logits equal transformers' GGUF
loader, the tokenizer's ids equal transformers', and bad files are one-line errors."""

import hashlib
import json
import math
import time

import gguf
import hf_helpers as H
import numpy as np
import pytest
import tokenizers
import torch
from tokenizers import models, pre_tokenizers, trainers
from transformers import AutoTokenizer, LlamaForCausalLM

from maxprune import cli
from maxprune.convert import gguf as gguf_convert
from maxprune.data.tokenizer import Tokenizer
from maxprune.errors import MaxpruneError
from maxprune.model.arch import RopeScaling
from maxprune.model.model_dir import load_model_dir

Q = gguf.GGMLQuantizationType
TEXT = ("The history of the periodic table spans more than two centuries. In 1869 Dmitri Mendeleev "
        "arranged the 63 elements then known by atomic weight, and left gaps for ones not yet found; "
        "gallium (1875) and germanium (1886) filled two of them. It's said he saw it in a dream, "
        "but he'd been working on it for years.\n\nToday 118 elements are known:  the last four were "
        "named in 2016 — nihonium, moscovium, tennessine and oganesson. <think> Café, naïve, 東京.")
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>"]
TYPES = {"<|endoftext|>": 3, "<|im_start|>": 3, "<|im_end|>": 3, "<think>": 4}  # CONTROL, USER_DEFINED
EXTRA_ROWS = 3  # embedding rows beyond the vocabulary, as padded vocabularies have
HF_TO_GGUF = {hf_name: name for name, hf_name in gguf_convert.GLOBAL_NAMES.items()}


# -------------------------------------------------------------- writing GGUF
@pytest.fixture(scope="module")
def vocab():
    """(tokens, merges, token types) of a small byte-level BPE trained on TEXT."""
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([TEXT] * 3, trainer=trainer)
    vocab = tok.get_vocab()
    tokens = sorted(vocab, key=vocab.get)
    merges = [" ".join(m) for m in json.loads(tok.to_str())["model"]["merges"]]
    return tokens, merges, [TYPES.get(t, 1) for t in tokens]


def _hf_model(vocab, **config):
    return H.random_hf_model(H.hf_config(vocab=len(vocab[0]) + EXTRA_ROWS, **config))


def _gguf_tensors(model) -> dict[str, np.ndarray]:
    """GGUF name -> HF-layout fp32 array, Q/K permuted as llama.cpp's converter does."""
    config, out = model.config, {}
    for hf_name, value in model.state_dict().items():
        value = value.float().numpy()
        if hf_name == "lm_head.weight" and config.tie_word_embeddings:
            continue  # a tied checkpoint has no lm_head tensor, so llama.cpp writes no output.weight
        if hf_name in HF_TO_GGUF:
            out[HF_TO_GGUF[hf_name]] = value
            continue
        layer, rest = hf_name.removeprefix("model.layers.").split(".", 1)
        module, suffix = rest.rsplit(".", 1)
        short = {v: k for k, v in gguf_convert.LAYER_NAMES.items()}[module]
        if short in ("attn_q", "attn_k"):
            heads = config.num_attention_heads if short == "attn_q" else config.num_key_value_heads
            value = gguf_convert.permute_qk(value, heads)
        out[f"blk.{layer}.{short}.{suffix}"] = value
    return out


def llama3_rope_freqs(head_dim, theta, factor, low, high, original):
    """llama.cpp's convert_hf_to_gguf.py ``rope_freqs.weight`` for Llama-3.1 scaling, written out."""
    freqs = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
    out = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < original / high:
            out.append(1.0)
        elif wavelen > original / low:
            out.append(factor)
        else:
            smooth = (original / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, np.float32)


def write_gguf(path, model, vocab, quant=None, pre="default", add_bos=False, architecture="llama",
               rope_freqs=None, tokenizer_model="gpt2", drop=(), edit=None):
    """A llama.cpp-style GGUF of an HF `model`; `quant` maps a GGUF-name substring to a ggml type.

    Returns {GGUF name: the HF-layout values the file holds}, dequantized (unpermuted).
    """
    config, (tokens, merges, types) = model.config, vocab
    w = gguf.GGUFWriter(str(path), architecture)
    w.add_name("tiny test llama")
    w.add_block_count(config.num_hidden_layers)
    w.add_context_length(config.max_position_embeddings)
    w.add_embedding_length(config.hidden_size)
    w.add_feed_forward_length(config.intermediate_size)
    w.add_head_count(config.num_attention_heads)
    w.add_head_count_kv(config.num_key_value_heads)
    w.add_rope_dimension_count(config.head_dim)
    w.add_rope_freq_base(config.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(config.rms_norm_eps)
    w.add_vocab_size(config.vocab_size)
    w.add_tokenizer_model(tokenizer_model)
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_bos_token(add_bos)
    held = {}
    tensors = {n: v for n, v in _gguf_tensors(model).items() if n not in drop}
    for name, value in (edit or (lambda t: t))(tensors).items():
        qtype = next((t for part, t in (quant or {}).items() if part in name), None)
        if value.dtype != np.float32 or qtype is None:
            w.add_tensor(name, value)
            held[name] = value
        else:
            packed = (_random_blocks(value.shape, qtype) if qtype in HAND_MADE else
                      gguf.quants.quantize(value, qtype))
            w.add_tensor(name, packed, raw_dtype=qtype)
            held[name] = gguf.quants.dequantize(packed, qtype)
    if rope_freqs is not None:
        w.add_tensor(gguf_convert.ROPE_FREQS, rope_freqs)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return {n: _unpermute(n, v, config) for n, v in held.items()}


# Types the gguf library dequantizes but cannot quantize: byte offset and value of each block's
# fp16 scale(s); the rest of a block (sub-scales, quants) may hold any bits.
HAND_MADE = {Q.Q4_K: ((0, 1e-4), (2, 5e-5)), Q.Q5_K: ((0, 1e-4), (2, 5e-5)), Q.Q6_K: ((208, 1e-4),),
             Q.Q3_K: ((108, 1e-4),)}


def _random_blocks(shape, qtype, seed=0):
    """Valid ``qtype`` blocks for a ``shape`` (rows, cols) tensor: random bits, small fp16 scales."""
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    rows, cols = shape
    blocks = np.random.default_rng(seed).integers(0, 256, (rows, cols // block, size), dtype=np.uint8)
    for offset, scale in HAND_MADE[qtype]:
        blocks[..., offset:offset + 2] = np.frombuffer(np.float16(scale).tobytes(), np.uint8)
    return blocks.reshape(rows, cols // block * size)


def _unpermute(name, value, config):
    if ".attn_q." in name:
        return gguf_convert.unpermute_qk(value, config.num_attention_heads)
    if ".attn_k." in name:
        return gguf_convert.unpermute_qk(value, config.num_key_value_heads)
    return value


def _expected_params(held, num_layers):
    """The maxprune params the held HF-layout tensors mean (kernels transposed, layers stacked)."""
    stack = lambda short, t=True: np.stack([held[f"blk.{i}.{short}.weight"].T if t else
                                            held[f"blk.{i}.{short}.weight"] for i in range(num_layers)])
    params = {"embed": {"embedding": held["token_embd.weight"]},
              "final_norm": {"scale": held["output_norm.weight"]},
              "layers": {"attn_norm": {"scale": stack("attn_norm", False)},
                         "mlp_norm": {"scale": stack("ffn_norm", False)},
                         "attn": {k: {"kernel": stack(s)} for k, s in
                                  (("q", "attn_q"), ("k", "attn_k"), ("v", "attn_v"), ("o", "attn_output"))},
                         "mlp": {k: {"kernel": stack(s)} for k, s in
                                 (("gate", "ffn_gate"), ("up", "ffn_up"), ("down", "ffn_down"))}}}
    if "output.weight" in held:
        params["lm_head"] = {"kernel": held["output.weight"].T}
    return params


def _assert_tree_equal(got, want, path=""):
    assert sorted(got) == sorted(want), path
    for key in want:
        if isinstance(want[key], dict):
            _assert_tree_equal(got[key], want[key], f"{path}/{key}")
        else:
            np.testing.assert_array_equal(np.asarray(got[key]), want[key], err_msg=f"{path}/{key}")


def _transformers_logits(directory, name, tokens_BL):
    model = LlamaForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32).eval()
    return H.hf_logits(model, tokens_BL)


# ---------------------------------------------------------------- conversions
CASES = {
    # GQA, Q8_0 attention and FFN up/down (rows of 64 and 96: whole 32-blocks), F32 elsewhere.
    "q8-gqa": {"config": {}, "quant": {"attn_q": Q.Q8_0, "attn_k": Q.Q8_0, "ffn_up": Q.Q8_0,
                                     "ffn_down": Q.Q8_0, "token_embd": Q.Q8_0}},
    # Tied embeddings, head_dim 32 != hidden / heads, F16 and BF16 tensors, MHA (kv == heads).
    "tied-f16": {"config": {"tie": True, "head_dim": 32, "kv_heads": 4},
                     "quant": {"attn_v": Q.F16, "ffn_gate": Q.BF16, "attn_q": Q.F16}},
}


@pytest.fixture(scope="module", params=list(CASES))
def converted(request, vocab, tmp_path_factory):
    case = CASES[request.param]
    tmp = tmp_path_factory.mktemp(request.param)
    model = _hf_model(vocab, **case["config"])
    held = write_gguf(tmp / "model.gguf", model, vocab, case["quant"])
    gguf_convert.from_gguf(tmp / "model.gguf", tmp / "md")
    return request.param, tmp, model, held, load_model_dir(tmp / "md", as_numpy=True)


def test_params_equal_the_dequantized_source(converted):
    case, _, model, held, md = converted
    _assert_tree_equal(md.params, _expected_params(held, model.config.num_hidden_layers))
    # Q/K are back in HF's layout: an F32 K comes back bit-exact from the HF model, a Q8_0 one rounded.
    hf_k = model.state_dict()["model.layers.1.self_attn.k_proj.weight"].numpy()
    kernel = md.params["layers"]["attn"]["k"]["kernel"][1]
    if "attn_k" in CASES[case]["quant"]:
        np.testing.assert_allclose(kernel, hf_k.T, atol=np.abs(hf_k).max() / 100)
        assert not np.array_equal(kernel, hf_k.T)
    else:
        np.testing.assert_array_equal(kernel, hf_k.T)
    c = model.config
    assert (md.arch.num_heads, md.arch.num_kv_heads, md.arch.head_dim, md.arch.hidden_size) == (
        c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.hidden_size)
    assert md.arch.vocab_size == c.vocab_size and md.arch.tie_embeddings == c.tie_word_embeddings
    assert md.arch.rope_scaling is None and md.arch.norm_eps == pytest.approx(1e-5, rel=1e-6)


ALL_TYPES = {  # one ggml type per kernel, in a model whose rows are whole 256-element super-blocks
    "blk.0.attn_q": Q.Q4_0, "blk.0.attn_k": Q.Q4_1, "blk.0.attn_v": Q.Q5_0, "blk.0.attn_output": Q.Q5_1,
    "blk.0.ffn_gate": Q.Q4_K, "blk.0.ffn_up": Q.Q6_K, "blk.0.ffn_down": Q.Q5_K,
    "blk.1.attn_q": Q.Q3_K, "blk.1.attn_k": Q.Q8_0, "blk.1.attn_v": Q.TQ2_0, "blk.1.attn_output": Q.MXFP4,
    "blk.1.ffn_gate": Q.TQ1_0, "blk.1.ffn_up": Q.BF16, "blk.1.ffn_down": Q.F16, "token_embd": Q.Q8_0,
}


def test_every_dequantizable_type_converts_exactly(tmp_path, vocab):
    model = _hf_model(vocab, hidden=256, ffn=256, heads=4, kv_heads=2)
    held = write_gguf(tmp_path / "m.gguf", model, vocab, ALL_TYPES)
    gguf_convert.from_gguf(tmp_path / "m.gguf", tmp_path / "md", skip_tokenizer=True)
    md = load_model_dir(tmp_path / "md", as_numpy=True)
    _assert_tree_equal(md.params, _expected_params(held, 2))
    assert md.provenance["gguf_types"] == {"F32": 6, **{t.name: 1 for t in ALL_TYPES.values()},
                                           "Q8_0": 2}


def test_logits_equal_transformers_gguf_loader(converted):
    _, tmp, model, _, md = converted
    tokens = H.tokens(model.config.vocab_size, batch=2, length=40)
    ours = H.our_logits(md.params, md.arch, tokens)
    np.testing.assert_allclose(ours, _transformers_logits(tmp, "model.gguf", tokens), atol=1e-4, rtol=0)


def test_provenance_records_source_types_and_tokenizer(converted):
    case, tmp, _, _, md = converted
    prov = md.provenance
    assert prov["source_sha256"] == hashlib.sha256((tmp / "model.gguf").read_bytes()).hexdigest()
    assert prov["format"] == "gguf" and prov["gguf_name"] == "tiny test llama"
    assert prov["source"] == str((tmp / "model.gguf").absolute())
    n_layers = md.arch.num_layers
    expected_q8 = 4 * n_layers + 1 if case == "q8-gqa" else 0
    assert prov["gguf_types"].get("Q8_0", 0) == expected_q8
    assert sum(prov["gguf_types"].values()) == 9 * n_layers + 2 + (not md.arch.tie_embeddings)
    tok = Tokenizer.load(md.tokenizer_dir)
    assert prov["tokenizer_hash"] == tok.hash and (tok.bos_id, tok.eos_id) == (1, 2)
    assert prov["hf_config"] == {"bos_token_id": 1, "eos_token_id": 2}


@pytest.mark.parametrize("pre, add_bos", [("default", False), ("llama-bpe", True)])
def test_tokenizer_ids_equal_transformers(tmp_path, vocab, pre, add_bos):
    model = _hf_model(vocab, layers=1)
    write_gguf(tmp_path / "t.gguf", model, vocab, pre=pre, add_bos=add_bos)
    gguf_convert.from_gguf(tmp_path / "t.gguf", tmp_path / "md")
    ours = Tokenizer.load(tmp_path / "md" / "tokenizer")
    theirs = AutoTokenizer.from_pretrained(tmp_path, gguf_file="t.gguf")
    for text in (TEXT, "  leading spaces, 1234567 digits and can't/won't\n\n\ttabs"):
        ids = ours.encode(text)
        assert ids == theirs(text, add_special_tokens=False).input_ids
        assert ours.encode(text, bos=add_bos) == theirs(text).input_ids
        assert ours.decode(ids) == text
    think = vocab[0].index("<think>")
    assert think in ours.encode(TEXT)  # user-defined tokens are matched whole
    if pre == "llama-bpe":  # llama.cpp's split for it takes digits at most three at a time
        assert max(len(ours.decode([i])) for i in ours.encode("12345671869")) <= 3


def test_llama3_rope_scaling_from_rope_freqs(tmp_path, vocab):
    """rope_freqs.weight becomes an equivalent RopeScaling: logits equal the HF model's (which
    transformers' GGUF loader, ignoring rope_freqs, would not reproduce)."""
    model = _hf_model(vocab, llama3_rope=True, head_dim=32)
    rope = H.LLAMA3_ROPE
    freqs = llama3_rope_freqs(32, 10000.0, rope["factor"], rope["low_freq_factor"],
                              rope["high_freq_factor"], rope["original_max_position_embeddings"])
    assert 1 < np.sum((freqs > 1) & (freqs < rope["factor"]))  # some frequencies are smoothed
    write_gguf(tmp_path / "r.gguf", model, vocab, rope_freqs=freqs)
    gguf_convert.from_gguf(tmp_path / "r.gguf", tmp_path / "md")
    md = load_model_dir(tmp_path / "md", as_numpy=True)
    assert md.arch.rope_scaling is not None and md.arch.rope_scaling.factor == rope["factor"]
    tokens = H.tokens(model.config.vocab_size, batch=1, length=96)  # well past original context 32
    np.testing.assert_allclose(H.our_logits(md.params, md.arch, tokens), H.hf_logits(model, tokens),
                               atol=1e-4, rtol=0)


def test_llama31_constants_are_recovered_exactly():
    freqs = llama3_rope_freqs(128, 500000.0, 8.0, 1.0, 4.0, 8192)
    assert gguf_convert.llama3_scaling(freqs, 128, 500000.0) == RopeScaling(8.0, 1.0, 4.0, 8192)
    assert gguf_convert.llama3_scaling(np.ones(64, np.float32), 128, 500000.0) is None
    with pytest.raises(MaxpruneError, match="matches no Llama-3.1 RoPE scaling"):
        gguf_convert.llama3_scaling(np.linspace(1, 8, 64), 128, 500000.0)


def test_bfloat16_storage(tmp_path, vocab):
    model = _hf_model(vocab, layers=1)
    held = write_gguf(tmp_path / "m.gguf", model, vocab)
    gguf_convert.from_gguf(tmp_path / "m.gguf", tmp_path / "md", dtype="bfloat16")
    md = load_model_dir(tmp_path / "md", as_numpy=True)
    embedding = md.params["embed"]["embedding"]
    assert embedding.dtype.name == "bfloat16"
    np.testing.assert_array_equal(embedding.astype(np.float32),
                                  held["token_embd.weight"].astype("bfloat16").astype(np.float32))


def test_cli_converts_and_refuses_an_existing_output(tmp_path, vocab, capsys):
    write_gguf(tmp_path / "m.gguf", _hf_model(vocab, layers=1), vocab)
    assert cli.main(["convert", "from-gguf", str(tmp_path / "m.gguf"), str(tmp_path / "md")]) == 0
    assert (tmp_path / "md" / "tokenizer" / "tokenizer.json").is_file()
    before = (tmp_path / "md" / "manifest.json").read_bytes()
    assert cli.main(["convert", "from-gguf", str(tmp_path / "m.gguf"), str(tmp_path / "md")]) == 2
    assert "exists and is not empty; pass --overwrite" in capsys.readouterr().err
    assert (tmp_path / "md" / "manifest.json").read_bytes() == before
    assert cli.main(["convert", "from-gguf", str(tmp_path / "m.gguf"), str(tmp_path / "md"),
                     "--overwrite", "--skip-tokenizer"]) == 0
    md = load_model_dir(tmp_path / "md")
    assert md.tokenizer_dir is None and "tokenizer_hash" not in md.provenance


# --------------------------------------------------------------------- errors
def _truncated(path, tmp):
    data = path.read_bytes()
    (tmp / "bad.gguf").write_bytes(data[: len(data) * 2 // 3])


def _not_gguf(path, tmp):
    (tmp / "bad.gguf").write_bytes(b"PK\x03\x04" + path.read_bytes()[4:])


BAD_FILES = {
    "truncated": (_truncated, r"cannot read GGUF file .*bad\.gguf: .*truncated or corrupt"),
    "not-gguf": (_not_gguf, r"is not a GGUF file \(starts with b'PK\\x03\\x04', not b'GGUF'\)"),
    "architecture": ({"architecture": "mamba"},
                     r"general.architecture='mamba' is not supported; supported: \['llama'\]"),
    "quant-type": ({"edit": lambda t: {**t, "blk.0.ffn_up.weight": t["blk.0.ffn_up.weight"].astype(np.int32)}},
                   r"tensor 'blk.0.ffn_up.weight' has ggml type I32, which the gguf library cannot dequantize"),
    "missing-tensor": ({"drop": ("blk.1.attn_v.weight",)},
                       r"is missing 1 tensor\(s\) \(HF names\): model.layers.1.self_attn.v_proj.weight"),
    "sentencepiece": ({"tokenizer_model": "llama"},
                      r"tokenizer.ggml.model='llama': only 'gpt2' .*pass --skip-tokenizer"),
    "rope-freqs": ({"rope_freqs": np.linspace(1, 4, 8, dtype=np.float32)},
                   r"rope_freqs.weight \(divisors 1..4\) matches no Llama-3.1 RoPE scaling"),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_bad_files_are_one_line_errors_and_write_nothing(tmp_path, vocab, capsys, case):
    how, message = BAD_FILES[case]
    model = _hf_model(vocab)
    bad = tmp_path / "bad.gguf"
    if callable(how):
        write_gguf(tmp_path / "good.gguf", model, vocab)
        how(tmp_path / "good.gguf", tmp_path)
    else:
        write_gguf(bad, model, vocab, **how)
    with pytest.raises(MaxpruneError, match=message):
        gguf_convert.from_gguf(bad, tmp_path / "out")
    assert cli.main(["convert", "from-gguf", str(bad), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("maxprune: error: ") and "\n" not in err
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(".out*"))  # no staging dir left


def test_missing_file_is_an_error(tmp_path):
    with pytest.raises(MaxpruneError, match=r"GGUF file .*nope\.gguf does not exist"):
        gguf_convert.from_gguf(tmp_path / "nope.gguf", tmp_path / "out")


# ----------------------------------------------------------------- real model

@pytest.mark.slow
@H.needs_smollm2
def test_smollm2_q4_1_matches_transformers(tmp_path):
    start = time.perf_counter()
    gguf_convert.from_gguf(H.SMOLLM2, tmp_path / "md")
    convert_s = time.perf_counter() - start
    md = load_model_dir(tmp_path / "md", as_numpy=True)
    assert (md.arch.num_layers, md.arch.num_heads, md.arch.num_kv_heads, md.arch.hidden_size) == (30, 9, 3, 576)
    assert md.arch.tie_embeddings and md.provenance["gguf_types"] == {"F32": 61, "Q4_1": 210, "Q8_0": 1}

    theirs = AutoTokenizer.from_pretrained(H.SMOLLM2.parent, gguf_file=H.SMOLLM2.name)
    ours = Tokenizer.load(md.tokenizer_dir)
    ids = ours.encode(TEXT)
    assert ids == theirs(TEXT, add_special_tokens=False).input_ids

    sentence = "The capital of France is Paris, and the capital of Germany is"
    tokens = np.array([ours.encode(sentence)], np.int32)
    want = _transformers_logits(H.SMOLLM2.parent, H.SMOLLM2.name, tokens)
    got = H.our_logits(md.params, md.arch, tokens)
    max_diff = float(np.abs(got - want).max())
    print(f"\nSmolLM2 Q4_1: convert {convert_s:.1f} s, {len(ids)} ids equal, "
          f"max |dlogit| {max_diff:.2e} (max |logit| {np.abs(want).max():.1f})")
    assert max_diff <= 1e-4 * np.abs(want).max()
    assert (got.argmax(-1) == want.argmax(-1)).all()
