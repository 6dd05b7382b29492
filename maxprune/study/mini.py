"""The embedded default study: a miniature of the paper on the builtin corpus, sized for 2 CPU cores.

A tiny Llama parent is pretrained on the pretrain range, pruned at 50 % by a
depth, a width and a sparse method, retrained, and compared with the scratch
baselines S_N (same retraining tokens) and S_{M+N} (pretraining ∪ retraining
tokens). `arg="all"` adds every other method variant.
"""

from ml_collections import ConfigDict

from maxprune.config import config_arg

VOCAB = 2048
SEQ_LEN = 128
DEFAULT = ("minitron_depth@0.5", "minitron_width@0.5", "wanda/unstructured@0.5")
MORE = ("flap@0.5", "sheared_llama@0.5", "wanda/2:4@0.5", "sparsegpt/unstructured@0.5", "sparsegpt/2:4@0.5")


def get_config(arg=None):
    variants = DEFAULT + (MORE if config_arg(arg, ("all",)) == "all" else ())
    return ConfigDict({
        "model": {"preset": "tiny", "dtype": "float32",
                  "arch": {"vocab_size": VOCAB, "hidden_size": 128, "num_layers": 4, "num_heads": 4,
                           "num_kv_heads": 2, "head_dim": 32, "ffn_size": 384, "max_position_embeddings": SEQ_LEN}},
        "mesh": {"data": 1, "fsdp": -1, "tensor": 1},
        "train": {"global_batch": 16, "lr": 3e-3, "log_every": 10, "checkpoint_every": 100, "eval_sequences": 64,
                  "tensorboard": False},
        "prune": {"n_samples": 32, "seq_len": SEQ_LEN, "batch_size": 16},
        "eval": {"tasks": ("arc_easy", "piqa", "sciq"), "limit": 40, "batch_size": 32,
                 "perplexity": {"corpora": ("builtin_wiki", "builtin_news", "builtin_fiction", "builtin_shakespeare"),
                                "seq_len": SEQ_LEN, "n_seqs": 32, "batch_size": 16},
                 "validation_sequences": 64},
        "study": {"name": "mini" if arg != "all" else "mini-all", "pretrain_tokens": "500K",
                  "retrain_tokens": ("125K",), "variants": variants, "sheared_tokens": "100K",
                  "method_settings": "study"},  # the demo's own small calibration for every method
    })
