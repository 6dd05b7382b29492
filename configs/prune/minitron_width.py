"""Minitron-width at the paper's settings: hidden and FFN channels by activation importance, heads kept.

Usage::

    maxprune prune --config configs/prune/minitron_width.py[:RATIO[,search]] \
        --config.prune.input=PARENT_DIR --config.prune.output=OUT_DIR \
        --config.prune.calibration=CALIBRATION [--overwrite]

RATIO is one of the paper's: 0.5 (default), 0.625, 0.75, 0.813. Without
``search`` the shape is Table 1's for Llama-3.1-8B (3072/9216, 2432/6144,
1792/6016, 1536/4736 hidden/FFN, 32 heads); with ``search`` every admissible
shape at the ratio (2h <= FFN <= 4h, multiples of 128; Appendix D.3) is pruned
and scored by calibration loss, and the best kept. The paper's 50 % counts the
prunable weights, 62.5-81.3 % all parameters (``ratio_of``; 81.3 % is 13/16).
CALIBRATION: 1024 x 8192 tokens of WikiText-103 in the paper.
"""

import ml_collections

from maxprune.config import config_arg

PAPER = {  # ratio label -> (ratio, ratio_of, Table 1 hidden, Table 1 FFN)
    "0.5": (0.5, "prunable", 3072, 9216), "0.625": (0.625, "params", 2432, 6144),
    "0.75": (0.75, "params", 1792, 6016), "0.813": (13 / 16, "params", 1536, 4736),
}


def get_config(arg=None):
    label, _, mode = (arg or "0.5").partition(",")
    ratio, ratio_of, hidden, ffn = PAPER[config_arg(label, list(PAPER))]
    config_arg(mode or None, ("search",))
    width = {"ratio_of": ratio_of}
    if mode != "search":
        width.update(hidden_size=hidden, ffn_size=ffn)
    prune = {"method": "minitron_width", "ratio": ratio, "n_samples": 1024, "batch_size": 8,
             "minitron_width": width, "search": {"enabled": mode == "search"}}
    return ml_collections.ConfigDict({"prune": prune, "model": {"dtype": "float32"}})
