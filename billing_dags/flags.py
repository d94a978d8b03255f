"""Anomaly flags for people: list them, acknowledge critical ones so their invoices can finalize.

Flags are the partitions of fct_anomaly_flags. An acknowledgement (who, why, when) is kept in
data/flags/acks.json, keyed by customer, month, meter and rule; a critical flag without one holds
the customer's invoice for that month in draft.
"""

from __future__ import annotations

import json
from datetime import date, datetime, timezone
from pathlib import Path

import pyarrow.parquet as pq

from . import durable
from .core.calendar import next_month
from .settings import Paths
from .sqlmodels import load_project, partition_dir


def acks_path(paths: Paths) -> Path:
    return paths.data_dir / "flags" / "acks.json"


def read_acks(paths: Paths) -> list[dict]:
    f = acks_path(paths)
    return json.loads(f.read_text()) if f.exists() else []


def _ack_key(a: dict) -> tuple:
    return (a["customer_id"], a["month"], a["meter_id"], a["rule"])


def month_flags(paths: Paths, month: date) -> list[dict]:
    """Every flag raised on a day of ``month``."""
    end = next_month(month)
    model = load_project().models["fct_anomaly_flags"]
    rows: list[dict] = []
    for f in sorted(partition_dir(paths, model).glob("day=*/data.parquet")):
        day = date.fromisoformat(f.parent.name[4:])
        if month <= day < end:
            rows += pq.read_table(f, partitioning=None).to_pylist()
    return rows


def unacknowledged_critical(paths: Paths, month: date) -> dict[str, list[dict]]:
    """Customer -> critical flags of the month nobody has acknowledged (these hold finalization)."""
    acked = {_ack_key(a) for a in read_acks(paths)}
    out: dict[str, list[dict]] = {}
    for flag in month_flags(paths, month):
        key = (flag["customer_id"], f"{month:%Y-%m}", flag["meter_id"], flag["rule"])
        if flag["severity"] == "critical" and flag["customer_id"] and key not in acked:
            out.setdefault(flag["customer_id"], []).append(flag)
    return out


def acknowledge(paths: Paths, customer_id: str, month: date, rule: str, meter_id: str, by: str, reason: str, *, now: datetime | None = None) -> dict:
    flags = [
        f for f in month_flags(paths, month)
        if f["customer_id"] == customer_id and f["rule"] == rule and (not meter_id or f["meter_id"] == meter_id)
    ]
    if not flags:
        raise ValueError(
            f"no {rule!r} flag for {customer_id} in {month:%Y-%m}{' on meter ' + meter_id if meter_id else ''}; "
            f"list them with `billing flags list --month {month:%Y-%m}`"
        )
    if not by.strip() or not reason.strip():
        raise ValueError("--by and --reason must say who acknowledges the flag and why")
    acks = read_acks(paths)
    stamp = (now or datetime.now(timezone.utc)).isoformat(timespec="seconds")
    added = []
    for meter in sorted({f["meter_id"] for f in flags}):
        ack = {"customer_id": customer_id, "month": f"{month:%Y-%m}", "meter_id": meter, "rule": rule, "by": by, "reason": reason, "at": stamp}
        acks = [a for a in acks if _ack_key(a) != _ack_key(ack)] + [ack]
        added.append(ack)
    durable.write_bytes(acks_path(paths), (json.dumps(sorted(acks, key=_ack_key), indent=2) + "\n").encode())
    return {"acknowledged": added}


def register(sub) -> None:
    p = sub.add_parser("flags", help="anomaly flags: list them, acknowledge critical ones")
    fsub = p.add_subparsers(dest="flags_command", required=True, metavar="ACTION")
    lp = fsub.add_parser("list", help="flags raised in a month")
    lp.add_argument("--month", required=True, help="YYYY-MM")
    lp.add_argument("--severity", choices=["info", "warning", "critical"], help="only this severity")
    lp.add_argument("--customer", help="only this customer")
    lp.add_argument("--format", choices=["table", "json", "csv"], default="table")
    lp.set_defaults(func=cmd_list)
    ap = fsub.add_parser("ack", help="acknowledge a flag so the customer's invoice can finalize")
    ap.add_argument("customer")
    ap.add_argument("--month", required=True, help="YYYY-MM")
    ap.add_argument("--rule", required=True)
    ap.add_argument("--meter", default="", help="only this meter (default: every meter the rule flagged)")
    ap.add_argument("--by", required=True, help="who acknowledges")
    ap.add_argument("--reason", required=True, help="why the flag is not a billing problem")
    ap.set_defaults(func=cmd_ack)


def _quantity(flag: dict) -> str:
    """The quantity a flag states, in the meter's billing unit ("9.75 gib"); "" for flags without one."""
    q = flag.get("quantity")
    return "" if q is None else f"{q.normalize():f} {flag.get('unit') or ''}".strip()


def cmd_list(args) -> int:
    from .cli import _emit, _paths, console, parse_month

    paths = _paths(args)
    month = parse_month(args.month)
    acked = {_ack_key(a) for a in read_acks(paths)}
    rows = []
    for f in month_flags(paths, month):
        if args.severity and f["severity"] != args.severity:
            continue
        if args.customer and f["customer_id"] != args.customer:
            continue
        rows.append({
            "day": f["day"], "customer": f["customer_id"] or "(none)", "meter": f["meter_id"], "rule": f["rule"],
            "severity": f["severity"], "value": f"{f['value'].normalize():f}", "threshold": f"{f['threshold'].normalize():f}",
            "quantity": _quantity(f),
            "acknowledged": (f["customer_id"], f"{month:%Y-%m}", f["meter_id"], f["rule"]) in acked, "detail": f["detail"],
        })
    if not rows:
        console.print(f"no flags in {month:%Y-%m}" + (" (fct_anomaly_flags not materialized yet?)" if not month_flags(paths, month) else ""))
        return 0
    _emit(rows, args.format, title=f"Anomaly flags {month:%Y-%m}")
    return 0


def cmd_ack(args) -> int:
    from .cli import CliError, _paths, console, parse_month, require_customer

    paths = _paths(args)
    month = parse_month(args.month)
    require_customer(paths, args.customer)
    try:
        result = acknowledge(paths, args.customer, month, args.rule, args.meter, args.by, args.reason)
    except ValueError as e:
        raise CliError(str(e)) from None
    for a in result["acknowledged"]:
        console.print(f"acknowledged {a['rule']} on {a['meter_id']} for {a['customer_id']} {a['month']} by {a['by']}: {a['reason']}")
    console.print(f"rerun the month's invoices to finalize: billing run --month {month:%Y-%m} --no-ingest (or the invoices asset in the UI)")
    return 0
