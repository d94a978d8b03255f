"""`python -m benchmarks`: every issue-7 figure in one table (see benchmarks/suite.py)."""

import sys

from .suite import main

sys.exit(main())
