"""Allowance notifications: "you have used 80% (100%) of an included allowance", for a mail or webhook sender.
An allowance of a counted meter (bytes, shares) is used by the month's usage, one of a peak meter (devices,
storage: aggregation max) by the month's peak.

They are built on the ``allowance_used`` flags of fct_anomaly_flags_by_day, which already decide when a
threshold is crossed (seeds/anomaly_rules.csv: the day month-to-date usage first reaches a level,
again at a higher level, again next month; the highest level reached that day) and carry the included
quantity of the plan in force it is a percentage of. One flag is one notification; nothing here decides
a crossing, or which plan is in force, a second time.

The outbox is one JSON Lines file per day of crossing, ``data/notifications/outbox/day=YYYY-MM-DD.jsonl``,
rewritten whole (durably) when the day is computed again: a notification keeps its ``created_at``, and
one whose crossing a recomputation removed (late data lowered the usage) is dropped before anyone
sent it. Each notification's ``id`` derives from (customer, meter, dimension, period, threshold) only,
so the same crossing found on another day after a recomputation has the same id: a sender
deduplicates on it. A sender lists ``pending`` notifications and marks the ones it delivered
(``mark_delivered``); the marks are kept apart, in ``data/notifications/delivered.jsonl``, so a
recomputed day never forgets a delivery.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable
from contextlib import contextmanager
from datetime import UTC, date, datetime, timedelta
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path

from billing_dags.billing import projection
from billing_dags.core import durable
from billing_dags.core.errors import InputError
from billing_dags.core.settings import Paths

RULE = "allowance_used"
_ID_RE = re.compile(r"^ntf_[0-9a-f]{24}$")


def notifications_dir(paths: Paths) -> Path:
    return paths.data_dir / "notifications"


def outbox_file(paths: Paths, day: date) -> Path:
    return notifications_dir(paths) / "outbox" / f"day={day.isoformat()}.jsonl"


def delivered_file(paths: Paths) -> Path:
    return notifications_dir(paths) / "delivered.jsonl"


def notification_id(customer_id: str, meter_id: str, dimension: str, period: str, threshold: Decimal) -> str:
    key = "\0".join([RULE, customer_id, meter_id, dimension, period, f"{Decimal(threshold).normalize():f}"])
    return "ntf_" + hashlib.sha256(key.encode()).hexdigest()[:24]


def _flags_of_day(paths: Paths, day: date) -> list[dict]:
    from billing_dags.models.sqlmodels import Window, load_project, partition_file, read_day_partition

    model = load_project().models["fct_anomaly_flags_by_day"]
    window = Window(day, day + timedelta(days=1))
    flags = read_day_partition(paths, model, window)
    if flags is None:
        raise InputError(
            f"no anomaly flags computed for {day} under {partition_file(paths, model, window).parent}; materialize fct_anomaly_flags_by_day for {day} first"
        )
    return flags.to_pylist()


def build_day(paths: Paths, day: date, now: datetime | None = None) -> list[dict]:
    """The notifications of the allowance thresholds crossed on ``day`` (from its flags), sorted by id;
    ``created_at`` is kept from the day's outbox file when a notification is already there."""
    now = now or datetime.now(UTC)
    flags = [f for f in _flags_of_day(paths, day) if f["rule"] == RULE and f["customer_id"]]
    if not flags:
        return []
    seeds = projection.seed_tables(paths)
    meters = {m["meter_id"]: m for m in seeds["meters"].to_pylist()}
    names = {c["customer_id"]: c["name"] for c in seeds["customers"].to_pylist()}
    before = {n["id"]: n for n in read_outbox_file(outbox_file(paths, day))}
    period = f"{day:%Y-%m}"
    out = []
    for f in flags:
        threshold = Decimal(f["threshold"])
        nid = notification_id(f["customer_id"], f["meter_id"], "", period, threshold)
        allowance = f.get("included_quantity")  # the plan in force, resolved by the flags model
        t = f"{threshold.normalize():f}"
        unit = f["unit"] or meters.get(f["meter_id"], {}).get("billing_unit", "")
        quantity = projection.fmt(f["quantity"]) if f["quantity"] is not None else None
        used = Decimal(f["value"]).quantize(Decimal("0.01"), rounding=ROUND_HALF_UP)
        description = meters.get(f["meter_id"], {}).get("description") or f["meter_id"]
        peak = meters.get(f["meter_id"], {}).get("aggregation") == "max"
        out.append(
            {
                "id": nid,
                "kind": "allowance_threshold",
                "customer_id": f["customer_id"],
                "customer_name": names.get(f["customer_id"], ""),
                "meter_id": f["meter_id"],
                "meter": description,
                "period": period,
                "day": day.isoformat(),
                "threshold_percent": t,
                "used_percent": f"{used:f}",
                "quantity": quantity,
                "allowance": projection.fmt(allowance) if allowance is not None else None,
                "unit": unit,
                "severity": f["severity"],
                "subject": f"{'Allowance used up' if threshold >= 100 else f'{t}% of an allowance used'}: {description}",
                "message": (
                    f"{description} reached {quantity} {unit} in {period}"  # a peak (devices, storage): the month's highest
                    if peak
                    else f"{quantity} {unit} of {description} used in {period}"
                )
                + f": {used:f}% of the {projection.fmt(allowance) if allowance is not None else '?'} {unit} included in your plan"
                + (f" ({'a peak' if peak else 'usage'} over it is billed at the plan's price)" if threshold >= 100 else ""),
                "created_at": before.get(nid, {}).get("created_at") or now.isoformat(timespec="seconds"),
            }
        )
    return sorted(out, key=lambda n: n["id"])


def write_day(paths: Paths, day: date, notifications: list[dict]) -> Path | None:
    """Publish the day's outbox file (removed when the day has none); unchanged bytes are not rewritten."""
    dest = outbox_file(paths, day)
    if not notifications:
        durable.remove(dest)
        return None
    data = _jsonl(notifications)
    if not (dest.exists() and dest.read_bytes() == data):
        durable.write_bytes(dest, data)
    return dest


def _jsonl(rows: list[dict]) -> bytes:
    """One JSON object a line, keys sorted: the same rows are the same bytes."""
    return "".join(json.dumps(r, sort_keys=True, ensure_ascii=False, separators=(",", ":")) + "\n" for r in rows).encode("utf-8")


def read_outbox_file(f: Path) -> list[dict]:
    """The rows of a JSON-lines file ([] when there is none), read for an update (``durable.read_for_update``)."""
    data = durable.read_for_update(f)
    if data is None:
        return []
    return [json.loads(line) for line in data.decode("utf-8").splitlines() if line.strip()]


def outbox(paths: Paths, period: str | None = None) -> list[dict]:
    """Every notification in the outbox (of the month ``period``, YYYY-MM), once per id (the earliest
    day's), oldest first."""
    seen: dict[str, dict] = {}
    for f in sorted((notifications_dir(paths) / "outbox").glob(f"day={period + '-' if period else ''}*.jsonl")):
        for n in read_outbox_file(f):
            seen.setdefault(n["id"], n)
    return sorted(seen.values(), key=lambda n: (n["day"], n["customer_id"], n["meter_id"], n["threshold_percent"]))


def delivered(paths: Paths) -> dict[str, dict]:
    return {d["id"]: d for d in read_outbox_file(delivered_file(paths))}


def pending(paths: Paths) -> list[dict]:
    """Notifications not marked delivered yet, oldest first: what a sender sends."""
    done = delivered(paths)
    return [n for n in outbox(paths) if n["id"] not in done]


@contextmanager
def _locked(paths: Paths):
    with durable.exclusive_lock(notifications_dir(paths) / ".delivered.lock"):
        yield


def mark_delivered(paths: Paths, ids: Iterable[str], channel: str, now: datetime | None = None) -> list[str]:
    """Record that ``ids`` were delivered (by ``channel``: "email", "webhook", ...); the ids newly marked.

    Idempotent; an id that is not a notification in the outbox is an InputError naming it."""
    ids = list(dict.fromkeys(ids))
    if not channel.strip():
        raise InputError("channel must say how the notifications were delivered, e.g. email or webhook")
    known = {n["id"] for n in outbox(paths)}
    for i in ids:
        if not _ID_RE.match(i) or i not in known:
            raise InputError(f"notification id {i[:60]!r} is not in the outbox; list them with `billing notifications list`")
    stamp = (now or datetime.now(UTC)).isoformat(timespec="seconds")
    with _locked(paths):
        done = delivered(paths)
        new = [i for i in ids if i not in done]
        if new:
            rows = list(done.values()) + [{"id": i, "delivered_at": stamp, "channel": channel} for i in new]
            durable.write_bytes(delivered_file(paths), _jsonl(rows))
    return new
