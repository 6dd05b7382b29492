"""What a run dir records about its run: the fingerprint a resume must match,
the status in run.json, and the model dir written at the end."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import jax
import numpy as np
from jax.experimental import multihost_utils

from maxprune.errors import MaxpruneError
from maxprune.fs import atomic
from maxprune.model import masks as masks_lib
from maxprune.model.arch import Arch
from maxprune.model.model_dir import save_model_dir
from maxprune.train.setup import Setup, arch_diff
from maxprune.train.step import TrainState

MODEL_SUBDIR = "model"
# Fingerprint fields that must not change when a run resumes.
FINGERPRINT_KEYS = ("arch", "masks_hash", "init", "steps", "global_batch", "seq_len", "lr", "schedule_steps",
                    "data_ranges", "seed", "microbatches")


# ------------------------------------------------------------- fingerprint
def fingerprint(cfg, s: Setup, lr: float, schedule_steps: int | None = None) -> dict:
    """`schedule_steps`: the steps the LR schedule spans (default: the run's; a compressed sweep trial's are fewer)."""
    return {"arch": s.arch.to_dict(), "masks_hash": masks_hash(s.masks), "init": cfg.train.init,
            "steps": s.steps, "global_batch": cfg.train.global_batch, "seq_len": s.seq_len, "lr": lr,
            "schedule_steps": s.steps if schedule_steps is None else schedule_steps,
            "data_ranges": [list(r) for r in s.plan.ranges], "seed": cfg.seed,
            "microbatches": cfg.train.microbatches}


def check_resume(saved: dict, current: dict, run_dir: Path) -> None:
    saved = {"schedule_steps": saved.get("steps"), **saved}  # checkpoints older than the key: the run's own schedule
    for key in FINGERPRINT_KEYS:
        if saved.get(key) != current.get(key):
            if key == "arch":
                what = arch_diff(Arch.from_dict(saved["arch"]), Arch.from_dict(current["arch"]))
            else:
                what = f"{saved.get(key)!r} vs now {current.get(key)!r}"
            raise MaxpruneError(f"run dir {run_dir} holds checkpoints of a different run ({key}: {what}); "
                                f"use a new run dir or delete its checkpoints")


def masks_hash(masks) -> str | None:
    if not masks:
        return None
    digest = hashlib.sha256()
    for block, name, mask in masks_lib.iter_masks(masks):
        digest.update(f"{block}/{name}".encode())
        digest.update(np.packbits(_fetch(mask)).tobytes())
    return digest.hexdigest()[:16]


def _fetch(x) -> np.ndarray:
    """The whole array on this host, also when its shards live on other hosts' devices."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))


# ------------------------------------------------------------------ status
def write_status(run_dir: Path, record: dict) -> None:
    if jax.process_index() == 0:
        atomic.write_json(run_dir / "run.json", record, sort_keys=True)


def read_status(run_dir: str | Path) -> dict:
    path = Path(run_dir) / "run.json"
    return json.loads(path.read_text()) if path.exists() else {}


# ------------------------------------------------------------------- model
def save_model(cfg, s: Setup, state: TrainState, run_dir: Path, tokens_seen: int, lr: float) -> Path:
    tok = s.dataset.manifest.tokenizer
    provenance = {**s.parent, "method": "train", "tokens_seen": tokens_seen, "lr": lr,
                  "steps": int(state.step), "data": str(s.dataset.path),
                  "data_ranges": [list(r) for r in s.plan.ranges],
                  "tokenizer_hash": tok["hash"], "masks_hash": masks_hash(s.masks), "config": cfg.to_dict()}
    tokenizer_dir = _tokenizer_dir(cfg, s)
    return save_model_dir(run_dir / MODEL_SUBDIR, s.arch, state.params, s.masks, provenance,
                          overwrite=True, tokenizer_dir=tokenizer_dir)


def _tokenizer_dir(cfg, s: Setup):
    """Tokenizer files to ship with the model: the parent's, else the dataset's if it kept them."""
    if cfg.train.init:
        tok = Path(cfg.train.init) / "tokenizer"
        if tok.is_dir():
            return tok
    tok = Path(s.dataset.path) / "tokenizer"
    return tok if tok.is_dir() else None
