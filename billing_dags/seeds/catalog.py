"""Seeds: versioned CSV inputs (meters, units, currencies, customers, plans, prices).

Every file is read with an explicit schema and validated row by row; a bad row raises a
``SeedError`` naming the file, the line, the column and the fix. Seeds are read, never written.
Columns are documented in seeds/README.md.
"""

from __future__ import annotations

import csv
import hashlib
import io
import itertools
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import date
from decimal import Decimal, InvalidOperation
from pathlib import Path

import pyarrow as pa

from billing_dags.seeds.credits import CREDITS_FILE, Grant, validate_grants
from billing_dags.seeds.errors import SeedError
from billing_dags.seeds.invoicing import TAX_TREATMENTS, InvoiceProfile, country, email, jurisdiction, required_text, terms_days, validate_profile

SAFE_ID_RE = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,62}$")
LABEL_NAME_RE = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")
METRIC_RE = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*$")
KINDS = {"counter", "gauge"}
PRICING_MODELS = {"per_unit", "package", "graduated", "volume"}
PACKAGE_ROUNDING = {"up", "down", "half_up"}
#: the rules fct_anomaly_flags_by_day raises for usage on a day no subscription covers (it is on no invoice)
OUTSIDE_SUBSCRIPTION_RULES = ("outside_subscription", "outside_subscription_unpriced")
ANOMALY_RULES = {
    "week_over_week",
    "allowance_used",
    "outlier_mad",
    "scrape_gap",
    "counter_resets",
    "reappeared_series",
    "dropped_samples",
    "unmatched_series",
    "rate_per_minute",
    "pool_share_mismatch",
    "unpriced_usage",
    *OUTSIDE_SUBSCRIPTION_RULES,
    "duplicate_conflicts",
    "low_coverage",
}
#: where a customer's usage arrives from (the simulator follows it; informational otherwise)
USAGE_SOURCES = {"prometheus", "usage_events", "usage_reports"}
#: how a usage-report field becomes an event: a per-interval increment or a level
REPORT_FIELD_KINDS = {"delta", "gauge"}
SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
AGGREGATIONS = {
    "counter": {"sum"},
    "gauge": {"max", "avg", "unit_hours", "unit_months"},
}


def _safe_id(value: str) -> str:
    if not SAFE_ID_RE.match(value):
        raise ValueError(
            f"{value!r} is not a safe identifier (lowercase letters, digits, '_', '-', '.', at most 63 characters, starting with a letter or digit)"
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


def _percent(value: str) -> Decimal:
    d = _non_negative_decimal(value)
    if d > 100:
        raise ValueError(f"{value!r} is more than 100 percent")
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


def _sha256(value: str) -> str:
    if not SHA256_RE.match(value):
        raise ValueError("is not a SHA-256 hex digest (64 lowercase hex digits); store sha256(token), never the token")
    return value


def _report_field(value: str) -> str:
    if not LABEL_NAME_RE.match(value):
        raise ValueError(f"{value!r} is not a JSON field name of letters, digits and '_'")
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
                Column("currency", pa.string(), _iso_currency),
                Column("stripe_customer_id", pa.string(), _optional(_label_value)),
                Column("usage_source", pa.string(), _one_of(USAGE_SOURCES)),
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
                Column("minimum_charge", DEC, _non_negative_decimal),
                Column("discount_percent", DEC, _percent),
                Column("risk_multiplier", DEC, _non_negative_decimal),
                Column("description", pa.string(), _text),
            ),
            ("plan_id", "version"),
        ),
        SeedSpec(
            "subscriptions",
            "subscriptions.csv",
            (
                Column("customer_id", pa.string(), _safe_id),
                Column("plan_id", pa.string(), _safe_id),
                Column("start_date", pa.date32(), _date),
                Column("end_date", pa.date32(), _optional(_date)),
            ),
            ("customer_id", "start_date"),
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
                Column("pricing", pa.string(), _one_of(PRICING_MODELS)),
                Column("unit_price", DEC, _non_negative_decimal),
                Column("package_size", pa.int64(), _positive_int),
                Column("package_rounding", pa.string(), _one_of(PACKAGE_ROUNDING)),
                Column("description", pa.string(), _text),
            ),
            ("plan_id", "version", "meter_id", "dimension"),
        ),
        SeedSpec(
            "price_tiers",
            "price_tiers.csv",
            (
                Column("plan_id", pa.string(), _safe_id),
                Column("version", pa.int32(), _positive_int),
                Column("meter_id", pa.string(), _safe_id),
                Column("dimension", pa.string(), _text),
                Column("tier", pa.int32(), _positive_int),
                Column("up_to", DEC, _optional(_non_negative_decimal)),
                Column("unit_price", DEC, _non_negative_decimal),
                Column("flat_fee", DEC, _non_negative_decimal),
            ),
            ("plan_id", "version", "meter_id", "dimension", "tier"),
        ),
        SeedSpec(
            "credits",
            "credits.csv",
            (
                Column("grant_id", pa.string(), _safe_id),
                Column("customer_id", pa.string(), _safe_id),
                Column("currency", pa.string(), _iso_currency),
                Column("amount", DEC, _non_negative_decimal),
                Column("granted_on", pa.date32(), _date),
                Column("expires_on", pa.date32(), _optional(_date)),
                Column("description", pa.string(), _text),
            ),
            ("grant_id",),
        ),
        SeedSpec(
            "report_fields",
            "report_fields.csv",
            (
                Column("field", pa.string(), _report_field),
                Column("meter_id", pa.string(), _safe_id),
                Column("kind", pa.string(), _one_of(REPORT_FIELD_KINDS)),
                Column("scale", DEC, _non_negative_decimal),
                Column("description", pa.string(), _text),
            ),
            ("field",),
        ),
        SeedSpec(
            "report_tokens",
            "report_tokens.csv",
            (
                Column("customer_id", pa.string(), _safe_id),
                Column("token_sha256", pa.string(), _sha256),
                Column("description", pa.string(), _text),
            ),
            ("token_sha256",),
        ),
        SeedSpec(
            "issuer",
            "issuer.csv",
            (
                Column("name", pa.string(), required_text),
                Column("address", pa.string(), required_text),
                Column("country", pa.string(), country),
                Column("tax_id", pa.string(), required_text),
                Column("email", pa.string(), _optional(email)),
                Column("payment_terms_days", pa.int32(), terms_days),
                Column("tax_code", pa.string(), _safe_id),
            ),
            ("name",),
        ),
        SeedSpec(
            "tax_rates",
            "tax_rates.csv",
            (
                Column("tax_code", pa.string(), _safe_id),
                Column("jurisdiction", pa.string(), _optional(jurisdiction)),
                Column("name", pa.string(), required_text),
                Column("rate_percent", DEC, _percent),
                Column("treatment", pa.string(), _one_of(TAX_TREATMENTS)),
                Column("note", pa.string(), _text),
            ),
            ("tax_code",),
        ),
        SeedSpec(
            "customer_billing",
            "customer_billing.csv",
            (
                Column("customer_id", pa.string(), _safe_id),
                Column("legal_name", pa.string(), required_text),
                Column("address", pa.string(), required_text),
                Column("country", pa.string(), country),
                Column("tax_id", pa.string(), _optional(required_text)),
                Column("email", pa.string(), _optional(email)),
                Column("payment_terms_days", pa.int32(), _optional(terms_days)),
                Column("tax_code", pa.string(), _optional(_safe_id)),
            ),
            ("customer_id",),
        ),
        SeedSpec(
            "meter_display",
            "meter_display.csv",
            (
                Column("meter_id", pa.string(), _safe_id),
                Column("name", pa.string(), required_text),
                Column("unit", pa.string(), required_text),
                Column("decimals", pa.int32(), _non_negative_int),
            ),
            ("meter_id",),
        ),
        SeedSpec(
            "anomaly_rules",
            "anomaly_rules.csv",
            (
                Column("rule", pa.string(), _one_of(ANOMALY_RULES)),
                Column("meter_id", pa.string(), _text),
                Column("threshold", DEC, _non_negative_decimal),
                Column("severity", pa.string(), _one_of({"info", "warning", "critical"})),
                Column("description", pa.string(), _text),
            ),
            ("rule", "meter_id", "threshold"),
        ),
    ]
}


#: validated seed tables by (name, file path, SHA-256 of the file's bytes): a seed is read many times
#: a run (every day's assets), and parsing and checking it costs far more than reading its bytes
_PARSED: dict[tuple[str, str, bytes], pa.Table] = {}
_PARSED_MAX = 64


def read_seed(seeds_dir: Path, name: str) -> pa.Table:
    """Read and validate one seed file into an Arrow table with its declared schema."""
    spec = SPECS[name]
    path = Path(seeds_dir) / spec.file
    if not path.exists():
        raise SeedError(
            f"{path}: seed file missing; create it (columns: {', '.join(c.name for c in spec.columns)}) or point BILLING_SEEDS_DIR at a folder that has it"
        )
    data = path.read_bytes()
    key = (name, str(path), hashlib.sha256(data).digest())
    table = _PARSED.get(key)
    if table is None:
        table = _parse_seed(path, spec, data.decode("utf-8"))
        if len(_PARSED) >= _PARSED_MAX:
            _PARSED.clear()
        _PARSED[key] = table
    return table


def _parse_seed(path: Path, spec: SeedSpec, text: str) -> pa.Table:
    columns: dict[str, list] = {c.name: [] for c in spec.columns}
    columns["seed_line"] = []
    seen: dict[tuple, int] = {}
    with io.StringIO(text, newline="") as f:
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
        raise SeedError(f"{seeds_dir}: seeds folder not found; set BILLING_SEEDS_DIR to a folder with {', '.join(s.file for s in SPECS.values())}")
    tables = {name: read_seed(seeds_dir, name) for name in SPECS}
    _check_references(seeds_dir, tables)
    return tables


def _rows(table: pa.Table) -> list[dict]:
    return table.to_pylist()


def _check_references(seeds_dir: Path, t: dict[str, pa.Table]) -> None:
    def fail(name: str, row: dict, problem: str) -> SeedError:
        return SeedError(f"{seeds_dir / SPECS[name].file}:{row['seed_line']}: {problem}")

    units = {(r["unit"], r["billing_unit"]) for r in _rows(t["units"])}
    currencies = {r["currency"]: r["minor_unit_exponent"] for r in _rows(t["currencies"])}
    meters = {}
    for m in _rows(t["meters"]):
        if m["aggregation"] not in AGGREGATIONS[m["kind"]]:
            raise fail("meters", m, f"aggregation {m['aggregation']!r} is not valid for a {m['kind']}; use one of {', '.join(sorted(AGGREGATIONS[m['kind']]))}")
        if (m["unit"], m["billing_unit"]) not in units:
            raise fail("meters", m, f"no conversion from unit {m['unit']!r} to billing unit {m['billing_unit']!r}; add a row to units.csv")
        meters[m["meter_id"]] = m
    plans: dict[str, list[dict]] = {}
    for p in _rows(t["plans"]):
        if p["currency"] not in currencies:
            raise fail("plans", p, f"currency {p['currency']!r} is not in currencies.csv; add it there")
        for col in ("base_fee", "minimum_charge"):
            if p[col] != p[col].quantize(Decimal(1).scaleb(-currencies[p["currency"]])):
                raise fail("plans", p, f"column {col}: {p[col]} has more decimals than {p['currency']} allows; round it to the minor unit")
        plans.setdefault(p["plan_id"], []).append(p)
    versions = {(p["plan_id"], p["version"]) for ps in plans.values() for p in ps}
    priced: dict[tuple, dict] = {}
    by_meter: dict[tuple, dict[bool, dict]] = {}
    for p in _rows(t["prices"]):
        if (p["plan_id"], p["version"]) not in versions:
            raise fail("prices", p, f"plan {p['plan_id']!r} version {p['version']} is not in plans.csv; add the plan or fix the id")
        if p["meter_id"] not in meters:
            raise fail("prices", p, f"meter {p['meter_id']!r} is not in meters.csv; add the meter or fix the id")
        if p["dimension"] and not meters[p["meter_id"]]["dimension_label"]:
            raise fail("prices", p, f"dimension {p['dimension']!r} given but meter {p['meter_id']!r} has no dimension_label; leave dimension empty")
        # a row with an empty dimension prices the meter over every dimension: beside per-dimension
        # rows of the same meter and plan version it would bill the same usage a second time
        rows_of_meter = by_meter.setdefault((p["plan_id"], p["version"], p["meter_id"]), {})
        rows_of_meter.setdefault(p["dimension"] == "", p)
        if len(rows_of_meter) == 2:
            catch_all, specific = rows_of_meter[True], rows_of_meter[False]
            raise fail(
                "prices",
                catch_all,
                (
                    f"this row prices meter {p['meter_id']!r} on plan {p['plan_id']} v{p['version']} in every dimension, and line "
                    f"{specific['seed_line']} prices its dimension {specific['dimension']!r}: that usage would be billed twice; "
                    "give this row a dimension of its own, or remove the per-dimension rows of the meter"
                ),
            )
        priced[(p["plan_id"], p["version"], p["meter_id"], p["dimension"])] = p
    tiers: dict[tuple, list[dict]] = {}
    for r in _rows(t["price_tiers"]):
        key = (r["plan_id"], r["version"], r["meter_id"], r["dimension"])
        if key not in priced or priced[key]["pricing"] not in ("graduated", "volume"):
            raise fail(
                "price_tiers",
                r,
                f"no graduated or volume price row in prices.csv for plan {r['plan_id']} v{r['version']} meter {r['meter_id']} dimension "
                f"{r['dimension']!r}; add one or remove the tier",
            )
        tiers.setdefault(key, []).append(r)
    for key, p in priced.items():
        if p["pricing"] in ("graduated", "volume"):
            rows = sorted(tiers.get(key, []), key=lambda r: r["tier"])
            if not rows:
                raise fail("prices", p, f"pricing {p['pricing']} needs tiers in price_tiers.csv for plan {key[0]} v{key[1]} meter {key[2]}")
            if [r["tier"] for r in rows] != list(range(1, len(rows) + 1)):
                raise fail("price_tiers", rows[0], f"tiers of {key[2]} on plan {key[0]} v{key[1]} must be numbered 1..{len(rows)}")
            bounds = [r["up_to"] for r in rows]
            if bounds[-1] is not None or any(b is None for b in bounds[:-1]):
                raise fail("price_tiers", rows[-1], "only the last tier has an empty up_to (no upper bound); give every other tier an up_to")
            if any(a >= b for a, b in itertools.pairwise(bounds[:-1])):
                raise fail("price_tiers", rows[0], f"up_to values of {key[2]} on plan {key[0]} v{key[1]} must increase tier by tier")
    for r in _rows(t["anomaly_rules"]):
        if r["meter_id"] and r["meter_id"] not in meters:
            raise fail("anomaly_rules", r, f"meter {r['meter_id']!r} is not in meters.csv; leave meter_id empty for every meter or fix the id")
    customers = {c["customer_id"]: c for c in _rows(t["customers"])}
    labels: dict[str, dict] = {}
    for c in customers.values():
        if c["currency"] not in currencies:
            raise fail("customers", c, f"currency {c['currency']!r} is not in currencies.csv; add it there")
        if c["label_value"] in labels:
            raise fail(
                "customers",
                c,
                f"label_value {c['label_value']!r} already identifies the customer on line {labels[c['label_value']]['seed_line']}; "
                f"each series must map to one customer",
            )
        labels[c["label_value"]] = c
    for f in _rows(t["report_fields"]):
        m = meters.get(f["meter_id"])
        if m is None:
            raise fail("report_fields", f, f"meter {f['meter_id']!r} is not in meters.csv; add the meter or fix the id")
        want = "counter" if f["kind"] == "delta" else "gauge"
        if m["kind"] != want:
            raise fail("report_fields", f, f"a {f['kind']} field needs a {want} meter but {f['meter_id']!r} is a {m['kind']}; fix kind or meter_id")
        if f["scale"] == 0:
            raise fail(
                "report_fields", f, "scale 0 would bill nothing; give the number of meter units per reported unit (e.g. 1048576 for MB as bytes / 1024 / 1024)"
            )
    for tok in _rows(t["report_tokens"]):
        if tok["customer_id"] not in customers:
            raise fail("report_tokens", tok, f"customer {tok['customer_id']!r} is not in customers.csv; add the customer or remove the token")
    # prepaid credits: amounts, customers, currencies, expiry

    validate_grants(_rows(t["credits"]), customers.values(), _rows(t["currencies"]), source=seeds_dir / SPECS["credits"].file)
    # what invoice documents say besides their figures: issuer, bill-to, payment terms, tax, meter names
    _invoice_profile(seeds_dir, t)
    periods: dict[str, list[dict]] = {}
    for sub in _rows(t["subscriptions"]):
        if sub["customer_id"] not in customers:
            raise fail("subscriptions", sub, f"customer {sub['customer_id']!r} is not in customers.csv; add the customer or fix the id")
        if sub["plan_id"] not in plans:
            raise fail("subscriptions", sub, f"plan {sub['plan_id']!r} is not in plans.csv; use one of {', '.join(sorted(plans))}")
        currency = customers[sub["customer_id"]]["currency"]
        if any(p["currency"] != currency for p in plans[sub["plan_id"]]):
            raise fail("subscriptions", sub, f"plan {sub['plan_id']!r} is not priced in the customer's currency {currency!r}; use a plan in {currency}")
        first = min(plans[sub["plan_id"]], key=lambda p: p["effective_from"])
        if sub["start_date"] < first["effective_from"]:
            raise fail(
                "subscriptions",
                sub,
                (
                    f"start_date {sub['start_date']} is before the first version of plan {sub['plan_id']!r} (version {first['version']}, "
                    f"effective {first['effective_from']}, plans.csv line {first['seed_line']}): no price is in force on its first days; "
                    f"start it on or after {first['effective_from']}, or add a version of the plan effective on or before {sub['start_date']}"
                ),
            )
        if sub["end_date"] is not None and sub["end_date"] <= sub["start_date"]:
            raise fail("subscriptions", sub, f"end_date {sub['end_date']} is not after start_date {sub['start_date']} (end_date is exclusive)")
        periods.setdefault(sub["customer_id"], []).append(sub)
    for subs in periods.values():
        subs.sort(key=lambda r: r["start_date"])
        for a, b in itertools.pairwise(subs):
            if a["end_date"] is None or a["end_date"] > b["start_date"]:
                raise fail(
                    "subscriptions",
                    b,
                    f"subscription of {b['customer_id']} starting {b['start_date']} overlaps the one on line {a['seed_line']}; "
                    f"end that one on {b['start_date']} (end_date is exclusive)",
                )


def seeds_digest(seeds_dir: Path) -> dict[str, str]:
    """SHA-256 of each seed file, for invoice manifests."""
    return {
        spec.file: hashlib.sha256((Path(seeds_dir) / spec.file).read_bytes()).hexdigest() for spec in SPECS.values() if (Path(seeds_dir) / spec.file).exists()
    }


def read_credit_rows(seeds_dir: Path | str) -> list[dict]:
    """The parsed rows of ``seeds/credits.csv`` (columns checked one by one, no references yet)."""
    return read_seed(Path(seeds_dir), "credits").to_pylist()


def load_grants(seeds_dir: Path | str, customers: Iterable[Mapping], currencies: Iterable[Mapping]) -> list[Grant]:
    """Read and validate ``seeds/credits.csv`` against the given customer and currency rows."""
    seeds_dir = Path(seeds_dir)
    return validate_grants(read_credit_rows(seeds_dir), customers, currencies, source=seeds_dir / CREDITS_FILE)


def _invoice_profile(seeds_dir: Path, t: Mapping[str, pa.Table]) -> InvoiceProfile:
    return validate_profile(
        _rows(t["issuer"]),
        _rows(t["tax_rates"]),
        _rows(t["customer_billing"]),
        _rows(t["meter_display"]),
        _rows(t["customers"]),
        _rows(t["meters"]),
        seeds_dir,
    )


def load_invoice_profile(seeds_dir: Path | str) -> InvoiceProfile:
    """The issuer, customers' bill-to, payment terms and tax rates, and meter display names, validated
    against customers.csv and meters.csv (``billing_dags.seeds.invoicing``)."""
    seeds_dir = Path(seeds_dir)
    names = ("issuer", "tax_rates", "customer_billing", "meter_display", "customers", "meters")
    return _invoice_profile(seeds_dir, {n: read_seed(seeds_dir, n) for n in names})
