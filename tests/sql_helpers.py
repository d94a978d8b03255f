"""Run the SQL models on fixture rows in an in-memory DuckDB.

Sources (raw_samples, raw_series, raw_carry_in, seed_*) are created as tables from fixture rows; each upstream
table model is a table named like the model, filled with what ``query()`` of that model returned,
day by day (delete-then-insert, as the real runs do).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from functools import cache
from pathlib import Path

import pyarrow as pa

from billing_dags.core.calendar import next_month
from billing_dags.core.settings import PROJECT_ROOT
from billing_dags.models import sqlmodels
from billing_dags.models.sqlmodels import Window
from billing_dags.seeds.catalog import load_seeds

SEEDS_DIR = PROJECT_ROOT / "seeds"
DAY_MS = 86_400_000
UTC = UTC

SAMPLES_SCHEMA = pa.schema([("series_id", pa.int64()), ("ts", pa.int64()), ("value", pa.float64())])
SERIES_SCHEMA = pa.schema(
    [
        ("series_id", pa.int64()),
        ("metric", pa.string()),
        ("labels", pa.map_(pa.string(), pa.string())),
        ("first_seen", pa.int64()),
    ]
)

#: fct_usage_by_day rows, for fixture partitions
USAGE_BY_DAY_SCHEMA = pa.schema(
    [
        ("day", pa.date32()),
        ("customer_id", pa.string()),
        ("meter_id", pa.string()),
        ("dimension", pa.string()),
        ("kind", pa.string()),
        ("usage", pa.decimal128(38, 9)),
        ("gauge_integral", pa.decimal128(38, 9)),
        ("gauge_covered_ms", pa.int64()),
        ("gauge_peak", pa.decimal128(38, 9)),
        ("series", pa.int64()),
        ("samples", pa.int64()),
        ("dropped_samples", pa.int64()),
        ("resets", pa.int64()),
        ("reappeared_series", pa.int64()),
        ("max_gap_ms", pa.int64()),
        ("events", pa.int64()),
        ("duplicate_conflicts", pa.int64()),
        ("gauge_held_ms", pa.int64()),
    ]
)

USAGE_BY_MONTH_SCHEMA = pa.schema(
    [
        ("month", pa.date32()),
        ("customer_id", pa.string()),
        ("meter_id", pa.string()),
        ("dimension", pa.string()),
        ("kind", pa.string()),
        ("usage", pa.decimal128(38, 9)),
        ("gauge_integral", pa.decimal128(38, 9)),
        ("gauge_covered_ms", pa.int64()),
        ("gauge_peak", pa.decimal128(38, 9)),
        ("period_ms", pa.int64()),
        ("days_with_data", pa.int64()),
        ("samples", pa.int64()),
        ("dropped_samples", pa.int64()),
        ("resets", pa.int64()),
        ("reappeared_series", pa.int64()),
    ]
)


def day_start_ms(d: date) -> int:
    return int(datetime(d.year, d.month, d.day, tzinfo=UTC).timestamp()) * 1000


def ms(d: date, hours: int = 0, minutes: int = 0, seconds: int = 0, millis: int = 0) -> int:
    return day_start_ms(d) + ((hours * 60 + minutes) * 60 + seconds) * 1000 + millis


def next_day(d: date, n: int = 1) -> date:
    return d + timedelta(days=n)


def day_window(d: date) -> Window:
    return Window(d, next_day(d))


@cache
def _real_seeds() -> dict[str, pa.Table]:
    return load_seeds(SEEDS_DIR)


def seed_tables(seeds_dir: Path | None = None) -> dict[str, pa.Table]:
    """Validated seed tables (the real seeds by default)."""
    return _real_seeds() if seeds_dir is None else load_seeds(seeds_dir)


_create_table = sqlmodels.create_table


def _append_partition(con, name: str, table: pa.Table, time_column: str, window: Window) -> None:
    """Delete-window-then-insert into the table standing for an upstream table model."""
    exists = con.execute("select count(*) from information_schema.tables where table_name = ?", [name]).fetchall()[0][0]
    if not exists:
        _create_table(con, name, table)
        return
    con.execute(
        f"delete from {name} where {time_column} >= ?::date and {time_column} < ?::date",
        [window.start, window.end],
    )
    tmp = f"__arrow_{name}"
    con.register(tmp, table)
    try:
        con.execute(f"insert into {name} by name select * from {tmp}")
    finally:
        con.unregister(tmp)


def samples_table(samples_by_series: Mapping[int, Iterable[tuple[int, float]]]) -> pa.Table:
    ids, tss, values = [], [], []
    for sid, samples in samples_by_series.items():
        for ts, v in samples:
            ids.append(int(sid))
            tss.append(int(ts))
            values.append(float(v))
    return pa.table([ids, tss, values], schema=SAMPLES_SCHEMA)


def series_table(series_labels: Mapping[int, tuple]) -> pa.Table:
    """``series_labels``: series_id -> (metric, labels dict, first_seen_ms)."""
    ids, metrics, labels, first = [], [], [], []
    for sid, (metric, lab, first_seen) in series_labels.items():
        ids.append(int(sid))
        metrics.append(metric)
        labels.append(list(lab.items()))
        first.append(int(first_seen))
    return pa.table([ids, metrics, labels, first], schema=SERIES_SCHEMA)


class Runner:
    """One in-memory DuckDB with fixture sources; runs models and keeps their tables."""

    def __init__(self, seeds: Mapping[str, pa.Table] | None = None):
        self.project = sqlmodels.load_project()
        self.con = sqlmodels.connect()
        self.con.execute("set threads = 1")  # tiny fixture tables: parallelism only costs here
        self._prepared: set[str] = set()
        for name, table in (seeds if seeds is not None else seed_tables()).items():
            _create_table(self.con, f"seed_{name}", table)
        self.con.execute(f"create or replace table raw_events as {sqlmodels.EVENTS_EMPTY_SQL}")
        _create_table(self.con, "raw_carry_in", SAMPLES_SCHEMA.empty_table())

    def set_events(self, events: pa.Table) -> None:
        """Fixture raw events (the layout of billing_dags/ingest/events.py) as the raw_events source."""
        _create_table(self.con, "raw_events", events)

    def close(self) -> None:
        self.con.close()

    def __enter__(self) -> Runner:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def set_raw(self, samples_by_series, series_labels) -> None:
        _create_table(self.con, "raw_samples", samples_table(samples_by_series))
        _create_table(self.con, "raw_series", series_table(series_labels))
        # the views already created stay: DuckDB binds a view's tables by name each time it is queried

    def set_carry_in(self, samples: Mapping[int, tuple[int, float]]) -> None:
        """The window's carry-in (series_id -> its last sample before the day) as the raw_carry_in source."""
        _create_table(self.con, "raw_carry_in", samples_table({sid: [s] for sid, s in samples.items()}))

    def set_table(self, name: str, table: pa.Table) -> None:
        _create_table(self.con, name, table)

    def query(self, name: str, window: Window | None) -> pa.Table:
        if name not in self._prepared:
            sqlmodels.prepare(self.con, self.project, name, None, window)
            self._prepared.add(name)
        return sqlmodels.query(self.con, self.project.models[name], window)

    def run(self, name: str, window: Window | None) -> pa.Table:
        """Query a table model for a window and store its rows as the table ``name``."""
        table = self.query(name, window)
        model = self.project.models[name]
        sqlmodels.check_window(model, table, window)
        if model.partitioned_by == "none":
            _create_table(self.con, name, table)
        else:
            _append_partition(self.con, name, table, model.time_column, window)
        return table

    def rows(self, sql: str, params=None) -> list[dict]:
        return self.con.execute(sql, params or []).to_arrow_table().to_pylist()


#: the daily usage models, in the order a day is computed
DAILY_MODELS = ("int_series_edges_by_day", "int_gauge_peaks_by_day", "fct_usage_by_day")


@dataclass
class DayChain:
    edges: dict[date, list[dict]] = field(default_factory=dict)
    days: dict[date, list[dict]] = field(default_factory=dict)
    peaks: dict[date, list[dict]] = field(default_factory=dict)
    month: list[dict] = field(default_factory=list)


def run_days(
    samples_by_series: Mapping[int, Sequence[tuple[int, float]]],
    series_labels: Mapping[int, tuple],
    seeds: Mapping[str, pa.Table] | None,
    days: Sequence[date],
    *,
    month_window: Window | None = None,
    runner: Runner | None = None,
) -> DayChain:
    """Run int_series_edges_by_day, int_gauge_peaks_by_day then fct_usage_by_day for each day (in order), then
    fct_usage_by_month over ``month_window`` (default: from the first day to after the last)."""
    own = runner is None
    r = runner or Runner(seeds)
    try:
        r.set_raw(samples_by_series, series_labels)
        for t in DAILY_MODELS:
            r.con.execute(f"drop table if exists {t}")
        out = DayChain()
        for d in days:
            w = day_window(d)
            out.edges[d] = r.run("int_series_edges_by_day", w).to_pylist()
            out.peaks[d] = r.run("int_gauge_peaks_by_day", w).to_pylist()
            out.days[d] = r.run("fct_usage_by_day", w).to_pylist()
        mw = month_window or Window(min(days), next_day(max(days)))
        out.month = r.query("fct_usage_by_month", mw).to_pylist()
        return out
    finally:
        if own:
            r.close()


def run_days_alone(
    samples_by_series: Mapping[int, Sequence[tuple[int, float]]],
    series_labels: Mapping[int, tuple],
    days: Sequence[date],
    runner: Runner,
) -> DayChain:
    """Each day in the order given, alone: no earlier day's edges, only the day's carry-in (each
    series' last finite sample before the day, at most 35 days earlier), as a pulled day records it."""
    runner.set_raw(samples_by_series, series_labels)
    out = DayChain()
    try:
        for d in days:
            for t in DAILY_MODELS:
                runner.con.execute(f"drop table if exists {t}")
            start = day_start_ms(d)
            carry_in = {}
            for sid, samples in samples_by_series.items():
                earlier = [(t, v) for t, v in samples if start - 35 * DAY_MS <= t < start and math.isfinite(v)]
                if earlier:
                    carry_in[sid] = max(earlier)
            runner.set_carry_in(carry_in)
            w = day_window(d)
            out.edges[d] = runner.run("int_series_edges_by_day", w).to_pylist()
            out.peaks[d] = runner.run("int_gauge_peaks_by_day", w).to_pylist()
            out.days[d] = runner.run("fct_usage_by_day", w).to_pylist()
    finally:
        runner.set_carry_in({})
    return out


def usage_month_table(rows: Sequence[Mapping]) -> pa.Table:
    """A fixture fct_usage_by_month table; missing columns get neutral defaults."""
    defaults = {
        "dimension": "",
        "usage": None,
        "gauge_integral": None,
        "gauge_covered_ms": None,
        "gauge_peak": None,
        "days_with_data": 1,
        "samples": 1,
        "dropped_samples": 0,
        "resets": 0,
        "reappeared_series": 0,
    }
    cols: dict[str, list] = {f.name: [] for f in USAGE_BY_MONTH_SCHEMA}
    for row in rows:
        full = {**defaults, **row}
        for f in USAGE_BY_MONTH_SCHEMA:
            v = full[f.name]
            if v is not None and pa.types.is_decimal(f.type):
                v = Decimal(v)
            cols[f.name].append(v)
    return pa.table(cols, schema=USAGE_BY_MONTH_SCHEMA)


def month_window(year: int, month: int) -> Window:
    start = date(year, month, 1)
    return Window(start, next_month(start))


def rate_month(
    usage_rows: Sequence[Mapping],
    window: Window,
    seeds: Mapping[str, pa.Table] | None = None,
    *,
    runner: Runner | None = None,
) -> tuple[list[dict], list[dict]]:
    """fct_rated_usage_by_subscription_period then fct_invoice_lines for one month from fixture fct_usage_by_month rows.

    With ``runner`` (whose seeds are used) the month's partitions are replaced in its tables."""
    r = runner or Runner(seeds)
    try:
        r.set_table("fct_usage_by_month", usage_month_table(usage_rows))
        r.run("dim_subscription_periods_by_month", window)
        # the fixture month rows stand for the usage of each customer's (single) period
        r.con.execute(
            "create or replace table fct_usage_by_subscription_period as "
            "select u.*, p.period_start, p.period_end, u.period_ms as month_ms, u.samples as observations "
            "from fct_usage_by_month u join dim_subscription_periods_by_month p using (month, customer_id)"
        )
        r.run("fct_billable_usage_by_subscription_period", window)
        rated = r.run("fct_rated_usage_by_subscription_period", window).to_pylist()
        lines = r.run("fct_invoice_lines", window).to_pylist()
    finally:
        if runner is None:
            r.close()
    return rated, lines


def duplicate_event(paths, days: tuple[date, ...]) -> list[Path]:
    """The same event id written by the postgres source on each of ``days`` (the check that ids are unique fails)."""
    from billing_dags.ingest.events import EVENTS_SCHEMA, write_events_day
    from billing_dags.ingest.raw import day_bounds_ms

    written = []
    for day in days:
        event = {
            "event_id": "req-42",
            "ts": day_bounds_ms(day)[0] + 3_600_000,
            "customer_key": "k",
            "meter_id": "llm_input_tokens",
            "dimension": "gpt-4o",
            "kind": "delta",
            "quantity": Decimal(5),
            "hold_ms": 0,
            "attributes": [],
        }
        written.append(Path(write_events_day(paths, day, pa.Table.from_pylist([event], schema=EVENTS_SCHEMA), "postgres")["path"]))
    return written
