"""`maxprune train RUN_DIR`: pretrain, retrain or train from scratch to a token budget."""

from __future__ import annotations

from maxprune.commands import Command


def _add_train(parser) -> None:
    parser.add_argument("run_dir", metavar="RUN_DIR",
                        help="run directory: checkpoints, metrics and the final model dir; "
                             "an existing run resumes from its latest checkpoint")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def _run_train(args, cfg) -> int:
    import jax

    from maxprune.train import trainer

    result = trainer.train(cfg, args.run_dir, progress=not args.quiet)
    if jax.process_index() != 0:  # one report per job, not per host
        return 0
    if result.status == "stopped":
        print(f"stopped at step {result.steps} ({result.tokens_seen:,} tokens); "
              f"run the same command again to resume")
        return 0
    val = "" if result.validation_loss is None else f", validation loss {result.validation_loss:.4f}"
    loss = "" if result.final_loss is None else f", final loss {result.final_loss:.4f}"
    print(f"trained {result.steps} steps ({result.tokens_seen:,} tokens) at lr {result.lr:g}{loss}{val}")
    print(f"model dir: {result.model_dir}")
    return 0


COMMANDS = [Command("train", "train a model to a token budget (resumes an interrupted run)",
                    _add_train, _run_train)]
