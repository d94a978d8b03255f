"""Integration: the Dagster webserver (what `make dev` serves) loads the code location on 127.0.0.1,
with the daemon beside it (tests/servers.py `DagsterServer`, the session's `dagster_server`)."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.integration

QUERY = """
{
  workspaceOrError {
    ... on Workspace {
      locationEntries {
        name
        locationOrLoadError {
          ... on RepositoryLocation { repositories { name assetNodes { assetKey { path } } schedules { name } sensors { name } } }
        }
      }
    }
  }
  instance { daemonHealth { allDaemonStatuses { daemonType required healthy } } }
}
"""


def test_webserver_serves_the_code_location(dagster_server):
    data = dagster_server.graphql(QUERY)
    repo = data["workspaceOrError"]["locationEntries"][0]["locationOrLoadError"]["repositories"][0]
    assets = {"/".join(a["assetKey"]["path"]) for a in repo["assetNodes"]}
    assert {"raw_samples", "fct_usage_by_day", "fct_invoice_lines", "invoices", "stripe_outbox"} <= assets
    assert "daily_usage_schedule" in {s["name"] for s in repo["schedules"]}
    assert "late_raw_data_sensor" in {s["name"] for s in repo["sensors"]}
    daemons = {d["daemonType"] for d in data["instance"]["daemonHealth"]["allDaemonStatuses"] if d["healthy"]}
    assert {"SCHEDULER", "SENSOR", "QUEUED_RUN_COORDINATOR", "BACKFILL"} <= daemons
