"""The `billing` command: demo, simulate, run, invoice(s), usage, plans, sql.

Every command meets bad input with an error that names the input and the fix, and exits 2.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import re
import sys
import time
from datetime import date, datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from . import durable
from .core import calendar
from .core.calendar import month_days, next_month
from .settings import PROJECT_ROOT, Paths, resolve_paths

console = Console(width=None if sys.stdout.isatty() else 140)
err_console = Console(stderr=True)


class CliError(Exception):
    """Bad input to a command; the message names the input and the fix."""

    exit_code = 2


class RunFailed(CliError):
    """A Dagster run of the command failed: exit 2 when bad input explains it (a failed blocking check, a
    ``dg.Failure`` or one of the project's input errors), else 1 (a bug: see the run log)."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


# --- argument parsing helpers ----------------------------------------------------------------

_MONTH_RE = re.compile(r"^(\d{4})-(\d{2})$")


def parse_month(value: str) -> date:
    m = _MONTH_RE.match(value or "")
    if not m or not 1 <= int(m.group(2)) <= 12:
        raise CliError(f"month {value!r} is not YYYY-MM; give e.g. --month 2026-10")
    return date(int(m.group(1)), int(m.group(2)), 1)


def last_complete_month(today: date | None = None) -> date:
    return calendar.last_complete_month(today or datetime.now(timezone.utc).date())


def check_billable_month(month: date, today: date | None = None, seeds_dir: Path | None = None) -> None:
    """``month`` has ended and is a partition (the partitions start as the code location's do, for these seeds)."""
    from .settings import partitions_start

    today = today or datetime.now(timezone.utc).date()
    start = partitions_start(seeds_dir=seeds_dir)
    if month < start:
        raise CliError(
            f"month {month:%Y-%m} is before the first partition ({start:%Y-%m}); pick a later month, or set "
            f"BILLING_PARTITIONS_START={month:%Y-%m} to start the partitions earlier"
        )
    if next_month(month) > today:
        raise CliError(
            f"month {month:%Y-%m} has not ended yet (today is {today}); the latest complete month is "
            f"{last_complete_month(today):%Y-%m}"
        )


def _paths(args) -> Paths:
    return resolve_paths(getattr(args, "data_dir", None), getattr(args, "seeds_dir", None))


def _seeds(paths: Paths) -> dict:
    """Every seed table, validated (a bad row stops the command with file, line and fix)."""
    from .seeds import load_seeds

    return load_seeds(paths.seeds_dir)


def _customers(paths: Paths) -> list[dict]:
    return _seeds(paths)["customers"].to_pylist()


def require_customer(paths: Paths, customer_id: str) -> dict:
    from .seeds import SAFE_ID_RE

    if not SAFE_ID_RE.match(customer_id or ""):
        raise CliError(
            f"customer id {customer_id!r} is not a safe identifier (lowercase letters, digits, '_', '-', '.'); "
            "use the customer_id column of seeds/customers.csv"
        )
    customers = {c["customer_id"]: c for c in _customers(paths)}
    if customer_id not in customers:
        close = [c for c in customers if c.startswith(customer_id.split("-")[0])][:5] or sorted(customers)[:5]
        raise CliError(
            f"unknown customer {customer_id!r} in {paths.seeds_dir / 'customers.csv'}; known ids include "
            f"{', '.join(close)} (see `billing sql \"select customer_id from seed_customers\"`)"
        )
    return customers[customer_id]


def _emit(rows: list[dict], fmt: str, title: str | None = None) -> None:
    if fmt == "json":
        print(json.dumps(rows, indent=2, default=str))
    elif fmt == "csv":
        buf = io.StringIO()
        if rows:
            w = csv.DictWriter(buf, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
        print(buf.getvalue(), end="")
    else:
        table = Table(title=title, show_lines=False)
        cols = list(rows[0]) if rows else []
        for c in cols:
            table.add_column(c, justify="right" if rows and isinstance(rows[0][c], (int, Decimal)) else "left")
        for r in rows:
            table.add_row(*["" if r[c] is None else str(r[c]) for c in cols])
        console.print(table)


# --- dagster plumbing --------------------------------------------------------------------------

def _dagster_instance():
    import dagster as dg

    home = os.environ.get("DAGSTER_HOME")
    if not home:
        home = str(PROJECT_ROOT / ".dagster")
        os.environ["DAGSTER_HOME"] = home
    Path(home).mkdir(parents=True, exist_ok=True)
    cfg = Path(home) / "dagster.yaml"
    if not cfg.exists() and (PROJECT_ROOT / "dagster.yaml").exists():
        durable.write_bytes(cfg, (PROJECT_ROOT / "dagster.yaml").read_bytes())
    return dg.DagsterInstance.get()


#: Dagster's console logger stays silent (its failures carry stack traces); the CLI prints the run's
#: warnings and failures itself (_execute)
QUIET_LOGS = {"loggers": {"console": {"config": {"log_level": "CRITICAL"}}}}
#: step errors caused by bad input (exit 2); any other error is a bug (exit 1)
INPUT_ERRORS = ("Failure", "ModelError", "SeedError", "InvoiceError", "DisputeError", "EventsLayoutError", "RawLayoutError", "ReportError")


def _definitions(paths: Paths):
    """The code location and the Dagster instance (DAGSTER_HOME), pointed at ``paths``."""
    os.environ["BILLING_DATA_DIR"] = str(paths.data_dir)
    os.environ["BILLING_SEEDS_DIR"] = str(paths.seeds_dir)
    from .definitions import defs as load_defs

    defs = load_defs() if callable(load_defs) else load_defs
    return defs, _dagster_instance()


#: the code location of workspace.yaml (and pyproject's [tool.dagster]): the CLI's runs name it as their
#: origin, so the UI can re-execute them (all of them, or from failure) like the runs it launched
CODE_LOCATION = "billing_dags"
#: tags of every run the CLI starts (the Runs page filters on them)
CLI_TAGS = {"billing/launched_by": "cli"}


def _remote_origin(job_name: str):
    """The origin a run launched from the UI over workspace.yaml's code location would have.

    Dagster's execute_in_process records no origin, and the UI refuses to re-execute such a run
    ("Expected non-None value"); re-execution looks the job up by the origin's location and
    repository names in the workspace, then launches it there as any UI run (the code location
    must see the same BILLING_DATA_DIR, as the daemon's runs must).
    """
    from dagster._core.remote_origin import (
        ManagedGrpcPythonEnvCodeLocationOrigin,
        RemoteJobOrigin,
        RemoteRepositoryOrigin,
    )
    from dagster._core.types.loadable_target_origin import LoadableTargetOrigin

    location = ManagedGrpcPythonEnvCodeLocationOrigin(
        loadable_target_origin=LoadableTargetOrigin(
            executable_path=sys.executable, module_name="billing_dags.definitions", working_directory=str(PROJECT_ROOT)
        ),
        location_name=CODE_LOCATION,
    )
    return RemoteJobOrigin(RemoteRepositoryOrigin(location, "__repository__"), job_name)


def _execute(
    job,
    instance,
    what: str,
    run_config: dict | None = None,
    *,
    partition_key: str | None = None,
    partition_range: tuple[str, str] | None = None,
    asset_selection=None,
    progress=None,
) -> None:
    """Run ``job`` in this process (quietly) for one partition or a range of them (one run), print its
    warnings, and raise RunFailed naming why it failed.

    The run is created with the code location's origin (re-executable from the UI) and the
    CLI's tags; its steps run one after another here, as the in-process executor runs them.
    ``progress`` (rich Progress, task id) advances by one per finished step.
    """
    import logging

    from dagster._core.definitions.job_base import InMemoryJob
    from dagster._core.events import DagsterEventType
    from dagster._core.execution.api import create_execution_plan, execute_run_iterator
    from dagster._core.execution.execute_in_process_result import ExecuteInProcessResult
    from dagster._core.storage.tags import ASSET_PARTITION_RANGE_END_TAG, ASSET_PARTITION_RANGE_START_TAG, PARTITION_NAME_TAG

    run_config = {**QUIET_LOGS, **(run_config or {})}
    tags = {**CLI_TAGS}
    if partition_key is not None:
        tags[PARTITION_NAME_TAG] = partition_key
    if partition_range is not None:
        tags[ASSET_PARTITION_RANGE_START_TAG], tags[ASSET_PARTITION_RANGE_END_TAG] = partition_range
    selection = frozenset(asset_selection) if asset_selection else None
    recon = InMemoryJob(job)
    if selection:
        recon = recon.get_subset(asset_selection=selection)
    plan = create_execution_plan(recon, run_config=run_config, instance_ref=instance.get_ref() if instance.is_persistent else None, tags=tags)
    run = instance.create_run_for_job(
        job_def=recon.get_definition(),
        execution_plan=plan,
        run_config=run_config,
        tags={**job.run_tags, **tags},
        asset_selection=selection,
        remote_job_origin=_remote_origin(job.name),
    )
    if progress is not None:
        bar, task = progress
        bar.update(task, total=len(plan.step_keys_to_execute), completed=0)
    events = []
    for event in execute_run_iterator(InMemoryJob(job), run, instance):
        events.append(event)
        if progress is not None and event.event_type in (DagsterEventType.STEP_SUCCESS, DagsterEventType.STEP_FAILURE, DagsterEventType.STEP_SKIPPED):
            bar.advance(task)
    result = ExecuteInProcessResult(job_def=recon.get_definition(), event_list=events, dagster_run=instance.get_run_by_id(run.run_id), output_capture={})
    for entry in instance.all_logs(result.run_id):
        if not entry.is_dagster_event and entry.level == logging.WARNING:  # context.log.warning (skipped steps log ERROR)
            err_console.print(f"[yellow]warning:[/] {entry.step_key or what}: {entry.user_message}", highlight=False, soft_wrap=True)
    _check_run(result, what)


def _check_run(result, what: str) -> None:
    """Nothing when the run succeeded; else RunFailed with each failed blocking check's own message (its
    description, else its metadata) and each failed step's error message, never a stack trace."""
    if result.success:
        return
    from .defs.models.assets import metadata_text

    reasons = []
    exit_code = 2
    for evaluation in result.get_asset_check_evaluations():
        if evaluation.passed or not evaluation.blocking:
            continue
        detail = evaluation.description or metadata_text(evaluation.metadata)
        reasons.append(f"check {evaluation.asset_key.to_user_string()} {evaluation.check_name} failed: {detail}")
    for event in result.all_events:
        if not event.is_step_failure:
            continue
        error = event.step_failure_data.error
        if error.cls_name == "DagsterAssetCheckFailedError":
            continue  # the failed checks above say why
        while error.cause is not None and "Error occurred while executing" in error.message:
            error = error.cause
        if error.cls_name not in INPUT_ERRORS:
            exit_code = 1
        message = re.sub(r"^[\w.]+(Error|Failure|Exception): ", "", error.message.strip())
        reasons.append(f"{event.step_key}: {message}")
    if not reasons:
        reasons, exit_code = ["see the Dagster run log in the UI (make dev)"], 1
    raise RunFailed(f"{what} failed: " + "; ".join(reasons), exit_code)


def run_invoices(paths: Paths, month: date, *, as_of: str = "") -> None:
    """Rerun the month's invoices asset, as of ``as_of`` (ISO timestamp; empty = now)."""
    import dagster as dg

    defs, instance = _definitions(paths)
    _execute(
        defs.resolve_job_def("monthly_invoicing"), instance, f"invoices of {month:%Y-%m}",
        {"ops": {"invoices": {"config": {"as_of": as_of}}}}, partition_key=month.isoformat(), asset_selection=[dg.AssetKey("invoices")],
    )


def run_month(
    paths: Paths,
    month: date,
    *,
    ingest: bool = True,
    seed: int = 42,
    customers: int | None = None,
    interval_s: int = 60,
    as_of: str | None = None,
    quiet: bool = False,
) -> dict:
    """Materialize every asset for ``month``: seeds, each day in order, the month, the views."""
    import dagster as dg

    _seeds(paths)  # a bad seed stops here with its file, line and fix, before any run starts
    defs, instance = _definitions(paths)
    sim = {"seed": seed, "interval_s": interval_s, "customers": customers}
    t0 = time.perf_counter()
    seeds_job = defs.resolve_job_def("refresh_seeds_and_views")
    daily_job = defs.resolve_job_def("daily_usage")
    monthly_job = defs.resolve_job_def("monthly_invoicing")
    selection = None
    if not ingest:
        selection = [k for k in daily_job.asset_layer.executable_asset_keys if k.to_user_string() != "raw_samples"]

    _execute(seeds_job, instance, "validating seeds")
    run_config = {"resources": {"simulation": {"config": sim}}}
    # rule 3/4: a counter's first sample only counts as new usage when nothing precedes it, so
    # the day before the month is ingested and its edges computed (not billed: it is not in the month)
    warmup = month - timedelta(days=1)
    from .defs.shared.partitions import PARTITIONS_START

    if ingest and warmup >= date.fromisoformat(PARTITIONS_START):
        edges_only = [dg.AssetKey(k) for k in ("raw_samples", "fct_series_edges_by_day", "fct_gauge_peaks_by_day")]
        _execute(daily_job, instance, f"warm-up day {warmup}", run_config, partition_key=warmup.isoformat(), asset_selection=edges_only)
    days = month_days(month)
    with Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        console=err_console, disable=quiet,
    ) as progress:
        # the month's days are one run over the partition range, as a backfill from the UI is: each
        # step (asset) processes every day in order, after the assets it reads; the bar counts steps
        task = progress.add_task(f"days {days[0]} to {days[-1]} (one run, step by step)", total=None)
        _execute(
            daily_job, instance, f"days {days[0]} to {days[-1]}", run_config,
            partition_range=(days[0].isoformat(), days[-1].isoformat()), asset_selection=selection, progress=(progress, task),
        )
        mtask = progress.add_task("month: rating and invoices", total=None)
        month_config = {"ops": {"invoices": {"config": {"as_of": as_of or ""}}}}
        _execute(monthly_job, instance, f"month {month:%Y-%m}", month_config, partition_key=month.isoformat(), progress=(progress, mtask))
    _execute(seeds_job, instance, "refreshing warehouse views")
    return {"days": len(days), "seconds": time.perf_counter() - t0}


# --- commands ----------------------------------------------------------------------------------

def invoice_rows(paths: Paths, month: date) -> list[dict]:
    from .invoices import document_title

    folder = paths.invoices / f"{month:%Y-%m}"
    rows = []
    for f in sorted(folder.glob("*.json")):
        if f.name == "registry.json":
            continue
        doc = json.loads(f.read_text())
        if "customer_id" not in doc:
            continue
        rows.append(
            {
                "invoice": doc["invoice_number"],
                "document": document_title(doc).lower(),
                "status": doc["status"],
                "customer": doc["customer_id"],
                "plan": doc.get("plan_id", ""),
                "lines": len(doc["lines"]),
                "total": f"{doc['total']} {doc['currency'].upper()}",
            }
        )
    return rows


def outbox_summary(paths: Paths, month: date) -> str:
    """Meter events of the month's days by status, e.g. '1,234 events: 900 dry_run, 334 too_old'."""
    from .stripe_outbox import read_outbox, summarize

    rows = [row for day in month_days(month) for row in read_outbox(paths, day)]
    summary = summarize(rows)
    return f"{summary['rows']:,} meter events: " + ", ".join(
        f"{n:,} {status}" for status, n in sorted(summary["by_status"].items()) if n
    )


def event_billed_lines(paths: Paths, month: date, n_customers: int | None = None) -> list[str]:
    """One line per customer (of the first ``n_customers``) billed from usage events or usage reports."""
    import duckdb

    from .warehouse import open_warehouse

    customers = _customers(paths)[:n_customers]
    picked = [c for c in customers if c.get("usage_source", "prometheus") != "prometheus"]
    if not picked:
        return []
    con = open_warehouse(paths)
    try:
        rows = con.execute(
            """
            select customer_id, meter_id, sum(events)::bigint, sum(usage), max(gauge_peak)
            from fct_usage_by_day
            where day >= $start and day < $end and list_contains($customers, customer_id)
            group by customer_id, meter_id
            """,
            {"start": month, "end": next_month(month), "customers": [c["customer_id"] for c in picked]},
        ).fetchall()
    except duckdb.Error:
        return []  # no usage computed yet: nothing to summarize
    finally:
        con.close()
    usage: dict[str, dict[str, tuple]] = {}
    for customer, meter, events, total, peak in rows:
        usage.setdefault(customer, {})[meter] = (events or 0, Decimal(total or 0), Decimal(peak or 0))
    totals = {r["customer"]: r["total"] for r in invoice_rows(paths, month)}
    mega, gib = Decimal(10) ** 6, Decimal(2) ** 30
    lines = []
    for c in picked:
        cid, meters = c["customer_id"], usage.get(c["customer_id"], {})
        get = lambda meter, i: meters.get(meter, (0, Decimal(0), Decimal(0)))[i]  # noqa: E731
        total = totals.get(cid, "no invoice")
        if c["usage_source"] == "usage_events":
            events = sum(m[0] for m in meters.values())
            tokens_in, tokens_out = get("llm_input_tokens", 1) / mega, get("llm_output_tokens", 1) / mega
            lines.append(
                f"{cid} (usage_events): {events:,} events, {tokens_in:,.1f}M input / {tokens_out:,.1f}M output tokens, "
                f"invoice total {total}"
            )
        else:
            reports = max((m[0] for m in meters.values()), default=0)
            traffic = (get("iot_mqtt_bytes", 1) + get("iot_http_bytes", 1)) / gib
            lines.append(
                f"{cid} (usage reports): {reports:,} reports, peak {get('iot_devices', 2):,.0f} devices, "
                f"{traffic:,.1f} GiB traffic, peak storage {get('iot_storage', 2) / gib:,.1f} GiB, invoice total {total}"
            )
    return lines


def cmd_run(args) -> int:
    paths = _paths(args)
    month = parse_month(args.month)
    check_billable_month(month, seeds_dir=paths.seeds_dir)
    if args.customers is not None and args.customers < 1:
        raise CliError(f"--customers {args.customers} must be at least 1")
    figures = run_month(paths, month, ingest=not args.no_ingest, seed=args.seed, customers=args.customers, interval_s=args.interval)
    rows = invoice_rows(paths, month)
    _emit(rows, "table", title=f"Invoices {month:%Y-%m}")
    console.print(f"{figures['days']} days and the month in {figures['seconds']:.1f}s")
    return 0


def cmd_demo(args) -> int:
    from .usage_reports import ReportSchema, demo_report_token

    paths = _paths(args)
    month = parse_month(args.month) if args.month else last_complete_month()
    check_billable_month(month, seeds_dir=paths.seeds_dir)
    console.print(f"[bold]billing_dags demo[/]: simulated usage for {month:%Y-%m}, Stripe dry-run, data in {paths.data_dir}")
    # the lifecycle as the schedules run it: drafts on the 1st of the next month, while late data
    # may still arrive; then finalization once the grace period has passed (here: now)
    on_the_first = datetime.combine(next_month(month), datetime.min.time(), tzinfo=timezone.utc) + timedelta(hours=2)
    figures = run_month(paths, month, seed=args.seed, customers=args.customers, interval_s=args.interval, as_of=on_the_first.isoformat())
    drafts = invoice_rows(paths, month)
    example = next((r for r in drafts if not r["total"].startswith("0.00")), drafts[0] if drafts else None)
    console.print(
        f"\nOn {on_the_first:%Y-%m-%d %H:%M} UTC the month's invoices are drafts "
        f"({sum(r['status'] == 'draft' for r in drafts)} of {len(drafts)}), e.g. {example['invoice']} {example['total']}."
        if drafts else "\nNo invoices."
    )
    run_invoices(paths, month)
    rows = invoice_rows(paths, month)
    _emit(rows, "table", title=f"Invoices {month:%Y-%m} as of now ({len(rows)} customers)")
    for line in event_billed_lines(paths, month, args.customers):
        console.print(line, highlight=False)
    schema = ReportSchema.from_seeds(paths.seeds_dir)
    for cid in sorted(c for c in schema.tokens if schema.authorized(c, demo_report_token(c))):
        console.print(
            f"{cid} may POST usage reports (billing remote-write serve) with Authorization: Bearer {demo_report_token(cid)} "
            "(its demo token, derived now; the seeds hold only its SHA-256)",
            highlight=False,
        )
    console.print(f"\nRan {figures['days']} daily partitions and the month in {figures['seconds']:.1f}s.")
    console.print(f"Invoices (JSON, CSV, HTML): {paths.invoices / f'{month:%Y-%m}'}")
    console.print(f"DuckDB warehouse (views): duckdb {paths.warehouse_db}   or   billing sql \"select * from fct_invoice_lines limit 5\"")
    console.print(f"Stripe outbox (dry-run): {paths.outbox} — {outbox_summary(paths, month)}")
    console.print("Dagster UI: make dev, then http://127.0.0.1:3000 (the runs above are in .dagster/)")
    return 0


def cmd_simulate(args) -> int:
    from . import simulate

    paths = _paths(args)
    month = parse_month(args.month)
    if args.interval <= 0:
        raise CliError(f"--interval {args.interval} must be a positive number of seconds (e.g. 60)")
    customers = _seeds(paths)["customers"]
    n = args.customers
    if n is not None and not 1 <= n <= customers.num_rows:
        raise CliError(f"--customers {n}: seeds have {customers.num_rows} customers; give 1..{customers.num_rows} or add customers to {paths.seeds_dir / 'customers.csv'}")
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=err_console) as progress:
        task = progress.add_task(f"simulating {month:%Y-%m}", total=calendar.days_in_month(month))
        figures = simulate.simulate_month(
            paths, month, customers, seed=args.seed, interval_s=args.interval, n_customers=n,
            progress=lambda day: progress.advance(task),
        )
    console.print(f"wrote {figures['samples']:,} samples of {figures['series']:,} series over {figures['days']} days to {paths.raw_samples}")
    return 0


def _load_invoice(paths: Paths, customer_id: str, month: date) -> dict:
    require_customer(paths, customer_id)
    f = paths.invoices / f"{month:%Y-%m}" / f"{customer_id}.json"
    if not f.exists():
        raise CliError(f"no invoice for {customer_id} in {month:%Y-%m} under {f.parent}; run `billing run --month {month:%Y-%m}` first")
    return json.loads(f.read_text())


def cmd_invoice(args) -> int:
    from .invoices import document_title, render_invoice, total_label

    paths = _paths(args)
    month = parse_month(args.month)
    doc = _load_invoice(paths, args.customer, month)
    if args.format == "table":
        table = Table(title=f"{document_title(doc)} {doc['invoice_number']} ({doc['status']}) {doc['customer_id']} {doc['period_start']}..{doc['period_end']}")
        for col in ("#", "description", "quantity", "unit", "unit price", "amount"):
            table.add_column(col, justify="right" if col in ("#", "quantity", "unit price", "amount") else "left")
        for line in doc["lines"]:
            table.add_row(str(line["line_number"]), line["description"], line["quantity"], line["unit"], line["unit_price"], line["amount"])
        table.add_row("", f"[bold]{total_label(doc).lower()}", "", "", "", f"[bold]{doc['total']} {doc['currency'].upper()}")
        console.print(table)
    else:
        sys.stdout.write(render_invoice(doc, args.format))
    return 0


def cmd_invoices(args) -> int:
    paths = _paths(args)
    month = parse_month(args.month)
    rows = invoice_rows(paths, month)
    if not rows:
        raise CliError(f"no invoices for {month:%Y-%m} under {paths.invoices}; run `billing run --month {month:%Y-%m}` first")
    _emit(rows, args.format, title=f"Invoices {month:%Y-%m}")
    return 0


def usage_rows(paths: Paths, customer_id: str, month: date) -> list[dict]:
    """The month's billable quantities of a customer, per subscription period, as the invoice rates them
    (int_billable_usage_by_subscription_period), with the month's sample counts beside them."""
    from .warehouse import open_warehouse

    con = open_warehouse(paths)
    try:
        try:
            result = con.execute(
                """
                select b.period_start, b.meter_id, b.dimension, m.kind, b.aggregation, b.quantity, b.unit,
                       b.base_quantity, b.base_unit, b.days_with_data, u.samples, u.resets, u.dropped_samples
                from int_billable_usage_by_subscription_period b
                join seed_meters m using (meter_id)
                left join fct_usage_by_month u
                    on u.month = b.month and u.customer_id = b.customer_id
                    and u.meter_id = b.meter_id and u.dimension = b.dimension
                where b.customer_id = $customer and b.month = $month
                order by b.period_start, b.meter_id, b.dimension
                """,
                {"customer": customer_id, "month": month},
            ).fetchall()
        except Exception:
            raise CliError(f"no usage computed for {month:%Y-%m} in {paths.data_dir}; run `billing run --month {month:%Y-%m}` first") from None
    finally:
        con.close()
    return [
        {
            "period_start": period.isoformat(), "meter": meter, "dimension": dim, "kind": kind, "aggregation": agg,
            "quantity": f"{qty.normalize():f}", "unit": unit,
            "base_quantity": f"{base.normalize():f}", "base_unit": base_unit,
            "days": days, "samples": samples, "resets": resets, "dropped_samples": dropped,
        }
        for (period, meter, dim, kind, agg, qty, unit, base, base_unit, days, samples, resets, dropped) in result
    ]


def cmd_usage(args) -> int:
    paths = _paths(args)
    month = parse_month(args.month)
    require_customer(paths, args.customer)
    from . import projection

    if projection.month_state(month) != "closed":  # the current month: month-to-date and projected (seed 000)
        return projection.emit_usage_report(paths, args.customer, month, args.format)
    rows = usage_rows(paths, args.customer, month)
    if not rows:
        raise CliError(f"no usage for {args.customer} in {month:%Y-%m}; check the month, or run `billing run --month {month:%Y-%m}`")
    _emit(rows, args.format, title=f"Usage of {args.customer} in {month:%Y-%m}")
    return 0


def cmd_plans(args) -> int:
    paths = _paths(args)
    t = _seeds(paths)
    prices: dict[tuple, list[dict]] = {}
    for p in t["prices"].to_pylist():
        prices.setdefault((p["plan_id"], p["version"]), []).append(p)
    rows = []
    for plan in t["plans"].to_pylist():
        if args.plan and plan["plan_id"] != args.plan:
            continue
        lines = prices.get((plan["plan_id"], plan["version"]), [])
        rows.append(
            {
                "plan": plan["plan_id"], "version": plan["version"], "from": str(plan["effective_from"]),
                "name": plan["name"], "currency": plan["currency"], "base_fee": f"{plan['base_fee'].normalize():f}",
                "risk_multiplier": f"{plan['risk_multiplier'].normalize():f}",
                "prices": "; ".join(p["description"] for p in lines) if args.format == "table" else [
                    {k: (f"{v.normalize():f}" if isinstance(v, Decimal) else v) for k, v in p.items()} for p in lines
                ],
            }
        )
    if args.plan and not rows:
        raise CliError(f"unknown plan {args.plan!r}; plans: {', '.join(sorted({p['plan_id'] for p in t['plans'].to_pylist()}))}")
    _emit(rows, args.format, title="Plans")
    return 0


def cmd_sql(args) -> int:
    """Queries only, on a locked-down connection (billing_dags.warehouse.open_read_only)."""
    import tempfile

    import duckdb

    from .warehouse import RefusedStatement, open_read_only, query_statements

    paths = _paths(args)
    empty = 'empty query; give SQL, e.g. billing sql "select * from fct_invoice_lines limit 5"'
    if not args.query.strip():
        raise CliError(empty)
    with tempfile.TemporaryDirectory(prefix="billing-sql-") as spill_dir:
        con = open_read_only(paths, Path(spill_dir))
        try:
            try:
                statements = query_statements(con, args.query)
                if not statements:
                    raise CliError(empty)
                for statement in statements:
                    cur = con.execute(statement)
                cols = [d[0] for d in cur.description]
                rows = [dict(zip(cols, r)) for r in cur.fetchmany(args.limit)]
            except RefusedStatement as e:
                raise CliError(str(e)) from None
            except duckdb.PermissionException as e:
                raise CliError(
                    f"query refused: {str(e).splitlines()[0]}; billing sql reads only the warehouse's files under {paths.data_dir}"
                ) from None
            except duckdb.Error as e:
                raise CliError(f"query failed: {str(e).splitlines()[0]}; list views with billing sql \"show tables\"") from None
        finally:
            con.close()
    _emit(rows, args.format)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="billing", description="Prometheus-native usage billing: exact usage, invoices, Stripe meter events.")
    parser.add_argument("--data-dir", help="warehouse folder (default $BILLING_DATA_DIR or ./data)")
    parser.add_argument("--seeds-dir", help="seeds folder (default $BILLING_SEEDS_DIR or ./seeds)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def sim_args(p):
        p.add_argument("--seed", type=int, default=42, help="simulation seed (default 42)")
        p.add_argument("--customers", type=int, default=None, help="simulate the first N customers of the seeds (default all)")
        p.add_argument("--interval", type=int, default=60, help="scrape interval in seconds (default 60)")

    p = sub.add_parser("demo", help="simulate a month for every seeded customer, bill it, print the invoices")
    p.add_argument("--month", help="YYYY-MM (default: the last complete month)")
    sim_args(p)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("simulate", help="write deterministic simulated raw samples for a month")
    p.add_argument("--month", required=True, help="YYYY-MM")
    sim_args(p)
    p.set_defaults(func=cmd_simulate)

    p = sub.add_parser("run", help="materialize every asset for a month, in process")
    p.add_argument("--month", required=True, help="YYYY-MM")
    p.add_argument("--no-ingest", action="store_true", help="use the raw samples already in the data dir")
    sim_args(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("invoice", help="show one customer's invoice for a month")
    p.add_argument("customer")
    p.add_argument("--month", required=True, help="YYYY-MM")
    p.add_argument("--format", choices=["table", "json", "csv", "html"], default="table")
    p.set_defaults(func=cmd_invoice)

    p = sub.add_parser("invoices", help="list every invoice of a month with status and total")
    p.add_argument("--month", required=True, help="YYYY-MM")
    p.add_argument("--format", choices=["table", "json", "csv"], default="table")
    p.set_defaults(func=cmd_invoices)

    p = sub.add_parser("usage", help="one customer's usage for a month, per meter")
    p.add_argument("customer")
    p.add_argument("--month", required=True, help="YYYY-MM")
    p.add_argument("--format", choices=["table", "json", "csv"], default="table")
    p.set_defaults(func=cmd_usage)

    p = sub.add_parser("plans", help="the plans and prices in the seeds")
    p.add_argument("--plan", help="only this plan id")
    p.add_argument("--format", choices=["table", "json", "csv"], default="table")
    p.set_defaults(func=cmd_plans)

    p = sub.add_parser("sql", help="run an ad-hoc DuckDB query over the warehouse views")
    p.add_argument("query")
    p.add_argument("--format", choices=["table", "json", "csv"], default="table")
    p.add_argument("--limit", type=int, default=1000, help="rows to print at most (default 1000)")
    p.set_defaults(func=cmd_sql)
    __import__("billing_dags.stripe_meters", fromlist=["register"]).register(sub)  # billing stripe sync-meters | send
    __import__("billing_dags.remote_write.cli", fromlist=["register"]).register(sub)  # billing remote-write serve|compact|status
    __import__("billing_dags.disputes", fromlist=["register"]).register(sub)  # billing dispute
    __import__("billing_dags.retention", fromlist=["register"]).register(sub)  # billing retention
    __import__("billing_dags.flags", fromlist=["register"]).register(sub)  # billing flags list|ack
    __import__("billing_dags.reports", fromlist=["register"]).register(sub)  # billing report daily
    __import__("billing_dags.metrics_export", fromlist=["register"]).register(sub)  # billing export-metrics
    return parser


def main(argv: list[str] | None = None) -> int:
    from .disputes import DisputeError
    from .raw import RawLayoutError
    from .seeds import SeedError
    from .settings import SettingsError
    from .sqlmodels import ModelError

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (CliError, SeedError, ModelError, DisputeError, RawLayoutError, SettingsError) as e:
        err_console.print(f"[red]error:[/] {e}", highlight=False, soft_wrap=True)
        return e.exit_code if isinstance(e, CliError) else 2


if __name__ == "__main__":
    sys.exit(main())
