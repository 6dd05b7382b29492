"""Training-step throughput: maxprune's jitted step vs a transformers + torch step, same shapes.

Both do one full step of the paper's recipe on the same batch: forward,
next-token cross-entropy, backward, global-norm clipping at 1.0 and AdamW
(0.9/0.95, eps 1e-8, weight decay 0.01). maxprune runs its real train step
(`maxprune.train.step.make_train_step`); torch runs `LlamaForCausalLM` with
SDPA and `torch.optim.AdamW`, in fp32 and with bf16 autocast (fp32 weights, bf16
matmuls: the same mixed precision as maxprune's bf16, and as its fp32 activations
with bf16 matmul operands, the faster mix on CPU). MFU is reported against the fp32 GEMM peak
measured in the same run (XLA 2048³ matmul) — the machine's practical limit.

    python benchmarks/train_step.py                       # vocab 8192, hidden 512, 8 layers, seq 512, batch 8
    python benchmarks/train_step.py --preset large        # vocab 32000, hidden 1024, 8 layers, batch 4
    python benchmarks/train_step.py --quick
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import torch
import transformers
from common import machine, random_params, time_runs, write_result

from maxprune.convert import hf
from maxprune.model import llama
from maxprune.model.arch import Arch
from maxprune.model.model_dir import save_model_dir
from maxprune.train import metrics
from maxprune.train import optimizer as opt_lib
from maxprune.train.step import init_state, make_train_step

RESULTS = Path(__file__).parent / "results"
PRESETS = {
    "small": dict(vocab=8192, hidden=512, layers=8, heads=8, kv_heads=2, ffn=1536, seq=512, batch=8),
    "large": dict(vocab=32000, hidden=1024, layers=8, heads=16, kv_heads=4, ffn=2816, seq=512, batch=4),
    "quick": dict(vocab=512, hidden=64, layers=2, heads=4, kv_heads=2, ffn=192, seq=64, batch=2),
}
RECIPE = dict(lr=3e-4, warmup_ratio=0.05, min_lr_ratio=0.1, grad_clip=1.0, b1=0.9, b2=0.95, eps=1e-8,
              weight_decay=0.01)


def maxprune_step(params, arch: Arch, tokens_BL, dtype: str, remat: str, matmul_dtype: str = "same"):
    recipe = ml_collections.ConfigDict(RECIPE)
    optimizer = opt_lib.make_optimizer(recipe, 1000)
    options = llama.ModelOptions(dtype=dtype, remat=remat, matmul_dtype=matmul_dtype)
    step = jax.jit(make_train_step(arch, options, optimizer,
                                   opt_lib.make_schedule(3e-4, 1000)), donate_argnums=0)
    box = {"state": init_state(jax.device_put(params), optimizer)}
    tokens = jnp.asarray(tokens_BL)

    def run():
        box["state"], m = step(box["state"], tokens, None)
        jax.block_until_ready(m["loss"])
        return float(m["loss"])
    return run


def torch_step(hf_dir: Path, tokens_BL, autocast_bf16: bool = False):
    """fp32 weights and AdamW; `autocast_bf16` runs the forward/backward matmuls in bf16 (torch.autocast)."""
    model = transformers.LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float32,
                                                          attn_implementation="sdpa").train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.01)
    tokens = torch.as_tensor(tokens_BL, dtype=torch.long)

    def run():
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast_bf16):
            loss = model(tokens, labels=tokens).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        return float(loss)
    return run


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="small")
    p.add_argument("--quick", action="store_true", help="tiny shapes (smoke run)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--remat", default="none")
    args = p.parse_args(argv)
    name = "quick" if args.quick else args.preset
    s = PRESETS[name]
    arch = Arch(vocab_size=s["vocab"], hidden_size=s["hidden"], num_layers=s["layers"], num_heads=s["heads"],
                num_kv_heads=s["kv_heads"], head_dim=s["hidden"] // s["heads"], ffn_size=s["ffn"],
                max_position_embeddings=max(2048, s["seq"]))
    params = random_params(arch)
    tokens_BL = np.random.default_rng(1).integers(0, arch.vocab_size, (s["batch"], s["seq"]), dtype=np.int32)
    runners = {}
    with tempfile.TemporaryDirectory() as tmp:
        save_model_dir(Path(tmp) / "md", arch, params)
        hf_dir = hf.to_hf(Path(tmp) / "md", Path(tmp) / "hf", dtype="float32")
        runners["transformers torch fp32"] = torch_step(hf_dir, tokens_BL)
        runners["transformers torch bf16 autocast"] = torch_step(hf_dir, tokens_BL, autocast_bf16=True)
    runners["maxprune jax fp32"] = maxprune_step(params, arch, tokens_BL, "float32", args.remat)
    runners["maxprune jax bf16"] = maxprune_step(params, arch, tokens_BL, "bfloat16", args.remat)
    runners["maxprune jax fp32 + bf16 matmuls"] = maxprune_step(params, arch, tokens_BL, "float32", args.remat,
                                                                "bfloat16")
    # First-step losses agree (same weights, same batch) before timing means anything.
    first = {k: run() for k, run in runners.items()}

    peak = metrics.measured_cpu_peak()
    tokens = s["batch"] * s["seq"]
    flops_per_token = arch.train_flops_per_token(s["seq"])
    results = {}
    for key, run in runners.items():
        times = time_runs(run, args.warmup, args.repeats)
        median = statistics.median(times)
        tps = tokens / median
        results[key] = {"median_s": median, "times_s": times, "tokens_per_s": tps,
                        "mfu_vs_measured_fp32_gemm": metrics.mfu(tps, flops_per_token, 1, peak),
                        "first_loss": first[key]}
    base = results["transformers torch fp32"]["tokens_per_s"]
    for r in results.values():
        r["vs_torch"] = r["tokens_per_s"] / base

    print(f"train step ({name}): batch {s['batch']} x seq {s['seq']}, {arch.num_params() / 1e6:.1f} M params, "
          f"AdamW + clip; measured fp32 GEMM peak {peak / 1e9:.0f} GFLOP/s")
    print(f"{'implementation':<36}{'median s':>10}{'tokens/s':>11}{'vs torch':>10}{'MFU':>8}{'loss@1':>9}")
    for key, r in results.items():
        print(f"{key:<36}{r['median_s']:>10.3f}{r['tokens_per_s']:>11.0f}{r['vs_torch']:>9.2f}x"
              f"{100 * r['mfu_vs_measured_fp32_gemm']:>7.1f}%{r['first_loss']:>9.4f}")
    record = {"benchmark": "train_step", "preset": name, "shapes": s, "arch": arch.to_dict(),
              "flops_per_token": flops_per_token, "measured_fp32_gemm_flops": peak,
              "results": results, "machine": machine()}
    out = RESULTS / f"train_step_{name}.json"
    write_result(out, record)
    return record


if __name__ == "__main__":
    main()
