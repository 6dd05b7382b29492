"""`python -m maxprune`: the same as the `maxprune` console script."""

import sys

from maxprune.cli import main

sys.exit(main())
