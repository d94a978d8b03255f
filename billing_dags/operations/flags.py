"""Anomaly flags for people: list them, acknowledge critical ones so their invoices can finalize.

Flags are the partitions of fct_anomaly_flags_by_day. An acknowledgement (who, why, when) is kept in
data/flags/acks.json, keyed by customer, month, meter and rule; a critical flag without one holds
the customer's invoice for that month in draft.
"""

from __future__ import annotations

import json
from datetime import UTC, date, datetime
from pathlib import Path

import pyarrow.parquet as pq

from billing_dags.core import durable
from billing_dags.core.calendar import next_month
from billing_dags.core.settings import Paths
from billing_dags.models.sqlmodels import load_project, partition_dir


def acks_path(paths: Paths) -> Path:
    return paths.data_dir / "flags" / "acks.json"


def read_acks(paths: Paths) -> list[dict]:
    data = durable.read_for_update(acks_path(paths))
    return json.loads(data) if data is not None else []


def _ack_key(a: dict) -> tuple:
    return (a["customer_id"], a["month"], a["meter_id"], a["rule"])


def month_flags(paths: Paths, month: date) -> list[dict]:
    """Every flag raised on a day of ``month``."""
    end = next_month(month)
    model = load_project().models["fct_anomaly_flags_by_day"]
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
    flags = [f for f in month_flags(paths, month) if f["customer_id"] == customer_id and f["rule"] == rule and (not meter_id or f["meter_id"] == meter_id)]
    if not flags:
        raise ValueError(
            f"no {rule!r} flag for {customer_id} in {month:%Y-%m}{' on meter ' + meter_id if meter_id else ''}; "
            f"list them with `billing flags list --month {month:%Y-%m}`"
        )
    if not by.strip() or not reason.strip():
        raise ValueError("--by and --reason must say who acknowledges the flag and why")
    acks = read_acks(paths)
    stamp = (now or datetime.now(UTC)).isoformat(timespec="seconds")
    added = []
    for meter in sorted({f["meter_id"] for f in flags}):
        ack = {"customer_id": customer_id, "month": f"{month:%Y-%m}", "meter_id": meter, "rule": rule, "by": by, "reason": reason, "at": stamp}
        acks = [a for a in acks if _ack_key(a) != _ack_key(ack)] + [ack]
        added.append(ack)
    durable.write_bytes(acks_path(paths), (json.dumps(sorted(acks, key=_ack_key), indent=2) + "\n").encode())
    return {"acknowledged": added}


def _quantity(flag: dict) -> str:
    """The quantity a flag states, in the meter's billing unit ("9.75 gib"); "" for flags without one."""
    q = flag.get("quantity")
    return "" if q is None else f"{q.normalize():f} {flag.get('unit') or ''}".strip()
