"""maxprune: prune a pretrained Llama or train a small one from scratch, and compare."""

__version__ = "0.1.0"
