"""The paper's full grid at Llama-3.1-8B scale ("Small LLMs: Pruning vs. Training from Scratch").

P200 pretrains Llama-3.1-8B for 200B DCLM tokens; every method prunes it (and Meta's
released checkpoint) and retrains; scratch baselines train the pruned shape from
random init on the same tokens (S_N) or on all 200B + N tokens (S_{M+N}).

    maxprune study plan --config configs/study/paper.py \\
        --config.data.train=gs://bucket/dclm-llama3-8192 --config.data.validation=gs://bucket/dclm-val-8192 \\
        --config.study.imported.Meta=gs://bucket/llama31-8b
    maxprune study plan --config configs/study/paper.py --resolved          # every prune run's shape and calibration
    maxprune study plan --config configs/study/paper.py --show P200B.prune.flap-r50   # one run's whole config

Each method runs with its paper settings (`maxprune.prune.paper`): Table 1's shapes,
Appendix D.2's calibration (WikiText-103 for Minitron, C4 for FLAP/Wanda/SparseGPT,
the training data for Sheared LLaMA; `study.calibration` maps the corpora to
sources) and Sheared LLaMA's 3200 x 32 x 4096 mask learning. Evaluation follows
Appendix E (hub tasks, train-split perplexity windows, DCLM validation loss).

Runs: Table 2/16 (8 variants: P200-R50, S50, S250), Tables 12-15 (4 structured methods:
S_N, P200-R_N, Meta-R_N for N in 10..500B), Table 11 (Minitron-D/W at 62.5-81.3 %:
P200-R50, S50) and Table 10 (every variant right after pruning, from both parents).
"""

from ml_collections import ConfigDict

from maxprune.eval.perplexity import PAPER_CORPORA

SCALING = "10B,30B,50B,250B,500B"
STRUCTURED = ("minitron_depth", "minitron_width", "flap", "sheared_llama")
SPARSE = ("wanda/2:4", "wanda/unstructured", "sparsegpt/2:4", "sparsegpt/unstructured")
ABLATION = ("minitron_depth", "minitron_width")


def variants() -> tuple[str, ...]:
    out = [f"{m}@0.5 retrain={SCALING} parents=P,Meta total_for=50B" for m in STRUCTURED]
    out += [f"{m}@0.5 retrain=50B parents=P,Meta retrain_parents=P" for m in SPARSE]
    # Table 11's ratios are fractions of all parameters (1 - 3/8, 2/8, 1.5/8 of "8 B"): ratio_of=params
    out += [f"{m}@{r} retrain=50B scratch=S_N ratio_of=params" for m in ABLATION for r in (0.625, 0.75, 0.8125)]
    return tuple(out)


def get_config(arg=None):
    return ConfigDict({
        "model": {"preset": "llama3.1-8b", "dtype": "bfloat16", "remat": "dots_with_no_batch_dims_saveable"},
        "train": {"global_batch": 512, "lr_sweep": (1e-5, 3e-5, 1e-4, 3e-4, 1e-3), "sweep_fraction": 0.02,
                  "checkpoint_every": 1000, "keep_checkpoints": 3, "eval_every": 5000},
        "eval": {  # Appendix E: lm-eval's own data (ARC, SciQ, OBQA test splits), 256 x 8192-token windows of
                   # the train splits the paper's scripts read (WikiText-103 and -2 then differ, as in its tables)
            "task_source": "hub",
            "perplexity": {"corpora": ("c4", "wikitext103", "wikitext2", "cnn_dm"), "split": "train",
                           "seq_len": 8192, "n_seqs": 256},
        },
        "study": {
            "name": "paper",
            "pretrain_tokens": "200B",
            "retrain_tokens": tuple(SCALING.split(",")),
            "variants": variants(),
            "imported": {"Meta": "checkpoints/llama-3.1-8b"},
            "method_settings": "paper",   # every method's Table 1 shape and Appendix D.2 calibration
            "calibration": {name: PAPER_CORPORA[name][0].format(split="train") for name in ("wikitext103", "c4")},
            "require_validation": True,   # the DCLM-loss column: data.validation = held-out DCLM sequences
        },
    })
