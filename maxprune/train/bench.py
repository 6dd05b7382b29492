"""Train-step profiling of the base model and every pruned shape: the paper's Table 9, measured.

`variants(base)` derives the pruned shapes from a base Arch with the ratios of
the paper's Table 1 (read from its CSV, relative to Llama-3.1-8B):

- Minitron depth: layers x 16/32, 8/32, 4/32, 2/32;
- Minitron width: hidden and FFN sizes x Table 1's ratios (heads kept);
- FLAP: 5 of 8 KV groups (20 of 32 heads) and FFN x 6656/14336;
- Sheared LLaMA: hidden and FFN x 3456/4096, 7552/14336;
- Wanda / SparseGPT: the base shape under 50 % masks (what TPUs run: masked dense).

`scale_arch(arch, s)` shrinks the widths (hidden, FFN, head_dim, vocab) by `s`
for small hardware and keeps layer and head counts, so every ratio above stays
exact. `bench_step` times the real jitted train step
(`maxprune.train.step.make_train_step`, sharded like the trainer's, donated
state) on random tokens for each variant and reports step time, tokens/s, MFU,
the measured speed-up over the base, and beside it the analytic forward FLOPs
(`Arch.forward_flops`, Table 9's convention) and the paper's TPU v4 numbers.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from maxprune import sharding
from maxprune.errors import MaxpruneError
from maxprune.model import masks as masks_lib
from maxprune.model.arch import Arch
from maxprune.model.schema import arch_from_config
from maxprune.train import build
from maxprune.train import metrics as metrics_lib
from maxprune.train.setup import init_sharded
from maxprune.train.step import init_state

PAPER_TABLES = Path(__file__).parents[1] / "study" / "paper_tables"
SPARSE_METHODS = ("wanda", "sparsegpt")


@dataclasses.dataclass(frozen=True)
class Variant:
    name: str  # e.g. "minitron_depth-0.5"
    method: str  # Table 1's method; "sparse" for Wanda/SparseGPT
    ratio: float
    arch: Arch
    sparsity: float = 0.0  # masked fraction of the seven prunable kernels

    def forward_flops(self, seq_len: int) -> float:
        """Table 9's convention: full attention; sparse models count non-zero weights only."""
        removed = 2.0 * seq_len * self.arch.num_prunable_params() * self.sparsity
        return self.arch.forward_flops(seq_len) - removed


def _read_csv(name: str) -> list[dict[str, str]]:
    with open(PAPER_TABLES / name, newline="") as f:
        return list(csv.DictReader(f))


def paper_table9() -> dict[str, dict[str, float]]:
    """variant name -> {"forward_tflops_seq2048", "training_speedup_tpu_v4"} from Table 9."""
    out = {}
    for row in _read_csv("table09_efficiency.csv"):
        method, ratio = row["method"], float(row["sparsity"])  # Table 9's "sparsity" is the pruning ratio
        if method == "base":
            name = "base"
        elif method.split("_")[0] in SPARSE_METHODS:  # wanda/sparsegpt, unstructured and 2:4: one shape
            name = f"sparse-{ratio:g}"
        else:
            name = f"{method}-{ratio:g}"
        out.setdefault(name, {"forward_tflops_seq2048": float(row["forward_tflops_seq2048"]),
                              "training_speedup_tpu_v4": float(row["training_speedup_tpu_v4"])})
    return out


def variants(base: Arch) -> list[Variant]:
    """The base and each Table 1 shape, derived from `base` with Table 1's ratios."""
    rows = _read_csv("table01_architectures.csv")
    ref = rows[0]
    assert ref["method"] == "base"
    ratio = lambda row, key: int(row[key]) / int(ref[key])  # noqa: E731
    out, seen = [], set()
    for row in rows:
        method, prune_ratio = row["method"], float(row["pruning_ratio"])
        if method == "base":
            out.append(Variant("base", "base", 0.0, base))
            continue
        if method in SPARSE_METHODS:
            name = f"sparse-{prune_ratio:g}"
            if name not in seen:
                out.append(Variant(name, "sparse", prune_ratio, base, sparsity=float(row["sparsity"])))
                seen.add(name)
            continue
        kv_heads = max(1, round(base.num_kv_heads * ratio(row, "num_attention_heads")))
        arch = base.replace(
            num_layers=max(1, round(base.num_layers * ratio(row, "num_layers"))),
            hidden_size=max(1, round(base.hidden_size * ratio(row, "hidden_size"))),
            ffn_size=max(1, round(base.ffn_size * ratio(row, "ffn_size"))),
            num_kv_heads=kv_heads, num_heads=kv_heads * base.group_size)
        out.append(Variant(f"{method}-{prune_ratio:g}", method, prune_ratio, arch))
    return out


def scale_arch(arch: Arch, scale: float) -> Arch:
    """`arch` with hidden, FFN, head_dim and vocab sizes times `scale`; layer and head counts kept."""
    if not 0 < scale <= 1:
        raise MaxpruneError(f"--scale={scale} must be in (0, 1]")
    if scale == 1:
        return arch
    return arch.replace(hidden_size=max(8, round(arch.hidden_size * scale)),
                        ffn_size=max(8, round(arch.ffn_size * scale)),
                        head_dim=max(2, 2 * round(arch.head_dim * scale / 2)),
                        vocab_size=max(64, round(arch.vocab_size * scale)))


def select(all_variants: list[Variant], names: str | None) -> list[Variant]:
    """The variants named in a comma list (the base is always measured first)."""
    if not names:
        return all_variants
    by_name = {v.name: v for v in all_variants}
    wanted = [n.strip() for n in names.split(",") if n.strip()]
    unknown = [n for n in wanted if n not in by_name]
    if unknown:
        raise MaxpruneError(f"unknown variant(s) {unknown}; valid: {', '.join(by_name)}")
    return [by_name["base"]] + [by_name[n] for n in wanted if n != "base"]


# --------------------------------------------------------------- measure
def measure(variant: Variant, cfg, mesh, *, seq_len: int, global_batch: int, steps: int, warmup: int,
            seed: int = 0, trace_dir: Path | None = None) -> dict[str, Any]:
    """Compile and time `variant`'s train step; returns step times (s) and compile time."""


    arch = variant.arch
    optimizer, schedule = build.optimizer_and_schedule(cfg.train, 1000)  # shapes do not depend on the length
    key_params, key_masks, key_tokens = jax.random.split(jax.random.key(seed), 3)
    batch_sh = sharding.batch_sharding(mesh)
    with sharding.use_mesh(mesh):
        params = init_sharded(arch, key_params, mesh)
        masks, masks_sh = None, None
        if variant.sparsity:
            shapes = {k: masks_lib.get_kernel(params, *k).shape for k in masks_lib.PRUNABLE}
            abstract = masks_lib.from_kernels({k: jax.ShapeDtypeStruct(s, jnp.bool_) for k, s in shapes.items()})
            masks_sh = sharding.tree_shardings(abstract, mesh)
            draw = lambda key: masks_lib.from_kernels(  # noqa: E731
                {k: jax.random.bernoulli(jax.random.fold_in(key, i), 1.0 - variant.sparsity, s)
                 for i, (k, s) in enumerate(shapes.items())})
            masks = jax.jit(draw, out_shardings=masks_sh)(key_masks)
            params = masks_lib.apply_masks(params, masks)
        state = init_state(params, optimizer)
        state_sh = sharding.tree_shardings(state, mesh)
        state = jax.device_put(state, state_sh)
        tokens = jax.jit(lambda k: jax.random.randint(k, (global_batch, seq_len), 0, arch.vocab_size, jnp.int32),
                         out_shardings=batch_sh)(key_tokens)
        step = build.build_step(cfg, arch, mesh, state, optimizer, schedule, masks=masks)
        start = time.perf_counter()
        compiled = step.fn.lower(state, tokens, masks, None).compile()
        compile_s = time.perf_counter() - start

        def one_step(state):
            state, metrics = compiled(state, tokens, masks, None)
            return jax.block_until_ready((state, metrics))[0]

        for _ in range(warmup):
            state = one_step(state)
        times = []
        for _ in range(steps):
            start = time.perf_counter()
            state = one_step(state)
            times.append(time.perf_counter() - start)
        if trace_dir is not None:
            with jax.profiler.trace(str(trace_dir / variant.name)):
                for _ in range(2):
                    state = one_step(state)
    return {"step_times_s": times, "compile_s": compile_s}


def bench_step(cfg, *, seq_len: int = 2048, scale: float = 1.0, names: str | None = None,
               steps: int = 5, warmup: int = 2, trace_dir: str | Path | None = None,
               progress=print) -> dict[str, Any]:
    """Measure every variant of the config's model; the report as a JSON-able dict."""


    if steps < 1 or warmup < 0:
        raise MaxpruneError(f"--steps={steps} must be >= 1 and --warmup={warmup} >= 0")
    base = scale_arch(arch_from_config(cfg), scale)
    if not 2 <= seq_len <= base.max_position_embeddings:
        raise MaxpruneError(f"--seq-len={seq_len} must be in [2, {base.max_position_embeddings}]")
    chosen = select(variants(base), names)
    mesh = sharding.make_mesh(cfg.mesh)
    dp = mesh.shape["data"] * mesh.shape["fsdp"]
    batch = cfg.train.global_batch
    if batch % dp or batch % cfg.train.microbatches:
        raise MaxpruneError(f"train.global_batch={batch} must be divisible by the data-parallel size "
                            f"data x fsdp = {dp} and by train.microbatches={cfg.train.microbatches}")
    peak, peak_source = metrics_lib.device_peak()
    device = jax.devices()[0]
    paper = paper_table9()
    trace = Path(trace_dir) if trace_dir else None
    rows = []
    for variant in chosen:
        progress(f"{variant.name}: compiling and timing {warmup} + {steps} steps ...")
        timing = measure(variant, cfg, mesh, seq_len=seq_len, global_batch=batch, steps=steps,
                         warmup=warmup, seed=cfg.seed, trace_dir=trace)
        step_s = statistics.median(timing["step_times_s"])
        tokens_per_s = batch * seq_len / step_s
        a = variant.arch
        rows.append({
            "variant": variant.name, "method": variant.method, "ratio": variant.ratio,
            "sparsity": variant.sparsity, "arch": a.to_dict(),
            "params": a.num_params(sparsity=variant.sparsity),
            "forward_flops": variant.forward_flops(seq_len),
            "step_s": step_s, "step_times_s": timing["step_times_s"], "compile_s": timing["compile_s"],
            "tokens_per_s": tokens_per_s,
            "mfu": metrics_lib.mfu(tokens_per_s, a.train_flops_per_token(seq_len), mesh.devices.size, peak),
            "paper_forward_tflops_seq2048": paper.get(variant.name, {}).get("forward_tflops_seq2048"),
            "paper_speedup_tpu_v4": paper.get(variant.name, {}).get("training_speedup_tpu_v4"),
        })
    base_row = rows[0]
    paper_base = paper["base"]["forward_tflops_seq2048"]
    for row in rows:
        row["speedup"] = base_row["step_s"] / row["step_s"]
        row["flops_ratio"] = base_row["forward_flops"] / row["forward_flops"]
        tf = row["paper_forward_tflops_seq2048"]
        row["paper_flops_ratio"] = paper_base / tf if tf else None
    return {
        "benchmark": "bench_step", "base_preset": cfg.model.preset, "scale": scale, "seq_len": seq_len,
        "global_batch": batch, "microbatches": cfg.train.microbatches, "dtype": cfg.model.dtype,
        "remat": cfg.model.remat, "attention": cfg.model.attention, "steps": steps, "warmup": warmup,
        "mesh": dict(mesh.shape), "device": {
            "platform": device.platform, "kind": device.device_kind, "count": mesh.devices.size,
            "processes": jax.process_count(), "peak_flops_per_device": peak, "peak_source": peak_source,
            "host": platform.node(), "jax": jax.__version__},
        "rows": rows,
    }


def to_markdown(report: dict[str, Any]) -> str:
    """A Table 9-style Markdown table of a `bench_step` report."""
    d = report["device"]
    scaled = "" if report["scale"] == 1 else f", widths x{report['scale']:g}"
    lines = [
        f"# Train-step speed of pruned shapes ({report['base_preset']}{scaled})",
        "",
        f"{d['count']} x {d['kind']} ({d['platform']}, {d['processes']} process(es)); global batch "
        f"{report['global_batch']} x seq {report['seq_len']}, {report['dtype']}, remat {report['remat']}; "
        f"median of {report['steps']} steps after {report['warmup']} warm-up. MFU against "
        f"{d['peak_flops_per_device'] / 1e12:.3g} TFLOP/s per device ({d['peak_source']}), dense FLOPs. "
        f"Forward FLOPs per sequence as in Table 9 (full attention; sparse: non-zeros only). "
        f"Paper columns: Table 9, Llama-3.1-8B at seq 2048 on TPU v4.",
        "",
        "| variant | layers | hidden | ffn | heads (kv) | params | fwd FLOPs | FLOPs ratio (paper) "
        "| step ms | tokens/s | MFU | speed-up | paper TPU v4 |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in report["rows"]:
        a = r["arch"]
        paper_ratio = "" if r["paper_flops_ratio"] is None else f" ({r['paper_flops_ratio']:.2f})"
        paper_speed = "" if r["paper_speedup_tpu_v4"] is None else f"{r['paper_speedup_tpu_v4']:.1f}x"
        lines.append(
            f"| {r['variant']} | {a['num_layers']} | {a['hidden_size']} | {a['ffn_size']} | "
            f"{a['num_heads']} ({a['num_kv_heads']}) | {_count(r['params'], giga='B')} | "
            f"{_count(r['forward_flops'])} | "
            f"{r['flops_ratio']:.2f}{paper_ratio} | {1e3 * r['step_s']:.1f} | {r['tokens_per_s']:,.0f} | "
            f"{100 * r['mfu']:.1f}% | {r['speedup']:.2f}x | {paper_speed} |")
    return "\n".join(lines) + "\n"


def write_report(report: dict[str, Any], out_dir: str | Path) -> tuple[Path, Path]:
    """`out_dir/bench_step.{md,json}` (process 0 only in a multi-host job)."""

    out = Path(out_dir)
    md, js = out / "bench_step.md", out / "bench_step.json"
    if jax.process_index() == 0:
        out.mkdir(parents=True, exist_ok=True)
        md.write_text(to_markdown(report))
        js.write_text(json.dumps(report, indent=2) + "\n")
    return md, js


def _count(n: float, giga: str = "G") -> str:
    """3 significant digits with a unit: 8.03 B (params, giga="B"), 32.9 T (FLOPs)."""
    for unit, size in (("T", 1e12), (giga, 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return f"{n:g}"
