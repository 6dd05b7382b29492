"""The embedded demo study (`maxprune demo`); see maxprune/study/mini.py.

    maxprune study plan --config configs/study/mini.py        # ":all" for every method variant
"""

from maxprune.study.mini import get_config  # noqa: F401
