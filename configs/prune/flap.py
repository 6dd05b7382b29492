"""FLAP at the paper's settings: UL-MM, WIFV, whole KV groups, bias compensation, 50 %.

Usage::

    maxprune prune --config configs/prune/flap.py[:search] \
        --config.prune.input=PARENT_DIR --config.prune.output=OUT_DIR \
        --config.prune.calibration=CALIBRATION [--overwrite]

On a Llama-3.1-8B-shaped parent the shape is Table 1's: 20 heads (5 of 8 KV
groups) and FFN 6656 in every layer. On any other parent it comes from the
ratio (the median KV-group count of the admissible shapes, FFN filling the
target; `maxprune.prune.structured.shapes`). With ``search`` every KV-group count from half
to all is tried with the FFN that fills the ratio (Table 6) and the lowest
calibration loss wins. 50 % counts the prunable weights (4.54 B left, as Wanda
at 50 %). CALIBRATION: 128 x 8192 tokens of C4 in the paper (random windows of
long documents). Settings: `maxprune.prune.paper`; method notes: docs/methods.md.
"""

import ml_collections

from maxprune.config import config_arg
from maxprune.prune import paper


def get_config(arg=None):
    search = config_arg(arg, ("search",)) == "search"
    prune = paper.method_config("flap", 0.5)
    prune["search"] = {"enabled": search}
    return ml_collections.ConfigDict({"prune": prune, "model": {"dtype": paper.model_dtype("flap")}})
