"""Meta's Llama-3.1-8B shape (the paper's parent model for pruning)."""

import ml_collections


def get_config(arg=None):
    del arg  # no variants
    return ml_collections.ConfigDict({"model": {"preset": "llama3.1-8b"}})
