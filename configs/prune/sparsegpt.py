"""SparseGPT (Frantar & Alistarh 2023) at the reference's settings: blocksize 128, percdamp 0.01.

Usage::

    maxprune prune --config configs/prune/sparsegpt.py[:2:4] \
        --config.prune.input=PARENT_DIR --config.prune.output=OUT_DIR \
        --config.prune.calibration=CALIBRATION [--overwrite]

`ARG` is the sparsity pattern: ``unstructured`` (default, 50 %) or ``N:M``
(ratio N/M). CALIBRATION: a source spec (e.g. C4 json.gz shards: the paper's
128 x 8192 tokens, random windows of long documents as in the reference), a
prepared dataset dir, or a .npy of token ids. ``prune.seq_len`` defaults to 8192
for a source spec and to the sequences' length otherwise.
``prune.order=sequential`` reproduces the reference's ``--true-sequential``.
Statistics run in fp32 (``model.dtype``); ``--config.model.dtype=bfloat16``
halves the calibration activations' memory at some accuracy cost.
"""

import ml_collections

from maxprune.prune import paper


def get_config(arg=None):
    prune = paper.sparse_config("sparsegpt", arg)
    return ml_collections.ConfigDict({"prune": prune, "model": {"dtype": paper.model_dtype("sparsegpt")}})
