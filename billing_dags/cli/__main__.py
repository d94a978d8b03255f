"""`python -m billing_dags.cli`: the `billing` command."""

import sys

from billing_dags.cli.main import main

sys.exit(main())
