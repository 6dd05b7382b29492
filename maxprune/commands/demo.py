"""`maxprune demo`: the paper in miniature on the builtin corpus, end to end, resumable."""

from __future__ import annotations

import time
from pathlib import Path

from maxprune.commands import Command


def _add_demo(parser) -> None:
    from maxprune.study import mini
    parser.set_defaults(config=mini.__file__)  # --config.a.b=VALUE overrides apply to the mini study
    parser.add_argument("--all", action="store_true", help="every method variant, not just depth/width/sparse")
    parser.add_argument("--root", default=None, help="where the study's runs go (default: runs/mini)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def demo_config(cfg, all_variants: bool = False):
    """The mini study config with the builtin corpus's data dirs filled in (built on first use)."""
    from maxprune.data.builtin import builtin_corpus
    from maxprune.study import mini
    from maxprune.config import override

    corpus = builtin_corpus(vocab_size=mini.VOCAB, seq_len=mini.SEQ_LEN, progress=False)
    changes = {"data.train": str(corpus.prepared_dirs["train"]),
               "data.validation": str(corpus.prepared_dirs["validation"]),
               "prune.calibration": str(corpus.prepared_dirs["train"]),
               "eval.tokenizer": str(corpus.tokenizer_dir)}
    if all_variants:
        changes.update({"study.variants": mini.DEFAULT + mini.MORE, "study.name": "mini-all"})
    return override(cfg, changes, "maxprune demo")


def _run_demo(args, cfg) -> int:
    from maxprune.commands.study import print_plan
    from maxprune.study import report
    from maxprune.study.evaluate import evaluator
    from maxprune.study.runner import StudyRunner, make_plan, read_status
    from maxprune.train.metrics import CompileClock

    start = time.perf_counter()
    cfg = demo_config(cfg, args.all)
    root = Path(args.root) if args.root else Path("runs") / cfg.study.name
    plan = make_plan(cfg)
    print_plan(plan)
    with CompileClock() as clock:
        StudyRunner(cfg, root, plan, evaluate=evaluator(cfg, progress=not args.quiet),
                    progress=not args.quiet).run()
    paths = report.write_report(cfg, root, plan)
    tables, _ = report.build_tables(plan, read_status(root))
    print()
    print(tables[0].markdown())
    total = time.perf_counter() - start
    print(f"report and figures: {root / 'report'} ({len(paths)} files); {total:.0f} s in all, of which "
          f"{clock.seconds:.0f} s compiling {clock.programs} XLA programs")
    return 0


COMMANDS = [Command("demo", "run the embedded mini study (builtin corpus, tiny Llama) and print its table",
                    _add_demo, _run_demo)]
