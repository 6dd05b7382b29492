"""A ~1 B Llama-3 style model, for accelerator step-time checks."""

import ml_collections


def get_config(arg=None):
    del arg  # no variants
    return ml_collections.ConfigDict({"model": {"preset": "llama-1b"}})
