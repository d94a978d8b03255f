"""Audits: SQL queries next to the models that return a model's failing rows (none: it passes).

An audit is ``<layer>/<subject>/audits/<model>__<audit>.sql``. It starts, like a model, with a
one-line ``--`` description and a YAML block:

    -- Counter usage, gauge integrals and peaks are never negative.
    /* audit
    blocking: true    # a failing audit keeps the partition from being published (false: a warning)
    */
    with usage as (
        select * from fct_usage_by_day
    ), ...
    select * from final

The audited model's name stands for the rows under audit: the new rows before they are
published, or a published partition when the audit runs alone. Every other table it reads is a
model or a source, as in a model (read from the SQL), and the window reaches it only as bound
parameters ($start_date, $end_date, $start_ms, ...). The grain (one row per key) is checked
by the runner from each model's ``grain``, not by an audit file.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from pathlib import Path

import duckdb
import pyarrow as pa

from billing_dags.core.settings import SQL_MODELS_DIR, Paths
from billing_dags.models.sqlmodels import (
    Model,
    ModelError,
    Project,
    Window,
    bound_params,
    load_project,
    parse_sql,
    prepare_reads,
    read_header,
    session,
    sources,
)

#: failing rows shown in a result (the count covers them all)
EXAMPLES = 20


@dataclass(frozen=True)
class Audit:
    model: str
    name: str
    path: Path
    sql: str
    description: str
    blocking: bool
    refs: frozenset[str]
    params: frozenset[str]


@dataclass(frozen=True)
class AuditResult:
    audit: Audit
    failing_rows: int
    rows_checked: int
    #: the first EXAMPLES failing rows, values as text
    examples: tuple[dict, ...]

    @property
    def passed(self) -> bool:
        return self.failing_rows == 0


def parse_audit(path: Path) -> Audit:
    model, sep, name = path.stem.rpartition("__")
    if not sep or not model or not name:
        raise ModelError(f"{path}: an audit file is named <model>__<audit>.sql (e.g. fct_usage_by_day__no_negative_usage.sql)")
    text, description, config = read_header(path, "audit", "blocking: true or false")
    blocking = config.get("blocking")
    if not isinstance(blocking, bool):
        raise ModelError(f"{path}: the audit block needs blocking: true (stops publishing) or false (a warning), not {blocking!r}")
    refs, params = parse_sql(path, text)
    return Audit(model, name, path, text, description, blocking, refs, params)


@cache
def _load_audits_cached(models_dir: str, stamp: tuple) -> dict[str, tuple[Audit, ...]]:
    project = load_project(Path(models_dir))
    known = sources()
    out: dict[str, list[Audit]] = {}
    for path in sorted(Path(models_dir).rglob("audits/*.sql")):
        audit = parse_audit(path)
        model = project.models.get(audit.model)
        if model is None or model.materialized != "table":
            raise ModelError(f"{path}: audits {audit.model}, which is not a table model in {models_dir}; fix the file name")
        unknown = {r for r in audit.refs if r not in project.models and r not in known}
        if unknown:
            raise ModelError(f"{path}: reads {', '.join(sorted(unknown))}, which is neither a model nor a source")
        if path.parent.parent != model.path.parent:
            raise ModelError(f"{path}: an audit sits next to its model, in {model.path.parent / 'audits'}; move it there")
        if any(a.name == audit.name for a in out.get(audit.model, [])):
            raise ModelError(f"{path}: {audit.model} has two audits named {audit.name}")
        out.setdefault(audit.model, []).append(audit)
    return {m: tuple(a) for m, a in out.items()}


def load_audits(models_dir: Path = SQL_MODELS_DIR) -> dict[str, tuple[Audit, ...]]:
    """Every audit of the tree, by the model it audits (in file name order)."""
    files = sorted(Path(models_dir).rglob("*.sql"))
    stamp = tuple((str(f), f.stat().st_mtime_ns) for f in files)
    return _load_audits_cached(str(models_dir), stamp)


def audits_of(model: str, models_dir: Path = SQL_MODELS_DIR) -> tuple[Audit, ...]:
    return load_audits(models_dir).get(model, ())


def _text(v) -> str | None:
    return None if v is None else str(v)


def run_audit(con: duckdb.DuckDBPyConnection, audit: Audit, model: Model, window: Window | None, rows_checked: int) -> AuditResult:
    """One audit in a session prepared by ``run_audits``."""
    params = bound_params(f"audit {audit.name} of {audit.model}", audit.path, audit.params, window, model.lookback_days)
    try:
        failing = con.sql(audit.sql.strip().rstrip(";"), params=params or None).to_arrow_table()
    except duckdb.Error as e:
        raise ModelError(f"audit {audit.name} of {audit.model} ({audit.path}) failed for window {window}: {e}") from None
    examples = tuple({k: _text(v) for k, v in r.items()} for r in failing.slice(0, EXAMPLES).to_pylist())
    return AuditResult(audit, len(failing), rows_checked, examples)


def run_audits(paths: Paths, model: Model, window: Window | None, table: pa.Table, *, project: Project | None = None) -> list[AuditResult]:
    """Every audit of ``model`` on ``table`` (the rows under audit), in file name order."""
    audits = audits_of(model.name)
    if not audits:
        return []
    project = project or load_project()
    with session() as con:
        prepare_reads(con, project, frozenset().union(*(a.refs for a in audits)) - {model.name}, paths, window)
        con.register(model.name, table)
        try:
            return [run_audit(con, a, model, window, len(table)) for a in audits]
        finally:
            con.unregister(model.name)
