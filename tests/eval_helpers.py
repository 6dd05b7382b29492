"""Shared pieces of the eval tests: a tiny model dir with a tokenizer, its HF export, local tasks."""

from __future__ import annotations

import json
from pathlib import Path

from hf_helpers import random_params

from maxprune.model.arch import preset
from maxprune.model.model_dir import save_model_dir

# Multiple-choice questions in the tiny corpus's vocabulary (conftest.WORDS).
QUESTIONS = [
    ("the cat sat on a", ["mat", "dog", "sky", "fire"], 0),
    ("the dog ran far", ["away", "home", "warm", "blue"], 0),
    ("then came home at", ["night", "green", "cat", "the"], 0),
    ("to sleep by the warm", ["fire", "sky", "mat", "and"], 0),
    ("green fields under blue", ["sky", "fire", "dog", "mat"], 0),
    ("a dog ran into", ["green fields", "the warm fire", "blue sky", "night"], 0),
    ("while the cat", ["sat", "ran", "came", "slept"], 0),
    ("and then the dog came", ["home", "away", "far", "under"], 0),
]


def tiny_arch():
    return preset("tiny").replace(vocab_size=300)


def make_model_dir(path: Path, tokenizer_dir: Path | None, seed: int = 0, masks=None, **provenance) -> Path:
    """A tiny random model whose weights are large enough that answer choices do not tie."""
    arch = tiny_arch()
    return save_model_dir(path, arch, random_params(arch, seed), masks=masks,
                          provenance={"method": "test", **provenance}, tokenizer_dir=tokenizer_dir)


def write_mc_task(directory: Path, name: str = "tiny_mc") -> str:
    """A local lm-eval multiple-choice task (acc and acc_norm) over QUESTIONS; returns its name."""
    directory.mkdir(parents=True, exist_ok=True)
    data = directory / f"{name}.jsonl"
    data.write_text("".join(json.dumps({"question": q, "choices": c, "label": a}) + "\n"
                            for q, c, a in QUESTIONS))
    (directory / f"{name}.yaml").write_text(
        f"task: {name}\n"
        f"dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        f"output_type: multiple_choice\n"
        f"test_split: test\n"
        f"doc_to_text: '{{{{question}}}}'\n"
        f"doc_to_target: label\n"
        f"doc_to_choice: '{{{{choices}}}}'\n"
        f"metric_list:\n  - metric: acc\n  - metric: acc_norm\n")
    return name
