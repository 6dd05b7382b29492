"""Minitron-depth at the paper's settings: drop the contiguous block of layers that hurts the loss least.

Usage::

    maxprune prune --config configs/prune/minitron_depth.py[:RATIO] \
        --config.prune.input=PARENT_DIR --config.prune.output=OUT_DIR \
        --config.prune.calibration=CALIBRATION [--overwrite]

RATIO is one of the paper's: 0.5 (default), 0.625, 0.75, 0.813 — 16, 8, 4 and
2 of Llama-3.1-8B's 32 layers kept (Table 1). The paper's 50 % counts the
prunable weights (as 50 % sparsity does); its 62.5-81.3 % count all parameters
(1 - 3/8, 2/8, 1.5/8 of an "8 B" model; 81.3 % is 13/16), hence ``ratio_of``
(see maxprune/prune/shapes.py). ``--config.prune.minitron_depth.layers_removed=K``
fixes the block length instead; ``criterion=block_influence`` is ShortGPT's
cheap one-forward alternative. CALIBRATION: the paper scores with 1024 x 8192
tokens of WikiText-103, e.g. ``hf:wikitext?config=wikitext-103-raw-v1&split=train``,
a prepared dataset dir, or a .npy of token ids.
"""

import ml_collections

from maxprune.config import config_arg

PAPER_RATIOS = {"0.5": (0.5, "prunable"), "0.625": (0.625, "params"), "0.75": (0.75, "params"),
                "0.813": (13 / 16, "params")}


def get_config(arg=None):
    ratio, ratio_of = PAPER_RATIOS[config_arg(arg, list(PAPER_RATIOS), "0.5")]
    prune = {"method": "minitron_depth", "ratio": ratio, "n_samples": 1024, "batch_size": 8,
             "minitron_depth": {"criterion": "loss", "ratio_of": ratio_of}}
    return ml_collections.ConfigDict({"prune": prune, "model": {"dtype": "bfloat16"}})
