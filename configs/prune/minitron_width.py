"""Minitron-width at the paper's settings: hidden and FFN channels by activation importance, heads kept.

Usage::

    maxprune prune --config configs/prune/minitron_width.py[:RATIO[,search]] \
        --config.prune.input=PARENT_DIR --config.prune.output=OUT_DIR \
        --config.prune.calibration=CALIBRATION [--overwrite]

RATIO is one of the paper's: 0.5 (default), 0.625, 0.75, 0.813. On a
Llama-3.1-8B-shaped parent the shape is Table 1's (3072/9216, 2432/6144,
1792/6016, 1536/4736 hidden/FFN, 32 heads); on any other parent the median
admissible shape at the ratio (2h <= FFN <= 4h, sizes in multiples scaled to the
model). With ``search`` every admissible shape at the ratio (Appendix D.3) is
pruned and scored by calibration loss, and the best kept. The paper's 50 %
counts the prunable weights, 62.5-81.3 % all parameters (``ratio_of``; 81.3 %
is 13/16). CALIBRATION: the first 1024 windows of 8192 tokens of the joined
WikiText-103 train stream in the paper (``calibration_sampling=stream``, set
here). Settings: `maxprune.prune.paper`; method notes: docs/methods.md.
"""

import ml_collections

from maxprune.config import config_arg
from maxprune.prune import paper


def get_config(arg=None):
    label, _, mode = (arg or "0.5").partition(",")
    ratio = paper.RATIO_LABELS[config_arg(label, list(paper.RATIO_LABELS))]
    config_arg(mode or None, ("search",))
    prune = paper.method_config("minitron_width", ratio)
    prune["search"] = {"enabled": mode == "search"}
    return ml_collections.ConfigDict({"prune": prune, "model": {"dtype": paper.model_dtype("minitron_width")}})
