"""A model dir made ready to evaluate: params on the mesh, its tokenizer found and checked.

Evaluation reads text, so it needs the exact tokenizer the model was trained
with. Model dirs carry it in different ways: a `tokenizer/` dir (imported and
exported models, trained models whose data kept one), or only a hash in
`provenance.json` and the prepared dataset it was trained on. `find_tokenizer`
follows those references (and the chain of parent model dirs) and refuses a
tokenizer whose hash differs from the one the model recorded.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

from maxprune import sharding
from maxprune.data.tokenizer import LLAMA3_SHA256, Tokenizer
from maxprune.errors import MaxpruneError
from maxprune.eval.scoring import Scorer
from maxprune.model import llama
from maxprune.model.model_dir import ModelDir, load_model_dir, read_provenance

_MAX_PARENTS = 8


@dataclasses.dataclass
class EvalModel:
    """Everything evaluation needs from one model dir."""

    model: ModelDir
    tokenizer: Tokenizer
    mesh: object  # jax.sharding.Mesh
    options: llama.ModelOptions
    _scorers: dict = dataclasses.field(default_factory=dict, repr=False)

    @property
    def arch(self):
        return self.model.arch

    def scorer(self, batch_size: int, buckets, batch_tokens: int | None = None):
        """One `Scorer` per batching setup, kept: corpora of one seq_len share its compilations."""
        key = (batch_size, tuple(buckets), batch_tokens)
        if key not in self._scorers:
            self._scorers[key] = Scorer(self.arch, self.model.params, self.model.masks, self.mesh,
                                        self.options, batch_size, buckets, batch_tokens)
        return self._scorers[key]


def load_for_eval(path: str | os.PathLike, *, tokenizer: str | None = None, mesh=None,
                  options: llama.ModelOptions | None = None) -> EvalModel:
    """Load `path` sharded over `mesh` (default: all devices on fsdp) with its tokenizer."""
    mesh = mesh if mesh is not None else sharding.make_mesh()
    model = load_model_dir(path, mesh)
    tok = find_tokenizer(model, tokenizer)
    if tok.vocab_size > model.arch.vocab_size:
        raise MaxpruneError(f"tokenizer {tok.name!r} has {tok.vocab_size} tokens but model dir {path} "
                            f"has vocab_size={model.arch.vocab_size}: they do not belong together")
    return EvalModel(model, tok, mesh, options or llama.ModelOptions(dtype="float32"))


def find_tokenizer(model: ModelDir, override: str | None = None) -> Tokenizer:
    """`override`, else the tokenizer the model dir (or its data, or its parents) refers to."""
    expected = model.provenance.get("tokenizer_hash")
    if override:
        tok = Tokenizer.load(override)
        _check_hash(tok, expected, model.path, f"the given tokenizer {override}")
        return tok
    for candidate in _candidates(model.path, model.provenance):
        tok = Tokenizer.load(candidate)
        if expected is None or tok.hash == expected:
            return tok
    if expected == LLAMA3_SHA256:
        return Tokenizer.llama3()
    raise MaxpruneError(f"model dir {model.path} has no tokenizer reference: no tokenizer/ dir, and its "
                        f"provenance names no tokenizer found on disk (tokenizer_hash="
                        f"{(expected or 'none')[:8]}, data={model.provenance.get('data')}); "
                        f"pass --tokenizer DIR (or 'llama3')")


def _check_hash(tok: Tokenizer, expected: str | None, path: Path, what: str) -> None:
    if expected is not None and tok.hash != expected:
        raise MaxpruneError(f"{what} has hash {tok.hash[:8]} but model dir {path} was trained with "
                            f"tokenizer {expected[:8]}")


def _candidates(path: Path, provenance: dict):
    """Tokenizer dirs a model dir points to, nearest first: its own, its data's, its parents'."""
    for _ in range(_MAX_PARENTS):
        if (path / "tokenizer" / "tokenizer.json").is_file():
            yield path / "tokenizer"
        yield from _dataset_tokenizers(provenance.get("data"))
        parent = provenance.get("parent")
        if not isinstance(parent, str) or not (Path(parent) / "arch.json").is_file():
            return
        path = Path(parent)
        provenance = read_provenance(path)


def _dataset_tokenizers(data: str | None):
    """A prepared dataset's tokenizer: kept beside it (`tokenizer/`, or `../../tokenizer/` as the
    builtin corpus lays out `prepared/<split>/`), or named "llama3" in its manifest."""
    if not data or not Path(data).is_dir():
        return
    data = Path(data)
    for tok_dir in (data / "tokenizer", data.parent / "tokenizer", data.parent.parent / "tokenizer"):
        if (tok_dir / "tokenizer.json").is_file():
            yield tok_dir
    try:
        name = json.loads((data / "manifest.json").read_text())["tokenizer"]["name"]
    except (OSError, ValueError, KeyError, TypeError):
        return
    if name == "llama3":
        yield "llama3"
