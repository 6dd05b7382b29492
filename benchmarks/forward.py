"""Forward throughput: maxprune (jit, fp32 and bf16) vs transformers LlamaForCausalLM (torch fp32).

Both run the same weights (exported with `maxprune.convert.hf.to_hf`) on the
same tokens, on this machine. Prints a side-by-side table and writes
benchmarks/results/forward.json with the machine's description.

    python benchmarks/forward.py            # default small Llama
    python benchmarks/forward.py --quick    # tiny shapes, seconds
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers
from common import machine, random_params, time_runs, write_result

from maxprune.convert import hf
from maxprune.model import llama
from maxprune.model.arch import Arch
from maxprune.model.model_dir import save_model_dir

RESULTS = Path(__file__).parent / "results" / "forward.json"
QUICK = dict(vocab=512, hidden=64, layers=2, heads=4, kv_heads=2, ffn=192, seq=64, batch=2,
             warmup=1, repeats=3)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--ffn", type=int, default=1536)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5, help="timed runs; the median is reported")
    p.add_argument("--quick", action="store_true", help="tiny shapes and few repeats (smoke run)")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    if args.quick:
        vars(args).update(QUICK)
    return args


def maxprune_runner(params, arch: Arch, tokens_BL: np.ndarray, dtype: str):
    options = llama.ModelOptions(dtype=dtype)
    forward = jax.jit(lambda p, t: llama.forward(p, t, arch, options=options))
    params, tokens = jax.device_put(params), jnp.asarray(tokens_BL)
    return lambda: forward(params, tokens).block_until_ready()


def torch_runner(hf_dir: Path, tokens_BL: np.ndarray):
    model = transformers.LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    tokens = torch.as_tensor(tokens_BL, dtype=torch.long)

    def run():
        with torch.no_grad():
            return model(tokens).logits

    return run


def main(argv=None) -> dict:
    args = parse_args(argv)
    arch = Arch(vocab_size=args.vocab, hidden_size=args.hidden, num_layers=args.layers,
                num_heads=args.heads, num_kv_heads=args.kv_heads, head_dim=args.hidden // args.heads,
                ffn_size=args.ffn, max_position_embeddings=max(args.seq, 2048))
    params = random_params(arch)
    rng = np.random.default_rng(1)
    tokens_BL = rng.integers(0, arch.vocab_size, (args.batch, args.seq), dtype=np.int32)
    runners = {}
    with tempfile.TemporaryDirectory() as tmp:
        save_model_dir(Path(tmp) / "md", arch, params)
        hf_dir = hf.to_hf(Path(tmp) / "md", Path(tmp) / "hf", dtype="float32")
        runners["transformers torch fp32"] = torch_runner(hf_dir, tokens_BL)
    runners["maxprune jax fp32"] = maxprune_runner(params, arch, tokens_BL, "float32")
    runners["maxprune jax bf16"] = maxprune_runner(params, arch, tokens_BL, "bfloat16")

    # Same weights, same tokens: the fp32 logits must agree before timing means anything.
    ref = runners["transformers torch fp32"]().numpy()
    ours = np.asarray(llama.forward(params, jnp.asarray(tokens_BL), arch,
                                    options=llama.ModelOptions(dtype="float32")))
    max_abs_diff = float(np.abs(ref - ours).max())

    tokens_per_call = args.batch * args.seq
    results = {}
    for name, run in runners.items():
        times = time_runs(run, args.warmup, args.repeats)
        median = statistics.median(times)
        results[name] = {"median_s": median, "times_s": times, "tokens_per_s": tokens_per_call / median}
    baseline = results["transformers torch fp32"]["tokens_per_s"]
    for r in results.values():
        r["vs_torch_fp32"] = r["tokens_per_s"] / baseline

    print(f"forward, batch {args.batch} x seq {args.seq}, {arch.num_params() / 1e6:.1f} M params, "
          f"median of {args.repeats} after {args.warmup} warmup; fp32 max |dlogit| {max_abs_diff:.2e}")
    print(f"{'implementation':<26}{'median ms':>11}{'tokens/s':>12}{'vs torch':>10}")
    for name, r in results.items():
        print(f"{name:<26}{r['median_s'] * 1e3:>11.1f}{r['tokens_per_s']:>12.0f}"
              f"{r['vs_torch_fp32']:>9.2f}x")

    record = {"benchmark": "forward", "config": {k: v for k, v in vars(args).items() if k != "out"},
              "arch": arch.to_dict(), "num_params": arch.num_params(),
              "fp32_max_abs_logit_diff": max_abs_diff, "results": results, "machine": machine()}
    record["config"]["quick"] = args.quick
    write_result(args.out, record)
    return record


if __name__ == "__main__":
    main()
