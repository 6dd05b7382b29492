"""`maxprune data prepare|train-tokenizer|inspect|builtin`: one-off data tools, configured by flags."""

from __future__ import annotations

import itertools

from maxprune.commands import Command, data_builtin
from maxprune.errors import MaxpruneError


def _add_prepare(parser) -> None:
    parser.add_argument("source", metavar="SOURCE",
                        help="source spec, e.g. 'jsonl:/data/*.jsonl.zst?field=text' or '/data/*.parquet'")
    parser.add_argument("out", metavar="OUT", help="prepared dataset dir to write")
    parser.add_argument("--tokenizer", default="llama3", metavar="PATH|llama3",
                        help="tokenizer.json, a dir with one, a model dir (its tokenizer/), or 'llama3' (default)")
    parser.add_argument("--seq-len", type=int, default=8192, help="tokens per sequence (default 8192)")
    parser.add_argument("--workers", type=int, default=None, help="parallel processes (default: CPUs)")
    parser.add_argument("--text-field", default=None, help="JSON/parquet/dataset field holding the text")
    parser.add_argument("--on-missing-field", choices=("error", "skip"), default="error",
                        help="a record without the text field: stop (default) or skip and count it")
    parser.add_argument("--sequences-per-shard", type=int, default=None,
                        help="sequences per ArrayRecord shard (default: ~1 GiB)")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")


def _run_prepare(args) -> int:
    from maxprune.data.prepare import prepare
    from maxprune.data.tokenizer import Tokenizer

    tokenizer = Tokenizer.load(args.tokenizer)
    manifest = prepare(args.source, tokenizer, args.out, args.seq_len, workers=args.workers,
                       overwrite=args.overwrite, on_missing_field=args.on_missing_field,
                       text_field=args.text_field, sequences_per_shard=args.sequences_per_shard)
    print(f"wrote {args.out}: {manifest.num_sequences:,} sequences x {manifest.seq_len} = "
          f"{manifest.num_tokens:,} tokens ({manifest.tokens_dropped:,} dropped) in "
          f"{len(manifest.shards)} shards")
    return 0


def _add_train_tokenizer(parser) -> None:
    parser.add_argument("source", metavar="SOURCE", help="source spec of the training text")
    parser.add_argument("out", metavar="OUT", help="dir to write tokenizer.json into")
    parser.add_argument("--vocab-size", type=int, required=True,
                        help="vocabulary size, special tokens included")
    parser.add_argument("--text-field", default=None, help="JSON/parquet/dataset field holding the text")
    parser.add_argument("--max-documents", type=int, default=None, help="train on the first N documents")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT/tokenizer.json if it exists")


def _run_train_tokenizer(args) -> int:
    from maxprune.data import sources
    from maxprune.data.tokenizer import train_bpe

    spec = sources.parse_source(args.source)
    if args.text_field is not None:
        spec = spec.with_options(field=args.text_field)
    if args.max_documents is not None and args.max_documents < 1:
        raise MaxpruneError(f"--max-documents={args.max_documents} must be >= 1")
    sources.list_files(spec)  # a missing source fails before training starts
    texts = (doc.text for doc in itertools.islice(sources.iter_documents(spec), args.max_documents))
    tokenizer = train_bpe(texts, args.vocab_size, args.out, overwrite=args.overwrite)
    print(f"wrote {args.out}: byte-level BPE, vocab {tokenizer.vocab_size}, hash {tokenizer.hash[:8]}")
    return 0


def _add_inspect(parser) -> None:
    parser.add_argument("dir", metavar="DIR", help="prepared dataset dir")
    parser.add_argument("--sequence", type=int, default=None, metavar="I",
                        help="also decode sequence I (needs --tokenizer)")
    parser.add_argument("--tokenizer", default=None, metavar="PATH|llama3", help="tokenizer for --sequence")
    parser.add_argument("--verify", action="store_true",
                        help="also check every shard's sha256 against the manifest (reads the whole dataset)")


def _run_inspect(args) -> int:
    from maxprune.data.prepared import open_prepared
    from maxprune.data.tokenizer import Tokenizer

    dataset = open_prepared(args.dir)
    m = dataset.manifest
    skipped = {key: sum(f.get(key, 0) for f in m.files)
               for key in ("skipped_empty", "skipped_undecodable", "skipped_missing_field")}
    tok = m.tokenizer
    rows = [
        ("sequences", f"{m.num_sequences:,} x {m.seq_len} = {m.num_tokens:,} tokens "
                      f"({m.tokens_dropped:,} dropped), {m.dtype}"),
        ("tokenizer", f"{tok['name']} {tok['hash'][:8]}, vocab {tok['vocab_size']}, "
                      f"bos {tok['bos_id']}, eos {tok['eos_id']}"),
        ("source", m.source),
        ("files", f"{len(m.files)}, {m.documents:,} documents; skipped: "
                  + ", ".join(f"{k.removeprefix('skipped_')} {v:,}" for k, v in skipped.items())),
        ("shards", f"{len(m.shards)} ({m.shards[0]['file']} ... {m.shards[-1]['file']})"),
        ("created", f"{m.created} by maxprune {m.code_version}"),
    ]
    for name, value in rows:
        print(f"{name:10} {value}")
    if args.verify:
        checked = dataset.verify()
        verdict = (f"{checked} shards: sizes and sha256 match the manifest" if checked
                   else "nothing: prepared before shard hashes were recorded")
        print(f"{'verified':10} {verdict}")
    if args.sequence is not None:
        if args.tokenizer is None:
            raise MaxpruneError("--sequence needs --tokenizer to decode it")
        tokenizer = Tokenizer.load(args.tokenizer)
        dataset.check_tokenizer(tokenizer)
        if not 0 <= args.sequence < len(dataset):
            raise MaxpruneError(f"--sequence={args.sequence} must be in [0, {len(dataset)})")
        tokens_L = dataset[args.sequence]
        print(f"sequence {args.sequence}: {tokenizer.decode(tokens_L)!r}")
    return 0


_SUBCOMMANDS = {
    "prepare": ("tokenize a source into packed seq_len sequences (resumable)", _add_prepare, _run_prepare),
    "train-tokenizer": ("train a byte-level BPE tokenizer on a source", _add_train_tokenizer,
                        _run_train_tokenizer),
    "inspect": ("describe a prepared dataset", _add_inspect, _run_inspect),
    "builtin": data_builtin.SUBCOMMAND,
    "real-parent": data_builtin.REAL_PARENT,
}


def _add_data(parser) -> None:
    sub = parser.add_subparsers(dest="data_command", required=True, metavar="SUBCOMMAND")
    for name, (help_text, add, run) in _SUBCOMMANDS.items():
        add(sub.add_parser(name, help=help_text, description=help_text))


def _run_data(args, cfg) -> int:
    return _SUBCOMMANDS[args.data_command][2](args)


COMMANDS = [
    Command("data", "prepare and inspect training data: prepare, train-tokenizer, inspect, builtin, real-parent",
            _add_data, _run_data, takes_config=False, multihost=False),
]
