"""Magnitude pruning (the Wanda repo's baseline): one |W| threshold per matrix.

Usage::

    maxprune prune --config configs/prune/magnitude.py[:2:4] \
        --config.prune.input=PARENT_DIR --config.prune.output=OUT_DIR \
        --config.prune.calibration=CALIBRATION [--overwrite]

`ARG` is the sparsity pattern: ``unstructured`` (default, 50 %) or ``N:M``
(ratio N/M). Calibration is optional (only the report's reconstruction errors use it).
Statistics run in fp32 (``model.dtype``); ``--config.model.dtype=bfloat16``
halves the calibration activations' memory at some accuracy cost.
"""

import ml_collections

from maxprune.prune import paper


def get_config(arg=None):
    prune = paper.sparse_config("magnitude", arg)
    return ml_collections.ConfigDict({"prune": prune, "model": {"dtype": paper.model_dtype("magnitude")}})
