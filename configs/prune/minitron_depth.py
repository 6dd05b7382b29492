"""Minitron-depth at the paper's settings: drop the contiguous block of layers that hurts the loss least.

Usage::

    maxprune prune --config configs/prune/minitron_depth.py[:RATIO] \
        --config.prune.input=PARENT_DIR --config.prune.output=OUT_DIR \
        --config.prune.calibration=CALIBRATION [--overwrite]

RATIO is one of the paper's: 0.5 (default), 0.625, 0.75, 0.813 — 16, 8, 4 and
2 of Llama-3.1-8B's 32 layers kept (Table 1). The paper's 50 % counts the
prunable weights (as 50 % sparsity does); its 62.5-81.3 % count all parameters
(1 - 3/8, 2/8, 1.5/8 of an "8 B" model; 81.3 % is 13/16), hence ``ratio_of``.
On another parent the layers kept come from the same ratio.
``--config.prune.minitron_depth.layers_removed=K`` fixes the block length
instead; ``criterion=block_influence`` is ShortGPT's cheap one-forward
alternative. CALIBRATION: the paper scores with the first 1024 windows of 8192
tokens of the joined WikiText-103 train stream (``prune.calibration_sampling=stream``,
set here), e.g. ``hf:Salesforce/wikitext?config=wikitext-103-raw-v1&split=train``,
a prepared dataset dir, or a .npy of token ids. Settings: `maxprune.prune.paper`.
"""

import ml_collections

from maxprune.config import config_arg
from maxprune.prune import paper


def get_config(arg=None):
    ratio = paper.RATIO_LABELS[config_arg(arg, list(paper.RATIO_LABELS), "0.5")]
    prune = paper.method_config("minitron_depth", ratio)
    return ml_collections.ConfigDict({"prune": prune, "model": {"dtype": paper.model_dtype("minitron_depth")}})
