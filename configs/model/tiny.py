"""The tiny preset: 2 layers, 64 wide, a 512-token vocab; for tests and the CPU demo."""

import ml_collections


def get_config(arg=None):
    del arg  # no variants
    return ml_collections.ConfigDict({"model": {"preset": "tiny"}})
