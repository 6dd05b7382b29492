"""`python -m maxprune.eval ...`: lm-eval's own CLI with the ``maxprune`` model registered.

lm-eval has no plugin hook for models, so `lm_eval --model maxprune` cannot find
ours; this runs the same CLI after registering it::

    python -m maxprune.eval run --model maxprune --model_args path=runs/x/model --tasks piqa
"""

from lm_eval.__main__ import cli_evaluate

import maxprune.eval.lm_eval_adapter  # noqa: F401  registers "maxprune"

if __name__ == "__main__":
    cli_evaluate()
