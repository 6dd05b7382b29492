"""The Llama model: `Arch` (dimensions), the Flax decoder, masks and the model dir."""

from maxprune.model.arch import PRESETS, Arch, RopeScaling, preset

__all__ = ["Arch", "PRESETS", "RopeScaling", "preset"]
