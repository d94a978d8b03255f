"""Shared fixtures: every test gets its own data dir; nothing on disk is shared between tests.

`make test` runs the suite on several workers (pytest-xdist, ``--dist loadgroup``): a test that uses a
fixture built once for many tests (session or module scope, defined here or in its module) runs on the
worker that holds that fixture, so nothing expensive is built twice (see ``pytest_collection_modifyitems``).
A new expensive setup shared by several tests: make it a fixture of module (or session) scope that builds
a template once, and a function-scoped fixture that copies it into the test's tmp_path (as test_security_sql's
``built``/``wh`` do); its tests are then scheduled on one worker by themselves."""

from __future__ import annotations

from pathlib import Path

import pytest
from seed_copies import copy_small_seeds

from billing_dags.core.settings import resolve_paths


def pytest_configure(config):
    """Under ``--dist loadgroup`` the controller hands out the groups in the order of the collection,
    which pytest_collection_modifyitems below sets (xdist's own reordering, by number of tests per
    group, would queue the Dagster instance's few long tests behind bigger groups of quick ones)."""
    if getattr(config.option, "dist", "no") == "loadgroup":
        config.option.loadscopereorder = False


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    """Group the tests of each shared fixture for xdist's loadgroup: those of a session-scoped fixture
    of ours (e.g. ``dagster_server``) under its name, those of a module-scoped one under their module.
    Under loadgroup the longest work goes first, so that both workers finish together: the session
    groups, then the module groups (most tests first), then every other test in collection order.
    Without xdist nothing changes."""
    loadgroup = getattr(config.option, "loadgroup", False)  # an xdist worker under --dist loadgroup
    tiers: dict[str, tuple[int, int]] = {}
    for item in items:
        info = getattr(item, "_fixtureinfo", None)
        if info is None:
            continue
        session, module = None, None
        for name in item.fixturenames:
            defs = info.name2fixturedefs.get(name)
            if not defs or not defs[-1].baseid:  # pytest's own fixtures (tmp_path_factory...) have no baseid
                continue
            if defs[-1].scope == "session":
                session = session or name
            elif defs[-1].scope in ("module", "package"):
                module = module or item.nodeid.split("::")[0]
        if session or module:
            item.add_marker(pytest.mark.xdist_group(session or module))
            if loadgroup:
                _suffix_group(item, session or module)
                tier = tiers.setdefault(session or module, (0 if session else 1, 0))
                tiers[session or module] = (tier[0], tier[1] - 1)  # more tests, earlier
    if loadgroup:

        def rank(item) -> tuple[int, int]:
            group = item.nodeid.rpartition("@")[2] if "@" in item.nodeid else None
            return tiers.get(group, (2, 0))

        items.sort(key=rank)  # stable: a group's tests, and the rest, keep their order


def _suffix_group(item, group: str) -> None:
    """Append ``@group`` to the test's id, which is what xdist's loadgroup scheduler reads. xdist's own
    hook does it by setting ``item._nodeid``; since pytest 9.2 a node's id lives in ``item._id`` (a
    ``NodeId``), so that suffix never reached the scheduler: every test was a unit of its own and a
    fixture of module or session scope was built on both workers (the Dagster instance, each shared
    month). Setting ``_id`` (or ``_nodeid`` on an older pytest) here fixes that for our groups."""
    nodeid = item.nodeid
    if nodeid.endswith("@" + group):
        return
    if hasattr(item, "_id"):
        from _pytest.nodeid import NodeId

        item._id = NodeId.parse(f"{nodeid}@{group}")
    else:
        item._nodeid = f"{nodeid}@{group}"


@pytest.fixture
def data_dir(tmp_path, monkeypatch) -> Path:
    d = tmp_path / "data"
    monkeypatch.setenv("BILLING_DATA_DIR", str(d))
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "dagster_home"))
    (tmp_path / "dagster_home").mkdir()
    (tmp_path / "dagster_home" / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    for var in ("PROMETHEUS_URL", "STRIPE_API_KEY", "STRIPE_API_BASE", "STRIPE_METER_API", "STRIPE_CONCURRENCY", "STRIPE_RATE_LIMIT", "BILLING_EXECUTOR"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.delenv("BILLING_DATA_URL", raising=False)  # the warehouse of a test is its local folder
    return d


@pytest.fixture
def small_seeds(tmp_path, monkeypatch) -> Path:
    """A copy of the seeds with one customer per set-up (five customers)."""
    d = copy_small_seeds(tmp_path / "seeds")
    monkeypatch.setenv("BILLING_SEEDS_DIR", str(d))
    return d


@pytest.fixture
def paths(data_dir, small_seeds):
    return resolve_paths(data_dir, small_seeds)


@pytest.fixture(scope="session")
def dagster_server(tmp_path_factory):
    """One real Dagster instance (webserver + daemon, tests/servers.py) for the integration tests that
    drive the UI's GraphQL API or a browser: starting one takes ~40 s. It bills the small seeds (five
    customers, simulated usage); the seeds are materialized once, as an operator does first. Each
    test works on days of its own (see the `days` picks in each test)."""
    from servers import DagsterServer

    root = tmp_path_factory.mktemp("instance")
    with DagsterServer(root, seeds_dir=copy_small_seeds(root / "seeds")) as server:
        run = server.wait_run(server.launch_run("refresh_seeds_and_views"), 600)
        assert run["status"] == "SUCCESS", server.run_errors(run["id"])
        yield server


@pytest.fixture
def no_proxy(monkeypatch):
    """Requests to the local test servers go straight to 127.0.0.1, whatever proxy the environment names."""
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
