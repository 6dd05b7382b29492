"""Perplexity on text corpora, and validation loss on a prepared dataset.

The protocol (the paper's Appendix E and its collection's scripts):

- **Stream.** A corpus's documents, in the order its source yields them (empty
  ones skipped), become one token stream: BOS once at the very start, then each
  document encoded on its own with the join text (default ``"\\n\\n"``, as the
  Wanda/SparseGPT and HF perplexity recipes join WikiText) prepended to every
  document but the first. ``join="eos"`` puts the EOS token between documents
  instead. Encoding per document lets the stream be read lazily and stop as soon
  as it is long enough (C4 is streamed, never downloaded whole).
- **Windows.** The stream is cut into at most `n_seqs` non-overlapping windows
  of `seq_len` tokens (256 x 8192 in the paper); the tail is dropped. Each
  window is scored independently: its first token has no context and is not
  predicted, so a window contributes `seq_len - 1` predicted tokens.
- **PPL** = exp(mean next-token NLL over every predicted token of every window).

Corpora and splits: the paper's text says it evaluates test sets; its
collection's scripts read *train* splits. `split="test"` reads WikiText-103/-2
and CNN/DailyMail test and C4 validation (C4 has no test split); `split="train"`
reads the train splits. Note WikiText-103 and WikiText-2 share one test set
(about 280k Llama-3 tokens, 35 windows of 8192), so on test splits their
perplexities coincide; the paper's tables show them differ, which fits the train
splits its scripts read. Offline, the builtin corpus's held-out sets stand in
(`builtin_wiki`, `builtin_news`, `builtin_fiction`, `builtin_shakespeare`).

Validation loss ("DCLM loss" in the paper) is the mean next-token NLL over the
first N sequences of a prepared dataset (`maxprune data prepare`), exactly the
sequences the trainer's validation reads.
"""

from __future__ import annotations

import dataclasses
import math
import time

import numpy as np
from tqdm import tqdm

from maxprune.data.builtin import builtin_source
from maxprune.data.prepared import open_prepared
from maxprune.data.sources import iter_documents
from maxprune.data.stream import token_stream, windows
from maxprune.errors import MaxpruneError

# name -> (hf source with a {split} slot, {"test": split, "train": split}, what it is)
PAPER_CORPORA = {
    "c4": ("hf:allenai/c4?config=en&streaming=true&split={split}",
           {"test": "validation", "train": "train"}, "C4 (en), streamed; no test split: 'test' reads validation"),
    "wikitext103": ("hf:Salesforce/wikitext?config=wikitext-103-raw-v1&split={split}",
                    {"test": "test", "train": "train"}, "WikiText-103 (raw)"),
    "wikitext2": ("hf:Salesforce/wikitext?config=wikitext-2-raw-v1&split={split}",
                  {"test": "test", "train": "train"}, "WikiText-2 (raw)"),
    "cnn_dm": ("hf:abisee/cnn_dailymail?config=3.0.0&field=article&streaming=true&split={split}",
               {"test": "test", "train": "train"}, "CNN/DailyMail 3.0.0 articles, streamed"),
}
BUILTIN_CORPORA = {
    "builtin_wiki": "heldout_wiki",
    "builtin_news": "heldout_news",
    "builtin_fiction": "heldout_fiction",
    "builtin_shakespeare": "heldout_shakespeare",
}


@dataclasses.dataclass(frozen=True)
class Corpus:
    name: str
    source: str  # a `maxprune.data.sources` spec (builtin: resolved when read)
    split: str | None
    about: str


def corpus_names() -> list[str]:
    return [*PAPER_CORPORA, *BUILTIN_CORPORA]


def resolve_corpus(entry: str, split: str = "test") -> Corpus:
    """A known corpus name, or ``name=SOURCE_SPEC`` for any text source."""
    name, eq, spec = entry.partition("=")
    if eq:
        if not name.isidentifier() or not spec:
            raise MaxpruneError(f"perplexity corpus {entry!r} must be a known name or NAME=SOURCE_SPEC")
        return Corpus(name, spec, None, f"user source {spec}")
    if name in PAPER_CORPORA:
        template, splits, about = PAPER_CORPORA[name]
        return Corpus(name, template.format(split=splits[split]), splits[split], about)
    if name in BUILTIN_CORPORA:
        return Corpus(name, f"builtin:{BUILTIN_CORPORA[name]}", BUILTIN_CORPORA[name],
                      f"builtin corpus split {BUILTIN_CORPORA[name]}")
    raise MaxpruneError(f"unknown perplexity corpus {entry!r}; valid: {', '.join(corpus_names())}, "
                        f"or NAME=SOURCE_SPEC")


def _source_spec(corpus: Corpus) -> str:
    if corpus.source.startswith("builtin:"):
        # the text alone: the evaluated model's own tokenizer encodes it
        return builtin_source(corpus.source.removeprefix("builtin:"))
    return corpus.source


# ------------------------------------------------------------------ scoring
def mean_nll(scorer, windows_NL: np.ndarray, desc: str = "", progress: bool = True) -> float:
    """Mean next-token NLL over all windows, each scored on its own (float64 accumulation)."""
    total, count = 0.0, 0
    bar = tqdm(total=len(windows_NL), desc=desc, unit="seq", disable=not progress, dynamic_ncols=True)
    rows = scorer.rows_for(windows_NL.shape[1])
    for start in range(0, len(windows_NL), rows):
        chunk = windows_NL[start:start + rows]
        for logprob_T, _ in scorer.score_batch(list(chunk), [w[1:] for w in chunk], greedy=False):
            total -= float(np.sum(logprob_T, dtype=np.float64))
            count += len(logprob_T)
        bar.update(len(chunk))
    bar.close()
    return total / count


def perplexity(model, corpus: Corpus | str, *, seq_len: int = 8192, n_seqs: int = 256, batch_size: int = 8,
               join: str = "\n\n", split: str = "test", progress: bool = True) -> dict:
    """Perplexity of an `EvalModel` on one corpus; every number needed to reproduce it."""
    corpus = resolve_corpus(corpus, split) if isinstance(corpus, str) else corpus
    check_seq_len(model.arch, seq_len)
    start = time.perf_counter()
    spec = _source_spec(corpus)
    try:
        docs = (d.text for d in iter_documents(spec))
        stream, n_docs = token_stream(docs, model.tokenizer, seq_len * n_seqs, join)
    except MaxpruneError as e:
        if corpus.name not in PAPER_CORPORA:
            raise
        raise MaxpruneError(f"{e}; without the hub, the builtin corpora stand in: --perplexity "
                            f"{','.join(BUILTIN_CORPORA)} or --config configs/eval/offline.py") from e
    windows_NL = windows(stream, seq_len, n_seqs)
    if len(windows_NL) == 0:
        raise MaxpruneError(f"corpus {corpus.name} ({spec}) has only {len(stream)} tokens, fewer than "
                            f"eval.perplexity.seq_len={seq_len}")
    read_s = time.perf_counter() - start
    scorer = model.scorer(batch_size, (seq_len,))
    nll = mean_nll(scorer, windows_NL, desc=f"ppl {corpus.name}", progress=progress)
    score_s = time.perf_counter() - start - read_s
    tokens = windows_NL.shape[0] * (seq_len - 1)
    return {"ppl": math.exp(nll), "nll": nll, "tokens": tokens, "sequences": int(windows_NL.shape[0]),
            "seq_len": seq_len, "requested_sequences": n_seqs, "documents": n_docs, "source": spec,
            "split": corpus.split, "about": corpus.about, "join": join, "read_s": read_s,
            "score_s": score_s, "tokens_per_s": tokens / score_s}


def validation_loss(model, dataset_dir: str, *, n_seqs: int = 256, batch_size: int = 8,
                    progress: bool = True) -> dict:
    """Mean next-token NLL on the first `n_seqs` sequences of a prepared dataset."""
    ds = open_prepared(dataset_dir)
    ds.check_tokenizer(model.tokenizer)
    check_seq_len(model.arch, ds.seq_len, f"the prepared dataset's seq_len ({dataset_dir})")
    n = min(n_seqs, len(ds))
    start = time.perf_counter()
    windows_NL = np.stack(ds.__getitems__(range(n)))
    loss = mean_nll(model.scorer(batch_size, (ds.seq_len,)), windows_NL, desc="validation", progress=progress)
    return {"loss": loss, "sequences": n, "seq_len": ds.seq_len, "tokens": n * (ds.seq_len - 1),
            "data": str(ds.path), "seconds": time.perf_counter() - start}


def check_seq_len(arch, seq_len: int, what: str = "eval.perplexity.seq_len") -> None:
    if seq_len > arch.max_position_embeddings:
        raise MaxpruneError(f"{what}={seq_len} exceeds the model's max_position_embeddings="
                            f"{arch.max_position_embeddings}")
