"""Conversion between maxprune model dirs and other checkpoint formats."""

from maxprune.convert.hf import from_hf, to_hf

__all__ = ["from_hf", "to_hf"]
