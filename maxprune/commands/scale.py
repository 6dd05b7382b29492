"""`maxprune compile` (AOT for a TPU slice) and `maxprune bench step` (step time of every pruned shape)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from maxprune.commands import Command


def _add_compile(parser) -> None:
    parser.add_argument("--topology", required=True, metavar="TYPE",
                        help="TPU accelerator type: v4-8 ... v4-4096, v5p-8 ..., v5e-N (v5litepod-N), v6e-N")
    parser.add_argument("--seq-len", type=int, default=None,
                        help="tokens per sequence (default: data.train's, else 2048)")
    parser.add_argument("--masks", action=argparse.BooleanOptionalAction, default=None,
                        help="compile with pruning masks (default: when train.init/masks_from has masks)")
    parser.add_argument("--json", metavar="FILE", help="also write the report as JSON")


def _run_compile(args, cfg) -> int:
    """Exit 0 if the step fits the chip's HBM, 1 if it compiles but does not fit."""
    from maxprune.train import aot

    report = aot.aot_compile(cfg, args.topology, seq_len=args.seq_len, masks=args.masks)
    print(report.format())
    if args.json:
        Path(args.json).write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    return 0 if report.fits else 1


def _add_bench(parser) -> None:
    parser.add_argument("what", choices=("step",), help="step: train-step time of the base and each pruned shape")
    parser.add_argument("--seq-len", type=int, default=2048, help="tokens per sequence (default: 2048, Table 9's)")
    parser.add_argument("--scale", type=float, default=1.0,
                        help="shrink hidden, FFN, head_dim and vocab by this factor (layer/head counts kept)")
    parser.add_argument("--variants", metavar="A,B", default=None,
                        help="only these (base always runs), e.g. minitron_depth-0.5,flap-0.5; default: all")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per variant (median reported)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps after compiling")
    parser.add_argument("--trace", metavar="DIR", help="also write a jax.profiler trace per variant under DIR")
    parser.add_argument("--out", metavar="DIR", default="bench_step",
                        help="where bench_step.md and bench_step.json go (default: ./bench_step)")


def _run_bench(args, cfg) -> int:
    import jax

    from maxprune.train import bench

    say = print if jax.process_index() == 0 else (lambda *a, **k: None)
    report = bench.bench_step(cfg, seq_len=args.seq_len, scale=args.scale, names=args.variants,
                              steps=args.steps, warmup=args.warmup, trace_dir=args.trace, progress=say)
    md, js = bench.write_report(report, args.out)
    say(bench.to_markdown(report))
    say(f"wrote {md} and {js}")
    return 0


COMMANDS = [
    Command("compile", "compile the train step ahead of time for a TPU slice: HBM per device, FLOPs, fits?",
            _add_compile, _run_compile, multihost=False),
    Command("bench", "bench step: time the train step of the base model and each pruned shape (Table 9)",
            _add_bench, _run_bench),
]
