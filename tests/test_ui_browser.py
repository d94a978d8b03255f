"""End to end in a real browser: an operator opens the Lineage page of the daily assets in the
Dagster UI, clicks "Materialize all…", picks two days, launches the backfill, and sees it succeed.

Chromium is Debian's (/usr/bin/chromium, or $BILLING_CHROMIUM), driven headless by Playwright
(its own browser download is not used). Without Chromium or Playwright the test is skipped on a
developer machine but fails in CI (CI or BILLING_REQUIRE_BROWSER set; .ci/run sets the latter).
"""

from __future__ import annotations

import os
import shutil
from urllib.parse import quote

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.acceptance]

RUN_TIMEOUT = 600
#: the UI is slow to render on a loaded machine; every click and wait gets this long (ms)
UI_TIMEOUT_MS = 120_000


def _missing(what: str):
    if os.environ.get("CI") or os.environ.get("BILLING_REQUIRE_BROWSER"):
        pytest.fail(f"{what} (required in CI: the browser test must run there)")
    pytest.skip(what)


@pytest.fixture(scope="module")
def browser():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _missing("playwright is not installed (pip install -e '.[test]')")
    chromium = os.environ.get("BILLING_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if not chromium:
        _missing("no chromium on PATH (apt-get install chromium, or set BILLING_CHROMIUM)")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=chromium, headless=True, args=["--no-sandbox", "--disable-dev-shm-usage"])
        try:
            yield b
        finally:
            b.close()


@pytest.fixture
def page(browser, tmp_path):
    context = browser.new_context(viewport={"width": 1400, "height": 900})
    context.set_default_timeout(UI_TIMEOUT_MS)
    page = context.new_page()
    try:
        yield page
    finally:
        page.screenshot(path=str(tmp_path / "last.png"))  # what the page showed last, for a failure
        context.close()


def test_backfill_of_two_days_launched_from_the_lineage_page_succeeds(dagster_server, page):
    server = dagster_server
    # the last two days: a backfill also targets the later days of the models that look back (none here)
    picked = server.partition_keys("raw_samples")[-2:]
    # Lineage, filtered to the daily assets (what typing job:"daily_usage" in its search box opens)
    page.goto(server.url + "/asset-groups~" + quote('job:"daily_usage"', safe="") + "/")
    page.get_by_role("button", name="Materialize all…").click()
    # the partitions dialog; an "Are you sure?" about unmaterialized upstreams may come first
    partitions = page.get_by_placeholder("No matching partitions")
    confirm = page.get_by_role("button", name="Confirm")
    partitions.or_(confirm).first.wait_for()
    if confirm.is_visible():
        confirm.click()
    partitions.fill(f"[{picked[0]}...{picked[1]}]")
    partitions.press("Enter")
    dialog = page.get_by_role("dialog")
    dialog.get_by_text("2 partitions", exact=True).wait_for()
    # the UI posts to /graphql?op=<operation>
    with page.expect_response(lambda r: "/graphql" in r.url and "launchPartitionBackfill" in (r.request.post_data or "")) as launched:
        dialog.get_by_role("button", name="Launch backfill").click()
    got = launched.value.json()["data"]["launchPartitionBackfill"]
    assert got["__typename"] == "LaunchBackfillSuccess", got
    backfill_id = got["backfillId"]

    backfill = server.wait_backfill(backfill_id, RUN_TIMEOUT)
    detail = server.graphql(
        "query($id: String!) { partitionBackfillOrError(backfillId: $id) { ... on PartitionBackfill { isAssetBackfill } } }", {"id": backfill_id}
    )
    assert detail["partitionBackfillOrError"]["isAssetBackfill"], "the Lineage page launched a job backfill, not an asset backfill"
    assert backfill["status"] == "COMPLETED_SUCCESS" and all(r["status"] == "SUCCESS" for r in backfill["runs"]), (
        backfill["status"],
        [(r["id"], r["status"], server.run_errors(r["id"])) for r in backfill["runs"] if r["status"] != "SUCCESS"],
    )
    for day in picked:
        assert all(server.published(day).values()), (day, server.published(day))
    # and the UI says so: the backfill's page shows the status Succeeded
    page.goto(f"{server.url}/runs/b/{backfill_id}")
    status = page.get_by_text("Status", exact=True).first.locator("xpath=..")
    status.get_by_text("Succeeded", exact=True).wait_for()
