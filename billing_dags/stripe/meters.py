"""Stripe meters for the seeds, and the `billing stripe ...` commands (DESIGN rule 9).

Every priced dimension of a meter of ``seeds/meters.csv`` with a ``stripe_event_name`` (every
(meter, dimension) of ``seeds/prices.csv``) needs a Stripe billing meter with its event name
(``outbox.stripe_event_name``), configured so that the outbox's events mean what they say: formula
``sum`` for counters and unit-hours (daily deltas), ``last`` for levels (peak, average, unit-months:
the period-to-date quantity), ``event_time_window=day`` (the newest event of a customer's UTC day
replaces the earlier ones, so a corrected day sent as a new revision overwrites rather than adds),
the Stripe unit in the display name, customers mapped by id from
``payload[stripe_customer_id]`` (the ``stripe_customer_id`` of ``seeds/customers.csv``) and the
value read from ``payload[value]``.

``sync_meters`` lists the account's meters (every page), creates the missing ones and reports
each as ``existing``, ``created`` or ``conflicting``. Stripe meters are immutable except their
display name, so a meter with the right event name but other settings (or deactivated) is
reported with the differences and never modified: fix it in the Stripe Dashboard or pick another
event name in the seeds.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import date, datetime
from typing import Any

from billing_dags.core.errors import InputError

#: the settings every billing_dags meter has in Stripe
CUSTOMER_PAYLOAD_KEY = "stripe_customer_id"
VALUE_PAYLOAD_KEY = "value"
EVENT_TIME_WINDOW = "day"
DISPLAY_NAME_MAX = 250


class StripeMeterError(InputError):
    """Seeds or Stripe state that sync-meters cannot act on; the message names it and the fix."""


def desired_meter(meter: Mapping, dimension: str = "", divisor: int | None = None) -> dict:
    """The Stripe meter of a seeds meter's priced dimension ("" = the whole meter), as nested create
    parameters: formula ``last`` for level aggregations (max, avg, unit_months), ``sum`` otherwise;
    the display name says what is counted, in which unit and how."""
    from billing_dags.stripe.outbox import stripe_event_name, stripe_formula, unit_decimals, unit_label

    divisor = 1 if divisor is None else divisor
    aggregation, base_unit = meter.get("aggregation") or "sum", meter.get("unit") or "unit"
    decimals = unit_decimals(aggregation, base_unit, divisor)
    formula = stripe_formula(aggregation)
    name = meter.get("description") or meter["meter_id"]
    what = f"{meter['meter_id']}{' ' + dimension if dimension else ''}"
    how = "period-to-date, last value" if formula == "last" else "daily usage, summed"
    unit = unit_label(base_unit, decimals) + {"unit_hours": "-hour", "unit_months": "-month"}.get(aggregation, "")
    display = f"{name}{' - ' + dimension if dimension else ''} ({what}; {unit}; {how})"
    return {
        "display_name": display[:DISPLAY_NAME_MAX],
        "event_name": stripe_event_name(meter["stripe_event_name"], dimension),
        "default_aggregation": {"formula": formula},
        "customer_mapping": {"event_payload_key": CUSTOMER_PAYLOAD_KEY, "type": "by_id"},
        "value_settings": {"event_payload_key": VALUE_PAYLOAD_KEY},
        "event_time_window": EVENT_TIME_WINDOW,
    }


def desired_meters(meters: Iterable[Mapping], prices: Iterable[Mapping] | None = None, units: Iterable[Mapping] | None = None) -> list[dict]:
    """One desired Stripe meter per priced dimension of a seeds meter with a stripe_event_name (every
    (meter, dimension) of ``prices``; without ``prices`` one per meter), sorted by event name."""
    divisors = {(u["unit"], u["billing_unit"]): int(u["divisor"]) for u in units or []}
    meters = [m for m in meters if m.get("stripe_event_name")]
    by_id = {m["meter_id"]: m for m in meters}
    if prices is None:
        wanted = [(m["meter_id"], "") for m in meters]
    else:
        wanted = sorted({(p["meter_id"], p["dimension"] or "") for p in prices if p["meter_id"] in by_id})
    out: dict[str, dict] = {}
    for meter_id, dim in wanted:
        m = by_id[meter_id]
        d = desired_meter(m, dim, divisors.get((m.get("unit"), m.get("billing_unit"))))
        ev = d["event_name"]
        if ev in out:
            raise StripeMeterError(
                f"seeds/meters.csv: meters {out[ev]['meter_id']!r} and {meter_id!r} share stripe_event_name {ev!r}; "
                "give each meter its own event name (Stripe sums every event of a name into one meter)"
            )
        out[ev] = {**d, "meter_id": meter_id, "dimension": dim}
    return [out[k] for k in sorted(out)]


def _get(obj: Any, *keys: str) -> Any:
    for k in keys:
        if obj is None:
            return None
        obj = obj.get(k) if isinstance(obj, Mapping) else getattr(obj, k, None)
    return obj


def differences(existing: Any, desired: Mapping) -> list[str]:
    """How an existing Stripe meter differs from the desired one (display name ignored: it is cosmetic)."""
    diffs = []
    checks = [
        ("status", _get(existing, "status"), "active"),
        ("default_aggregation.formula", _get(existing, "default_aggregation", "formula"), desired["default_aggregation"]["formula"]),
        ("event_time_window", _get(existing, "event_time_window"), desired["event_time_window"]),
        ("customer_mapping.event_payload_key", _get(existing, "customer_mapping", "event_payload_key"), desired["customer_mapping"]["event_payload_key"]),
        ("customer_mapping.type", _get(existing, "customer_mapping", "type"), desired["customer_mapping"]["type"]),
        ("value_settings.event_payload_key", _get(existing, "value_settings", "event_payload_key"), desired["value_settings"]["event_payload_key"]),
    ]
    for what, have, want in checks:
        if have != want:
            diffs.append(f"{what} is {have!r}, needs {want!r}")
    return diffs


def list_meters(client) -> list:
    """Every meter of the account (all pages, active and inactive)."""
    page = client.v1.billing.meters.list(params={"limit": 100})
    return list(page.auto_paging_iter())


@dataclass
class MeterSync:
    event_name: str
    meter_id: str
    action: str  # existing | created | conflicting | missing (dry-run) | failed
    stripe_meter_id: str | None = None
    detail: str = ""


@dataclass
class SyncReport:
    mode: str
    items: list[MeterSync] = field(default_factory=list)

    def by_action(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for i in self.items:
            out[i.action] = out.get(i.action, 0) + 1
        return out

    @property
    def ok(self) -> bool:
        return not any(i.action in ("conflicting", "failed") for i in self.items)


def _create_key(desired: Mapping) -> str:
    """Idempotency-Key of a meter creation: the same settings give the same key (a retried create
    never makes a second meter)."""
    settings = "|".join(str(desired[k]) for k in ("event_name", "default_aggregation", "customer_mapping", "value_settings", "event_time_window"))
    return "billing-dags-meter-" + hashlib.sha256(settings.encode()).hexdigest()[:32]


def sync_meters(client, meters: Iterable[Mapping], prices: Iterable[Mapping] | None = None, units: Iterable[Mapping] | None = None) -> SyncReport:
    """Create the Stripe meters the seeds need (one per priced dimension, see ``desired_meters``) and
    report the rest; ``client`` None is a dry run (nothing listed, nothing created: every meter is
    reported ``missing``)."""
    import stripe

    from billing_dags.stripe.sender import _error_text

    wanted = desired_meters(meters, prices, units)
    if client is None:
        return SyncReport("dry_run", [MeterSync(d["event_name"], d["meter_id"], "missing", None, "dry-run: no STRIPE_API_KEY") for d in wanted])
    by_event: dict[str, list] = {}
    for m in list_meters(client):
        by_event.setdefault(_get(m, "event_name"), []).append(m)
    report = SyncReport("live")
    for d in wanted:
        found = by_event.get(d["event_name"], [])
        active = [m for m in found if _get(m, "status") == "active"]
        candidates = active or found
        if candidates:
            match = next((m for m in candidates if not differences(m, d)), None)
            if match is not None:
                report.items.append(MeterSync(d["event_name"], d["meter_id"], "existing", _get(match, "id")))
            else:
                m = candidates[0]
                report.items.append(
                    MeterSync(
                        d["event_name"],
                        d["meter_id"],
                        "conflicting",
                        _get(m, "id"),
                        "; ".join(differences(m, d))
                        + " (meters are immutable: fix it in the Stripe Dashboard or change stripe_event_name in seeds/meters.csv)",
                    )
                )
            continue
        params = {k: v for k, v in d.items() if k not in ("meter_id", "dimension")}
        try:
            created = client.v1.billing.meters.create(params=params, options={"idempotency_key": _create_key(d)})
        except stripe.StripeError as e:
            report.items.append(MeterSync(d["event_name"], d["meter_id"], "failed", None, _error_text(e)))
            continue
        report.items.append(MeterSync(d["event_name"], d["meter_id"], "created", _get(created, "id")))
    return report


# --------------------------------------------------------------------------- sending days


def send_days(paths, days: list[date], client, *, now: datetime, log: Callable[[str], None] | None = None, **sender_options) -> tuple[list[dict], Any]:
    """Send the outbox of the given days with one sender, all days at once (concurrent across
    customers and meters, see ``stripe.sender.Sender``), writing each day's outbox file back as its
    rows change (every few dozen rows or a fraction of a second, and at the end), so a run stopped
    mid-way resends only what it had not recorded yet (with the same identifiers and keys).
    Returns (one summary row per day with an outbox, the sender)."""
    from billing_dags.stripe import outbox as ob
    from billing_dags.stripe import sender as sd

    sender = sd.Sender(client, now=now, log=log, **sender_options)
    stored = {d: ob.read_outbox(paths, d) for d in days}
    spans: list[tuple[date, int, int]] = []  # (day, first index, end index) in the combined rows
    rows: list[dict] = []
    for d in days:
        if stored[d]:
            spans.append((d, len(rows), len(rows) + len(stored[d])))
            rows.extend(stored[d])

    def save(out: list[dict], changed: set[int]) -> None:
        for d, lo, hi in spans:
            if any(lo <= i < hi for i in changed):
                ob.write_outbox(paths, d, out[lo:hi])

    before = {i: (r["status"], r["identifier"]) for i, r in enumerate(rows)}
    tries = [int(r.get("attempts") or 0) for r in rows]
    out = sender.send(rows, on_progress=save)
    summary = []
    for d, lo, hi in spans:
        day_rows = out[lo:hi]
        counts = dict.fromkeys(ob.STATUSES, 0)
        for r in day_rows:
            counts[r["status"]] += 1
        newly = [r["status"] for i, r in enumerate(day_rows, lo) if r["status"] != before[i][0]]
        tried = [r["status"] for i, r in enumerate(day_rows, lo) if int(r.get("attempts") or 0) > tries[i]]
        summary.append(
            {
                "day": d.isoformat(),
                "events": len(day_rows),
                "sent_now": newly.count("sent"),
                "failed_now": tried.count("failed"),
                **counts,
            }
        )
    return summary, sender


# --------------------------------------------------------------------------- CLI
