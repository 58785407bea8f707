"""`python -m pipeline ...`: the same CLI as the `listener-grpo` console script."""

import sys

from pipeline.cli import main

sys.exit(main())
