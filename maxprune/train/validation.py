"""Validation loss: mean next-token loss on the first `train.eval_sequences` of
`data.validation`, every `train.eval_every` steps and at the end of a run."""

from __future__ import annotations

import functools
from pathlib import Path

import jax
import numpy as np

from maxprune import sharding
from maxprune.data.prepared import open_prepared
from maxprune.model import llama
from maxprune.model.arch import Arch
from maxprune.train import metrics as metrics_lib
from maxprune.train.setup import Setup


@functools.lru_cache(maxsize=8)
def make_eval_fn(arch: Arch, options: llama.ModelOptions):
    """jitted (params, masks, tokens_BL) -> sum of next-token NLL over the batch; one per (arch, options),
    so the validation every `train.eval_every` steps compiles once."""
    def eval_fn(params, masks, tokens_BL):
        logits = llama.forward(params, tokens_BL, arch, masks, options)
        return llama.next_token_loss(logits, tokens_BL) * (tokens_BL.shape[0] * (tokens_BL.shape[1] - 1))
    return jax.jit(eval_fn)


def validation_loss(cfg, s: Setup, params) -> float | None:
    """Mean next-token loss on the first `train.eval_sequences` of the validation set."""
    if not cfg.data.validation:
        return None
    ds = open_prepared(cfg.data.validation)
    ds.check_tokenizer(s.dataset.manifest.tokenizer["hash"])
    n = min(cfg.train.eval_sequences, len(ds))
    batch = cfg.train.global_batch
    eval_fn = make_eval_fn(s.arch, llama.ModelOptions.from_config(cfg.model))
    total, count = 0.0, 0
    with sharding.use_mesh(s.mesh):
        for start in range(0, n - n % batch or n, batch):
            tokens = np.stack([ds[i] for i in range(start, min(start + batch, n))])
            if tokens.shape[0] % (s.mesh.shape["data"] * s.mesh.shape["fsdp"]):
                break
            nll = eval_fn(params, s.masks, jax.device_put(tokens, sharding.batch_sharding(s.mesh)))
            total, count = total + float(nll), count + tokens.shape[0] * (tokens.shape[1] - 1)
    return total / count if count else None


def write_validation(run_dir: Path, step: int, loss: float, tensorboard: bool) -> None:
    """The end-of-run validation loss, as a `validation` row of metrics.jsonl (and TensorBoard)."""
    writer = metrics_lib.MetricsWriter(run_dir, tensorboard)
    writer.write(step, {"loss": loss}, kind="validation")
    writer.close()
