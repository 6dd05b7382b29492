"""`convert from-hf` / `convert to-hf` / `convert from-gguf`: other checkpoint formats <-> model dirs."""

from __future__ import annotations

from maxprune.commands import Command

# direction: (source metavar, help, dtypes of the written weights, what --dtype defaults to)
DIRECTIONS = {
    "from-hf": ("HF_DIR", "HF checkpoint dir -> model dir", ("float32", "bfloat16"), "float32"),
    "to-hf": ("MODEL_DIR", "model dir -> HF checkpoint dir", ("float32", "bfloat16", "float16"),
              "the dtype it was imported from, else float32"),
    "from-gguf": ("GGUF_FILE", "GGUF (llama.cpp) Llama file -> model dir, dequantized",
                  ("float32", "bfloat16"), "float32"),
}


def _add_arguments(parser) -> None:
    directions = parser.add_subparsers(dest="direction", required=True, metavar="DIRECTION")
    for direction, (source, help_text, dtypes, default) in DIRECTIONS.items():
        sub = directions.add_parser(direction, help=help_text, description=help_text)
        sub.add_argument("source", metavar=source)
        sub.add_argument("out", metavar="OUT")
        sub.add_argument("--dtype", choices=dtypes, default=None,
                         help=f"dtype of the written weights (default: {default})")
        sub.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
        if direction == "from-gguf":
            sub.add_argument("--skip-tokenizer", action="store_true",
                             help="convert the weights without rebuilding the tokenizer "
                                  "(for vocabularies other than byte-level BPE)")


def _run(args, cfg) -> int:
    if args.direction == "from-gguf":
        from maxprune.convert import gguf as gguf_convert

        gguf_convert.from_gguf(args.source, args.out, dtype=args.dtype, overwrite=args.overwrite,
                               skip_tokenizer=args.skip_tokenizer)
    else:
        from maxprune.convert import hf

        convert = hf.from_hf if args.direction == "from-hf" else hf.to_hf
        convert(args.source, args.out, dtype=args.dtype, overwrite=args.overwrite)
    print(f"wrote {args.out}")
    return 0


COMMANDS = [Command("convert", "convert between HF checkpoints, GGUF files and model dirs",
                    _add_arguments, _run, takes_config=False, multihost=False)]
