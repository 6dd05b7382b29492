"""Behaviour-preserving changes prove it: run a fixed set of commands on two trees, compare every output.

    python .ci/same_outputs.py BASE_REF            # BASE_REF (a commit) vs this working tree
    python .ci/same_outputs.py BASE_REF --keep DIR # keep both sides' outputs under DIR

Both sides run with this checkout's virtualenv, the tree under test first on
``PYTHONPATH`` (the base is ``git archive BASE_REF``), on the same inputs: a
synthetic corpus written here (seeded). The commands, in order: train a BPE
tokenizer, prepare the corpus, train a tiny Llama from scratch, prune it with
each shipped method config (wanda and sparsegpt in both patterns, magnitude,
minitron depth and width, flap, sheared_llama), evaluate one pruned model
(perplexity), plan the demo's study. Compared: every tensor of every model dir
(bytes, dtype, shape), its arch / provenance / prune report, the tokenizer
files, the prepared shards, the metrics, the plan's text. Timings, dates and
the sides' own paths are dropped before comparing JSON. Exits 1 on the first
side that differs, naming the file and key.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
VOLATILE = ("seconds", "time", "created", "date", "timestamp", "elapsed", "code_version", "tokens_per_s",
            "steps_per_s", "throughput", "wall", "mfu")
# Orbax's step metadata holds dates; a model dir's integrity manifest hashes its files (compared one by one
# here), provenance dates included.
SKIP = ("_CHECKPOINT_METADATA",)
PRUNES = {  # output name -> config (the calibration is the prepared corpus; small budgets)
    "wanda-u": "wanda.py:unstructured", "wanda-24": "wanda.py:2:4",
    "sparsegpt-u": "sparsegpt.py:unstructured", "sparsegpt-24": "sparsegpt.py:2:4",
    "magnitude": "magnitude.py", "minitron-depth": "minitron_depth.py", "minitron-width": "minitron_width.py",
    "flap": "flap.py", "sheared": "sheared_llama.py",
}


def corpus(path: Path) -> None:
    """A seeded jsonl of word salad with some structure (enough for a BPE and a few thousand tokens)."""
    rng = np.random.default_rng(0)
    words = ["".join(rng.choice(list("abcdefghijklmnopqrstuvwxyz"), rng.integers(2, 9))) for _ in range(400)]
    with path.open("w") as f:
        for _ in range(300):
            text = " ".join(rng.choice(words, rng.integers(40, 200)))
            f.write(json.dumps({"text": text.capitalize() + "."}) + "\n")


def commands(out: Path, data: Path) -> list[tuple[str, list[str]]]:
    tok, prepared, run = out / "tokenizer", out / "prepared", out / "train"
    model = run / "model"
    cmds = [
        ("tokenizer", ["data", "train-tokenizer", f"jsonl:{data}", str(tok), "--vocab-size", "512"]),
        ("prepare", ["data", "prepare", f"jsonl:{data}", str(prepared), "--tokenizer", str(tok),
                     "--seq-len", "64", "--workers", "1"]),
        ("train", ["train", str(run), "--config", "configs/train/scratch_tiny.py", "--quiet",
                   "--config.model.arch.vocab_size=512", f"--config.data.train={prepared}",
                   "--config.data.budgets.pretrain=0:~24K", "--config.data.budgets.retrain=~24K:",
                   "--config.train.tokens=8K", "--config.train.global_batch=8", "--config.train.checkpoint_every=8",
                   "--config.train.log_every=4"]),
    ]
    for name, conf in PRUNES.items():
        cmds.append((f"prune {name}", [
            "prune", "--config", f"configs/prune/{conf}", "--quiet", f"--config.prune.input={model}",
            f"--config.prune.output={out / 'pruned' / name}", f"--config.prune.calibration={prepared}",
            "--config.prune.n_samples=16", "--config.prune.seq_len=64", "--config.prune.sheared_llama.tokens=2K",
            "--config.prune.sheared_llama.global_batch=4",
            "--config.prune.sheared_llama.lagrangian_warmup=2",
            "--config.model.dtype=float32"]))
    cmds.append(("eval", ["eval", str(out / "pruned" / "wanda-u"), "--tasks", "none", "--no-progress",
                          "--perplexity", f"synthetic=jsonl:{data}", "--out", str(out / "metrics.json"),
                          "--config.eval.perplexity.seq_len=64", "--config.eval.perplexity.n_seqs=8",
                          "--config.model.dtype=float32"]))
    cmds.append(("study plan", ["study", "plan", "--config", "configs/study/mini.py", "--root", str(out / "study")]))
    return cmds


def run_side(tree: Path, out: Path, data: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(tree), "JAX_PLATFORMS": "cpu"}
    for name, argv in commands(out, data):
        proc = subprocess.run([sys.executable, "-m", "maxprune", *argv], cwd=tree, env=env, text=True,
                              capture_output=True)
        (out / "stdout").mkdir(exist_ok=True)
        (out / "stdout" / name.replace(" ", "_")).write_text(proc.stdout)
        if proc.returncode:
            raise SystemExit(f"{tree}: `maxprune {' '.join(argv)}` failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
        print(f"  {tree.name or tree}: {name} ok", flush=True)


# ---------------------------------------------------------------- comparing
def normalized(value, roots: tuple[str, ...]):
    """JSON with volatile keys dropped and the side's paths replaced."""
    if isinstance(value, dict):
        return {k: normalized(v, roots) for k, v in value.items()
                if not any(w in k.lower() for w in VOLATILE) and not k.endswith("_s")}
    if isinstance(value, list):
        return [normalized(v, roots) for v in value]
    if isinstance(value, str):
        for i, r in enumerate(roots):
            value = value.replace(r, f"<ROOT{i}>")
    return value


def tensors(ckpt: Path) -> dict[str, str]:
    """sha256 of (dtype, shape, bytes) of every leaf of an orbax checkpoint."""
    import jax
    import orbax.checkpoint as ocp
    meta = ocp.PyTreeCheckpointer().metadata(ckpt)
    meta = getattr(meta, "item_metadata", meta)
    args = jax.tree.map(lambda m: ocp.RestoreArgs(restore_type=np.ndarray), meta)
    tree = ocp.PyTreeCheckpointer().restore(ckpt, restore_args=args)
    out = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        a = np.ascontiguousarray(leaf)
        out[jax.tree_util.keystr(path)] = hashlib.sha256(f"{a.dtype}{a.shape}".encode() + a.tobytes()).hexdigest()
    return out


def comparable(data: bytes, roots: tuple[str, ...]):
    """JSON (.json, orbax's metadata files) normalized; text with paths replaced and printed timings
    ("0.80 s/layer") dropped; anything else by its sha256."""
    try:
        return normalized(json.loads(data), roots)
    except ValueError:  # not JSON (UnicodeDecodeError is one too)
        try:
            return re.sub(r"\d+(?:\.\d+)? ?s\b", "<time>", normalized(data.decode(), roots))
        except UnicodeDecodeError:
            return hashlib.sha256(data).hexdigest()


def fingerprint(out: Path, roots: tuple[str, ...]) -> dict[str, object]:
    """{relative path (or path#leaf): comparable value} of everything a side wrote."""
    found: dict[str, object] = {}
    ckpts = {p.parent for p in out.rglob("_METADATA")}  # orbax pytrees (params, masks, train states)
    for ckpt in sorted(ckpts):
        found[str(ckpt.relative_to(out))] = tensors(ckpt)
    for p in sorted(out.rglob("*")):
        if not p.is_file() or any(c in p.parents for c in ckpts) or p.name in SKIP:
            continue
        if p.name == "manifest.json" and (p.parent / "arch.json").is_file():
            continue
        rel = str(p.relative_to(out))
        if p.name.startswith("events.out") or p.name.endswith((".lock", ".log")):
            continue
        if p.suffix == ".jsonl":
            found[rel] = [normalized(json.loads(line), roots) for line in p.read_text().splitlines() if line]
            continue
        found[rel] = comparable(p.read_bytes(), roots)
    return found


def first_difference(a, b, where: str = "") -> str | None:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            if k not in a or k not in b:
                return f"{where}/{k}: only on the {'head' if k in b else 'base'} side"
            d = first_difference(a[k], b[k], f"{where}/{k}")
            if d:
                return d
        return None
    if a == b:
        return None
    a, b = str(a), str(b)
    i = next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return f"{where}: ...{a[max(0, i - 80):i + 80]!r} != ...{b[max(0, i - 80):i + 80]!r}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("base", help="the commit to compare against (e.g. main, HEAD~1)")
    ap.add_argument("--keep", type=Path, help="keep the outputs under this dir")
    args = ap.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="same-outputs-"))
    try:
        base = work / "base-tree"
        base.mkdir()
        archive = subprocess.run(["git", "archive", args.base], cwd=ROOT, capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(base)], input=archive, check=True)
        data = work / "corpus.jsonl"
        corpus(data)
        sides = {"base": (base, work / "out-base"), "head": (ROOT, work / "out-head")}
        prints = {}
        for side, (tree, out) in sides.items():
            print(f"{side}: {args.base if side == 'base' else 'working tree'} ({tree})", flush=True)
            out.mkdir()
            run_side(tree, out, data)
            prints[side] = fingerprint(out, (str(out), str(tree), str(work)))
        diff = first_difference(prints["base"], prints["head"])
        n = sum(len(v) if isinstance(v, dict) else 1 for v in prints["head"].values())
        if diff:
            print(f"DIFFERENT: {diff}")
            return 1
        print(f"identical: {len(prints['head'])} outputs ({n} compared items) of {len(commands(work, data))} commands")
        return 0
    finally:
        if args.keep:
            shutil.copytree(work, args.keep, dirs_exist_ok=True)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
