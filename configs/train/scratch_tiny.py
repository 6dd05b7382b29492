"""Train the tiny Llama from scratch on the builtin corpus (run `maxprune data builtin` first).

    maxprune train runs/tiny --config configs/train/scratch_tiny.py \
        --config.data.train=$HOME/.cache/maxprune/builtin/v8192-L256/prepared/train
"""

from ml_collections import ConfigDict


def get_config(arg=None):
    return ConfigDict({
        "model": {"preset": "tiny", "arch": {"vocab_size": 8192}, "dtype": "float32"},
        "data": {"budgets": {"pretrain": "0:~2M", "retrain": "~2M:"}, "range": "pretrain"},
        "train": {"tokens": "1M", "global_batch": 16, "lr": 1e-3, "log_every": 10, "checkpoint_every": 50},
    })
