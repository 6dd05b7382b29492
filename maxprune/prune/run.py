"""Parent model dir + calibration tokens → pruner → pruned model dir; shared by every method.

`prune_model_dir(cfg)` is the Python API (the study runner calls it; `maxprune
prune` is a thin wrapper). In order, so that a mistake fails before the long work:

1. refuse an existing output dir unless `overwrite`, and an output equal to the input;
2. load the parent sharded on ``cfg.mesh``; run the method module's optional
   ``check(arch, prune_cfg)`` (e.g. an N:M pattern fits the shapes);
3. build the calibration tokens from ``prune.calibration`` (`load_calibration`)
   and check their tokenizer against the parent's ``tokenizer_hash``;
4. run the pruner named by ``prune.method`` (compute dtype ``cfg.model.dtype``,
   the parent's params donated);
5. write the pruned model dir — provenance records the parent, method, pattern,
   ratio, calibration (what, how many tokens), seed and the report's summary and
   carries the parent's tokenizer_hash / hf_dtype / hf_config forward — with the
   full report as ``prune_report.json`` inside it.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
from pathlib import Path
from typing import Any

import jax
import numpy as np

from maxprune import sharding
from maxprune.data.calibration import (
    calibration_from_prepared,
    calibration_stream,
    calibration_windows,
    load_calibration_npy,
)
from maxprune.data.prepared import open_prepared
from maxprune.data.tokenizer import LLAMA3_SHA256, Tokenizer
from maxprune.errors import MaxpruneError
from maxprune.fs.staged import check_output_dir
from maxprune.model import masks as masks_lib
from maxprune.model.model_dir import ModelDir, load_model_dir, save_model_dir
from maxprune.prune import api
from maxprune.prune.engine.activations import check_calibration
from maxprune.prune.engine.options import run_options

REPORT_FILE = "prune_report.json"
DEFAULT_SEQ_LEN = 8192  # the paper's calibration window (128 x 8192 tokens of C4)
CARRIED = ("tokenizer_hash", "hf_dtype", "hf_config")  # parent provenance kept by the pruned model


@dataclasses.dataclass
class Calibration:
    """Calibration tokens and what they were (recorded in the provenance; the study counts `tokens`)."""

    tokens_NL: np.ndarray | None
    info: dict[str, Any]

    @property
    def tokens(self) -> int:
        return 0 if self.tokens_NL is None else int(self.tokens_NL.size)


def prune_model_dir(cfg, overwrite: bool = False, progress: bool = True) -> Path:
    """Prune ``cfg.prune.input`` into ``cfg.prune.output`` with ``cfg.prune.method``; returns the output path."""
    p = cfg.prune
    src, out = _paths(p)
    check_output_dir(out, overwrite)
    md = load_model_dir(src, sharding.make_mesh(cfg.mesh))
    check_method(md.arch, p)
    calibration = load_calibration(p, md)
    params = masks_lib.apply_masks(md.params, md.masks)  # a sparse parent: its zeros are real zeros
    with run_options(dtype=cfg.model.dtype, progress=progress, donate=True):
        result = api.prune(params, md.arch, calibration.tokens_NL, p)
    md.params = params = None  # donated to the pruner
    provenance = _provenance(cfg, md, calibration, result)
    report = json.dumps(_jsonable(result.report), indent=2, sort_keys=True) + "\n"
    return save_model_dir(out, result.arch, result.params, result.masks, provenance, overwrite=overwrite,
                          tokenizer_dir=md.tokenizer_dir, extra_files={REPORT_FILE: report})


def check_method(arch, p) -> None:
    """The method module's optional ``check(arch, prune_cfg)``: shape checks before calibration is built."""
    check = getattr(importlib.import_module(api.METHOD_MODULES[p.method]), "check", None)
    resolved, _ = api.resolve(p, arch)
    if check is not None:
        check(arch, resolved)
    api.target_shape(arch, resolved)  # a shape that cannot be cut fails here, not after calibration


def _paths(p) -> tuple[Path, Path]:
    if not p.input or not p.output:
        missing = "prune.input" if not p.input else "prune.output"
        raise MaxpruneError(f"{missing} is not set: give the parent model dir (prune.input) and the "
                            f"pruned model dir to write (prune.output)")
    src, out = Path(p.input).absolute(), Path(p.output).absolute()
    if src == out:
        raise MaxpruneError(f"prune.output={p.output} is the parent model dir; write the pruned model elsewhere")
    return src, out


def _provenance(cfg, md: ModelDir, calibration: Calibration, result: api.PruneResult) -> dict:
    p = cfg.prune
    record = {k: md.provenance[k] for k in CARRIED if k in md.provenance}
    record.update(parent=str(md.path), parent_method=md.provenance.get("method"),
                  parent_tokens_seen=md.provenance.get("tokens_seen"), method=p.method,
                  pattern=p.pattern if p.method in api.SPARSE_METHODS else None, ratio=p.ratio,
                  seed=p.seed, calibration=calibration.info, calibration_tokens=calibration.tokens,
                  report=_jsonable(result.report.get("summary", {})), config=cfg.to_dict())
    return record


# ---------------------------------------------------------------- calibration
def load_calibration(p, md: ModelDir) -> Calibration:
    """Calibration tokens from ``prune.calibration``: a .npy of ids, a prepared dataset dir, or a source spec.

    - ``*.npy``: int ``[n, L]`` ids (checked: dtype, shape, vocab); the first
      ``n_samples`` rows, cut to ``seq_len`` if set.
    - a prepared dataset dir (`maxprune data prepare`): ``n_samples`` random
      sequences (seeded), cut to ``seq_len`` if set; its tokenizer must be the model's.
    - any other string is a source spec: the Wanda/SparseGPT recipe of random
      ``seq_len``-token windows (default 8192) of long documents, tokenized with the
      model dir's tokenizer (its ``tokenizer/``, or Llama-3's when its provenance
      says so).
    - unset: no calibration (fine for magnitude; other methods refuse).
    """
    spec = p.calibration
    if not spec:
        return Calibration(None, {"kind": "none"})
    path = Path(spec)
    if spec.endswith(".npy"):
        tokens, info = _from_npy(p, md, path), {"kind": "npy", "path": str(path.absolute())}
    elif path.is_dir():
        tokens, info = _from_prepared(p, md, path)
    else:
        tokens, info = _from_source(p, md, spec)
    info.update(n_samples=int(tokens.shape[0]), seq_len=int(tokens.shape[1]), tokens=int(tokens.size),
                seed=p.seed)
    return Calibration(check_calibration(tokens, md.arch), info)


def _from_npy(p, md: ModelDir, path: Path) -> np.ndarray:
    tokens = load_calibration_npy(path, md.arch.vocab_size, p.seq_len)
    return _first(tokens, p.n_samples, f"calibration file {path}")


def _first(tokens: np.ndarray, n_samples: int, what: str) -> np.ndarray:
    if tokens.shape[0] < n_samples:
        raise MaxpruneError(f"{what} has {tokens.shape[0]} sequences ({tokens.size:,} tokens) but "
                            f"prune.n_samples={n_samples} needs {n_samples}; lower prune.n_samples "
                            f"or give more calibration tokens")
    return tokens[:n_samples]


def _from_prepared(p, md: ModelDir, path: Path) -> tuple[np.ndarray, dict]:
    ds = open_prepared(path)
    tok = ds.manifest.tokenizer
    if "tokenizer_hash" in md.provenance:
        ds.check_tokenizer(md.provenance["tokenizer_hash"])
    if tok["vocab_size"] > md.arch.vocab_size:
        raise MaxpruneError(f"prune.calibration={path} uses a tokenizer of {tok['vocab_size']} ids but the "
                            f"model's vocab_size is {md.arch.vocab_size}")
    if p.seq_len is not None and p.seq_len > ds.seq_len:
        raise MaxpruneError(f"prune.seq_len={p.seq_len} exceeds the {ds.seq_len}-token sequences of the "
                            f"prepared dataset {path}")
    if p.n_samples > len(ds):
        raise MaxpruneError(f"prepared dataset {path} has {len(ds)} sequences ({len(ds) * ds.seq_len:,} tokens) "
                            f"but prune.n_samples={p.n_samples} needs {p.n_samples}")
    tokens = calibration_from_prepared(ds, p.n_samples, p.seed)[:, :p.seq_len or ds.seq_len]
    return tokens, {"kind": "prepared", "path": str(path.absolute()), "tokenizer_hash": tok["hash"]}


def _from_source(p, md: ModelDir, spec: str) -> tuple[np.ndarray, dict]:
    tokenizer = model_tokenizer(md)
    if "tokenizer_hash" in md.provenance and md.provenance["tokenizer_hash"] != tokenizer.hash:
        raise MaxpruneError(f"model dir {md.path} ships tokenizer {tokenizer.hash[:8]} but its provenance "
                            f"says it was trained with {md.provenance['tokenizer_hash'][:8]}")
    seq_len = p.seq_len or DEFAULT_SEQ_LEN
    if p.calibration_sampling == "stream":
        tokens = calibration_stream(spec, tokenizer, p.n_samples, seq_len)
    else:
        tokens = calibration_windows(spec, tokenizer, p.n_samples, seq_len, p.seed)
    return tokens, {"kind": "source", "source": spec, "sampling": p.calibration_sampling,
                    "tokenizer_hash": tokenizer.hash}


def model_tokenizer(md: ModelDir):
    """The model's tokenizer: its ``tokenizer/`` dir, or Llama-3's if its provenance names that hash."""
    if md.tokenizer_dir is not None:
        return Tokenizer.load(md.tokenizer_dir)
    if md.provenance.get("tokenizer_hash") == LLAMA3_SHA256:
        return Tokenizer.llama3()
    raise MaxpruneError(f"model dir {md.path} has no tokenizer/ and no known tokenizer_hash, so a source "
                        f"spec cannot be tokenized for calibration; give prune.calibration as a prepared "
                        f"dataset dir or a .npy of token ids")


def _jsonable(value):
    """Reports may hold numpy / jax scalars; JSON wants Python ones."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (np.generic, jax.Array)):
        return np.asarray(value).tolist()
    return value
