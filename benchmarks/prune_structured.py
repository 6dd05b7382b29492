"""Structured pruning cost: time, peak memory and forward passes of Minitron-D/W, FLAP and the search.

Side by side, each against the way a straightforward implementation does it,
on the same model, tokens and machine:

- Minitron-depth (loss): one sweep per chunk sharing the prefix states, vs
  brute force (slice out each block, run the whole model);
- the architecture search: score once and slice per candidate, vs re-running
  the statistics pass for every candidate;
- FLAP statistics over chunks of 8 sequences (exact, see maxprune/prune/structured/flap.py)
  vs one sequence per forward, as the reference does.

Each measurement runs in its own process (so peak RSS / device memory is its
own), twice: cold (with compilation) and warm. "forwards" counts full-model
forward passes over the calibration set (decoder-layer applications / layers,
plus the candidates' forwards of a search).

    python benchmarks/prune_structured.py            # vocab 8192, hidden 512, 8 layers, 16 x 256 tokens
    python benchmarks/prune_structured.py --quick
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from common import write_result

RESULTS = Path(__file__).parent / "results" / "prune_structured.json"
PRESETS = {
    "small": dict(vocab=8192, hidden=512, layers=8, heads=8, kv_heads=4, ffn=1536, samples=16, seq=256),
    "quick": dict(vocab=512, hidden=64, layers=4, heads=4, kv_heads=2, ffn=192, samples=8, seq=32),
}
# name -> (method, config overrides, runner, the case it is the straightforward peer of)
CASES = {
    "minitron_depth": ("minitron_depth", [], "prune", None),
    "minitron_depth brute force": ("minitron_depth", [], "brute_depth", "minitron_depth"),
    "minitron_depth block_influence": ("minitron_depth", ["minitron_depth.criterion=block_influence"], "prune", None),
    "minitron_width": ("minitron_width", [], "prune", None),
    "minitron_width search": ("minitron_width", ["search.enabled=True"], "prune", None),
    "minitron_width search, rescoring": ("minitron_width", [], "naive_search", "minitron_width search"),
    "flap": ("flap", [], "prune", None),
    "flap, one sequence per forward": ("flap", ["batch_size=1"], "prune", "flap"),
    "flap search": ("flap", ["search.enabled=True"], "prune", None),
    "flap search, rescoring": ("flap", [], "naive_search", "flap search"),
}
BATCH = 8


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="small")
    p.add_argument("--quick", action="store_true", help="the quick preset")
    p.add_argument("--ratio", type=float, default=0.5)
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--one", help=argparse.SUPPRESS)  # child process: run one case, print JSON
    args = p.parse_args(argv)
    if args.quick:
        args.preset = "quick"
    return args


# ----------------------------------------------------------------- one case
def setup(preset: dict):
    from common import random_params

    from maxprune.model.arch import Arch

    arch = Arch(vocab_size=preset["vocab"], hidden_size=preset["hidden"], num_layers=preset["layers"],
                num_heads=preset["heads"], num_kv_heads=preset["kv_heads"],
                head_dim=preset["hidden"] // preset["heads"], ffn_size=preset["ffn"],
                max_position_embeddings=max(2048, preset["seq"]))
    tokens = np.random.default_rng(0).integers(0, arch.vocab_size, (preset["samples"], preset["seq"]), dtype=np.int32)
    return arch, random_params(arch), tokens


def run_case(name: str, preset: dict, ratio: float) -> dict:
    from maxprune.prune import api
    from maxprune.prune.engine.options import run_options
    from maxprune.schema import load_config

    method, overrides, runner, _ = CASES[name]
    arch, params, tokens = setup(preset)
    cfg = load_config(None, [f"--config.prune.method={method}", f"--config.prune.ratio={ratio}",
                                    f"--config.prune.batch_size={BATCH}"]
                             + [f"--config.prune.{o}" for o in overrides]).prune
    fn = {"prune": api.prune, "brute_depth": brute_depth, "naive_search": naive_search}[runner]
    times, result = [], None
    with run_options(dtype="float32", progress=False):
        for _ in range(2):  # cold (compiles), warm
            start = time.perf_counter()
            result = fn(params, arch, tokens, cfg)
            _block(result)
            times.append(time.perf_counter() - start)
    chunks = -(-tokens.shape[0] // cfg.batch_size)
    return {"cold_s": times[0], "warm_s": times[1], "forwards": forwards(result, arch, chunks),
            "arch": {k: getattr(result.arch, k) for k in ("num_layers", "hidden_size", "num_heads", "ffn_size")},
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, **device_peak()}


def forwards(result, arch, chunks: int) -> float:
    """Full-model forward passes over the calibration set that one run of the case needs."""
    report = result.report
    if "forwards" in report:  # the peers count their own
        return report["forwards"]
    if "layer_applications" in report.get("summary", {}):  # depth: decoder-layer applications
        return report["summary"]["layer_applications"] / arch.num_layers / chunks
    return 1.0 + report.get("search", {}).get("forward_passes", 0)  # a statistics pass (+ candidates)


def _block(result):
    import jax
    jax.block_until_ready(result.params)


def device_peak() -> dict:
    import jax
    stats = jax.devices()[0].memory_stats() or {}
    return {"device_peak_mb": stats["peak_bytes_in_use"] / 2**20} if "peak_bytes_in_use" in stats else {}


# ------------------------------------------------------------------- peers
def brute_depth(params, arch, tokens, cfg):
    """Every block removed in turn and the whole pruned model run: (L−k+1)(L−k) layer applications."""
    from maxprune.prune.api import PruneResult
    from maxprune.prune.engine.options import options_for
    from maxprune.prune.structured import search, shapes
    from maxprune.prune.structured.surgery import Keep, slice_model

    k = arch.num_layers - shapes.depth_layers_kept(arch, cfg.ratio, cfg.minitron_depth.ratio_of)
    options = options_for(cfg)
    losses = []
    for i in range(arch.num_layers - k + 1):
        kept = np.array([j for j in range(arch.num_layers) if not i <= j < i + k])
        pruned, small, _ = slice_model(params, arch, Keep(layers=kept))
        losses.append(search.calibration_loss(pruned, small, tokens, options))
    best = int(np.argmin(losses))
    kept = np.array([j for j in range(arch.num_layers) if not best <= j < best + k])
    pruned, small, _ = slice_model(params, arch, Keep(layers=kept))
    return PruneResult(pruned, small, None, {"forwards": len(losses) * (arch.num_layers - k) / arch.num_layers})


def naive_search(params, arch, tokens, cfg):
    """The search as a loop of whole prunes: statistics recomputed for every candidate shape."""
    from maxprune.prune import api
    from maxprune.prune.engine.options import options_for
    from maxprune.prune.structured import search, shapes
    from maxprune.schema import load_config

    options = options_for(cfg)
    if cfg.method == "minitron_width":
        candidates = shapes.minitron_width_candidates(arch, cfg.ratio)
        shape = lambda a: [f"minitron_width.hidden_size={a.hidden_size}", f"minitron_width.ffn_size={a.ffn_size}"]
    else:
        candidates = shapes.kv_group_candidates(arch, cfg.ratio)
        shape = lambda a: [f"flap.num_heads={a.num_heads}", f"flap.ffn_size={a.ffn_size}"]
    best, best_loss = None, np.inf
    for candidate in candidates:
        overrides = [f"method={cfg.method}", f"ratio={cfg.ratio}", f"batch_size={cfg.batch_size}", *shape(candidate)]
        one = load_config(None, [f"--config.prune.{o}" for o in overrides]).prune
        result = api.prune(params, arch, tokens, one)
        loss = search.calibration_loss(result.params, result.arch, tokens, options)
        if loss < best_loss:
            best, best_loss = result, loss
    best.report["forwards"] = 2.0 * len(candidates)  # a statistics pass and a loss forward each
    return best


# -------------------------------------------------------------------- main
def main(argv=None) -> dict:
    args = parse_args(argv)
    preset = PRESETS[args.preset]
    if args.one:
        print(json.dumps(run_case(args.one, preset, args.ratio)))
        return {}
    from common import machine

    results = {}
    for name in CASES:
        cmd = [sys.executable, __file__, "--preset", args.preset, "--ratio", str(args.ratio), "--one", name]
        out = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).parent)
        if out.returncode:
            raise SystemExit(f"{name} failed:\n{out.stderr[-3000:]}")
        results[name] = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"{name:36} cold {results[name]['cold_s']:7.2f} s  warm {results[name]['warm_s']:7.2f} s  "
              f"forwards {results[name]['forwards']:5.2f}  peak RSS {results[name]['peak_rss_mb']:7.0f} MB", flush=True)
    ratios = {}
    for name, (*_, peer_of) in CASES.items():
        if peer_of:
            ratios[f"{peer_of} vs {name}"] = {
                "warm_speedup": results[name]["warm_s"] / results[peer_of]["warm_s"],
                "cold_speedup": results[name]["cold_s"] / results[peer_of]["cold_s"],
                "forwards": [results[peer_of]["forwards"], results[name]["forwards"]]}
    print()
    for key, r in ratios.items():
        print(f"{key:70} {r['warm_speedup']:5.2f}x warm, {r['cold_speedup']:5.2f}x cold, "
              f"forwards {r['forwards'][0]:.2f} vs {r['forwards'][1]:.2f}")
    record = {"benchmark": "prune_structured", "preset": args.preset, "config": preset, "ratio": args.ratio,
              "results": results, "speedups": ratios, "machine": machine()}
    write_result(args.out, record)
    return record


if __name__ == "__main__":
    main()
