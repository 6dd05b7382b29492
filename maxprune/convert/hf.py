"""Hugging Face Llama checkpoints (config.json + safetensors) <-> maxprune model dirs.

HF stores a linear layer's weight ``[out, in]`` per layer
(``model.layers.{i}.self_attn.q_proj.weight``); maxprune stores kernels
``[in, out]`` stacked over layers (``layers/attn/q/kernel [L, in, out]``, see
`maxprune.model.llama`). Conversion streams tensor by tensor: import fills
pre-allocated layer-stacked arrays, export writes one shard at a time, so
neither holds two copies of the model.

Biases: maxprune has o_proj/down_proj biases only (``Arch.out_bias``, which
FLAP needs). An HF model with ``attention_bias`` or ``mlp_bias`` imports with
``out_bias=True`` even when those biases are zero, so a FLAP export comes back
with the same tensors. Its q/k/v/gate/up biases must be zero: they are dropped,
and written back as zeros on export, which sets both flags iff ``out_bias``.

Both directions build the output in a hidden sibling directory and rename it
into place at the end (`maxprune.model.model_dir`): a failure never leaves a
complete-looking output.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import json
import math
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

import jax
import ml_dtypes  # noqa: F401  registers numpy's "bfloat16", which safetensors' numpy backend needs
import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from maxprune.errors import MaxpruneError
from maxprune.fs.staged import check_output_dir, commit_dir, staging_dir
from maxprune.model import llama
from maxprune.model.arch import Arch, RopeScaling
from maxprune.model.model_dir import TOKENIZER_DIR, load_model_dir, save_model_dir

STORAGE_DTYPES = ("float32", "bfloat16")
EXPORT_DTYPES = ("float32", "bfloat16", "float16")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json",
                   "special_tokens_map.json", "added_tokens.json", "generation_config.json")
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
LLAMA3_ROPE_KEYS = ("factor", "low_freq_factor", "high_freq_factor",
                    "original_max_position_embeddings")
# Token ids carried from an imported config.json back into an exported one.
TOKEN_ID_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id")

# HF tensor name -> (param path, transpose). Layer names are relative to ``model.layers.{i}.``.
GLOBAL_TENSORS = {
    "model.embed_tokens.weight": (("embed", "embedding"), False),
    "model.norm.weight": (("final_norm", "scale"), False),
    "lm_head.weight": (("lm_head", "kernel"), True),
}
LAYER_TENSORS = {
    "input_layernorm.weight": (("layers", "attn_norm", "scale"), False),
    "self_attn.q_proj.weight": (("layers", "attn", "q", "kernel"), True),
    "self_attn.k_proj.weight": (("layers", "attn", "k", "kernel"), True),
    "self_attn.v_proj.weight": (("layers", "attn", "v", "kernel"), True),
    "self_attn.o_proj.weight": (("layers", "attn", "o", "kernel"), True),
    "self_attn.o_proj.bias": (("layers", "attn", "o", "bias"), False),
    "post_attention_layernorm.weight": (("layers", "mlp_norm", "scale"), False),
    "mlp.gate_proj.weight": (("layers", "mlp", "gate", "kernel"), True),
    "mlp.up_proj.weight": (("layers", "mlp", "up", "kernel"), True),
    "mlp.down_proj.weight": (("layers", "mlp", "down", "kernel"), True),
    "mlp.down_proj.bias": (("layers", "mlp", "down", "bias"), False),
}
# Biases maxprune has no parameter for: present in HF iff attention_bias / mlp_bias; must be zero.
ZERO_BIASES = {"self_attn.q_proj.bias": "q_dim", "self_attn.k_proj.bias": "kv_dim",
               "self_attn.v_proj.bias": "kv_dim", "mlp.gate_proj.bias": "ffn_size",
               "mlp.up_proj.bias": "ffn_size"}

Params = dict[str, Any]


# ===================================================================== import
def from_hf(hf_dir: str | Path, out_dir: str | Path, dtype: str | None = None,
            overwrite: bool = False) -> Path:
    """Import an HF ``LlamaForCausalLM`` directory as a model dir at `out_dir`.

    `dtype` is the storage dtype of the params: None means float32 (maxprune
    keeps fp32 master params), or "bfloat16".
    """
    hf_dir, out_dir = Path(hf_dir), Path(out_dir)
    storage_dtype = _check_dtype(dtype or "float32", STORAGE_DTYPES)
    check_output_dir(out_dir, overwrite)
    config = read_hf_config(hf_dir)
    arch = arch_from_hf_config(config)
    biases = bool(config.get("attention_bias")), bool(config.get("mlp_bias"))
    params, hf_dtype = read_params(safetensors_files(hf_dir), arch, storage_dtype, *biases)
    with tempfile.TemporaryDirectory() as tokenizer_dir:
        has_tokenizer = _copy_tokenizer(hf_dir, Path(tokenizer_dir))
        provenance = {"method": "import", "source": str(hf_dir.absolute()), "hf_config": config,
                      "hf_dtype": hf_dtype,
                      "tokenizer": str(out_dir.absolute() / TOKENIZER_DIR) if has_tokenizer else None}
        return save_model_dir(out_dir, arch, params, provenance=provenance, overwrite=overwrite,
                              tokenizer_dir=tokenizer_dir if has_tokenizer else None)


def read_hf_config(hf_dir: Path) -> dict[str, Any]:
    if not hf_dir.is_dir():
        problem = "is a file, not a directory" if hf_dir.exists() else "does not exist"
        raise MaxpruneError(f"HF model dir {hf_dir} {problem}")
    path = hf_dir / "config.json"
    if not path.is_file():
        raise MaxpruneError(f"{hf_dir} has no config.json; is it a Hugging Face model dir?")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise MaxpruneError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(config, dict):
        raise MaxpruneError(f"{path} holds a JSON {type(config).__name__}, not an object of config keys")
    return config


def arch_from_hf_config(cfg: dict[str, Any]) -> Arch:
    """The `Arch` of an HF Llama config.json (transformers 4 or 5 style); HF's defaults apply."""
    if cfg.get("model_type") != "llama":
        raise MaxpruneError(f"config.json has model_type={cfg.get('model_type')!r}; "
                            f"only 'llama' (LlamaForCausalLM) is supported")
    required = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads")
    missing = [k for k in required if k not in cfg]
    if missing:
        raise MaxpruneError(f"config.json is missing {missing}")
    if cfg.get("hidden_act", "silu") != "silu":
        raise MaxpruneError(f"config.json has hidden_act={cfg['hidden_act']!r}; "
                            f"only 'silu' is supported")
    heads, hidden = cfg["num_attention_heads"], cfg["hidden_size"]
    if not cfg.get("head_dim") and not (isinstance(heads, int) and heads > 0 and isinstance(hidden, int)
                                        and hidden % heads == 0):
        raise MaxpruneError(f"config.json has num_attention_heads={heads!r}, which does not divide "
                            f"hidden_size={hidden!r}, and no head_dim")
    rope_theta, rope_scaling = _rope_from_hf_config(cfg)
    return Arch(
        vocab_size=cfg["vocab_size"],
        hidden_size=cfg["hidden_size"],
        num_layers=cfg["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=cfg.get("num_key_value_heads") or heads,
        head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
        ffn_size=cfg["intermediate_size"],
        rope_theta=float(rope_theta),
        rope_scaling=rope_scaling,
        norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        out_bias=bool(cfg.get("attention_bias") or cfg.get("mlp_bias")),
        max_position_embeddings=cfg.get("max_position_embeddings", 2048),
    )


def _rope_from_hf_config(cfg: dict[str, Any]) -> tuple[float, RopeScaling | None]:
    # transformers 5 writes `rope_parameters` (theta inside); Meta / transformers 4
    # write a top-level `rope_theta` and a `rope_scaling` dict (or null).
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    theta = rope.get("rope_theta", cfg.get("rope_theta", 10000.0))
    rope_type = rope.get("rope_type", rope.get("type")) or "default"
    if rope_type == "default":
        return theta, None
    if rope_type != "llama3":
        raise MaxpruneError(f"config.json has rope_type={rope_type!r}; only 'default' and "
                            f"'llama3' (Llama-3.1) RoPE are supported")
    missing = [k for k in LLAMA3_ROPE_KEYS if k not in rope]
    if missing:
        raise MaxpruneError(f"config.json llama3 rope scaling is missing {missing}")
    original_max = int(rope["original_max_position_embeddings"])
    return theta, RopeScaling(factor=float(rope["factor"]),
                              low_freq_factor=float(rope["low_freq_factor"]),
                              high_freq_factor=float(rope["high_freq_factor"]),
                              original_max_position_embeddings=original_max)


def safetensors_files(hf_dir: Path) -> list[Path]:
    """The checkpoint's safetensors files: one ``model.safetensors`` or those of the index."""
    if (hf_dir / SINGLE_FILE).is_file():
        return [hf_dir / SINGLE_FILE]
    if (hf_dir / INDEX_FILE).is_file():
        weight_map = json.loads((hf_dir / INDEX_FILE).read_text())["weight_map"]
        files = [hf_dir / name for name in sorted(set(weight_map.values()))]
        absent = [f.name for f in files if not f.is_file()]
        if absent:
            raise MaxpruneError(f"{INDEX_FILE} in {hf_dir} names missing shard(s) {absent}")
        return files
    pickles = sorted(f.name for pattern in ("*.bin", "*.pt", "*.pth") for f in hf_dir.glob(pattern))
    if pickles:  # torch.load unpickles, which can run arbitrary code: never loaded here
        raise MaxpruneError(f"{hf_dir} holds only PyTorch pickle weights ({', '.join(pickles[:3])}), which maxprune "
                            f"does not load; re-save the model as safetensors (save_pretrained(dir, "
                            f"safe_serialization=True)) and convert that")
    raise MaxpruneError(f"{hf_dir} has no {SINGLE_FILE} or {INDEX_FILE} "
                        f"(only safetensors checkpoints are supported)")


def read_params(files: list[Path], arch: Arch, storage_dtype: str, attention_bias: bool = False,
                mlp_bias: bool = False) -> tuple[Params, str]:
    """Fill layer-stacked params from the safetensors `files`; also return the source dtype name.

    Biases HF does not have (e.g. down_proj's without ``mlp_bias``) stay zero.
    """
    shapes = _param_shapes(arch)
    params = _nested({path: np.zeros(shape, storage_dtype) for path, shape in shapes.items()})
    expected = {spec.name: spec for spec in _hf_tensor_specs(arch, attention_bias, mlp_bias)}
    seen, bytes_by_dtype = set(), collections.Counter()
    for file in files:
        try:
            _read_file(file, expected, params, seen, bytes_by_dtype)
        except (SafetensorError, OSError) as e:
            raise MaxpruneError(f"cannot read {file}: {' '.join(str(e).split())} (a corrupt or truncated "
                                f"safetensors file?)") from None
    # A tied model may also store lm_head.weight; like transformers, the embedding wins.
    missing = sorted(n for n, s in expected.items() if n not in seen and not s.optional)
    if missing:
        shown = missing[:5] + (["..."] if len(missing) > 5 else [])
        raise MaxpruneError(f"checkpoint is missing {len(missing)} tensor(s): {', '.join(shown)}")
    return params, bytes_by_dtype.most_common(1)[0][0]


def _read_file(file: Path, expected: dict, params: Params, seen: set, bytes_by_dtype: collections.Counter) -> None:
    with safe_open(file, framework="numpy") as f:
        for name in f.keys():
            if name.endswith("rotary_emb.inv_freq"):
                continue
            if name not in expected:
                raise MaxpruneError(f"unexpected tensor {name!r} in {file.name} "
                                    f"for this config.json")
            spec, shape = expected[name], tuple(f.get_slice(name).get_shape())
            if shape != spec.shape:
                raise MaxpruneError(f"tensor {name!r} has shape {shape} "
                                    f"but config.json implies {spec.shape}")
            tensor = f.get_tensor(name)
            spec.load(params, tensor)
            seen.add(name)
            bytes_by_dtype[tensor.dtype.name] += tensor.nbytes


@dataclasses.dataclass
class _TensorSpec:
    """One HF tensor: its expected shape and where it lives in the params.

    `path` None: a bias maxprune has no parameter for (must be zero).
    `optional`: the redundant ``lm_head.weight`` of a tied model (ignored).
    """

    name: str
    shape: tuple[int, ...]
    path: tuple[str, ...] | None = None
    layer: int | None = None
    transpose: bool = False
    optional: bool = False

    def load(self, params: Params, tensor: np.ndarray) -> None:
        if self.path is None:
            if np.any(tensor.astype(np.float32) != 0):
                raise MaxpruneError(f"unsupported non-zero bias {self.name!r}; only o_proj and "
                                    f"down_proj biases are supported")
            return
        if self.optional:
            return
        target = _get(params, self.path)
        value = tensor.T if self.transpose else tensor
        if self.layer is None:
            target[...] = value
        else:
            target[self.layer] = value


def _hf_tensor_specs(arch: Arch, attention_bias: bool | None = None,
                     mlp_bias: bool | None = None) -> Iterator[_TensorSpec]:
    """Every tensor an HF checkpoint of `arch` holds, in HF's order.

    The bias flags are config.json's; both default to ``arch.out_bias``.
    """
    shapes = _param_shapes(arch)
    with_bias = {"self_attn": arch.out_bias if attention_bias is None else attention_bias,
                 "mlp": arch.out_bias if mlp_bias is None else mlp_bias}
    has = lambda name: not name.endswith(".bias") or with_bias[name.split(".")[0]]
    hf_shape = lambda shape, transpose: tuple(shape[::-1]) if transpose else tuple(shape)
    for name, (path, transpose) in GLOBAL_TENSORS.items():
        if path[0] == "lm_head" and arch.tie_embeddings:
            yield _TensorSpec(name, (arch.vocab_size, arch.hidden_size), path, optional=True)
        else:
            yield _TensorSpec(name, hf_shape(shapes[path], transpose), path, None, transpose)
    for i in range(arch.num_layers):
        prefix = f"model.layers.{i}."
        for name, (path, transpose) in LAYER_TENSORS.items():
            if has(name):
                shape = hf_shape(shapes[path][1:], transpose)
                yield _TensorSpec(prefix + name, shape, path, i, transpose)
        for name, dim in ZERO_BIASES.items():
            if has(name):
                yield _TensorSpec(prefix + name, (getattr(arch, dim),))


def _copy_tokenizer(src: Path, dst: Path) -> bool:
    found = [src / n for n in TOKENIZER_FILES if (src / n).is_file()]
    if found:
        dst.mkdir(parents=True, exist_ok=True)
        for f in found:
            shutil.copy2(f, dst / f.name)
    return bool(found)


# ===================================================================== export
def to_hf(model_dir: str | Path, out_dir: str | Path, dtype: str | None = None,
          overwrite: bool = False, max_shard_bytes: int = 5 * 2**30) -> Path:
    """Export a model dir as an HF ``LlamaForCausalLM`` directory, masks baked in as zeros.

    `dtype` None means the dtype the model was imported from (provenance
    ``hf_dtype``), else float32.
    """
    out_dir = check_output_dir(out_dir, overwrite)
    md = load_model_dir(model_dir, as_numpy=True)
    arch = md.arch
    _check_transformers_loadable(arch)
    dtype = _check_dtype(dtype or md.provenance.get("hf_dtype") or "float32", EXPORT_DTYPES)
    tmp = staging_dir(out_dir)
    try:
        config = hf_config_from_arch(arch, dtype, md.provenance.get("hf_config") or {})
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        tensors = list(_export_tensors(arch, md.params, md.masks or {}, dtype))
        _write_shards(tmp, tensors, dtype, max_shard_bytes)
        if md.tokenizer_dir is not None:
            for f in md.tokenizer_dir.iterdir():
                shutil.copy2(f, tmp / f.name)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    commit_dir(tmp, out_dir)
    return out_dir


def _check_transformers_loadable(arch: Arch) -> None:
    if arch.hidden_size % arch.num_heads:
        raise MaxpruneError(
            f"cannot export to HF: hidden_size={arch.hidden_size} is not a multiple of "
            f"num_heads={arch.num_heads}, and transformers 5 refuses such a LlamaConfig even with "
            f"an explicit head_dim (exporting head-pruned models by padding heads is not supported yet)")


def hf_config_from_arch(arch: Arch, dtype: str, source: dict[str, Any]) -> dict[str, Any]:
    """A transformers-4 style config.json, which transformers 5 reads too."""
    rope_scaling = None
    if arch.rope_scaling is not None:
        rope_scaling = {"rope_type": "llama3",
                        **{k: getattr(arch.rope_scaling, k) for k in LLAMA3_ROPE_KEYS}}
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": arch.vocab_size, "hidden_size": arch.hidden_size,
        "intermediate_size": arch.ffn_size, "num_hidden_layers": arch.num_layers,
        "num_attention_heads": arch.num_heads, "num_key_value_heads": arch.num_kv_heads,
        "head_dim": arch.head_dim, "hidden_act": "silu",
        "max_position_embeddings": arch.max_position_embeddings, "rms_norm_eps": arch.norm_eps,
        "rope_theta": arch.rope_theta, "rope_scaling": rope_scaling,
        "tie_word_embeddings": arch.tie_embeddings,
        "attention_bias": arch.out_bias, "mlp_bias": arch.out_bias,
        "torch_dtype": dtype, "use_cache": True,
    }
    config.update({k: source[k] for k in TOKEN_ID_KEYS if k in source})
    return config


def _export_tensors(arch: Arch, params: Params, masks: Params,
                    dtype: str) -> Iterator[tuple[_TensorSpec, Callable[[], np.ndarray]]]:
    """Every HF tensor with a function that builds it (masked, transposed, cast) on demand."""
    for spec in _hf_tensor_specs(arch):
        if not spec.optional:
            yield spec, functools.partial(_export_tensor, params, masks, spec, dtype)


def _export_tensor(params: Params, masks: Params, spec: _TensorSpec, dtype: str) -> np.ndarray:
    if spec.path is None:
        return np.zeros(spec.shape, dtype)
    value, mask = _get(params, spec.path), _get(masks, spec.path)
    if spec.layer is not None:
        value = value[spec.layer]
        mask = None if mask is None else mask[spec.layer]
    if mask is not None:
        value = np.where(mask, value, np.zeros((), value.dtype))
    value = value.T if spec.transpose else value
    return np.ascontiguousarray(value.astype(dtype, copy=False))


def _write_shards(out: Path, tensors: list, dtype: str, max_shard_bytes: int) -> None:
    """Write ``model.safetensors``, or numbered shards + index when over `max_shard_bytes`."""
    itemsize = np.dtype(dtype).itemsize
    shards, shard_bytes = [[]], 0
    for spec, make in tensors:
        nbytes = math.prod(spec.shape) * itemsize
        if shards[-1] and shard_bytes + nbytes > max_shard_bytes:
            shards.append([])
            shard_bytes = 0
        shards[-1].append((spec.name, make))
        shard_bytes += nbytes
    names = ([SINGLE_FILE] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    weight_map, total_bytes = {}, 0
    for file_name, shard in zip(names, shards):
        arrays = {name: make() for name, make in shard}  # one shard in memory at a time
        save_file(arrays, out / file_name, metadata={"format": "pt"})
        total_bytes += sum(a.nbytes for a in arrays.values())
        weight_map.update(dict.fromkeys(arrays, file_name))
    if len(shards) > 1:
        index = {"metadata": {"total_size": total_bytes}, "weight_map": weight_map}
        (out / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")


# ==================================================================== helpers
def _check_dtype(dtype: str, allowed: tuple[str, ...]) -> str:
    if dtype not in allowed:
        raise MaxpruneError(f"dtype={dtype!r} is not one of {list(allowed)}")
    return dtype


def _param_shapes(arch: Arch) -> dict[tuple[str, ...], tuple[int, ...]]:
    """``{param path: shape}`` of every param of `arch`."""
    flat = jax.tree_util.tree_flatten_with_path(llama.abstract_params(arch))[0]
    return {tuple(k.key for k in path): tuple(leaf.shape) for path, leaf in flat}


def _nested(flat: dict[tuple[str, ...], Any]) -> Params:
    tree: Params = {}
    for path, value in flat.items():
        node = tree
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    return tree


def _get(tree: Params, path: tuple[str, ...]) -> Any:
    """``tree[path[0]][path[1]]...``, or None where the path is absent."""
    for key in path:
        if not isinstance(tree, dict) or key not in tree:
            return None
        tree = tree[key]
    return tree
