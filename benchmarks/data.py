"""Data pipeline throughput, side by side, on the builtin corpus's train text.

1. Tokenize + pack: `maxprune.data.prepare` (parallel files, ArrayRecord out) vs the
   usual Hugging Face recipe (`datasets.Dataset.from_dict({"text": ...}).map(tokenize,
   batched=True)` then run_clm's `group_texts` packing), same tokenizer, same
   `BOS doc EOS` stream, same number of processes. The token totals must agree.
2. Loader vs trainer: tokens/s of iterating the grain loader's batches next to the
   tokens/s a jitted train step (forward + grad of `next_token_loss`) of a tiny Llama
   consumes. The ratio loader/step must be >> 1, or the loader stalls training.

Writes benchmarks/results/data.json with the machine's description.

    python benchmarks/data.py            # builds/reuses the builtin corpus in the default data dir
    python benchmarks/data.py --quick    # fewer steps
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from common import write_result

from maxprune.data.builtin import builtin_corpus
from maxprune.data.loader import make_loader
from maxprune.data.prepare import prepare

# JAX is imported only for the train step, after `datasets` has forked its workers
# (forking a process that runs JAX's threads can deadlock).

RESULTS = Path(__file__).parent / "results" / "data.json"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default=None, help="builtin corpus dir (default: the usual cache)")
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch", type=int, default=32, help="global batch of the loader and the step")
    p.add_argument("--workers", type=int, default=os.cpu_count(), help="processes for both tokenizers")
    p.add_argument("--repeats", type=int, default=3,
                   help="tokenize+pack rounds, alternating the two; the best counts (noisy shared machines)")
    p.add_argument("--steps", type=int, default=200, help="loader batches timed")
    p.add_argument("--train-steps", type=int, default=20, help="train steps timed")
    p.add_argument("--dtype", default=None, choices=("float32", "bfloat16"),
                   help="train-step compute dtype (default: float32 on CPU, where bf16 is emulated)")
    p.add_argument("--quick", action="store_true", help="fewer steps (smoke run)")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.train_steps, args.repeats = 50, 5, 1
    return args


# ---------------------------------------------------------------- tokenize + pack
def time_prepare(corpus, tokenizer, seq_len: int, workers: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        manifest = prepare(corpus.source("train"), tokenizer, Path(tmp) / "out", seq_len,
                           workers=workers, progress=False)
        seconds = time.perf_counter() - start
    tokens = manifest.num_tokens + manifest.tokens_dropped
    return {"seconds": seconds, "tokens": tokens, "tokens_per_s": tokens / seconds}


def time_hf_datasets(corpus, tokenizer, seq_len: int, workers: int) -> dict:
    """run_clm.py's recipe: map(tokenize, batched) then map(group_texts, batched)."""
    import datasets
    from transformers import PreTrainedTokenizerFast

    datasets.disable_progress_bars()
    hf_tok = PreTrainedTokenizerFast(tokenizer_file=str(corpus.tokenizer_dir / "tokenizer.json"))
    bos, eos = tokenizer.bos_id, tokenizer.eos_id
    texts = [json.loads(line)["text"] for file in corpus.text_files["train"] for line in file.open()]

    def tokenize(batch):
        ids = hf_tok(batch["text"], add_special_tokens=False)["input_ids"]
        return {"input_ids": [[bos] + x + [eos] for x in ids]}

    def group_texts(batch):
        stream = [t for ids in batch["input_ids"] for t in ids]
        usable = len(stream) // seq_len * seq_len
        return {"input_ids": [stream[i:i + seq_len] for i in range(0, usable, seq_len)],
                "stream_tokens": [len(stream)] + [0] * (usable // seq_len - 1) if usable else []}

    cache = tempfile.mkdtemp()
    try:
        start = time.perf_counter()
        ds = datasets.Dataset.from_dict({"text": texts})
        ds = ds.map(tokenize, batched=True, remove_columns=["text"], num_proc=workers or None,
                    cache_file_name=os.path.join(cache, "tok.arrow"))
        tokens = sum(len(x) for x in ds["input_ids"])  # counted outside the timing below
        mid = time.perf_counter()
        packed = ds.map(group_texts, batched=True, batch_size=1000, num_proc=workers or None,
                        remove_columns=["input_ids"], cache_file_name=os.path.join(cache, "pack.arrow"))
        end = time.perf_counter()
        sequences = len(packed)
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    seconds = (end - mid) + (mid - start)
    return {"seconds": seconds, "tokens": tokens, "sequences": sequences, "tokens_per_s": tokens / seconds}


# ---------------------------------------------------------------- loader vs step
def time_loader(corpus, batch: int, steps: int) -> dict:
    dataset = corpus.open("train")
    loader = make_loader(dataset, [(0, len(dataset))], global_batch=batch, seed=0, num_epochs=None)
    with loader:
        next(loader)  # threads started, first read done
        start = time.perf_counter()
        for _ in range(steps):
            batch_BL = next(loader)
        seconds = time.perf_counter() - start
    tokens = steps * batch_BL.size
    return {"seconds": seconds, "batches": steps, "tokens_per_s": tokens / seconds}


def time_train_step(vocab_size: int, batch: int, seq_len: int, steps: int, dtype: str | None) -> dict:
    import jax
    import jax.numpy as jnp

    from maxprune.model import llama
    from maxprune.model.arch import preset

    dtype = dtype or ("float32" if jax.default_backend() == "cpu" else "bfloat16")
    arch = preset("tiny").replace(vocab_size=vocab_size, max_position_embeddings=max(2048, seq_len))
    params = llama.init_params(arch, jax.random.key(0))
    options = llama.ModelOptions(dtype=dtype)

    @jax.jit
    def step(params, tokens_BL):
        def loss(params):
            return llama.next_token_loss(llama.forward(params, tokens_BL, arch, options=options), tokens_BL)
        value, grads = jax.value_and_grad(loss)(params)
        return value, jax.tree.map(lambda p, g: p - 1e-3 * g, params, grads)

    tokens_BL = jnp.asarray(np.random.default_rng(0).integers(0, vocab_size, (batch, seq_len), np.int32))
    for _ in range(2):  # compile + warm up
        _, params = jax.block_until_ready(step(params, tokens_BL))
    start = time.perf_counter()
    for _ in range(steps):
        _, params = step(params, tokens_BL)
    jax.block_until_ready(params)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "steps": steps, "dtype": dtype, "params": arch.num_params(),
            "arch": arch.to_dict(),
            "tokens_per_s": steps * batch * seq_len / seconds}


def best(runs: list[dict]) -> dict:
    """The fastest run, with every run's seconds alongside."""
    return min(runs, key=lambda r: r["seconds"]) | {"all_seconds": [round(r["seconds"], 3) for r in runs]}


def machine() -> dict:
    import datasets
    import grain
    import jax
    import tokenizers
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "python": platform.python_version(), "cpu_count": os.cpu_count(),
            "jax": jax.__version__, "jax_backend": jax.default_backend(), "grain": grain.__version__,
            "datasets": datasets.__version__, "tokenizers": tokenizers.__version__,
            "numpy": np.__version__}


def main(argv=None) -> dict:
    args = parse_args(argv)
    start = time.perf_counter()
    corpus = builtin_corpus(args.data_dir, args.vocab_size, args.seq_len, log=print)
    print(f"builtin corpus ready in {time.perf_counter() - start:.1f} s: {corpus.root}")
    tokenizer = corpus.tokenizer()

    rounds = [(time_prepare(corpus, tokenizer, args.seq_len, args.workers),
               time_hf_datasets(corpus, tokenizer, args.seq_len, args.workers))
              for _ in range(args.repeats)]
    ours, hf = (best([r[i] for r in rounds]) for i in (0, 1))
    if ours["tokens"] != hf["tokens"]:
        raise SystemExit(f"token totals differ: prepare {ours['tokens']} vs datasets {hf['tokens']}")
    loader = time_loader(corpus, args.batch, args.steps)
    step = time_train_step(tokenizer.vocab_size, args.batch, args.seq_len, args.train_steps, args.dtype)

    result = {
        "benchmark": "data", "config": vars(args) | {"out": str(args.out)},
        "text_bytes": corpus.info["splits"]["train"]["bytes"],
        "tokenize_pack": {"maxprune_prepare": ours, "hf_datasets_map": hf,
                          "ratio": ours["tokens_per_s"] / hf["tokens_per_s"]},
        "loader_vs_step": {"loader": loader, "train_step": step,
                           "ratio": loader["tokens_per_s"] / step["tokens_per_s"]},
        "machine": machine(),
    }
    print(f"\ntokenize + pack {ours['tokens']:,} tokens ({result['text_bytes'] / 1e6:.1f} MB), "
          f"{args.workers} processes each, best of {args.repeats}")
    print(f"  maxprune prepare       {ours['tokens_per_s']:>12,.0f} tokens/s  ({ours['seconds']:.2f} s)")
    print(f"  datasets map + group   {hf['tokens_per_s']:>12,.0f} tokens/s  ({hf['seconds']:.2f} s)")
    print(f"  ratio                  {result['tokenize_pack']['ratio']:.2f}x")
    print(f"loader vs train step (batch {args.batch} x {args.seq_len}, "
          f"tiny Llama {step['params']:,} params, {step['dtype']} on {result['machine']['jax_backend']})")
    print(f"  grain loader           {loader['tokens_per_s']:>12,.0f} tokens/s")
    print(f"  train step             {step['tokens_per_s']:>12,.0f} tokens/s")
    print(f"  ratio loader/step      {result['loader_vs_step']['ratio']:.1f}x")
    write_result(args.out, result)
    return result


if __name__ == "__main__":
    main()
