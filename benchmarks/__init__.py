"""Reproducible performance workloads (`make bench`); figures are printed, not asserted.

The servers and corpora the workloads start and send come from the test harness in tests/.
"""

import sys
from pathlib import Path

_TESTS = str(Path(__file__).resolve().parent.parent / "tests")
if _TESTS not in sys.path:
    sys.path.insert(0, _TESTS)
