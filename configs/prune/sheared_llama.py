"""Sheared LLaMA at the paper's settings: learned layer / KV-group / FFN / hidden masks, 50 %.

Usage::

    maxprune prune --config configs/prune/sheared_llama.py \
        --config.prune.input=PARENT_DIR --config.prune.output=OUT_DIR \
        --config.prune.calibration=PREPARED_TRAIN_DIR [--overwrite]

On a Llama-3.1-8B-shaped parent the target is Table 1's: 32 layers, 32 heads
(all 8 KV groups), hidden 3456, FFN 7552 (4.6 B; the paper's D.3 search picked
it among hidden 3072 / 3456 x 16-32 heads); on any other parent the same rule at
the ratio (the larger of the two hidden-size fractions, every head, FFN filling
the target). The masks are learned as in the original run (Xia et al.): 3200
steps of 32 x 4096 tokens (0.42 B), Lagrangian warmup 320 steps, LR warmup 10 %
then cosine to 10 %, model lr 1e-4, log-alpha lr 1.0, lambda lr -1.0 (ascent),
bf16 compute, full remat. PREPARED_TRAIN_DIR is a prepared dataset dir (the
paper learns the masks on its training data, DCLM); its 8192-token sequences
are cut to 4096. A non-dir calibration source is only cycled through
(``prune.n_samples`` windows), which suits tests, not runs. Memory: the params,
their gradients and two Adam moments in fp32 (~16 bytes a parameter, 128 GB for
8 B) sharded over ``mesh.fsdp``; raise ``prune.sheared_llama.microbatches`` if
activations do not fit. Settings: `maxprune.prune.paper`.
"""

import ml_collections

from maxprune.prune import paper


def get_config(arg=None):
    prune = paper.method_config("sheared_llama", 0.5)
    return ml_collections.ConfigDict({"prune": prune, "model": {"dtype": paper.model_dtype("sheared_llama")}})
