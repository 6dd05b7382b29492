"""A minute-scale smoke evaluation: 100 documents per task, 16 windows of 256 tokens per corpus.

    maxprune eval runs/tiny/model --config configs/eval/quick.py

Numbers from a subset carry larger std-devs (metrics.json records N per task);
use configs/eval/offline.py or paper.py for reportable numbers.
"""

from ml_collections import ConfigDict


def get_config(arg=None):
    return ConfigDict({
        "model": {"dtype": "float32"},
        "eval": {
            "task_source": "offline",
            "limit": 100,
            "perplexity": {"corpora": ("builtin_wiki", "builtin_news"), "seq_len": 256, "n_seqs": 16},
        },
    })
