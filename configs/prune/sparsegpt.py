"""SparseGPT (Frantar & Alistarh 2023) at the reference's settings: blocksize 128, percdamp 0.01.

Usage::

    maxprune prune --config configs/prune/sparsegpt.py[:2:4] \
        --config.prune.input=PARENT_DIR --config.prune.output=OUT_DIR \
        --config.prune.calibration=CALIBRATION [--overwrite]

`ARG`, CALIBRATION, ``prune.seq_len`` and ``model.dtype`` as in configs/prune/wanda.py.
``prune.order=sequential`` reproduces the reference's ``--true-sequential``.
"""

import ml_collections

from maxprune.prune import paper


def get_config(arg=None):
    prune = paper.sparse_config("sparsegpt", arg)
    return ml_collections.ConfigDict({"prune": prune, "model": {"dtype": paper.model_dtype("sparsegpt")}})
