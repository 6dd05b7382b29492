"""GGUF (llama.cpp) Llama files -> maxprune model dirs.

A GGUF file holds the config as metadata (``llama.block_count``, ...), the
tokenizer as a vocabulary plus merges, and the weights in ggml's layout: a
linear layer's weight is ``[out, in]`` like HF's, possibly block-quantized
(Q4_0 ... Q8_0, K-quants, i-quants). Conversion maps each GGUF tensor to its
HF name and goes through the same tensor specs as `from_hf`
(`maxprune.convert.hf`): dequantized one tensor at a time into pre-allocated
layer-stacked fp32 (or bf16) arrays, so the model is never held twice.

llama.cpp permutes the rows of Q and K (``LlamaModel.permute`` in
convert_hf_to_gguf.py) from HF's rotate-half RoPE layout to its interleaved
one; `unpermute_qk` undoes it exactly. Llama-3.1 RoPE scaling is stored as
the per-frequency divisors ``rope_freqs.weight``, not as metadata: the
`RopeScaling` that reproduces them is recovered (`llama3_scaling`).

The tokenizer is rebuilt as a ``tokenizer.json`` for byte-level BPE
vocabularies (``tokenizer.ggml.model == "gpt2"``), the way transformers'
GGUF loader builds it, so the ids are the same; sentencepiece vocabularies
are refused (``skip_tokenizer`` converts the weights alone).
"""

from __future__ import annotations

import collections
import hashlib
import json
import math
import re
import tempfile
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors

from maxprune.convert import hf
from maxprune.data.tokenizer import (
    CONFIG_FILE,
    LLAMA3_PATTERN,
    TOKENIZER_FILE,
    Tokenizer,
)
from maxprune.errors import MaxpruneError
from maxprune.fs.staged import check_output_dir
from maxprune.model.arch import Arch, RopeScaling
from maxprune.model.layers import rope_inv_freq
from maxprune.model.model_dir import TOKENIZER_DIR, save_model_dir

SUPPORTED_ARCHITECTURES = ("llama",)
MAGIC = b"GGUF"
ROPE_FREQS = "rope_freqs.weight"
GLOBAL_NAMES = {"token_embd.weight": "model.embed_tokens.weight",
                "output_norm.weight": "model.norm.weight",
                "output.weight": "lm_head.weight"}
LAYER_NAMES = {"attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj",
               "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
               "attn_output": "self_attn.o_proj", "ffn_norm": "post_attention_layernorm",
               "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}
LAYER_TENSOR = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")
REQUIRED_KEYS = ("block_count", "embedding_length", "feed_forward_length", "attention.head_count",
                 "attention.layer_norm_rms_epsilon")
# Llama-3.1's RoPE scaling constants, tried first when recovering it from rope_freqs.weight.
LLAMA31_LOW, LLAMA31_HIGH, LLAMA31_ORIGINAL = 1.0, 4.0, 8192
# tokenizer.ggml.pre -> the pre-tokenizer split its merges were learned with (as transformers'
# GGUF loader maps them); any other value splits like GPT-2's ByteLevel.
_TEKKEN_SPLIT = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
                 r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
                 r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZER_SPLITS = {
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0",
                     "lfm2", "jina-v5-nano", "dbrx", "smaug-bpe"), LLAMA3_PATTERN),
    "tekken": _TEKKEN_SPLIT,
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "megrez"), _QWEN2_SPLIT),
}
CONTROL, USER_DEFINED = 3, 4  # tokenizer.ggml.token_type values


# ===================================================================== import
def from_gguf(gguf_file: str | Path, out_dir: str | Path, dtype: str | None = None,
              overwrite: bool = False, skip_tokenizer: bool = False) -> Path:
    """Import a GGUF Llama file as a model dir at `out_dir` (params dequantized to `dtype`)."""
    path, out_dir = Path(gguf_file), Path(out_dir)
    storage_dtype = hf._check_dtype(dtype or "float32", hf.STORAGE_DTYPES)
    check_output_dir(out_dir, overwrite)
    reader = open_gguf(path)
    meta = read_metadata(reader, path)
    arch, biases = arch_from_gguf(meta, reader)
    plan = _plan_tensors(reader, arch, biases, path)
    name = meta.get("general.name") or path.stem
    with tempfile.TemporaryDirectory() as tokenizer_dir:
        tok = None if skip_tokenizer else write_tokenizer(meta, Path(tokenizer_dir), name, arch.vocab_size)
        params = _read_params(plan, arch, storage_dtype)
        provenance = {"method": "import", "format": "gguf", "source": str(path.absolute()),
                      "source_sha256": _sha256(path), "gguf_name": meta.get("general.name"),
                      "gguf_types": dict(collections.Counter(t.tensor_type.name for t, _ in plan)),
                      "hf_config": _token_ids(meta),
                      "tokenizer": str(out_dir.absolute() / TOKENIZER_DIR) if tok else None}
        if tok is not None:
            provenance["tokenizer_hash"] = tok.hash
        return save_model_dir(out_dir, arch, params, provenance=provenance, overwrite=overwrite,
                              tokenizer_dir=tokenizer_dir if tok else None)


def open_gguf(path: Path) -> gguf.GGUFReader:
    """The file's reader (memory-mapped: tensors are read only when dequantized)."""
    if not path.is_file():
        raise MaxpruneError(f"GGUF file {path} {'is a directory' if path.exists() else 'does not exist'}")
    with path.open("rb") as f:
        magic = f.read(4)
    if magic != MAGIC:
        raise MaxpruneError(f"{path} is not a GGUF file (starts with {magic!r}, not {MAGIC!r})")
    try:
        return gguf.GGUFReader(path)
    except (ValueError, IndexError, OverflowError, KeyError, UnicodeDecodeError) as e:
        raise MaxpruneError(f"cannot read GGUF file {path}: {_one_line(e)} (a truncated or corrupt "
                            f"file?)") from None


def read_metadata(reader: gguf.GGUFReader, path: Path) -> dict[str, Any]:
    """Every metadata key -> its value (arrays as lists), without the GGUF.* header fields."""
    meta = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        try:
            meta[key] = field.contents()
        except (UnicodeDecodeError, ValueError, IndexError) as e:
            raise MaxpruneError(f"{path}: cannot read metadata key {key!r}: {_one_line(e)}") from None
    return meta


def arch_from_gguf(meta: dict[str, Any], reader: gguf.GGUFReader) -> tuple[Arch, tuple[bool, bool]]:
    """The `Arch` a GGUF file's metadata and tensors describe, and its (attention, mlp) bias flags."""
    architecture = meta.get("general.architecture")
    if architecture not in SUPPORTED_ARCHITECTURES:
        raise MaxpruneError(f"GGUF general.architecture={architecture!r} is not supported; "
                            f"supported: {list(SUPPORTED_ARCHITECTURES)}")
    key = lambda name, default=None: meta.get(f"llama.{name}", default)
    missing = [f"llama.{k}" for k in REQUIRED_KEYS if key(k) is None]
    if missing:
        raise MaxpruneError(f"GGUF file is missing metadata {missing}")
    if key("expert_count", 0):
        raise MaxpruneError(f"GGUF llama.expert_count={key('expert_count')}: mixture-of-experts models "
                            f"are not supported")
    tensors = {t.name: t for t in reader.tensors}
    if "token_embd.weight" not in tensors:
        raise MaxpruneError("GGUF file has no token_embd.weight tensor")
    heads, hidden = _per_model(key("attention.head_count"), "attention.head_count"), key("embedding_length")
    kv_heads = _per_model(key("attention.head_count_kv", heads), "attention.head_count_kv")
    head_dim = key("attention.key_length") or key("rope.dimension_count") or hidden // max(heads, 1)
    _check_head_dims(key, head_dim)
    theta = float(key("rope.freq_base", 10000.0))
    rope_freqs = tensors.get(ROPE_FREQS)
    rope_freqs = None if rope_freqs is None else _dequantize(rope_freqs)
    attention_bias = any(re.fullmatch(r"blk\.\d+\.attn_\w+\.bias", n) for n in tensors)
    mlp_bias = any(re.fullmatch(r"blk\.\d+\.ffn_\w+\.bias", n) for n in tensors)
    arch = Arch(
        vocab_size=int(tensors["token_embd.weight"].shape[-1]),  # ggml shapes are [in, out]: [D, V]
        hidden_size=hidden, num_layers=key("block_count"), num_heads=heads, num_kv_heads=kv_heads,
        head_dim=head_dim, ffn_size=_per_model(key("feed_forward_length"), "feed_forward_length"),
        rope_theta=theta, rope_scaling=_rope_scaling(key, rope_freqs, head_dim, theta),
        norm_eps=float(key("attention.layer_norm_rms_epsilon")),
        tie_embeddings="output.weight" not in tensors, out_bias=attention_bias or mlp_bias,
        max_position_embeddings=key("context_length", 2048))
    return arch, (attention_bias, mlp_bias)


def _per_model(value, name: str) -> int:
    """A count llama.cpp may store per layer: one value for every layer is all maxprune supports."""
    if isinstance(value, list):
        if len(set(value)) != 1:
            raise MaxpruneError(f"GGUF llama.{name} differs between layers ({sorted(set(value))}); "
                                f"only uniform layers are supported")
        return value[0]
    return value


def _check_head_dims(key, head_dim: int) -> None:
    value_dim = key("attention.value_length", head_dim)
    if value_dim != head_dim:
        raise MaxpruneError(f"GGUF llama.attention.value_length={value_dim} differs from key_length="
                            f"{head_dim}; only equal query/key/value head dims are supported")
    rope_dims = key("rope.dimension_count", head_dim)
    if rope_dims != head_dim:
        raise MaxpruneError(f"GGUF llama.rope.dimension_count={rope_dims} is not the head dim {head_dim}; "
                            f"partial rotary embeddings are not supported")


def _rope_scaling(key, rope_freqs: np.ndarray | None, head_dim: int, theta: float) -> RopeScaling | None:
    kind, factor = key("rope.scaling.type", "none"), key("rope.scaling.factor", 1.0)
    if kind not in ("none", "linear") or (kind == "linear" and factor != 1.0):
        raise MaxpruneError(f"GGUF llama.rope.scaling.type={kind!r} (factor {factor}) is not supported; "
                            f"only Llama-3.1 scaling (a rope_freqs.weight tensor) is")
    if rope_freqs is None:
        return None
    return llama3_scaling(rope_freqs, head_dim, theta, key("rope.scaling.original_context_length"))


def llama3_scaling(factors: np.ndarray, head_dim: int, theta: float,
                   original: int | None = None) -> RopeScaling | None:
    """A `RopeScaling` whose frequency divisors are `factors` (llama.cpp's ``rope_freqs.weight``).

    The divisors depend on the scaling only through ``factor`` and the two
    wavelength bounds ``original / low_freq_factor``, ``original /
    high_freq_factor``: Llama-3.1's constants are tried first, then the bounds
    are fitted to the smoothly scaled frequencies between them.
    """
    factors = np.asarray(factors, np.float64).reshape(-1)
    if factors.shape != (head_dim // 2,):
        raise MaxpruneError(f"GGUF {ROPE_FREQS} has {factors.size} values; head_dim={head_dim} needs "
                            f"{head_dim // 2}")
    if np.allclose(factors, 1.0, rtol=0, atol=1e-6):
        return None
    factor, original = float(factors.max()), int(original or LLAMA31_ORIGINAL)
    candidates = [RopeScaling(factor, LLAMA31_LOW, LLAMA31_HIGH, original),
                  _fit_llama3(factors, factor, head_dim, theta, original)]
    for scaling in candidates:
        if scaling is not None and np.allclose(_divisors(head_dim, theta, scaling), factors,
                                               rtol=1e-5, atol=0):
            return scaling
    raise MaxpruneError(f"GGUF {ROPE_FREQS} (divisors {factors.min():.4g}..{factor:.4g}) matches no "
                        f"Llama-3.1 RoPE scaling; other frequency scalings are not supported")


def _fit_llama3(factors, factor, head_dim, theta, original) -> RopeScaling | None:
    # Between the bounds, 1/divisor = (1 - s)/factor + s with s linear in 1/wavelength.
    inv_wavelen = np.asarray(rope_inv_freq(head_dim, theta, None), np.float64) / (2 * math.pi)
    medium = (factors > 1 + 1e-6) & (factors < factor * (1 - 1e-6))
    if medium.sum() < 2 or factor <= 1:
        return None
    smooth = (1 / factors[medium] - 1 / factor) / (1 - 1 / factor)
    slope, intercept = np.polyfit(inv_wavelen[medium], smooth, 1)
    if slope <= 0:
        return None
    low, high = original * -intercept / slope, original * (1 - intercept) / slope
    return RopeScaling(factor, float(low), float(high), original) if 0 < low < high else None


def _divisors(head_dim: int, theta: float, scaling: RopeScaling) -> np.ndarray:
    """What our RoPE divides each frequency by under `scaling`."""
    base = np.asarray(rope_inv_freq(head_dim, theta, None), np.float64)
    return base / np.asarray(rope_inv_freq(head_dim, theta, scaling), np.float64)


# ==================================================================== tensors
def _plan_tensors(reader: gguf.GGUFReader, arch: Arch, biases: tuple[bool, bool],
                  path: Path) -> list[tuple[Any, hf._TensorSpec]]:
    """Each GGUF tensor with the HF tensor spec it fills; names, shapes and types checked first."""
    expected = {spec.name: spec for spec in hf._hf_tensor_specs(arch, *biases)}
    plan, seen, dequantizable = [], set(), {}
    for tensor in reader.tensors:
        if tensor.name == ROPE_FREQS:
            continue
        spec = expected.get(hf_name(tensor.name))
        if spec is None:
            raise MaxpruneError(f"unexpected tensor {tensor.name!r} in {path.name} for a "
                                f"{arch.num_layers}-layer Llama")
        shape = tuple(int(n) for n in reversed(tensor.shape))  # ggml lists dims innermost first
        if shape != spec.shape:
            raise MaxpruneError(f"tensor {tensor.name!r} has shape {shape} but the metadata implies "
                                f"{spec.shape}")
        if tensor.tensor_type not in dequantizable:
            dequantizable[tensor.tensor_type] = _can_dequantize(tensor)
        if not dequantizable[tensor.tensor_type]:
            raise MaxpruneError(f"tensor {tensor.name!r} has ggml type {tensor.tensor_type.name}, which the "
                                f"gguf library cannot dequantize")
        plan.append((tensor, spec))
        seen.add(spec.name)
    # Absent biases are zero; a tied model has no output.weight.
    missing = sorted(n for n, s in expected.items() if n not in seen and not s.optional
                     and not n.endswith(".bias"))
    if missing:
        shown = missing[:5] + (["..."] if len(missing) > 5 else [])
        raise MaxpruneError(f"{path.name} is missing {len(missing)} tensor(s) (HF names): {', '.join(shown)}")
    return plan


def hf_name(gguf_name: str) -> str | None:
    """The HF Llama name of a GGUF tensor (``blk.3.attn_q.weight`` -> ``model.layers.3.self_attn.q_proj.weight``)."""
    if gguf_name in GLOBAL_NAMES:
        return GLOBAL_NAMES[gguf_name]
    match = LAYER_TENSOR.fullmatch(gguf_name)
    if match is None or match[2] not in LAYER_NAMES:
        return None
    return f"model.layers.{int(match[1])}.{LAYER_NAMES[match[2]]}.{match[3]}"


def _can_dequantize(tensor) -> bool:
    qtype = tensor.tensor_type
    if qtype not in gguf.GGML_QUANT_SIZES:
        return False
    try:  # one block of zeros
        gguf.quants.dequantize(np.zeros(gguf.GGML_QUANT_SIZES[qtype][1], np.uint8), qtype)
    except NotImplementedError:
        return False
    return True


def _read_params(plan, arch: Arch, storage_dtype: str) -> hf.Params:
    shapes = hf._param_shapes(arch)
    params = hf._nested({p: np.zeros(shape, storage_dtype) for p, shape in shapes.items()})
    for tensor, spec in plan:
        value = _dequantize(tensor).reshape(spec.shape)
        if ".self_attn.q_proj." in spec.name:
            value = unpermute_qk(value, arch.num_heads)
        elif ".self_attn.k_proj." in spec.name:
            value = unpermute_qk(value, arch.num_kv_heads)
        spec.load(params, value)
    return params


def _dequantize(tensor) -> np.ndarray:
    try:
        return gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    except (ValueError, IndexError, NotImplementedError) as e:
        raise MaxpruneError(f"cannot dequantize tensor {tensor.name!r} ({tensor.tensor_type.name}): "
                            f"{_one_line(e)}") from None


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row permutation: per head, rows (pairs, 2) back to HF's (2, half)."""
    half = w.shape[0] // n_head // 2
    return w.reshape(n_head, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's ``LlamaModel.permute``: HF rotate-half rows -> interleaved pairs (inverse of `unpermute_qk`)."""
    half = w.shape[0] // n_head // 2
    return w.reshape(n_head, 2, half, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# ================================================================== tokenizer
def write_tokenizer(meta: dict[str, Any], out: Path, name: str, vocab_size: int) -> Tokenizer:
    """Write tokenizer.json + tokenizer_config.json for the file's vocabulary into `out`."""
    kind = meta.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise MaxpruneError(f"GGUF tokenizer.ggml.model={kind!r}: only 'gpt2' (byte-level BPE) vocabularies "
                            f"can be rebuilt as a tokenizer.json; pass --skip-tokenizer to convert the "
                            f"weights without a tokenizer")
    tokens, merges = meta.get("tokenizer.ggml.tokens"), meta.get("tokenizer.ggml.merges")
    if not tokens or merges is None:
        raise MaxpruneError("GGUF byte-level vocabulary lacks tokenizer.ggml.tokens or tokenizer.ggml.merges")
    if len(tokens) > vocab_size:
        raise MaxpruneError(f"GGUF vocabulary has {len(tokens)} tokens but token_embd.weight only "
                            f"{vocab_size} rows")
    specials = {role: tokens[i] for role, i in _special_ids(meta).items() if 0 <= i < len(tokens)}
    add_bos, add_eos = bool(meta.get("tokenizer.ggml.add_bos_token")), bool(meta.get("tokenizer.ggml.add_eos_token"))
    tok = byte_level_bpe(tokens, merges, meta.get("tokenizer.ggml.token_type") or [],
                         meta.get("tokenizer.ggml.pre"), specials)
    tok.post_processor = _template(tok, specials, add_bos, add_eos)
    out.mkdir(parents=True, exist_ok=True)
    (out / TOKENIZER_FILE).write_text(tok.to_str())
    config = {"name": name, "tokenizer_class": "PreTrainedTokenizerFast",
              **{f"{role}_token": token for role, token in specials.items()},
              "add_bos_token": add_bos, "add_eos_token": add_eos}
    if meta.get("tokenizer.chat_template"):
        config["chat_template"] = meta["tokenizer.chat_template"]
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    return Tokenizer.load(out)


def byte_level_bpe(tokens: list[str], merges: list[str], token_types: list[int], pre: str | None,
                   specials: dict[str, str]) -> tokenizers.Tokenizer:
    """GPT-2 style BPE over the file's vocabulary, as transformers' GGUF loader builds it.

    Tokens outside the byte alphabet are respelled in it; CONTROL tokens (in
    the alphabet) and the named special tokens become special added tokens,
    USER_DEFINED ones plain added tokens, which are always matched whole.
    """
    spelling = bytes_to_unicode()
    alphabet = set(spelling.values())
    respell = lambda t: t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode("utf-8"))
    vocab = {respell(token): i for i, token in enumerate(tokens)}
    pairs = [tuple(merge.split(" ")) for merge in merges]
    tok = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=pairs, dropout=None, continuing_subword_prefix="",
                                          end_of_word_suffix="", fuse_unk=False))
    split = PRE_TOKENIZER_SPLITS.get(pre)
    tok.pre_tokenizer = (pre_tokenizers.ByteLevel(add_prefix_space=False) if split is None else
                         pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(split), behavior="isolated"),
                                                  pre_tokenizers.ByteLevel(add_prefix_space=False,
                                                                           use_regex=False)]))
    tok.decoder = decoders.ByteLevel()
    types = list(token_types) + [0] * (len(tokens) - len(token_types))
    special = [t for t, kind in zip(tokens, types) if kind == CONTROL and set(t) <= alphabet]
    special += [t for t in specials.values() if t not in special and t in vocab]
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in special])
    user = [t for t, kind in zip(tokens, types) if kind == USER_DEFINED and t in vocab]
    tok.add_tokens([AddedToken(t, normalized=False, special=False) for t in user])
    return tok


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table: the alphabet byte-level BPE vocabularies are spelled in."""
    printable = {*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)}
    table, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            table[byte] = chr(byte)
        else:
            table[byte] = chr(256 + extra)
            extra += 1
    return table


def _template(tok: tokenizers.Tokenizer, specials: dict[str, str], add_bos: bool,
              add_eos: bool) -> processors.TemplateProcessing:
    """Adds BOS/EOS as the file asks (llama.cpp's add_bos_token / add_eos_token)."""
    known = lambda role: role in specials and tok.token_to_id(specials[role]) is not None
    bos = [specials["bos"]] if add_bos and known("bos") else []
    eos = [specials["eos"]] if add_eos and known("eos") else []
    single = [*bos, "$A", *eos]
    pair = [*single, *(f"{t}:1" for t in bos), "$B:1", *(f"{t}:1" for t in eos)]
    ids = [(t, tok.token_to_id(t)) for t in dict.fromkeys(bos + eos)]
    return processors.TemplateProcessing(single=single, pair=pair, special_tokens=ids)


def _special_ids(meta: dict[str, Any]) -> dict[str, int]:
    roles = {"bos": "bos_token_id", "eos": "eos_token_id", "unk": "unknown_token_id", "pad": "padding_token_id"}
    return {role: int(meta[f"tokenizer.ggml.{key}"]) for role, key in roles.items()
            if meta.get(f"tokenizer.ggml.{key}") is not None}


def _token_ids(meta: dict[str, Any]) -> dict[str, int]:
    """The file's token ids as config.json names them, so `to_hf` writes them back."""
    ids = _special_ids(meta)
    return {f"{role}_token_id": ids[role] for role in ("bos", "eos", "pad") if role in ids}


# ==================================================================== helpers
def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(16 * 2**20):
            digest.update(chunk)
    return digest.hexdigest()


def _one_line(e: Exception) -> str:
    return " ".join(str(e).split()) or type(e).__name__
