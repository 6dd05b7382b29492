"""`maxprune prune`: parent model dir + calibration tokens → pruned model dir (any method)."""

from __future__ import annotations

from maxprune.commands import Command


def _add_prune(parser) -> None:
    parser.add_argument("--overwrite", action="store_true", help="replace prune.output if it exists")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def _run_prune(args, cfg) -> int:
    import json

    from maxprune.model.model_dir import read_provenance
    from maxprune.prune import run
    from maxprune.prune.sparse import report

    path = run.prune_model_dir(cfg, overwrite=args.overwrite, progress=not args.quiet)
    provenance = read_provenance(path)
    print(f"{cfg.prune.method}: wrote {path} (calibration {provenance.get('calibration_tokens', 0):,} tokens)")
    summary = provenance.get("report") or {}
    lines = report.format_summary(summary) if summary else [json.dumps(summary)]
    print("\n".join(lines))
    print(f"full report: {path / run.REPORT_FILE}")
    return 0


COMMANDS = [Command("prune", "prune a model dir (method, pattern and ratio from the config)",
                    _add_prune, _run_prune)]
