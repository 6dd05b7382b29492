"""maxprune: prune a pretrained Llama or train a small one from scratch, and compare."""

from maxprune.errors import MaxpruneError

__version__ = "0.1.0"

__all__ = ["MaxpruneError", "__version__"]
