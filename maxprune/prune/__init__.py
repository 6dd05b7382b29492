"""Pruning: methods registered by name that turn (params, Arch, calibration tokens) into a smaller model."""

from maxprune.prune.api import PruneResult, get_pruner, prune, pruner_names, register

__all__ = ["PruneResult", "get_pruner", "prune", "pruner_names", "register"]
