"""The Dagster definitions, one package per domain (billing_dags/definitions.py assembles them).

Importing any of them first silences Dagster's beta and preview warnings: the code location uses
backfill policies, asset checks with partitions and partition mappings on purpose (their use is
pinned by tests), and 20-odd warnings at every load of the code location would only hide real ones.
"""

import warnings

from dagster import BetaWarning, PreviewWarning

warnings.filterwarnings("ignore", category=BetaWarning)
warnings.filterwarnings("ignore", category=PreviewWarning)
# with BILLING_EXECUTOR=celery, dagster-celery registers its step task again for every step it submits, and
# Celery warns about the name once a run: nothing is wrong (it is the same task)
warnings.filterwarnings("ignore", message="Task name 'execute_plan' is already registered")
