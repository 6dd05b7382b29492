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
    parser.add_argument("--show", metavar="RUN", help="plan: print the fully resolved config RUN will execute")
    parser.add_argument("--resolved", action="store_true", help="plan: one table of every prune run's target "
                        "shape and calibration")


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
        if args.show:
            print_run(runner_lib.StudyRunner(cfg, root, plan, progress=False), plan[args.show])
        elif args.resolved:
            print_resolved(plan)
        else:
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
    if cfg.study.require_validation and not (cfg.data.validation or cfg.eval.validation):
        raise MaxpruneError("data.validation is not set, and study.require_validation asks for the paper's "
                            "validation-loss column: give a prepared held-out set (e.g. DCLM sequences kept out of "
                            "data.train), or set study.require_validation=False")
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
        params = _params(run.arch, run.sparsity)
        flops = run.flops(plan.seq_len) / 1e15
        print(f"{run.name:<44}{run.kind:<9}{params:>9}{fmt_tokens(run.tokens):>9}  {run.data_range or '-':<14}"
              f"{flops:>10.3g}  {', '.join(run.deps) or '-'}")
    train_tokens = plan.total_tokens(("pretrain", "retrain", "scratch"))
    prune_tokens = plan.total_tokens(("prune",))
    print(f"{len(plan.runs)} runs; {fmt_tokens(train_tokens)} training tokens, {fmt_tokens(prune_tokens)} "
          f"calibration/mask-learning tokens; {plan.total_flops() / 1e18:.3g} EFLOPs in total")
    print("data ranges: " + ", ".join(f"{k}={v}" for k, v in plan.budgets.items()))
    merged = [r for r in plan.runs if len(r.extra.get("roles", ())) > 1]
    for run in merged:
        roles = " and ".join(f"{b} of N={fmt_tokens(n)}" for b, n in run.extra["roles"])
        print(f"{run.name} is one run serving as {roles} (data {run.data_range}; study.merge_scratch=False "
              f"plans them apart)")


def _params(arch, sparsity: float = 0.0) -> str:
    if arch is None:
        return "-"
    n = arch.num_params(sparsity=sparsity)
    return f"{n / 1e9:.2f}B" if n > 1e8 else f"{n / 1e6:.2f}M"


def describe_shape(arch, sparsity: float = 0.0) -> str:
    if arch is None:
        return "decided by the architecture search when the run executes"
    return (f"{arch.num_layers} layers, hidden {arch.hidden_size}, {arch.num_heads} heads / {arch.num_kv_heads} KV, "
            f"head_dim {arch.head_dim}, FFN {arch.ffn_size}, {_params(arch, sparsity)} params"
            + (f" ({100 * sparsity:g} % sparse)" if sparsity else ""))


def print_resolved(plan) -> None:
    """Every prune run's target shape and calibration, one line each."""
    print(f"{'prune run':<38}{'layers':>7}{'hidden':>7}{'heads':>7}{'kv':>4}{'ffn':>7}{'params':>9}  "
          f"{'shape from':<10}{'calibration':>14}  sampling  source")
    for run in (r for r in plan.runs if r.kind == "prune"):
        p, a = run.extra["config"].prune, run.arch
        dims = ("-",) * 5 if a is None else (a.num_layers, a.hidden_size, a.num_heads, a.num_kv_heads, a.ffn_size)
        calib = f"{p.n_samples}x{p.seq_len or plan.seq_len}"
        if run.extra["mask_learning_tokens"]:
            calib += f"+{run.extra['mask_learning_tokens'] / 1e9:.2f}B"
        print(f"{run.name:<38}" + "".join(f"{d:>{w}}" for d, w in zip(dims, (7, 7, 7, 4, 7)))
              + f"{_params(a, run.sparsity):>9}  {run.extra['shape_from']:<10}{calib:>14}  "
              + f"{p.calibration_sampling:<8}  "
              f"{p.calibration or '-'}")


def print_run(runner, run) -> None:
    """What `run` executes: its place in the plan, shape, calibration or schedule, evaluation, and whole config."""
    cfg = runner.run_config(run) if run.kind != "import" else runner.cfg
    print(f"run: {run.name} ({run.kind}); depends on: {', '.join(run.deps) or '-'}")
    print(f"shape: {describe_shape(run.arch, run.sparsity)}")
    if run.kind == "prune":
        p = cfg.prune
        print(f"method: {run.variant.label} at {p.ratio:g}; settings: {run.extra['settings']}; shape from: "
              f"{run.extra['shape_from']}")
        print(f"calibration: {p.n_samples} x {p.seq_len or runner.plan.seq_len} tokens, {p.calibration_sampling} "
              f"windows of {p.calibration} (from {run.extra['calibration_from']})"
              + (f"; mask learning {run.extra['mask_learning_tokens']:,} tokens" if run.extra["mask_learning_tokens"]
                 else ""))
        if run.extra["pinned"]:  # what the pruner sets from Table 1 for this parent
            from maxprune.schema import override
            cfg = override(cfg, {f"prune.{p.method}.{k}": v for k, v in run.extra["pinned"].items()})
            print("Table 1 shape keys (set when the pruner sees the parent): " +
                  ", ".join(f"prune.{p.method}.{k}={v}" for k, v in run.extra["pinned"].items()))
        sections = ("model", "prune")
    elif run.kind in ("pretrain", "retrain", "scratch"):
        from maxprune.study.plan import fmt_tokens
        t = cfg.train
        steps = run.tokens // (t.global_batch * runner.plan.seq_len)
        roles = run.extra.get("roles")
        print(f"data: {run.data_range} = {runner.plan.budgets.get(run.data_range, ':')}; {fmt_tokens(run.tokens)} "
              f"tokens = {steps} steps of {t.global_batch} x {runner.plan.seq_len}"
              + (f"; serves as {', '.join(f'{b} (N={fmt_tokens(n)})' for b, n in roles)}" if roles else ""))
        sweep = f"LR sweep {list(t.lr_sweep)} on {t.sweep_fraction:g} of the steps ({t.sweep_schedule} schedule)" \
            if t.lr_sweep else f"lr {t.lr:g}"
        print(f"schedule: {sweep}; warmup {t.warmup_ratio:g}, cosine to {t.min_lr_ratio:g}; init "
              f"{t.init or t.masks_from and f'random under the masks of {t.masks_from}' or 'random'}"
              + (f"; teacher {t.teacher}" if t.teacher else ""))
        sections = ("model", "data", "train")
    else:
        sections = ()
    e = cfg.eval
    print(f"evaluation: tasks {', '.join(e.tasks) or '-'} ({e.task_source}); perplexity "
          f"{', '.join(e.perplexity.corpora) or '-'} ({e.perplexity.split} split, {e.perplexity.n_seqs} x "
          f"{e.perplexity.seq_len}); validation {cfg.data.validation or e.validation or '-'}")
    for name in sections:
        print(f"\n[{name}]")
        print(str(cfg[name]).rstrip())


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
