"""DuckDB connections: a fresh in-memory database, or a session on this process's shared one."""

from __future__ import annotations

import itertools
import os
import threading
from contextlib import contextmanager

import duckdb


def connect(threads: int | None = None) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB connection; ``threads`` (else BILLING_DUCKDB_THREADS, else every core) caps its pool."""
    threads = threads or os.environ.get("BILLING_DUCKDB_THREADS")
    config = {"autoinstall_known_extensions": False, "autoload_known_extensions": True}
    if threads:
        config["threads"] = int(threads)
    con = duckdb.connect(config=config)
    con.execute("set timezone = 'UTC'")
    return con


#: the in-memory DuckDB databases that sessions open cursors on, one per (process id, thread cap).
#: Keyed by process: a forked child must not use its parent's database (its threads are not there)
#: and must not close it either (DuckDB would join threads that do not exist in the child and
#: crash, e.g. in a subprocess's preexec_fn), so it leaves the parent's entry alone and opens its own.
_SHARED: dict[tuple[int, int | None], duckdb.DuckDBPyConnection] = {}
_SHARED_LOCK = threading.Lock()
_SESSION_IDS = itertools.count()


@contextmanager
def session(threads: int | None = None):
    """A connection for one model run: a cursor of this process's shared in-memory DuckDB database
    (opening a database costs about 0.1 s of CPU, a cursor about 1 ms), in a schema of its own.

    Everything the run creates (macros, views, tables) goes into that schema, which is dropped
    when the block ends, so sessions never see each other's objects, also when several run at
    once in threads. ``threads`` caps the database's pool as ``connect`` does.
    """
    threads = threads or os.environ.get("BILLING_DUCKDB_THREADS")
    key = (os.getpid(), int(threads) if threads else None)
    with _SHARED_LOCK:
        db = _SHARED.get(key)
        if db is None:
            db = _SHARED[key] = connect(key[1])
            db.execute("set global timezone = 'UTC'")
        con = db.cursor()
    schema = f"session_{next(_SESSION_IDS)}"
    try:
        con.execute(f"create schema {schema}")
        con.execute(f"set schema = '{schema}'")
        yield con
    finally:
        try:
            con.execute("set schema = 'main'")
            con.execute(f"drop schema {schema} cascade")
        finally:
            con.close()
