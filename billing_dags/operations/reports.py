"""The daily summary (seed 000's daily email): activity, traffic, shares, top customers, anomalies.

Built from the day's fct_usage_by_day and fct_anomaly_flags_by_day partitions; written as Markdown and
HTML to data/reports/daily/YYYY-MM-DD.{md,html}; deterministic for the same inputs.
"""

from __future__ import annotations

import html
from dataclasses import dataclass, field
from datetime import date, timedelta
from decimal import Decimal
from pathlib import Path

import pyarrow.parquet as pq

from billing_dags.core import durable
from billing_dags.core.settings import Paths
from billing_dags.models.sqlmodels import Window, load_project, partition_file, read_day_partition, seed_snapshot_path
from billing_dags.seeds.catalog import OUTSIDE_SUBSCRIPTION_RULES
from billing_dags.stripe.outbox import too_old_flags

GIB = Decimal(2**30)


@dataclass
class DailySummary:
    day: date
    active_customers: int
    peak_connections: Decimal
    bytes_total: Decimal
    shares_accepted: Decimal
    shares_rejected: Decimal
    meters: list[dict]
    top_by_bytes: list[dict]
    flags: list[dict]
    #: "customer (meter, ...)" for usage on a day no subscription covers: on no invoice
    outside_subscription: list[str]
    #: Stripe meter events too old to send (35 days), each with what to bill instead
    stripe_too_old: list[str] = field(default_factory=list)


def _read(path: Path) -> list[dict]:
    return pq.read_table(path, partitioning=None).to_pylist() if path.exists() else []


def build_daily_summary(paths: Paths, day: date) -> DailySummary:
    window = Window(day, day + timedelta(days=1))
    models = load_project().models
    usage_table = read_day_partition(paths, models["fct_usage_by_day"], window)
    if usage_table is None:
        usage_file = partition_file(paths, models["fct_usage_by_day"], window)
        raise FileNotFoundError(f"no usage computed for {day}: {usage_file} is missing; materialize fct_usage_by_day for {day} (billing run)")
    usage = usage_table.to_pylist()
    flags_table = read_day_partition(paths, models["fct_anomaly_flags_by_day"], window)
    flags = flags_table.to_pylist() if flags_table is not None else []
    meters = {m["meter_id"]: m for m in _read(seed_snapshot_path(paths, "meters"))}

    def total(meter_id: str, column: str = "usage") -> Decimal:
        return sum((r[column] or Decimal(0) for r in usage if r["meter_id"] == meter_id), Decimal(0))

    byte_meters = {m for m, row in meters.items() if row["unit"] == "byte" and row["kind"] == "counter"}
    per_customer: dict[str, Decimal] = {}
    for r in usage:
        if r["meter_id"] in byte_meters and r["usage"]:
            per_customer[r["customer_id"]] = per_customer.get(r["customer_id"], Decimal(0)) + r["usage"]
    top = sorted(per_customer.items(), key=lambda kv: (-kv[1], kv[0]))[:10]
    outside: dict[str, set[str]] = {}
    for f in flags:
        if f["rule"] in OUTSIDE_SUBSCRIPTION_RULES:
            outside.setdefault(f["customer_id"], set()).add(f["meter_id"])
    meter_rows = []
    for meter_id in sorted({r["meter_id"] for r in usage}):
        rows = [r for r in usage if r["meter_id"] == meter_id]
        kind = rows[0]["kind"]
        value = total(meter_id) if kind == "counter" else total(meter_id, "gauge_peak")
        meter_rows.append(
            {
                "meter": meter_id,
                "kind": kind,
                "customers": len({r["customer_id"] for r in rows}),
                "total": value,
                "unit": meters.get(meter_id, {}).get("unit", ""),
                "resets": sum(r["resets"] for r in rows),
                "dropped_samples": sum(r["dropped_samples"] for r in rows),
            }
        )
    return DailySummary(
        day=day,
        active_customers=len({r["customer_id"] for r in usage if (r["usage"] or 0) > 0 or (r["gauge_peak"] or 0) > 0}),
        peak_connections=total("proxy_connections", "gauge_peak"),
        bytes_total=sum((total(m) for m in byte_meters), Decimal(0)),
        shares_accepted=total("proxy_accepted_shares"),
        shares_rejected=total("proxy_rejected_shares"),
        meters=meter_rows,
        top_by_bytes=[{"rank": i + 1, "customer": c, "bytes": b, "gib": (b / GIB).quantize(Decimal("0.001"))} for i, (c, b) in enumerate(top)],
        flags=sorted(flags, key=lambda f: ({"critical": 0, "warning": 1, "info": 2}[f["severity"]], f["customer_id"], f["meter_id"], f["rule"])),
        outside_subscription=[f"{c} ({', '.join(sorted(m))})" for c, m in sorted(outside.items())],
        stripe_too_old=too_old_flags(paths, day),
    )


def _n(d) -> str:
    d = Decimal(d)
    return f"{d.normalize():,f}" if d == d.to_integral_value() else f"{d.normalize():f}"


def to_markdown(s: DailySummary) -> str:
    out = [
        f"# Daily summary {s.day} (UTC)",
        "",
        f"- Active customers: {s.active_customers}",
        f"- Peak proxy connections (sum of per-client peaks): {_n(s.peak_connections)}",
        f"- Bytes transferred: {_n(s.bytes_total)} ({_n((s.bytes_total / GIB).quantize(Decimal('0.001')))} GiB)",
        f"- Shares accepted / rejected: {_n(s.shares_accepted)} / {_n(s.shares_rejected)}",
        f"- Usage outside any subscription (not billed): {'; '.join(s.outside_subscription) or 'none'}",
        "",
        "## Top 10 customers by bytes",
        "",
        "| # | customer | bytes | GiB |",
        "|---|---|---:|---:|",
        *[f"| {t['rank']} | {t['customer']} | {_n(t['bytes'])} | {_n(t['gib'])} |" for t in s.top_by_bytes],
        "",
        "## Meters",
        "",
        "| meter | kind | customers | total | unit | resets | dropped samples |",
        "|---|---|---:|---:|---|---:|---:|",
        *[f"| {m['meter']} | {m['kind']} | {m['customers']} | {_n(m['total'])} | {m['unit']} | {m['resets']} | {m['dropped_samples']} |" for m in s.meters],
        "",
        f"## Anomalies ({len(s.flags)})",
        "",
    ]
    tail = [
        "",
        f"## Stripe: meter events too old to send ({len(s.stripe_too_old)})",
        "",
        *([f"- {t}" for t in s.stripe_too_old] or ["None."]),
    ]
    if s.flags:
        out += ["| severity | customer | meter | rule | detail |", "|---|---|---|---|---|"]
        out += [f"| {f['severity']} | {f['customer_id'] or '(none)'} | {f['meter_id']} | {f['rule']} | {f['detail']} |" for f in s.flags]
    else:
        out.append("None.")
    return "\n".join(out + tail) + "\n"


def to_html(s: DailySummary) -> str:
    e = html.escape

    def table(headers: list[str], rows: list[list]) -> str:
        head = "".join(f"<th>{e(h)}</th>" for h in headers)
        body = "".join("<tr>" + "".join(f"<td>{e(str(c))}</td>" for c in row) + "</tr>" for row in rows)
        return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"

    return (
        "<!doctype html><html><head><meta charset='utf-8'><title>Daily summary " + e(str(s.day)) + "</title>"
        "<style>body{font-family:system-ui,sans-serif;margin:2em;color:#222}table{border-collapse:collapse;margin:1em 0}"
        "td,th{border-bottom:1px solid #ddd;padding:4px 10px;text-align:left}th{background:#f4f5f7}</style></head><body>"
        f"<h1>Daily summary {e(str(s.day))} (UTC)</h1><ul>"
        f"<li>Active customers: {s.active_customers}</li>"
        f"<li>Peak proxy connections: {e(_n(s.peak_connections))}</li>"
        f"<li>Bytes transferred: {e(_n(s.bytes_total))}</li>"
        f"<li>Shares accepted / rejected: {e(_n(s.shares_accepted))} / {e(_n(s.shares_rejected))}</li>"
        f"<li>Usage outside any subscription (not billed): {e('; '.join(s.outside_subscription) or 'none')}</li></ul>"
        "<h2>Top 10 customers by bytes</h2>"
        + table(["#", "customer", "bytes", "GiB"], [[t["rank"], t["customer"], _n(t["bytes"]), _n(t["gib"])] for t in s.top_by_bytes])
        + "<h2>Meters</h2>"
        + table(
            ["meter", "kind", "customers", "total", "unit", "resets", "dropped samples"],
            [[m["meter"], m["kind"], m["customers"], _n(m["total"]), m["unit"], m["resets"], m["dropped_samples"]] for m in s.meters],
        )
        + f"<h2>Anomalies ({len(s.flags)})</h2>"
        + table(
            ["severity", "customer", "meter", "rule", "detail"],
            [[f["severity"], f["customer_id"] or "(none)", f["meter_id"], f["rule"], f["detail"]] for f in s.flags],
        )
        + f"<h2>Stripe: meter events too old to send ({len(s.stripe_too_old)})</h2>"
        + ("<ul>" + "".join(f"<li>{e(t)}</li>" for t in s.stripe_too_old) + "</ul>" if s.stripe_too_old else "<p>None.</p>")
        + "</body></html>\n"
    )


def write_daily_summary(paths: Paths, s: DailySummary) -> list[Path]:
    folder = paths.data_dir / "reports" / "daily"
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for suffix, text in ((".md", to_markdown(s)), (".html", to_html(s))):
        dest = folder / f"{s.day}{suffix}"
        durable.write_bytes(dest, text.encode())
        written.append(dest)
    return written


def event_billed_lines(paths: Paths, month: date, n_customers: int | None = None) -> list[str]:
    """One line per customer (of the first ``n_customers``) billed from usage events or usage reports:
    the month's events or reports, tokens or devices and traffic, and the invoice total."""
    import duckdb

    from billing_dags.billing.listing import invoice_rows
    from billing_dags.core.calendar import next_month
    from billing_dags.operations.warehouse import open_warehouse
    from billing_dags.seeds.catalog import load_seeds

    customers = load_seeds(paths.seeds_dir)["customers"].to_pylist()[:n_customers]
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
    mega = Decimal(10) ** 6
    lines = []
    for c in picked:
        cid, meters = c["customer_id"], usage.get(c["customer_id"], {})
        get = lambda meter, i, meters=meters: meters.get(meter, (0, Decimal(0), Decimal(0)))[i]  # noqa: E731
        total = totals.get(cid, "no invoice")
        if c["usage_source"] == "usage_events":
            events = sum(m[0] for m in meters.values())
            tokens_in, tokens_out = get("llm_input_tokens", 1) / mega, get("llm_output_tokens", 1) / mega
            lines.append(f"{cid} (usage_events): {events:,} events, {tokens_in:,.1f}M input / {tokens_out:,.1f}M output tokens, invoice total {total}")
        else:
            reports = max((m[0] for m in meters.values()), default=0)
            traffic = (get("iot_mqtt_bytes", 1) + get("iot_http_bytes", 1)) / GIB
            lines.append(
                f"{cid} (usage reports): {reports:,} reports, peak {get('iot_devices', 2):,.0f} devices, "
                f"{traffic:,.1f} GiB traffic, peak storage {get('iot_storage', 2) / GIB:,.1f} GiB, invoice total {total}"
            )
    return lines
