"""`maxprune study plan|run|status|report`: the paper's token-matched comparisons as one command."""

from __future__ import annotations

from pathlib import Path

from maxprune.commands import Command
from maxprune.errors import MaxpruneError

ACTIONS = ("plan", "run", "status", "report")


def _add_study(parser) -> None:
    parser.add_argument("action", choices=ACTIONS, help="plan: list the runs; run: execute them; "
                        "status: show progress; report: write tables and figures")
    parser.add_argument("--root", default=None, help="study directory (default: runs/<study.name>)")
    parser.add_argument("--only", metavar="RUN", help="run just this run (its dependencies must be complete); "
                        "for pod launchers that run one run per job")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def study_root(args, cfg) -> Path:
    return Path(args.root) if args.root else Path("runs") / cfg.study.name


def _run_study(args, cfg) -> int:
    from maxprune.study import runner as runner_lib

    root = study_root(args, cfg)
    if args.action == "status":
        return _print_status(root)
    if args.action == "report":
        from maxprune.study import report
        paths = report.write_report(cfg, root)
        for path in paths:
            print(f"wrote {path}")
        return 0
    plan = runner_lib.make_plan(cfg)
    if args.action == "plan":
        print_plan(plan)
        return 0
    check_inputs(cfg, plan, args.only)
    from maxprune.study.evaluate import evaluator
    runner = runner_lib.StudyRunner(cfg, root, plan, evaluate=evaluator(cfg), progress=not args.quiet)
    runner.run(only=args.only)
    print(f"study {cfg.study.name}: {'run ' + args.only if args.only else 'all runs'} complete in {root}")
    return 0


def check_inputs(cfg, plan, only: str | None = None) -> None:
    """What `run` needs, checked before the study root is created: data, imported parents, the --only run."""
    from maxprune.convert.hf import arch_from_hf_config, read_hf_config
    from maxprune.model.model_dir import read_arch

    if only:
        plan[only]
    if not cfg.data.train:
        raise MaxpruneError("data.train is not set: give the prepared dataset the study trains on")
    for name, path in cfg.study.imported.items():
        try:
            if (Path(path) / "config.json").is_file():  # an HF checkpoint, converted when its run comes
                arch_from_hf_config(read_hf_config(Path(path)))
            else:
                read_arch(path)
        except MaxpruneError as e:
            raise MaxpruneError(f"study.imported.{name}: {e}") from None


def print_plan(plan) -> None:
    from maxprune.study.plan import fmt_tokens

    print(f"{'run':<44}{'kind':<9}{'params':>9}{'tokens':>9}  {'data':<14}{'PFLOPs':>10}  depends on")
    for run in plan.runs:
        params = "-" if run.arch is None else f"{run.arch.num_params(sparsity=run.sparsity) / 1e9:.2f}B" \
            if run.arch.num_params() > 1e8 else f"{run.arch.num_params(sparsity=run.sparsity) / 1e6:.2f}M"
        flops = run.flops(plan.seq_len) / 1e15
        print(f"{run.name:<44}{run.kind:<9}{params:>9}{fmt_tokens(run.tokens):>9}  {run.data_range or '-':<14}"
              f"{flops:>10.3g}  {', '.join(run.deps) or '-'}")
    train_tokens = plan.total_tokens(("pretrain", "retrain", "scratch"))
    prune_tokens = plan.total_tokens(("prune",))
    print(f"{len(plan.runs)} runs; {fmt_tokens(train_tokens)} training tokens, {fmt_tokens(prune_tokens)} "
          f"calibration/mask-learning tokens; {plan.total_flops() / 1e18:.3g} EFLOPs in total")
    print("data ranges: " + ", ".join(f"{k}={v}" for k, v in plan.budgets.items()))


def _print_status(root: Path) -> int:
    from maxprune.study.runner import read_status

    status = read_status(root)
    if not status.get("plan"):
        raise MaxpruneError(f"no study has run in {root} yet (no study.json)")
    runs = status["runs"]
    done = sum(1 for name in status["plan"] if runs.get(name, {}).get("status") == "complete")
    for name in status["plan"]:
        entry = runs.get(name, {})
        print(f"{name:<44}{entry.get('status', 'pending'):<10}{entry.get('seconds', ''):>8}")
    print(f"{done}/{len(status['plan'])} runs complete")
    return 0


COMMANDS = [Command("study", "plan, run, follow and report a pruning-vs-scratch study", _add_study, _run_study)]
