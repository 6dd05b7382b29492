"""FLAP at the paper's settings: UL-MM, WIFV, whole KV groups, bias compensation, 50 %.

Usage::

    maxprune prune --config configs/prune/flap.py[:search] \
        --config.prune.input=PARENT_DIR --config.prune.output=OUT_DIR \
        --config.prune.calibration=CALIBRATION [--overwrite]

Without ``search`` the shape is Table 1's for Llama-3.1-8B: 20 heads (5 of 8
KV groups) and FFN 6656 in every layer; with ``search`` every KV-group count
from 4 to 8 is tried with the FFN that fills the ratio (Table 6) and the
lowest calibration loss wins. 50 % counts the prunable weights (4.54 B left,
as Wanda at 50 %). CALIBRATION: 128 x 8192 tokens of C4 in the paper.
"""

import ml_collections

from maxprune.config import config_arg


def get_config(arg=None):
    search = config_arg(arg, ("search",)) == "search"
    flap = {"structure": "UL-MM", "metric": "WIFV", "ratio_of": "prunable"}
    if not search:
        flap.update(num_heads=20, ffn_size=6656)
    prune = {"method": "flap", "ratio": 0.5, "n_samples": 128, "batch_size": 8,
             "flap": flap, "search": {"enabled": search}}
    return ml_collections.ConfigDict({"prune": prune, "model": {"dtype": "float32"}})
