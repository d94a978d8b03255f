"""The billing_dags code location: every definition under billing_dags/defs/ (pyproject's [tool.dg]
defs_module), found by Dagster's defs-folder loader; each domain lives in billing_dags/defs/<domain>/."""

from pathlib import Path

import dagster as dg

from billing_dags.defs.shared.metadata import with_owners


@dg.definitions
def defs() -> dg.Definitions:
    """Assets, checks, jobs, schedules and sensors from the modules of defs/; resources
    (defs/shared/resources.py) and the executor (defs/shared/executor.py) too. Every asset gets the
    billing owners (defs/shared/metadata.py)."""
    return dg.load_from_defs_folder(path_within_project=Path(__file__).parent).map_asset_specs(func=with_owners)
