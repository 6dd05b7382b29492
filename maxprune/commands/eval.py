"""`maxprune eval`: perplexity, validation loss and the eight tasks into metrics.json; or compare runs."""

from __future__ import annotations

from maxprune.commands import Command
from maxprune.errors import MaxpruneError


def _add_eval(parser) -> None:
    parser.add_argument("model_dir", nargs="?", metavar="MODEL_DIR", help="model dir to evaluate")
    parser.add_argument("--tasks", metavar="A,B", help="comma-separated paper tasks, or 'none' "
                        "(default: eval.tasks, all eight)")
    parser.add_argument("--limit", type=int, metavar="N", help="first N documents of each task")
    parser.add_argument("--perplexity", metavar="A,B", help="comma-separated corpora (names or "
                        "NAME=SOURCE_SPEC), or 'none' (default: eval.perplexity.corpora)")
    parser.add_argument("--tokenizer", metavar="DIR", help="tokenizer dir or 'llama3' (default: the one the "
                        "model dir refers to)")
    parser.add_argument("--out", metavar="FILE", help="metrics file (default: RUN_DIR/metrics.json for a "
                        "run's model/, else MODEL_DIR/metrics.json)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing metrics file")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--compare", nargs="+", metavar="DIR", help="print metrics of runs side by side "
                        "(run dirs, model dirs or metrics.json files) instead of evaluating")
    parser.add_argument("--write-tasks", metavar="DIR", help="only write the offline task YAMLs into DIR, "
                        "for lm-eval's own CLI (--include_path DIR --tasks piqa_offline ...)")


def _run_eval(args, cfg) -> int:
    from maxprune.eval import summary
    if args.compare:
        paths = ([args.model_dir] if args.model_dir else []) + args.compare
        if len(paths) < 2:
            raise MaxpruneError("--compare needs at least two runs to compare")
        print(summary.compare([summary.read_metrics(p) for p in paths], paths))
        return 0
    if args.write_tasks:
        from pathlib import Path

        from maxprune.eval.tasks import write_offline_tasks
        names = write_offline_tasks(_names(args.tasks) or cfg.eval.tasks, Path(args.write_tasks),
                                    cfg.eval.task_data_dir)
        print(f"wrote {len(names)} task YAMLs to {args.write_tasks}: {' '.join(names)}")
        return 0
    if not args.model_dir:
        raise MaxpruneError("give a MODEL_DIR to evaluate, --compare DIR1 DIR2, or --write-tasks DIR")
    cfg = _with_flags(cfg, args)
    out = args.out or summary.default_output(args.model_dir)
    _check_out(out, args.overwrite)  # before a possibly long evaluation
    metrics = summary.evaluate(args.model_dir, cfg, progress=not args.no_progress)
    path = summary.write_metrics(metrics, out, overwrite=True)
    import jax
    if jax.process_index() == 0:  # every process of a multi-host job computed the same numbers
        _print_summary(metrics)
        print(f"wrote {path}")
    return 0


def _with_flags(cfg, args):
    """The config with --tasks/--limit/--perplexity/--tokenizer applied, validated again."""
    import ml_collections

    from maxprune.schema import validate
    flags = {"eval.tasks": _names(args.tasks), "eval.limit": args.limit,
             "eval.perplexity.corpora": _names(args.perplexity), "eval.tokenizer": args.tokenizer}
    if all(v is None for v in flags.values()):
        return cfg
    cfg = cfg.as_configdict()
    for key, value in flags.items():
        if value is not None:
            section, _, name = key.rpartition(".")
            node = cfg
            for part in section.split("."):
                node = node[part]
            node[name] = value
    validate(cfg)
    return ml_collections.FrozenConfigDict(cfg)


def _names(text: str | None) -> tuple[str, ...] | None:
    if text is None:
        return None
    return () if text.strip() == "none" else tuple(t.strip() for t in text.split(",") if t.strip())


def _check_out(out, overwrite: bool) -> None:
    from pathlib import Path
    if Path(out).exists() and not overwrite:
        raise MaxpruneError(f"{out} exists; pass --overwrite to replace it (or --out FILE)")


def _print_summary(metrics: dict) -> None:
    from maxprune.eval.tasks import PAPER_TASKS
    for name, r in metrics["perplexity"].items():
        print(f"{'ppl ' + name:28} {r['ppl']:10.3f}   {r['tokens']:,} tokens, {r['split'] or r['source']}")
    if metrics.get("validation"):
        v = metrics["validation"]
        print(f"{'validation loss':28} {v['loss']:10.4f}   {v['sequences']} x {v['seq_len']} of {v['data']}")
    for name, r in metrics["tasks"].items():
        other = "acc_norm" if r["metric"] == "acc" else "acc"
        extra = f", {other} {100 * r[other]:.1f}" if other in r else ""
        print(f"{PAPER_TASKS[name].label + ' (' + r['metric'] + ')':28} {100 * r['value']:10.1f}   "
              f"± {100 * r['std']:.1f}, N={r['n']} {r['split']}{extra}")
    avg = metrics.get("average")
    if avg and avg["value"] is not None:
        print(f"{'Avg (8 tasks)':28} {avg['value']:10.1f}   ± {avg['std']:.1f}")
    elif avg:
        print(f"{'mean of run tasks':28} {avg['mean_of_run_tasks']:10.1f}   (not the paper's Avg: "
              f"{len(avg['tasks'])} of 8 tasks)")


COMMANDS = [
    Command("eval", "evaluate a model dir (perplexity, validation loss, the eight zero-shot tasks) "
            "into metrics.json, or --compare runs", _add_eval, _run_eval),
]
