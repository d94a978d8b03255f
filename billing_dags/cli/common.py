"""What every `billing` command shares: the consoles, the error that exits 2, paths, seeds and customers from the arguments, printing rows."""

from __future__ import annotations

import argparse
import csv
import difflib
import io
import json
import os
import re
import sys
from datetime import UTC, date, datetime
from pathlib import Path

from rich.console import Console
from rich.table import Table
from rich.text import Text

from billing_dags.core.calendar import last_complete_month, next_month
from billing_dags.core.errors import InputError
from billing_dags.core.settings import Paths, resolve_paths

# a terminal's own width (or $COLUMNS); piped output 140 columns wide. Tables widen beyond it rather than cut a number.
console = Console(width=None if sys.stdout.isatty() or os.environ.get("COLUMNS") else 140)
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


def did_you_mean(value: str, choices) -> str:
    """ "; did you mean 'x'?" for the closest of ``choices`` to a mistyped ``value``, else ""."""
    close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


class Parser(argparse.ArgumentParser):
    """argparse with "did you mean" for a mistyped command or choice (the same on every Python version; argparse
    itself suggests only from 3.14, with ``suggest_on_error``). Subparsers are made of this class too."""

    def _check_value(self, action, value):
        choices = action.choices
        if choices is not None and isinstance(value, str) and value not in choices and all(isinstance(c, str) for c in choices):
            shown = ", ".join(map(str, choices))
            raise argparse.ArgumentError(action, f"invalid choice: {value!r}{did_you_mean(value, choices)} (choose from {shown})")
        return super()._check_value(action, value)


#: options of the `billing` parser accepted before the command and after it (``billing invoices --month M --data-dir D``)
GLOBAL_OPTIONS = {
    "--data-dir": "warehouse folder (default $BILLING_DATA_DIR or ./data)",
    "--seeds-dir": "seeds folder (default $BILLING_SEEDS_DIR or ./seeds)",
}


def add_global_options(parser: argparse.ArgumentParser, *, top: bool) -> None:
    """The global options on ``parser``; below the top level they default to SUPPRESS, so that an option given
    before the command is not reset by the subcommand's parser."""
    for option, text in GLOBAL_OPTIONS.items():
        parser.add_argument(option, help=text, **({} if top else {"default": argparse.SUPPRESS}))


def subparsers_of(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    """Every parser below ``parser`` (commands and their actions), each once."""
    found: list[argparse.ArgumentParser] = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in dict.fromkeys(action.choices.values()):
                found += [child, *subparsers_of(child)]
    return found


def check_options(parser: argparse.ArgumentParser, argv: list[str]) -> None:
    """A mistyped ``--option`` gets "did you mean" before argparse parses (argparse would first complain about a
    required option the typo left missing, or list the typo as unrecognized without a suggestion)."""
    known = sorted({o for p in (parser, *subparsers_of(parser)) for a in p._actions for o in a.option_strings if o.startswith("--")})
    for token in argv:
        if token == "--":
            return
        name = token.split("=", 1)[0]
        if not name.startswith("--") or len(name) < 3 or any(k.startswith(name) for k in known):  # argparse takes unique prefixes
            continue
        parser.error(f"unrecognized option {name!r}{did_you_mean(name, known)}")


def billable(month: date, seeds_dir: Path | None = None, today: date | None = None) -> bool:
    """Whether `billing run --month` accepts ``month`` (check_billable_month)."""
    try:
        check_billable_month(month, today=today, seeds_dir=seeds_dir)
    except InputError:
        return False
    return True


def month_hint(month: date, seeds_dir: Path | None = None, today: date | None = None, *, then: str = "") -> str:
    """What to do about a month with nothing billed yet, right for the month: `billing run --month M` only for a month
    `billing run` accepts (check_billable_month); else why not and what to look at instead (``then``: the command
    that shows usage so far)."""
    today = today or datetime.now(UTC).date()
    try:
        check_billable_month(month, today=today, seeds_dir=seeds_dir)
    except InputError as e:
        if month <= today < next_month(month):
            text = f"month {month:%Y-%m} has not ended yet (today is {today}); it is billed after it ends, on {next_month(month)}"
            return text + (f"; usage so far: {then}" if then else "")
        if month > today:
            return f"month {month:%Y-%m} has not started yet (today is {today}); the latest complete month is {last_complete_month(today):%Y-%m}"
        return str(e)
    return f"run `billing run --month {month:%Y-%m}` first"


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
        raise CliError(
            f"unknown customer {customer_id!r} in {paths.seeds_dir / 'customers.csv'}{did_you_mean(customer_id, customers)} "
            "List the customers with `billing customers`."
        )
    return customers[customer_id]


#: a cell that must stay on one line: an identifier or any other single word, a number, an amount ("15.92 USD"),
#: a date or a timestamp
UNBREAKABLE = re.compile(r"\S+|[-+]?\d[\d,._:\-]*(?:[ T]\d[\d:._]*)?(?: [A-Za-z%][\w%/-]*)?")
NUMBER = re.compile(r"[-+]?\d[\d,]*(?:\.\d+)?(?: [A-Za-z%][\w%/-]*)?")


def table(columns: list[str], rows: list[list], title: str | None = None, *, right: set[str] | None = None) -> Table:
    """A rich table that never cuts a value: a column of numbers, amounts, dates or identifiers is at least as wide as
    its widest cell (never wrapped or cut), other columns wrap their text onto more lines (nothing dropped).
    Cells are values (printed as text, no markup) or rich ``Text``. ``right``: columns to right-align (default:
    those whose cells are all numbers). Print it with print_table."""
    t = Table(title=title, show_lines=False)
    cells = [[v if isinstance(v, Text) else Text("" if v is None else str(v)) for v in r] for r in rows]
    for i, col in enumerate(columns):
        plain = [r[i].plain for r in cells if r[i].plain]
        numeric = bool(plain) and all(NUMBER.fullmatch(c) for c in plain)
        align = "right" if (col in right if right is not None else numeric) else "left"
        if plain and all(UNBREAKABLE.fullmatch(c) for c in plain):
            t.add_column(col, justify=align, min_width=max(map(len, plain)), no_wrap=True)
        else:
            t.add_column(col, justify=align, overflow="fold")
    for r in cells:
        t.add_row(*r)
    return t


#: a text column is not made narrower than this (or its longest header word) before a table is widened
TEXT_MIN_WIDTH = 10


def print_table(t: Table, con: Console | None = None) -> None:
    """Print ``t`` (made by ``table``) without cutting a value. Columns of numbers and identifiers keep their full
    width; text columns share what is left of the console's width (each at least TEXT_MIN_WIDTH or its longest header
    word, wrapping their text); when even that does not fit, the output is widened beyond the console (a terminal
    then wraps the lines: every digit is printed, none is cut or replaced by an ellipsis)."""
    con = con or console

    def cells(c) -> list[str]:
        return [str(c.header), *(cell.plain if isinstance(cell, Text) else str(cell) for cell in c.cells)]

    fixed = {i: max(map(len, cells(c))) for i, c in enumerate(t.columns) if c.no_wrap}
    natural = {i: max(map(len, cells(c))) for i, c in enumerate(t.columns) if not c.no_wrap}
    floor = {i: max(max(map(len, str(t.columns[i].header).split() or [""])), min(natural[i], TEXT_MIN_WIDTH)) for i in natural}
    available = con.width - 1 - 3 * len(t.columns) - sum(fixed.values())
    widths = dict(natural)
    if sum(natural.values()) > available:
        # water-filling: every text column gets its floor, then the rest goes to the narrowest wants first
        widths = dict(floor)
        left = available - sum(floor.values())
        for k, i in enumerate(sorted(natural, key=lambda i: natural[i] - floor[i])):
            give = max(0, min(natural[i] - floor[i], left // (len(natural) - k)))
            widths[i] += give
            left -= give
    for i, w in {**fixed, **widths}.items():
        t.columns[i].width = w
    needed = 1 + 3 * len(t.columns) + sum(fixed.values()) + sum(widths.values())
    if needed <= con.width:
        con.print(t)
        return
    width = con.width
    con.width = needed
    try:
        con.print(t)
    finally:
        con.width = width


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
        cols = list(rows[0]) if rows else []
        print_table(table(cols, [[r[c] for c in cols] for r in rows], title))
