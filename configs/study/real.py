"""The real-weights study (`maxprune demo --real`); see maxprune/study/real.py.

    maxprune data real-parent                                  # SmolLM2-135M as a model dir, cached
    maxprune study plan --config configs/study/real.py
"""

from maxprune.study.real import get_config  # noqa: F401
