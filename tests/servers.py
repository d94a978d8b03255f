"""Servers for tests: a free 127.0.0.1 port, an ASGI app served by uvicorn in a thread, waiting on a
condition, stopping a server process (its whole process group), and a real Dagster instance
(`DagsterServer`: webserver + daemon) to drive over GraphQL."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import requests
import uvicorn


class HandlerServer:
    """A standard-library HTTP server for one handler class on 127.0.0.1 (port 0, read back as
    ``url``), served from a thread while the ``with`` block lasts."""

    def __init__(self, handler, poll_interval: float = 0.05):
        from http.server import ThreadingHTTPServer

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": poll_interval}, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def serve_app(app, timeout_s: float = 10) -> Iterator[str]:
    """Serve ``app`` on 127.0.0.1 until the block ends; yields its base URL."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error", access_log=False))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + timeout_s
    while not server.started:
        assert thread.is_alive() and time.time() < deadline, "server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout_s)


def receiver_command(data_dir: Path, seeds_dir: Path, port: int, *flags: str) -> list[str]:
    """The argv of ``billing remote-write serve`` (the CLI, as an operator starts it) on 127.0.0.1:``port``
    over ``data_dir`` and ``seeds_dir``, with the free-disk floor off (``--min-free-bytes 0``: a test or
    benchmark must not depend on how full the machine's disk is); ``flags`` are appended."""
    return [
        sys.executable,
        "-m",
        "billing_dags.cli.main",
        "--data-dir",
        str(data_dir),
        "--seeds-dir",
        str(seeds_dir),
        "remote-write",
        "serve",
        "--listen",
        f"127.0.0.1:{port}",
        "--min-free-bytes",
        "0",
        *flags,
    ]


def wait_for(pred, timeout: float, what: str, step: float = 0.2):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            value = pred()
            if value:
                return value
        except (requests.RequestException, OSError):
            pass
        time.sleep(step)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def stop(proc: subprocess.Popen, sig=signal.SIGTERM, timeout: float = 15) -> None:
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, sig)
        proc.wait(timeout)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(5)


#: PostgreSQL's server binaries (Debian's `postgresql` package), newest major version first
POSTGRES_BINDIRS = sorted((str(p.parent) for p in Path("/usr/lib/postgresql").glob("*/bin/initdb")), key=lambda d: int(Path(d).parent.name), reverse=True)


@contextmanager
def postgres_server(base: Path, user: str = "billing") -> Iterator[str]:
    """A real PostgreSQL server for the block: initdb into a folder of its own, postgres on a free
    127.0.0.1 port (socket in that folder, no fsync), in its own process group; yields the libpq DSN
    (``host=127.0.0.1 port=N user=USER dbname=postgres``, trust authentication) once it accepts a connection.

    As root (CI) the server runs as the package's ``postgres`` user, in a folder under /tmp that user can
    enter (a test's tmp_path may not be). ``base`` is only used when not root. Needs psycopg and
    POSTGRES_BINDIRS non-empty (skip the test otherwise)."""
    import pwd
    import shutil
    import tempfile

    import psycopg

    bindir = POSTGRES_BINDIRS[0]
    env = {**os.environ, "LC_ALL": "C"}
    runas: list[str] = []
    if os.geteuid() == 0:  # PostgreSQL refuses to run as root: run it as the package's postgres user
        pw = pwd.getpwnam("postgres")
        runas = ["runuser", "-u", "postgres", "--"]
        base = Path(tempfile.mkdtemp(prefix="billing-pg-"))
    data, sock = base / "data", base / "sock"
    sock.mkdir(parents=True)
    if runas:
        os.chmod(base, 0o755)
        for p_ in (base, sock):
            os.chown(p_, pw.pw_uid, pw.pw_gid)
    proc = None
    try:
        initdb = [*runas, f"{bindir}/initdb", "-D", str(data), "-A", "trust", "-U", user, "-E", "UTF8", "--no-sync"]
        subprocess.run(initdb, check=True, capture_output=True, env=env)
        port = free_port()
        proc = subprocess.Popen(
            [*runas, f"{bindir}/postgres", "-D", str(data), "-p", str(port), "-k", str(sock), "-c", "listen_addresses=127.0.0.1", "-c", "fsync=off"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
            env=env,
        )
        dsn = f"host=127.0.0.1 port={port} user={user} dbname=postgres"

        def accepts() -> bool:
            assert proc.poll() is None, f"postgres exited with {proc.returncode} (port {port} taken?)"
            try:
                psycopg.connect(dsn, connect_timeout=2).close()
                return True
            except psycopg.OperationalError:
                return False

        wait_for(accepts, 60, f"PostgreSQL on port {port}", step=0.1)
        yield dsn
    finally:
        if proc is not None:
            stop(proc, timeout=30)
        if runas:
            shutil.rmtree(base, ignore_errors=True)


#: credentials moto's S3 server accepts (any), for the tests' buckets
S3_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_REGION": "us-east-1"}


@contextmanager
def moto_s3_server() -> Iterator[str]:
    """moto's standalone S3 server as its own process (group) on 127.0.0.1, port 0; yields its URL (the port
    read back from its startup line) once it listens."""
    import re

    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    found: dict[str, str] = {}

    def read():
        for line in proc.stdout:
            m = re.search(r"Running on (http://127\.0\.0\.1:\d+)", line)
            if m:
                found["url"] = m.group(1)

    threading.Thread(target=read, daemon=True).start()
    try:
        url = wait_for(lambda: found.get("url") or (proc.poll() is not None and "exited"), 60, "moto's S3 server to start")
        assert url != "exited", "moto.server exited"
        yield url
    finally:
        stop(proc)


# --------------------------------------------------------------------------- a real Dagster instance

#: variables of the developer's shell that would point the instance at real systems
_ISOLATED = (
    "PROMETHEUS_URL",
    "STRIPE_API_KEY",
    "STRIPE_API_BASE",
    "BILLING_USAGE_EVENTS_DSN",
    "DAGSTER_HOME",
    "BILLING_DATA_DIR",
    "BILLING_DATA_URL",
    "BILLING_SEEDS_DIR",
    "BILLING_EXECUTOR",
    "BILLING_CELERY_BROKER",
    "BILLING_CELERY_BACKEND",
)

_READY = """
{
  workspaceOrError { ... on Workspace { locationEntries { name loadStatus
    locationOrLoadError { __typename ... on PythonError { message } } } } }
  instance { daemonHealth { allDaemonStatuses { daemonType required healthy } } }
}
"""

#: seconds between two iterations of the daemon's backfill loop (Dagster's is 30 s, a constant, not a setting:
#: an asset backfill of a few days takes several iterations, so the UI tests mostly waited on it). The daemon
#: is `dagster-daemon run` itself, started through its entry point with that one constant lowered. Not lower:
#: an iteration over a backfill in progress costs the daemon CPU (seconds on a loaded machine), taken from the
#: runs it waits for.
DAEMON_INTERVAL_S = 5
_DAEMON = (
    "import sys, dagster._daemon.controller as c; c.DEFAULT_DAEMON_INTERVAL_SECONDS = {interval}; "
    "from dagster._daemon.cli import main; sys.argv[0] = 'dagster-daemon'; sys.exit(main())"
)
#: appended to the project's dagster.yaml in a test instance (see DagsterServer._instance_yaml)
_FAST_QUEUE = """
# tests/servers.py: the run queue polled every second (the default is 5 s)
run_coordinator:
  module: dagster._core.run_coordinator
  class: QueuedRunCoordinator
  config:
    dequeue_interval_seconds: 1
"""

TERMINAL_RUN = {"SUCCESS", "FAILURE", "CANCELED"}
TERMINAL_BACKFILL = {"COMPLETED", "COMPLETED_SUCCESS", "COMPLETED_FAILED", "FAILED", "CANCELED"}


def _signal_group(pgid: int, sig) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


class GraphQLError(AssertionError):
    pass


class DagsterServer:
    """``dagster-webserver`` and ``dagster-daemon run`` over the project's workspace.yaml, each in its own
    process group, with DAGSTER_HOME (the project's dagster.yaml copied in) and BILLING_DATA_DIR under ``root``.

    ``start()`` returns once GraphQL answers, the code location is LOADED and every required daemon
    reports a healthy heartbeat; ``stop()`` ends both groups (their code servers and runs with them).
    Their output goes to ``root/webserver.log`` and ``root/daemon.log`` (``log_tail()`` for failures).
    """

    def __init__(self, root: Path, seeds_dir: Path | None = None, env: dict | None = None):
        from billing_dags.core.settings import PROJECT_ROOT

        self.project = PROJECT_ROOT
        self.root = Path(root)
        self.home = self.root / "dagster_home"
        self.data_dir = self.root / "data"
        self.seeds_dir = seeds_dir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.procs: dict[str, subprocess.Popen] = {}
        self.env = {k: v for k, v in os.environ.items() if k not in _ISOLATED}
        self.env.update(
            {
                "DAGSTER_HOME": str(self.home),
                "BILLING_DATA_DIR": str(self.data_dir),
                # a loaded machine can take a while to start a run's process; launches time out after 60 s by default
                "DAGSTER_GRPC_TIMEOUT_SECONDS": "180",
                # this checkout's code, whatever is installed in the venv
                "PYTHONPATH": os.pathsep.join([str(PROJECT_ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]),
            }
        )
        if seeds_dir is not None:
            self.env["BILLING_SEEDS_DIR"] = str(seeds_dir)
        self.env.update(env or {})

    # ------------------------------------------------------------------ lifecycle

    def start(self, timeout: float = 180) -> DagsterServer:
        self.home.mkdir(parents=True, exist_ok=True)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        (self.home / "dagster.yaml").write_text(self._instance_yaml())
        # the storage exists before two processes start: both creating it at once races on its schema
        from dagster import DagsterInstance

        with DagsterInstance.from_config(str(self.home)):
            pass
        bin_dir = Path(sys.executable).parent
        self._spawn("webserver", [str(bin_dir / "dagster-webserver"), "-w", "workspace.yaml", "-h", "127.0.0.1", "-p", str(self.port)])
        self._spawn("daemon", [sys.executable, "-c", _DAEMON.format(interval=DAEMON_INTERVAL_S), "run", "-w", "workspace.yaml"])
        try:
            self.wait(self._ready, timeout, "webserver answering, code location LOADED, daemons healthy")
        except BaseException:
            self.stop()
            raise
        return self

    def _instance_yaml(self) -> str:
        """The project's dagster.yaml, plus a run queue that is polled every second instead of every 5 s
        (runs start as they would in production, only without the wait)."""
        return (self.project / "dagster.yaml").read_text() + _FAST_QUEUE

    def _spawn(self, name: str, argv: list[str]) -> None:
        with open(self.root / f"{name}.log", "ab") as log:
            self.procs[name] = subprocess.Popen(
                argv, cwd=self.project, env=self.env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )

    def stop(self, grace: float = 15) -> None:
        """SIGTERM both process groups, then SIGKILL whatever of them is left after ``grace`` seconds
        (code servers and run workers can outlive their leader)."""
        for proc in self.procs.values():
            if proc.poll() is None:
                _signal_group(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        for proc in self.procs.values():
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        for proc in self.procs.values():
            _signal_group(proc.pid, signal.SIGKILL)
            proc.wait(10)

    def __enter__(self) -> DagsterServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def log_tail(self, chars: int = 3000) -> str:
        out = []
        for name in self.procs:
            f = self.root / f"{name}.log"
            if f.exists():
                out.append(f"--- {name}.log\n" + f.read_text(errors="replace")[-chars:])
        return "\n".join(out)

    def pids(self) -> list[int]:
        """The webserver, the daemon and every process in their groups (code servers, runs)."""
        groups = {p.pid for p in self.procs.values() if p.poll() is None}
        found = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    if os.getpgid(int(entry.name)) in groups:
                        found.append(int(entry.name))
                except (ProcessLookupError, PermissionError):
                    pass
        return found

    # ------------------------------------------------------------------ waiting

    def wait(self, pred, timeout: float, what: str, step: float = 0.5):
        """``pred()`` until it is truthy, failing at once if a server process exits, and at the deadline."""
        deadline = time.monotonic() + timeout
        last = None
        while True:
            for name, proc in self.procs.items():
                if proc.poll() is not None:
                    raise AssertionError(f"{name} exited with {proc.returncode} while waiting for {what}\n{self.log_tail()}")
            try:
                value = pred()
                if value:
                    return value
            except (requests.RequestException, OSError, GraphQLError, KeyError, TypeError) as e:
                last = e
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what} (last error: {last!r})\n{self.log_tail()}")
            time.sleep(step)

    def _ready(self) -> bool:
        data = self.graphql(_READY)
        entries = data["workspaceOrError"]["locationEntries"]
        if not entries or any(e["loadStatus"] != "LOADED" for e in entries):
            return False
        for e in entries:
            if e["locationOrLoadError"]["__typename"] != "RepositoryLocation":
                raise AssertionError(f"code location {e['name']} failed to load: {e['locationOrLoadError']}")
        daemons = data["instance"]["daemonHealth"]["allDaemonStatuses"]
        return bool(daemons) and all(d["healthy"] for d in daemons if d["required"])

    # ------------------------------------------------------------------ GraphQL

    def graphql(self, query: str, variables: dict | None = None, timeout: float = 60) -> dict:
        """The ``data`` of a GraphQL answer; GraphQLError if it has ``errors``."""
        r = requests.post(f"{self.url}/graphql", json={"query": query, "variables": variables or {}}, timeout=timeout)
        body = r.json()
        if body.get("errors"):
            raise GraphQLError(f"GraphQL errors: {body['errors']}")
        r.raise_for_status()
        return body["data"]

    def launch_run(
        self, job: str, partition: str | None = None, run_config: dict | None = None, tags: dict | None = None, assets: list[dict] | None = None
    ) -> str:
        """Launch a run of ``job`` (of the partition; of ``assets`` of it, as a schedule's request with an asset
        selection does) as the Launchpad does; its run id (it is queued for the daemon)."""
        tags = dict(tags or {})
        if partition is not None:
            tags["dagster/partition"] = partition
        selector = {"repositoryLocationName": "billing_dags", "repositoryName": "__repository__", "jobName": job}
        if assets is not None:
            selector["assetSelection"] = assets
        data = self.graphql(
            """mutation($p: ExecutionParams!) { launchRun(executionParams: $p) { __typename
                 ... on LaunchRunSuccess { run { id } } ... on PythonError { message } ... on Error { message }
                 ... on RunConfigValidationInvalid { errors { message } } } }""",
            {
                "p": {
                    "selector": selector,
                    "runConfigData": run_config or {},
                    "executionMetadata": {"tags": [{"key": k, "value": v} for k, v in tags.items()]},
                }
            },
        )
        got = data["launchRun"]
        if got["__typename"] != "LaunchRunSuccess":
            raise GraphQLError(f"launching {job}: {got}")
        return got["run"]["id"]

    def asset_keys(self, job: str) -> list[dict]:
        """The asset keys (as GraphQL inputs) of the assets of ``job``, as the Catalog selects them."""
        nodes = self.graphql("{ assetNodes { assetKey { path } jobNames } }")["assetNodes"]
        return [{"path": n["assetKey"]["path"]} for n in nodes if job in n["jobNames"]]

    def partition_keys(self, asset: str) -> list[str]:
        data = self.graphql("query($k: AssetKeyInput!) { assetNodeOrError(assetKey: $k) { ... on AssetNode { partitionKeys } } }", {"k": {"path": [asset]}})
        return data["assetNodeOrError"]["partitionKeys"]

    def launch_asset_backfill(self, assets: list[dict], partitions: list[str]) -> str:
        """An asset backfill, as "Materialize…" with several partitions in the Catalog or Lineage launches it; its id."""
        data = self.graphql(
            """mutation($p: LaunchBackfillParams!) { launchPartitionBackfill(backfillParams: $p) { __typename
                 ... on LaunchBackfillSuccess { backfillId } ... on PythonError { message } ... on Error { message } } }""",
            {"p": {"assetSelection": assets, "partitionNames": partitions}},
        )
        got = data["launchPartitionBackfill"]
        if got["__typename"] != "LaunchBackfillSuccess":
            raise GraphQLError(f"launching a backfill of {partitions}: {got}")
        return got["backfillId"]

    def reexecute(self, run_id: str, strategy: str) -> str:
        """Re-execute run ``run_id`` (strategy ALL_STEPS, FROM_FAILURE or FROM_ASSET_FAILURE) as the run page does; the new run's id."""
        data = self.graphql(
            """mutation($p: ReexecutionParams!) { launchRunReexecution(reexecutionParams: $p) { __typename
                 ... on LaunchRunSuccess { run { id } } ... on PythonError { message } ... on Error { message } } }""",
            {"p": {"parentRunId": run_id, "strategy": strategy}},
        )
        got = data["launchRunReexecution"]
        if got["__typename"] != "LaunchRunSuccess":
            raise GraphQLError(f"re-executing run {run_id} ({strategy}): {got}")
        return got["run"]["id"]

    def runs(self, job: str, tags: dict) -> list[dict]:
        data = self.graphql(
            """query($f: RunsFilter) { runsOrError(filter: $f) { __typename
                 ... on Runs { results { id status tags { key value } } } ... on PythonError { message } } }""",
            {"f": {"pipelineName": job, "tags": [{"key": k, "value": v} for k, v in tags.items()]}},
        )
        return data["runsOrError"]["results"]

    def published(self, day: str) -> dict[str, bool]:
        """Whether the day's raw samples and its partition of each daily usage model are on disk."""
        data = self.data_dir
        return {
            "raw samples": any((data / "raw" / "samples" / f"date={day}").glob("*.parquet")),
            **{
                m: (data / "models" / m / f"day={day}" / "data.parquet").exists()
                for m in ("int_series_edges_by_day", "int_gauge_peaks_by_day", "fct_usage_by_day")
            },
        }

    def run(self, run_id: str) -> dict:
        data = self.graphql(
            """query($id: ID!) { runOrError(runId: $id) { __typename
                 ... on Run { id status tags { key value } } ... on PythonError { message } } }""",
            {"id": run_id},
        )
        run = data["runOrError"]
        if run["__typename"] != "Run":
            raise GraphQLError(f"run {run_id}: {run}")
        return run

    def wait_run(self, run_id: str, timeout: float) -> dict:
        """The run once it has finished (SUCCESS, FAILURE or CANCELED)."""
        return self.wait(lambda: (r := self.run(run_id))["status"] in TERMINAL_RUN and r, timeout, f"run {run_id} to finish")

    def run_errors(self, run_id: str) -> str:
        """The messages and errors of a run's failure events, for assertion messages."""
        data = self.graphql(
            """query($id: ID!) { logsForRun(runId: $id, limit: 5000) { __typename
                 ... on EventConnection { events { __typename
                   ... on MessageEvent { message level }
                   ... on ExecutionStepFailureEvent { stepKey error { message causes { message } } }
                   ... on RunFailureEvent { error { message causes { message } } } } } } }""",
            {"id": run_id},
        )
        events = data["logsForRun"].get("events") or []
        lines = []
        for e in events:
            error = e.get("error") or {}
            err = " <- ".join(m.strip() for m in [error.get("message"), *(c["message"] for c in error.get("causes") or [])] if m)
            if err or e.get("level") == "ERROR":
                lines.append(f"{e['__typename']} {e.get('stepKey') or ''}: {err or e.get('message')}".strip())
        return "\n".join(lines)[-6000:]

    def backfill(self, backfill_id: str) -> dict:
        data = self.graphql(
            """query($id: String!) { partitionBackfillOrError(backfillId: $id) { __typename
                 ... on PartitionBackfill { id status partitionNames error { message }
                   runs { id status tags { key value } } }
                 ... on PythonError { message } } }""",
            {"id": backfill_id},
        )
        b = data["partitionBackfillOrError"]
        if b["__typename"] != "PartitionBackfill":
            raise GraphQLError(f"backfill {backfill_id}: {b}")
        return b

    def wait_backfill(self, backfill_id: str, timeout: float) -> dict:
        """The backfill once it is done and none of its runs is still going."""

        def done():
            b = self.backfill(backfill_id)
            return b["status"] in TERMINAL_BACKFILL and all(r["status"] in TERMINAL_RUN for r in b["runs"]) and b

        return self.wait(done, timeout, f"backfill {backfill_id} to finish", step=1)
