"""Evaluation throughput: maxprune (JAX, jit, bucketed) vs transformers + lm-eval's hf backend (torch).

Both sides run the same weights (exported with `maxprune.convert.hf.to_hf`) on
this machine, in the same dtype (`--dtype`, fp32 by default; bf16 runs both in
bf16: torch's bf16 kernels vs XLA's bf16 x bf16 -> fp32 matmuls):

- perplexity tokens/s: the same windows of the builtin corpus's held-out
  Wikipedia split, scored by `maxprune.eval.perplexity` vs a batched torch loop
  (LlamaForCausalLM + cross-entropy);
- lm-eval requests/s: the same ARC-Easy loglikelihood requests (offline data,
  first N docs) through the native adapter vs lm-eval's `hf` backend, with the
  same batch size.

"cold" is maxprune's first pass (reading, compiling); the compared columns are
the fastest of `--repeats` passes, the two sides taking turns; "per CPU-s" is the
same ratio in CPU seconds, the steadier measure on a shared machine.

The numbers of both sides are compared first (perplexity, every loglikelihood).
Prints a side-by-side table and writes benchmarks/results/eval.json.

    python benchmarks/eval.py            # 32 M-param Llama, 16 x 512-token windows, 100 ARC-Easy docs
    python benchmarks/eval.py --dtype bfloat16   # both sides in bf16 -> results/eval_bfloat16.json
    python benchmarks/eval.py --quick    # tiny shapes, seconds
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import transformers
from common import machine, random_params, write_result

from maxprune.convert import hf
from maxprune.data.builtin import builtin_corpus
from maxprune.data.sources import iter_documents
from maxprune.eval import perplexity as ppl_lib
from maxprune.eval import tasks as tasks_lib
from maxprune.eval.lm_eval_adapter import MaxpruneLM
from maxprune.eval.loading import load_for_eval
from maxprune.model.arch import Arch
from maxprune.model.llama import ModelOptions
from maxprune.model.model_dir import save_model_dir

RESULTS = Path(__file__).parent / "results" / "eval.json"
QUICK = dict(hidden=64, layers=2, heads=4, kv_heads=2, ffn=192, seq=128, windows=8, docs=20, repeats=1)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--ffn", type=int, default=1536)
    p.add_argument("--seq", type=int, default=512, help="perplexity window")
    p.add_argument("--windows", type=int, default=16, help="perplexity windows")
    p.add_argument("--ppl-batch", type=int, default=8)
    p.add_argument("--docs", type=int, default=100, help="ARC-Easy documents (4 requests each)")
    p.add_argument("--batch", type=int, default=32, help="lm-eval batch size, both backends")
    p.add_argument("--repeats", type=int, default=3, help="timed passes per side; the fastest counts")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="both sides")
    p.add_argument("--quick", action="store_true", help="tiny shapes (smoke run)")
    p.add_argument("--out", type=Path, default=None, help=f"default {RESULTS} (with _bfloat16 for bf16)")
    args = p.parse_args(argv)
    if args.out is None:
        args.out = RESULTS if args.dtype == "float32" else RESULTS.with_name(f"eval_{args.dtype}.json")
    if args.quick:
        vars(args).update(QUICK)
    return args


def interleaved(runs: dict, repeats: int) -> dict:
    """name -> (result, fastest wall s, fewest CPU s), the runs taking turns.

    On a shared machine, load that comes and goes hits both sides alike, the fastest
    pass is the least disturbed one, and CPU seconds (all threads of this process:
    XLA's and torch's pools alike) are what contention disturbs least.
    """
    wall, cpu, results = {n: [] for n in runs}, {n: [] for n in runs}, {}
    for _ in range(repeats):
        for name, fn in runs.items():
            w0, c0 = time.perf_counter(), time.process_time()
            results[name] = fn()
            wall[name].append(time.perf_counter() - w0)
            cpu[name].append(time.process_time() - c0)
    return {name: (results[name], min(wall[name]), min(cpu[name])) for name in runs}


# ------------------------------------------------------------------ perplexity
def torch_perplexity(model, windows_NL: np.ndarray, batch: int) -> float:
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(windows_NL), batch):
            tokens = torch.as_tensor(windows_NL[start:start + batch], dtype=torch.long)
            logits = model(tokens).logits[:, :-1].float()
            total += float(torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1), reduction="sum"))
            count += tokens[:, 1:].numel()
    return math.exp(total / count)


def bench_perplexity(ours, hf_model, args) -> dict:
    """`perplexity()` once cold (reading, tokenizing, compiling), then the scoring alone vs torch."""
    cold = ppl_lib.perplexity(ours, "builtin_wiki", seq_len=args.seq, n_seqs=args.windows,
                              batch_size=args.ppl_batch, progress=False)
    spec = builtin_corpus().source("heldout_wiki")
    stream, _ = ppl_lib.token_stream((d.text for d in iter_documents(spec)), ours.tokenizer,
                                     args.seq * args.windows)
    windows_NL = ppl_lib.windows(stream, args.seq, args.windows)
    scorer = ours.scorer(args.ppl_batch, (args.seq,))
    torch_perplexity(hf_model, windows_NL[:args.ppl_batch], args.ppl_batch)  # warm-up
    timed = interleaved({"maxprune": lambda: math.exp(ppl_lib.mean_nll(scorer, windows_NL, progress=False)),
                         "torch": lambda: torch_perplexity(hf_model, windows_NL, args.ppl_batch)}, args.repeats)
    (ppl, ours_s, ours_cpu), (ref_ppl, ref_s, ref_cpu) = timed["maxprune"], timed["torch"]
    tokens = cold["tokens"]
    assert ppl == cold["ppl"]
    return {"tokens": tokens, "windows": cold["sequences"], "seq_len": args.seq,
            "ppl_maxprune": ppl, "ppl_torch": ref_ppl, "ppl_rel_diff": abs(ppl / ref_ppl - 1),
            "maxprune_cold_tokens_per_s": tokens / (cold["read_s"] + cold["score_s"]),
            "maxprune_tokens_per_s": tokens / ours_s, "torch_tokens_per_s": tokens / ref_s,
            "ratio": ref_s / ours_s, "maxprune_tokens_per_cpu_s": tokens / ours_cpu,
            "torch_tokens_per_cpu_s": tokens / ref_cpu, "ratio_cpu": ref_cpu / ours_cpu}


# ------------------------------------------------------------------ lm-eval requests
def arc_easy_requests(docs: int, tmp: Path):
    from lm_eval.tasks import TaskManager
    names = tasks_lib.write_offline_tasks(["arc_easy"], tmp)
    with tasks_lib.hub_offline():
        task = TaskManager(include_path=str(tmp), include_defaults=False).load(names)["tasks"][names[0]]
    task.build_all_requests(limit=docs, rank=0, world_size=1)
    return task.instances


def bench_requests(ours_lm, hf_lm, requests, repeats: int) -> dict:
    """A cold pass of ours (compiling every bucket), then both backends taking turns."""
    n = len(requests)
    start = time.perf_counter()
    ours_lm.loglikelihood(requests, disable_tqdm=True)
    cold_s = time.perf_counter() - start
    hf_lm.loglikelihood(requests[:8], disable_tqdm=True)  # warm-up
    timed = interleaved({"maxprune": lambda: ours_lm.loglikelihood(requests, disable_tqdm=True),
                         "hf": lambda: hf_lm.loglikelihood(requests, disable_tqdm=True)}, repeats)
    (ours, ours_s, ours_cpu), (ref, ref_s, ref_cpu) = timed["maxprune"], timed["hf"]
    diff = max(abs(a[0] - b[0]) for a, b in zip(ours, ref))
    return {"requests": n, "max_abs_loglikelihood_diff": diff,
            "maxprune_cold_requests_per_s": n / cold_s, "maxprune_requests_per_s": n / ours_s,
            "hf_requests_per_s": n / ref_s, "ratio": ref_s / ours_s,
            "maxprune_requests_per_cpu_s": n / ours_cpu, "hf_requests_per_cpu_s": n / ref_cpu,
            "ratio_cpu": ref_cpu / ours_cpu,
            "compilations": ours_lm.compile_count, "buckets": list(ours_lm.scorer.buckets)}


def main(argv=None) -> dict:
    args = parse_args(argv)
    corpus = builtin_corpus()
    tok = corpus.tokenizer()
    arch = Arch(vocab_size=tok.vocab_size, hidden_size=args.hidden, num_layers=args.layers,
                num_heads=args.heads, num_kv_heads=args.kv_heads, head_dim=args.hidden // args.heads,
                ffn_size=args.ffn, max_position_embeddings=2048)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        save_model_dir(tmp / "md", arch, random_params(arch), tokenizer_dir=corpus.tokenizer_dir)
        hf_dir = hf.to_hf(tmp / "md", tmp / "hf", dtype="float32")
        ours = load_for_eval(tmp / "md", options=ModelOptions(dtype=args.dtype))
        hf_model = transformers.LlamaForCausalLM.from_pretrained(hf_dir, dtype=getattr(torch, args.dtype)).eval()
        ppl = bench_perplexity(ours, hf_model, args)
        from lm_eval.api.registry import get_model
        hf_lm = get_model("hf")(pretrained=str(hf_dir), dtype=args.dtype, add_bos_token=True,
                                batch_size=args.batch, device="cpu")
        ours_lm = MaxpruneLM(model=ours, batch_size=args.batch)
        requests = arc_easy_requests(args.docs, tmp / "tasks")
        reqs = bench_requests(ours_lm, hf_lm, requests, args.repeats)

    print(f"eval throughput, {arch.num_params() / 1e6:.1f} M params, {args.dtype}, {machine()['cpu_count']} CPUs")
    print(f"perplexity: {ppl['windows']} x {ppl['seq_len']} tokens, ppl {ppl['ppl_maxprune']:.4f} vs torch "
          f"{ppl['ppl_torch']:.4f} (rel diff {ppl['ppl_rel_diff']:.1e})")
    print(f"lm-eval: {reqs['requests']} ARC-Easy loglikelihood requests, max |d ll| "
          f"{reqs['max_abs_loglikelihood_diff']:.1e}, {reqs['compilations']} compilations")
    print(f"{'measure':<30}{'maxprune':>10}{'cold':>8}{'peer':>10}{'ratio':>8}{'per CPU-s':>11}")
    for label, r, unit, peer in (("perplexity tokens/s vs torch", ppl, "tokens", "torch"),
                                 ("requests/s vs lm-eval hf", reqs, "requests", "hf")):
        print(f"{label:<30}{r[f'maxprune_{unit}_per_s']:>10.1f}{r[f'maxprune_cold_{unit}_per_s']:>8.1f}"
              f"{r[f'{peer}_{unit}_per_s']:>10.1f}{r['ratio']:>7.2f}x{r['ratio_cpu']:>10.2f}x")
    record = {"benchmark": "eval", "config": {k: v for k, v in vars(args).items() if k != "out"},
              "arch": arch.to_dict(), "num_params": arch.num_params(), "perplexity": ppl,
              "lm_eval": reqs, "machine": machine()}
    write_result(args.out, record)
    return record


if __name__ == "__main__":
    main()
