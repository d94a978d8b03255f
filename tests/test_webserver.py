"""Integration: the Dagster webserver (what `make dev` serves) loads the code location on 127.0.0.1."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from billing_dags.settings import PROJECT_ROOT
from servers import free_port

pytestmark = pytest.mark.integration

QUERY = """
{
  workspaceOrError {
    ... on Workspace {
      locationEntries {
        name
        loadStatus
        locationOrLoadError {
          __typename
          ... on PythonError { message }
          ... on RepositoryLocation { repositories { name assetNodes { assetKey { path } } schedules { name } sensors { name } } }
        }
      }
    }
  }
}
"""


def test_webserver_serves_the_code_location(tmp_path):
    port = free_port()
    home = tmp_path / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text((PROJECT_ROOT / "dagster.yaml").read_text())
    env = {**os.environ, "DAGSTER_HOME": str(home), "BILLING_DATA_DIR": str(tmp_path / "data")}
    webserver = Path(sys.executable).with_name("dagster-webserver")
    proc = subprocess.Popen(
        [str(webserver), "-w", "workspace.yaml", "-h", "127.0.0.1", "-p", str(port)],
        cwd=PROJECT_ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 90
        body = None
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                pytest.fail(f"dagster-webserver exited: {proc.stderr.read().decode()[-2000:]}")
            try:
                r = requests.post(f"http://127.0.0.1:{port}/graphql", json={"query": QUERY}, timeout=5)
                entries = r.json()["data"]["workspaceOrError"]["locationEntries"]
                if entries and entries[0]["loadStatus"] == "LOADED":
                    body = entries[0]
                    break
            except (requests.ConnectionError, requests.Timeout, KeyError, ValueError):
                pass
            time.sleep(1)
        assert body is not None, "code location did not load within 90 s"
        location = body["locationOrLoadError"]
        assert location["__typename"] == "RepositoryLocation", location
        repo = location["repositories"][0]
        assets = {"/".join(a["assetKey"]["path"]) for a in repo["assetNodes"]}
        assert {"raw_samples", "fct_usage_by_day", "fct_invoice_lines", "invoices", "stripe_outbox"} <= assets
        assert "daily_usage_schedule" in {s["name"] for s in repo["schedules"]}
        assert "late_raw_data_sensor" in {s["name"] for s in repo["sensors"]}
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
