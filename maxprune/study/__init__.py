"""The study: plan, run and report the paper's token-matched comparisons."""
