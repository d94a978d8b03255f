"""Seeds: versioned CSV inputs (meters, units, currencies, customers, plans, prices).

Every file is read with an explicit schema and validated row by row; a bad row raises a
``SeedError`` naming the file, the line, the column and the fix. Seeds are read, never written.
Columns are documented in seeds/README.md.
"""

from __future__ import annotations

import csv
import hashlib
import re
from dataclasses import dataclass
from datetime import date
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Callable

import pyarrow as pa

SAFE_ID_RE = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,62}$")
LABEL_NAME_RE = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")
METRIC_RE = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*$")
KINDS = {"counter", "gauge"}
AGGREGATIONS = {
    "counter": {"sum"},
    "gauge": {"max", "avg", "unit_hours", "unit_months"},
}


class SeedError(ValueError):
    """A seed file or row that cannot be used; the message names file, line and fix."""


def _safe_id(value: str) -> str:
    if not SAFE_ID_RE.match(value):
        raise ValueError(
            f"{value!r} is not a safe identifier (lowercase letters, digits, '_', '-', '.', "
            "at most 63 characters, starting with a letter or digit)"
        )
    return value


def _decimal(value: str) -> Decimal:
    try:
        d = Decimal(value)
    except InvalidOperation:
        raise ValueError(f"{value!r} is not a decimal number") from None
    if not d.is_finite():
        raise ValueError(f"{value!r} is not a finite number")
    if d.as_tuple().exponent < -9:  # type: ignore[operator]
        raise ValueError(f"{value!r} has more than 9 decimal places")
    return d


def _non_negative_decimal(value: str) -> Decimal:
    d = _decimal(value)
    if d < 0:
        raise ValueError(f"{value!r} is negative")
    return d


def _positive_int(value: str) -> int:
    try:
        i = int(value)
    except ValueError:
        raise ValueError(f"{value!r} is not an integer") from None
    if i <= 0:
        raise ValueError(f"{value!r} must be a positive integer")
    return i


def _non_negative_int(value: str) -> int:
    try:
        i = int(value)
    except ValueError:
        raise ValueError(f"{value!r} is not an integer") from None
    if i < 0:
        raise ValueError(f"{value!r} must not be negative")
    return i


def _date(value: str) -> date:
    try:
        return date.fromisoformat(value)
    except ValueError:
        raise ValueError(f"{value!r} is not a date (YYYY-MM-DD)") from None


def _one_of(options: set[str]) -> Callable[[str], str]:
    def check(value: str) -> str:
        if value not in options:
            raise ValueError(f"{value!r} is not one of {', '.join(sorted(options))}")
        return value

    return check


def _label_name(value: str) -> str:
    if not LABEL_NAME_RE.match(value):
        raise ValueError(f"{value!r} is not a Prometheus label name")
    return value


def _optional(check: Callable[[str], object]) -> Callable[[str], object]:
    def run(value: str) -> object:
        return None if value == "" else check(value)

    return run


def _metrics(value: str) -> str:
    names = value.split()
    if not names:
        raise ValueError("no metric name given")
    for name in names:
        if not METRIC_RE.match(name):
            raise ValueError(f"{name!r} is not a Prometheus metric name")
    return " ".join(names)


def _label_value(value: str) -> str:
    if value == "" or len(value) > 256 or any(ord(c) < 32 for c in value):
        raise ValueError("must be 1-256 characters without control characters")
    return value


def _iso_currency(value: str) -> str:
    if not re.match(r"^[a-z]{3}$", value):
        raise ValueError(f"{value!r} is not a lowercase ISO 4217 currency code (e.g. usd)")
    return value


def _text(value: str) -> str:
    return value


@dataclass(frozen=True)
class Column:
    name: str
    type: pa.DataType
    parse: Callable[[str], object]


@dataclass(frozen=True)
class SeedSpec:
    name: str
    file: str
    columns: tuple[Column, ...]
    key: tuple[str, ...]

    @property
    def schema(self) -> pa.Schema:
        """The CSV columns plus ``seed_line``, the row's line in the file (audit; order of pooled allowances)."""
        return pa.schema([pa.field(c.name, c.type) for c in self.columns] + [pa.field("seed_line", pa.int32())])


DEC = pa.decimal128(38, 9)
SPECS: dict[str, SeedSpec] = {
    s.name: s
    for s in [
        SeedSpec(
            "meters",
            "meters.csv",
            (
                Column("meter_id", pa.string(), _safe_id),
                Column("metrics", pa.string(), _metrics),
                Column("kind", pa.string(), _one_of(KINDS)),
                Column("aggregation", pa.string(), _one_of(set().union(*AGGREGATIONS.values()))),
                Column("unit", pa.string(), _safe_id),
                Column("billing_unit", pa.string(), _safe_id),
                Column("customer_label", pa.string(), _label_name),
                Column("dimension_label", pa.string(), _optional(_label_name)),
                Column("stripe_event_name", pa.string(), _safe_id),
                Column("description", pa.string(), _text),
            ),
            ("meter_id",),
        ),
        SeedSpec(
            "units",
            "units.csv",
            (
                Column("unit", pa.string(), _safe_id),
                Column("billing_unit", pa.string(), _safe_id),
                Column("divisor", pa.int64(), _positive_int),
            ),
            ("unit", "billing_unit"),
        ),
        SeedSpec(
            "currencies",
            "currencies.csv",
            (
                Column("currency", pa.string(), _iso_currency),
                Column("minor_unit_exponent", pa.int32(), _non_negative_int),
            ),
            ("currency",),
        ),
        SeedSpec(
            "customers",
            "customers.csv",
            (
                Column("customer_id", pa.string(), _safe_id),
                Column("name", pa.string(), _text),
                Column("setup", pa.string(), _safe_id),
                Column("label_value", pa.string(), _label_value),
                Column("plan_id", pa.string(), _safe_id),
                Column("currency", pa.string(), _iso_currency),
                Column("stripe_customer_id", pa.string(), _optional(_label_value)),
            ),
            ("customer_id",),
        ),
        SeedSpec(
            "plans",
            "plans.csv",
            (
                Column("plan_id", pa.string(), _safe_id),
                Column("version", pa.int32(), _positive_int),
                Column("effective_from", pa.date32(), _date),
                Column("name", pa.string(), _text),
                Column("setup", pa.string(), _safe_id),
                Column("currency", pa.string(), _iso_currency),
                Column("base_fee", DEC, _non_negative_decimal),
                Column("risk_multiplier", DEC, _non_negative_decimal),
                Column("description", pa.string(), _text),
            ),
            ("plan_id", "version"),
        ),
        SeedSpec(
            "prices",
            "prices.csv",
            (
                Column("plan_id", pa.string(), _safe_id),
                Column("version", pa.int32(), _positive_int),
                Column("meter_id", pa.string(), _safe_id),
                Column("dimension", pa.string(), _text),
                Column("included_quantity", DEC, _non_negative_decimal),
                Column("included_pool", pa.string(), _optional(_safe_id)),
                Column("unit_price", DEC, _non_negative_decimal),
                Column("package_size", pa.int64(), _positive_int),
                Column("description", pa.string(), _text),
            ),
            ("plan_id", "version", "meter_id", "dimension"),
        ),
    ]
}


def read_seed(seeds_dir: Path, name: str) -> pa.Table:
    """Read and validate one seed file into an Arrow table with its declared schema."""
    spec = SPECS[name]
    path = Path(seeds_dir) / spec.file
    if not path.exists():
        raise SeedError(f"{path}: seed file missing; create it (columns: {', '.join(c.name for c in spec.columns)}) or point BILLING_SEEDS_DIR at a folder that has it")
    columns: dict[str, list] = {c.name: [] for c in spec.columns}
    columns["seed_line"] = []
    seen: dict[tuple, int] = {}
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        try:
            header = next(reader)
        except StopIteration:
            raise SeedError(f"{path}:1: file is empty; add the header row {','.join(columns)}") from None
        expected = [c.name for c in spec.columns]
        if header != expected:
            raise SeedError(f"{path}:1: header is {','.join(header)}; expected {','.join(expected)}")
        for row in reader:
            line = reader.line_num
            if not row or all(not cell.strip() for cell in row):
                continue
            if len(row) != len(expected):
                raise SeedError(f"{path}:{line}: {len(row)} fields, expected {len(expected)} ({','.join(expected)}); quote values that contain commas")
            parsed = {}
            for col, raw in zip(spec.columns, row):
                try:
                    parsed[col.name] = col.parse(raw.strip() if col.name != "description" else raw)
                except ValueError as e:
                    raise SeedError(f"{path}:{line}: column {col.name}: {e}; fix this value") from None
            key = tuple(parsed[k] for k in spec.key)
            if key in seen:
                raise SeedError(f"{path}:{line}: duplicate key {dict(zip(spec.key, key))} (first on line {seen[key]}); keep one row per key")
            seen[key] = line
            for k, v in parsed.items():
                columns[k].append(v)
            columns["seed_line"].append(line)
    return pa.table(columns, schema=spec.schema)


def load_seeds(seeds_dir: Path) -> dict[str, pa.Table]:
    """Read every seed and check references between them (meter, plan, unit, currency)."""
    seeds_dir = Path(seeds_dir)
    if not seeds_dir.is_dir():
        raise SeedError(f"{seeds_dir}: seeds folder not found; set BILLING_SEEDS_DIR to a folder with meters.csv, customers.csv, plans.csv, prices.csv, units.csv, currencies.csv")
    tables = {name: read_seed(seeds_dir, name) for name in SPECS}
    _check_references(seeds_dir, tables)
    return tables


def _rows(table: pa.Table) -> list[dict]:
    return table.to_pylist()


def _check_references(seeds_dir: Path, t: dict[str, pa.Table]) -> None:
    units = {(r["unit"], r["billing_unit"]) for r in _rows(t["units"])}
    currencies = {r["currency"] for r in _rows(t["currencies"])}
    meters = {}
    for i, m in enumerate(_rows(t["meters"]), start=2):
        if m["aggregation"] not in AGGREGATIONS[m["kind"]]:
            raise SeedError(f"{seeds_dir / 'meters.csv'}:{i}: aggregation {m['aggregation']!r} is not valid for a {m['kind']}; use one of {', '.join(sorted(AGGREGATIONS[m['kind']]))}")
        if (m["unit"], m["billing_unit"]) not in units:
            raise SeedError(f"{seeds_dir / 'meters.csv'}:{i}: no conversion from unit {m['unit']!r} to billing unit {m['billing_unit']!r}; add a row to units.csv")
        meters[m["meter_id"]] = m
    plans = {}
    for i, p in enumerate(_rows(t["plans"]), start=2):
        if p["currency"] not in currencies:
            raise SeedError(f"{seeds_dir / 'plans.csv'}:{i}: currency {p['currency']!r} is not in currencies.csv; add it there")
        plans.setdefault(p["plan_id"], []).append(p)
    for i, p in enumerate(_rows(t["prices"]), start=2):
        if (p["plan_id"], p["version"]) not in {(q["plan_id"], q["version"]) for q in plans.get(p["plan_id"], [])}:
            raise SeedError(f"{seeds_dir / 'prices.csv'}:{i}: plan {p['plan_id']!r} version {p['version']} is not in plans.csv; add the plan or fix the id")
        if p["meter_id"] not in meters:
            raise SeedError(f"{seeds_dir / 'prices.csv'}:{i}: meter {p['meter_id']!r} is not in meters.csv; add the meter or fix the id")
        if p["dimension"] and not meters[p["meter_id"]]["dimension_label"]:
            raise SeedError(f"{seeds_dir / 'prices.csv'}:{i}: dimension {p['dimension']!r} given but meter {p['meter_id']!r} has no dimension_label; leave dimension empty")
    labels: dict[str, int] = {}
    for i, c in enumerate(_rows(t["customers"]), start=2):
        if c["plan_id"] not in plans:
            raise SeedError(f"{seeds_dir / 'customers.csv'}:{i}: plan {c['plan_id']!r} is not in plans.csv; use one of {', '.join(sorted(plans))}")
        if c["currency"] not in currencies:
            raise SeedError(f"{seeds_dir / 'customers.csv'}:{i}: currency {c['currency']!r} is not in currencies.csv; add it there")
        if any(c["currency"] != p["currency"] for p in plans[c["plan_id"]]):
            raise SeedError(f"{seeds_dir / 'customers.csv'}:{i}: currency {c['currency']!r} differs from plan {c['plan_id']!r}'s currency; use a plan in the customer's currency")
        key = c["label_value"]
        if key in labels:
            raise SeedError(f"{seeds_dir / 'customers.csv'}:{i}: label_value {c['label_value']!r} already identifies the customer on line {labels[key]}; each series must map to one customer")
        labels[key] = i


def seeds_digest(seeds_dir: Path) -> dict[str, str]:
    """SHA-256 of each seed file, for invoice manifests."""
    return {
        spec.file: hashlib.sha256((Path(seeds_dir) / spec.file).read_bytes()).hexdigest()
        for spec in SPECS.values()
        if (Path(seeds_dir) / spec.file).exists()
    }
