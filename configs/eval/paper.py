"""The paper's evaluation protocol (Appendix E) with published data from the hub.

    maxprune eval runs/P200-R50/model --config configs/eval/paper.py            # test splits, as the text says
    maxprune eval runs/P200-R50/model --config configs/eval/paper.py:scripts    # train splits, as its scripts read

Perplexity: C4, WikiText-103, WikiText-2, CNN/DailyMail, up to 256 windows of 8192
tokens. Tasks: the eight zero-shot tasks with lm-eval's own datasets and splits
(ARC, SciQ, OpenBookQA on test). Needs network access to the HF hub.
"""

from ml_collections import ConfigDict


def get_config(arg=None):
    if arg not in (None, "scripts"):
        raise ValueError(f"arg must be empty or 'scripts', got {arg!r}")
    return ConfigDict({
        "model": {"dtype": "bfloat16"},
        "eval": {
            "task_source": "hub",
            "perplexity": {"corpora": ("c4", "wikitext103", "wikitext2", "cnn_dm"),
                           "split": "train" if arg == "scripts" else "test",
                           "seq_len": 8192, "n_seqs": 256},
        },
    })
