"""The paper's recipe (Table 4) at Llama-3.1-8B scale on a prepared DCLM stream.

`arg` picks the run kind: "pretrain" (P200: 200B tokens on [0, 200B)),
"retrain" (R_N on [200B, 250B), from a pruned model dir given as train.init),
"scratch" (S_N on the retrain range), "union" (S250 on exactly [0, 250B)).

    maxprune train gs://bucket/runs/P200 --config configs/train/paper.py:pretrain \
        --config.data.train=gs://bucket/dclm-llama3-8192
"""

from ml_collections import ConfigDict

from maxprune.config import config_arg

BUDGETS = {"pretrain": "0:~200B", "retrain": "~200B:~250B", "union": "pretrain+retrain"}
TOKENS = {"pretrain": "200B", "retrain": "50B", "scratch": "50B", "union": "250B"}
RANGE = {"pretrain": "pretrain", "retrain": "retrain", "scratch": "retrain", "union": "union"}


def get_config(arg="pretrain"):
    arg = config_arg(arg, list(TOKENS), "pretrain")
    return ConfigDict({
        "model": {"preset": "llama3.1-8b", "dtype": "bfloat16", "remat": "dots_with_no_batch_dims_saveable"},
        "mesh": {"data": 1, "fsdp": -1, "tensor": 1},
        "data": {"budgets": BUDGETS, "range": RANGE[arg]},
        "train": {
            "tokens": TOKENS[arg], "global_batch": 512,
            "lr_sweep": (1e-5, 3e-5, 1e-4, 3e-4, 1e-3), "sweep_fraction": 0.02,
            "warmup_ratio": 0.05, "min_lr_ratio": 0.1, "b1": 0.9, "b2": 0.95, "eps": 1e-8,
            "weight_decay": 0.01, "grad_clip": 1.0,
            "checkpoint_every": 1000, "keep_checkpoints": 3, "log_every": 10, "eval_every": 5000,
        },
    })
