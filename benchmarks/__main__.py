"""`python -m benchmarks`: every benchmark figure in one table (see benchmarks/suite.py)."""

import sys

from .suite import main

sys.exit(main())
