"""Wanda and SparseGPT on Llama-3.1-8B-shaped layers: maxprune (JAX engine) vs a reference-style PyTorch peer.

What is measured, and how:

- shape: decoder layers of Llama-3.1-8B (hidden 4096, FFN 14336, 32 query / 8 KV
  heads of 128), vocab 1024 (embeddings are not pruned); random normal(0.02)
  weights, one numpy draw shared by both sides; calibration 8 x 256 random tokens.
  ``--quick``: hidden 1024, FFN 3584, 8 / 2 heads, 8 x 128 tokens.
- seconds per layer: both prune one layer end to end (embed, dense pass with
  statistics, prune all seven linears, pruned pass). maxprune runs it twice and
  reports the second (steady state); the first, with XLA compilation, is
  ``first_layer_seconds`` — a real run compiles once for all its layers.
- peak memory: each (implementation, method) runs in a fresh subprocess; a thread
  samples the process RSS (/proc/self/statm) every 5 ms during the measured run;
  reported is the peak minus the RSS just before it (model, calibration and, for
  maxprune, compiled programs already there) — what pruning a layer adds:
  activations, statistics, copies. JAX's CPU backend has no device memory
  stats; on CPU its arrays live in this RSS.
- peer: transformers' ``LlamaDecoderLayer`` (the model code the originals hook)
  driven by transcriptions of locuslab/wanda ``WrappedGPT`` + ``prune_wanda`` and
  IST-DASLab/sparsegpt ``SparseGPT.add_batch`` + ``fasterprune``: forward hooks
  collect statistics one calibration sequence at a time, fp32, torch ``[out, in]``.
- maxprune: ``maxprune.prune.{wanda,sparsegpt}`` through the engine, fp32 compute,
  batch 8, reconstruction errors off (the reference computes none).
- agreement: fraction of equal mask entries of layer 0's q and down kernels.

    python benchmarks/prune_sparse.py            # 8B-shaped layer (minutes)
    python benchmarks/prune_sparse.py --quick    # smaller layer
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from common import write_result

RESULTS = Path(__file__).parent / "results" / "prune_sparse.json"
SHAPES = {
    "llama3.1-8b": dict(hidden=4096, ffn=14336, heads=32, kv_heads=8, head_dim=128, samples=8, seq=256),
    "quick": dict(hidden=1024, ffn=3584, heads=8, kv_heads=2, head_dim=128, samples=8, seq=128),
}
VOCAB, RATIO = 1024, 0.5
LINEARS = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
           "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}


# ------------------------------------------------------------------ shared
def make_arch(shape: dict):
    from maxprune.model.arch import preset
    return preset("llama3.1-8b").replace(
        vocab_size=VOCAB, hidden_size=shape["hidden"], ffn_size=shape["ffn"], num_heads=shape["heads"],
        num_kv_heads=shape["kv_heads"], head_dim=shape["head_dim"], num_layers=1, rope_scaling=None)


def make_inputs(shape: dict):
    """(arch, numpy params of one layer, tokens): the same draw in every worker."""
    sys.path.insert(0, str(Path(__file__).parent))
    from common import random_params
    arch = make_arch(shape)
    tokens = np.random.default_rng(1).integers(0, VOCAB, (shape["samples"], shape["seq"])).astype(np.int32)
    return arch, random_params(arch, seed=0), tokens


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """Peak RSS above the level at entry, sampled every 5 ms in a thread."""

    def __enter__(self):
        self.base = self.peak = rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, rss_bytes())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())

    @property
    def delta_mb(self) -> float:
        return (self.peak - self.base) / 2**20


# ---------------------------------------------------------------- maxprune
def run_maxprune(method: str, shape: dict, out_dir: Path) -> dict:
    import jax

    from maxprune.prune import api
    from maxprune.prune.engine.options import run_options
    from maxprune.schema import load_config

    arch, params, tokens = make_inputs(shape)
    cfg = load_config(None, [f"--config.prune.method={method}", "--config.prune.batch_size=8",
                                    f"--config.prune.ratio={RATIO}"]).prune

    def prune(device_params):
        with run_options(progress=False, reconstruction=False, donate=True, dtype="float32"):
            return jax.block_until_ready(api.prune(device_params, arch, tokens, cfg))

    start = time.perf_counter()
    prune(jax.device_put(params))  # compiles every program; a real run does this once for all its layers
    first = time.perf_counter() - start
    device_params = jax.block_until_ready(jax.device_put(params))
    with PeakRSS() as mem:
        start = time.perf_counter()
        result = prune(device_params)
        seconds = time.perf_counter() - start
    for name, block in (("q", "attn"), ("down", "mlp")):
        keep = np.asarray(result.masks["layers"][block][name]["kernel"][0])
        np.save(out_dir / f"maxprune_{method}_{name}.npy", ~keep)
    return {"seconds_per_layer": seconds, "first_layer_seconds": first, "peak_rss_delta_mb": mem.delta_mb}


# ------------------------------------------------------------- torch peer
def torch_layer(arch, params, i):
    import torch
    import transformers
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding
    config = transformers.LlamaConfig(
        vocab_size=arch.vocab_size, hidden_size=arch.hidden_size, intermediate_size=arch.ffn_size,
        num_attention_heads=arch.num_heads, num_key_value_heads=arch.num_kv_heads, head_dim=arch.head_dim,
        rope_theta=arch.rope_theta, rms_norm_eps=arch.norm_eps, num_hidden_layers=1)
    config._attn_implementation = "sdpa"
    with torch.device("meta"):
        layer = LlamaDecoderLayer(config, 0)
    lp = params["layers"]
    state = {f"{path}.weight": torch.from_numpy(np.ascontiguousarray(lp[blk][name]["kernel"][i].T))
             for name, path in LINEARS.items() for blk in ("attn", "mlp") if name in lp[blk]}
    state["input_layernorm.weight"] = torch.from_numpy(lp["attn_norm"]["scale"][i].copy())
    state["post_attention_layernorm.weight"] = torch.from_numpy(lp["mlp_norm"]["scale"][i].copy())
    layer.load_state_dict(state, assign=True)
    return layer.eval(), LlamaRotaryEmbedding(config)


def run_torch(method: str, shape: dict, out_dir: Path) -> dict:
    import torch
    sys.path.insert(0, str(Path(__file__).parent))
    from torch_reference import SparseGPT, WrappedGPT

    arch, params, tokens = make_inputs(shape)
    layer, rotary = torch_layer(arch, params, 0)
    inps = torch.from_numpy(params["embed"]["embedding"][tokens])
    L = tokens.shape[1]
    position_ids = torch.arange(L)[None]
    pos = rotary(inps[:1], position_ids)
    mask = torch.full((L, L), float("-inf")).triu(1)[None, None]
    modules = {name: layer.get_submodule(path) for name, path in LINEARS.items()}
    wrapper = {"wanda": WrappedGPT, "sparsegpt": SparseGPT}[method]
    run_layer = lambda x: layer(x, attention_mask=mask, position_ids=position_ids, position_embeddings=pos)
    with torch.no_grad(), PeakRSS() as mem:
        start = time.perf_counter()
        # the reference layer loop: one dense pass with hooks, prune all seven, one pruned pass
        wrapped = {name: wrapper(m) for name, m in modules.items()}
        hooks = [m.register_forward_hook(lambda mod, inp, out, n=name: wrapped[n].add_batch(inp[0].data, out.data))
                 for name, m in modules.items()]
        for j in range(inps.shape[0]):
            run_layer(inps[j:j + 1])
        for h in hooks:
            h.remove()
        for name in modules:
            wrapped[name].prune(RATIO, 0, 0)  # unstructured
        outs = torch.cat([run_layer(inps[j:j + 1]) for j in range(inps.shape[0])])
        seconds = time.perf_counter() - start
    del outs
    for name in ("q", "down"):
        np.save(out_dir / f"torch_{method}_{name}.npy", (modules[name].weight.data == 0).numpy().T)
    return {"seconds_per_layer": seconds, "peak_rss_delta_mb": mem.delta_mb, "torch_threads": torch.get_num_threads()}


# ------------------------------------------------------------------ driver
def worker(args) -> None:
    shape = SHAPES[args.shape]
    fn = run_maxprune if args.worker == "maxprune" else run_torch
    print("RESULT " + json.dumps(fn(args.method, shape, Path(args.tmp))), flush=True)


def spawn(impl: str, method: str, shape: str, tmp: str) -> dict:
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)  # one CPU device, as a user's machine has
    cmd = [sys.executable, __file__, "--worker", impl, "--method", method, "--shape", shape, "--tmp", tmp]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
    if proc.returncode or not lines:
        raise RuntimeError(f"{impl} {method} failed:\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def agreement(tmp: Path, method: str) -> dict:
    out = {}
    for name in ("q", "down"):
        ours, peer = (np.load(tmp / f"{impl}_{method}_{name}.npy") for impl in ("maxprune", "torch"))
        out[name] = float(np.mean(ours == peer))
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a smaller layer (hidden 1024, FFN 3584)")
    p.add_argument("--methods", default="wanda,sparsegpt")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--worker", choices=("maxprune", "torch"), help=argparse.SUPPRESS)
    p.add_argument("--method", help=argparse.SUPPRESS)
    p.add_argument("--shape", help=argparse.SUPPRESS)
    p.add_argument("--tmp", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return worker(args)
    shape = "quick" if args.quick else "llama3.1-8b"
    if args.quick and args.out == RESULTS:
        args.out = RESULTS.with_name("prune_sparse_quick.json")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for method in args.methods.split(","):
            ours, peer = spawn("maxprune", method, shape, tmp), spawn("torch", method, shape, tmp)
            results[method] = {"maxprune": ours, "torch": peer, "mask_agreement_layer0": agreement(Path(tmp), method),
                               "speedup": peer["seconds_per_layer"] / ours["seconds_per_layer"],
                               "memory_ratio": ours["peak_rss_delta_mb"] / max(peer["peak_rss_delta_mb"], 1e-9)}
            r = results[method]
            print(f"{method:10} s/layer maxprune {ours['seconds_per_layer']:8.2f} "
                  f"(first {ours['first_layer_seconds']:.2f})"
                  f" | torch {peer['seconds_per_layer']:8.2f} | speedup {r['speedup']:.2f}x"
                  f" | peak +MB maxprune {ours['peak_rss_delta_mb']:8.0f} torch {peer['peak_rss_delta_mb']:8.0f}"
                  f" (ratio {r['memory_ratio']:.2f}) | mask agreement {r['mask_agreement_layer0']}", flush=True)
    sys.path.insert(0, str(Path(__file__).parent))
    from common import machine
    record = {"benchmark": "prune_sparse", "shape": {"name": shape, **SHAPES[shape], "vocab": VOCAB},
              "ratio": RATIO, "pattern": "unstructured", "results": results, "machine": machine(),
              "method": __doc__.split("    python")[0].strip(),
              "max_rss_mb_driver": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if args.out.exists():  # a --methods subset updates those methods' rows
        old = json.loads(args.out.read_text())
        if old.get("shape") == record["shape"]:
            record["results"] = {**old.get("results", {}), **results}
    write_result(args.out, record)


if __name__ == "__main__":
    main()
