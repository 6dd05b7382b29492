"""The model: `arch` (dimensions), `layers`, `llama` (the decoder), `masks`, `model_dir` (the one artefact)."""
