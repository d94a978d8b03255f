"""What every `billing` command shares: the consoles, the error that exits 2, paths, seeds and customers from the arguments, printing rows."""

from __future__ import annotations

import csv
import io
import json
import sys
from datetime import UTC, date, datetime
from decimal import Decimal
from pathlib import Path

from rich.console import Console
from rich.table import Table

from billing_dags.core.calendar import last_complete_month, next_month
from billing_dags.core.errors import InputError
from billing_dags.core.settings import Paths, resolve_paths

console = Console(width=None if sys.stdout.isatty() else 140)
err_console = Console(stderr=True)


class CliError(InputError):
    """Bad input to a command; the message names the input and the fix."""

    exit_code = 2


class RunFailed(CliError):
    """A Dagster run of the command failed: exit 2 when bad input explains it (a failed blocking check, a
    ``dg.Failure`` or one of the project's input errors), else 1 (a bug: see the run log)."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


# --- argument parsing helpers ----------------------------------------------------------------


def check_billable_month(month: date, today: date | None = None, seeds_dir: Path | None = None) -> None:
    """``month`` has ended and is a partition (the partitions start as the code location's do, for these seeds)."""
    from billing_dags.core.settings import partitions_start

    today = today or datetime.now(UTC).date()
    start = partitions_start(seeds_dir=seeds_dir)
    if month < start:
        raise CliError(
            f"month {month:%Y-%m} is before the first partition ({start:%Y-%m}); pick a later month, or set "
            f"BILLING_PARTITIONS_START={month:%Y-%m} to start the partitions earlier"
        )
    if next_month(month) > today:
        raise CliError(f"month {month:%Y-%m} has not ended yet (today is {today}); the latest complete month is {last_complete_month(today):%Y-%m}")


def paths_of(args) -> Paths:
    return resolve_paths(getattr(args, "data_dir", None), getattr(args, "seeds_dir", None))


def seeds_of(paths: Paths) -> dict:
    """Every seed table, validated (a bad row stops the command with file, line and fix)."""
    from billing_dags.seeds.catalog import load_seeds

    return load_seeds(paths.seeds_dir)


def customers_of(paths: Paths) -> list[dict]:
    return seeds_of(paths)["customers"].to_pylist()


def require_customer(paths: Paths, customer_id: str) -> dict:
    from billing_dags.seeds.catalog import SAFE_ID_RE

    if not SAFE_ID_RE.match(customer_id or ""):
        raise CliError(
            f"customer id {customer_id!r} is not a safe identifier (lowercase letters, digits, '_', '-', '.'); "
            "use the customer_id column of seeds/customers.csv"
        )
    customers = {c["customer_id"]: c for c in customers_of(paths)}
    if customer_id not in customers:
        close = [c for c in customers if c.startswith(customer_id.split("-")[0])][:5] or sorted(customers)[:5]
        raise CliError(
            f"unknown customer {customer_id!r} in {paths.seeds_dir / 'customers.csv'}; known ids include "
            f'{", ".join(close)} (see `billing sql "select customer_id from seed_customers"`)'
        )
    return customers[customer_id]


def emit(rows: list[dict], fmt: str, title: str | None = None) -> None:
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
