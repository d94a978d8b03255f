"""`billing dispute`: how a customer's invoice follows from their raw samples, with an evidence pack.

The evidence query (sql_models/analyses/dispute_breakdown.sql) applies the same counter rules as
fct_usage_by_day to every raw sample of the customer's series. Two tie-outs: its per-meter totals
against the recomputed month (fct_usage_by_month), and the recomputed month's invoice lines
(fct_invoice_lines) against the invoice as stored, quantity and amount per line. A finalized
invoice is never edited, so the second can differ: the manifests say why (late data, a seed or
code change) and the pending adjustment says what the next invoice carries. The invoice's lines
must also sum to its total. Only this customer's series are read or exported (DESIGN rule 12).
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass, field
from datetime import date, timedelta
from decimal import Decimal
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

from billing_dags.billing.document import GENERATED_LINE_TYPES
from billing_dags.billing.manifest import code_version, invoice_manifest, recompute_reason
from billing_dags.billing.store import PENDING_DIR
from billing_dags.core import durable
from billing_dags.core.calendar import next_month
from billing_dags.core.errors import InputError
from billing_dags.core.money import format_minor
from billing_dags.core.settings import SQL_MODELS_DIR, Paths
from billing_dags.ingest import raw
from billing_dags.models.sqlmodels import Window, connect, load_project, partition_file, prepare

EVIDENCE_SQL = SQL_MODELS_DIR / "analyses" / "dispute_breakdown.sql"
BUCKETS_MS = {"hour": 3_600_000, "day": 86_400_000}
GAP_FLAG_MS = 15 * 60 * 1000


class DisputeError(InputError):
    """A dispute that cannot be built; the message names the input and the fix."""


@dataclass
class Dispute:
    customer_id: str
    month: date
    meter_id: str
    by: str
    breakdown: list[dict]
    totals: list[dict]
    events: list[dict]
    invoice: dict | None
    lines: list[dict]
    tie_out: dict = field(default_factory=dict)
    evidence: pa.Table | None = None


#: the model whose counter rules the evidence query applies (and whose lookback it uses)
USAGE_MODEL = "fct_usage_by_day"


def _evidence_params(customer_id: str, meter_id: str, window: Window, lookback_days: int) -> dict:
    return {
        "customer_id": customer_id,
        "meter_id": meter_id,
        "start_ms": window.start_ms,
        "end_ms": window.end_ms,
        "edge_lookback_ms": lookback_days * raw.DAY_MS,
    }


def evidence(paths: Paths, customer_id: str, month: date, meter_id: str = "") -> pa.Table:
    """Every raw sample of the customer's series in the month (plus the lookback), with its increase."""
    end = next_month(month)
    window = Window(month, end)
    project = load_project()
    lookback_days = project.models[USAGE_MODEL].lookback_days
    lookback = Window(month - timedelta(days=lookback_days), end)
    con = connect()
    try:
        # the view models the query reads, over raw days from the lookback to the month's end
        for name, over in (("dim_series", lookback), ("stg_raw__samples", lookback), ("stg_raw__carry_in", window)):
            prepare(con, project, name, paths, over)
            con.execute(f"create or replace view {name} as {project.models[name].sql.strip().rstrip(';')}")
        sql = EVIDENCE_SQL.read_text().strip().rstrip(";")
        return con.sql(sql, params=_evidence_params(customer_id, meter_id, window, lookback_days)).to_arrow_table()
    finally:
        con.close()


def build_dispute(paths: Paths, customer_id: str, month: date, *, meter_id: str = "", by: str = "day") -> Dispute:
    if by not in BUCKETS_MS:
        raise DisputeError(f"--by {by!r} is not one of hour, day")
    table = evidence(paths, customer_id, month, meter_id)
    if meter_id and not len(table):
        from difflib import get_close_matches

        from billing_dags.seeds.catalog import read_seed

        close = get_close_matches(meter_id, read_seed(paths.seeds_dir, "meters").column("meter_id").to_pylist(), n=1)
        raise DisputeError(
            f"no raw samples of meter {meter_id!r} for {customer_id} in {month:%Y-%m}"
            + (f"; did you mean {close[0]!r}?" if close else "")
            + f" Check the meter id (billing usage {customer_id} --month {month:%Y-%m} lists them)"
        )
    con = duckdb.connect()
    try:
        con.register("evidence", table)
        breakdown = _rows(
            con.execute(
                f"""
            select meter_id, dimension, make_timestamp((ts_ms // {BUCKETS_MS[by]}) * {BUCKETS_MS[by]} * 1000) as bucket,
                   count(*) as samples, sum(increase)::decimal(38, 9) as increase, max(value) as peak,
                   count(*) filter (where is_reset) as resets, max(gap_ms) as max_gap_ms
            from evidence group by all order by all
            """
            )
        )
        totals = _rows(
            con.execute(
                "select meter_id, any_value(kind) as kind, count(distinct series_id) as series, count(*) as samples, "
                "sum(increase)::decimal(38, 9) as increase, count(*) filter (where is_reset) as resets "
                "from evidence group by meter_id order by meter_id"
            )
        )
        events = _rows(
            con.execute(
                f"""
            select meter_id, series_id, ts,
                   case when is_reset then 'reset' when is_reappearance then 'reappeared after lookback' else 'gap' end as event,
                   prev_value, value, gap_ms
            from evidence
            where is_reset or is_reappearance or gap_ms > {GAP_FLAG_MS}
            order by ts_ms, series_id
            """
            )
        )
    finally:
        con.close()
    invoice = _read_invoice(paths, customer_id, month)
    lines = [l for l in (invoice or {}).get("lines", []) if not meter_id or l.get("meter_id") == meter_id]
    if lines:
        lines = with_allowances(lines, _partition_rows(_invoice_lines_file(paths, month), customer_id))
    dispute = Dispute(customer_id, month, meter_id, by, breakdown, totals, events, invoice, lines, evidence=table)
    dispute.tie_out = tie_out(paths, dispute)
    return dispute


def _rows(cursor) -> list[dict]:
    cols = [d[0] for d in cursor.description]
    return [dict(zip(cols, r)) for r in cursor.fetchall()]


def _invoice_lines_file(paths: Paths, month: date) -> Path:
    return partition_file(paths, load_project().models["fct_invoice_lines"], Window(month, next_month(month)))


ALLOWANCE_KEYS = ("included_quantity", "billable_quantity")


def with_allowances(invoice_lines: list[dict], recomputed_lines: list[dict]) -> list[dict]:
    """The invoice's lines with the included and billable quantity of each (quantity - included = billable, the
    quantity the price applies to). A line that states them keeps its own; otherwise they come from the recomputed
    month's line (fct_invoice_lines) of the same number, type, meter and dimension, and only when that line bills
    the same quantity (a finalized invoice that differs from the recomputed month keeps them unknown: None)."""
    by_key = {
        (r["line_number"], r["line_type"], r.get("meter_id") or "", r.get("dimension") or ""): r for r in recomputed_lines if r.get("quantity") is not None
    }
    out = []
    for line in invoice_lines:
        if all(k in line for k in ALLOWANCE_KEYS):
            out.append(line)
            continue
        r = by_key.get((line["line_number"], line["line_type"], line.get("meter_id") or "", line.get("dimension") or ""))
        same = r is not None and line.get("quantity") not in (None, "") and Decimal(line["quantity"]) == Decimal(r["quantity"])
        out.append({**line, **{k: (_fmt(r[k]) if same and r[k] is not None else None) for k in ALLOWANCE_KEYS if k not in line}})
    return out


def _read_invoice(paths: Paths, customer_id: str, month: date) -> dict | None:
    f = paths.invoices / f"{month:%Y-%m}" / f"{customer_id}.json"
    return json.loads(f.read_text()) if f.exists() else None


def tie_out(paths: Paths, dispute: Dispute) -> dict:
    """Raw evidence vs the recomputed month, the recomputed month vs the invoice, and invoice lines vs its total."""
    end = next_month(dispute.month)
    models = load_project().models
    recomputed: dict[str, Decimal] = {}
    month_file = partition_file(paths, models["fct_usage_by_month"], Window(dispute.month, end))
    for r in _partition_rows(month_file, dispute.customer_id):
        if r["usage"] is not None:
            recomputed[r["meter_id"]] = recomputed.get(r["meter_id"], Decimal(0)) + r["usage"]
    meters = {}
    for t in dispute.totals:
        if t["kind"] != "counter":
            continue
        got = t["increase"] or Decimal(0)
        want = recomputed.get(t["meter_id"])
        meters[t["meter_id"]] = {"raw": got, "recomputed": want, "ties_out": want is not None and got == want}
    # a month not computed yet has nothing to tie out against: that is not a difference
    result: dict = {"month_computed": month_file.exists(), "meters": meters}
    if dispute.invoice:
        lines = [
            l
            for l in _partition_rows(_invoice_lines_file(paths, dispute.month), dispute.customer_id)
            if not dispute.meter_id or l["meter_id"] == dispute.meter_id
        ]
        result["invoice_vs_recomputed"] = invoice_vs_recomputed(paths, dispute.invoice, dispute.lines, lines)
        lines_sum = sum(int(l["amount_minor"]) for l in dispute.invoice["lines"])
        result["invoice_total_minor"] = int(dispute.invoice["total_minor"])
        result["lines_sum_minor"] = lines_sum
        result["invoice_ties_out"] = lines_sum == int(dispute.invoice.get("subtotal_minor", dispute.invoice["total_minor"])) or lines_sum == int(
            dispute.invoice["total_minor"]
        )
    return result


def _partition_rows(path: Path, customer_id: str) -> list[dict]:
    if not path.exists():
        return []
    return [r for r in pq.read_table(path, partitioning=None).to_pylist() if r["customer_id"] == customer_id]


def invoice_vs_recomputed(paths: Paths, invoice: dict, invoice_lines: list[dict], recomputed_lines: list[dict]) -> dict:
    """The invoice's charge lines against the recomputed month's (fct_invoice_lines), by line type, meter and
    dimension: quantity and amount of each. When they differ: why (from the manifests) and what follows
    (a finalized invoice: the pending adjustment; a draft: the next run rewrites it)."""

    def by_key(lines) -> dict[tuple, dict]:
        # a month with a plan change has a line per subscription period: summed per key, none dropped
        out: dict[tuple, dict] = {}
        for line in lines:
            k = (line["line_type"], line.get("meter_id") or "", line.get("dimension") or "")
            acc = out.setdefault(k, {"unit": line.get("unit") or "", "quantity": Decimal(0), "amount_minor": 0})
            acc["quantity"] += Decimal(line["quantity"])
            acc["amount_minor"] += int(line["amount_minor"])
        return out

    billed = by_key(l for l in invoice_lines if l["line_type"] not in GENERATED_LINE_TYPES)
    again = by_key(recomputed_lines)
    rows = []
    for k in sorted(set(billed) | set(again)):
        b, r = billed.get(k), again.get(k)
        row = {
            "line_type": k[0],
            "meter_id": k[1],
            "dimension": k[2],
            "unit": (b or r)["unit"],
            "invoiced_quantity": b["quantity"] if b else None,
            "invoiced_amount_minor": b["amount_minor"] if b else None,
            "recomputed_quantity": r["quantity"] if r else None,
            "recomputed_amount_minor": r["amount_minor"] if r else None,
        }
        row["same"] = (row["invoiced_quantity"], row["invoiced_amount_minor"]) == (row["recomputed_quantity"], row["recomputed_amount_minor"])
        rows.append(row)
    out: dict = {"invoice_number": invoice["invoice_number"], "status": invoice["status"], "lines": rows, "same": all(r["same"] for r in rows)}
    if out["same"]:
        return out
    month, cid, exp = invoice["period_start"][:7], invoice["customer_id"], int(invoice["minor_unit_exponent"])
    if invoice["status"] != "finalized":
        out["explanation"] = f"draft {invoice['invoice_number']} was built before the latest recomputation; the next invoice run rewrites it"
        return out
    pending_file = paths.invoices / month / PENDING_DIR / f"{cid}.json"
    pending = json.loads(pending_file.read_text()) if pending_file.exists() else None
    manifest = (
        pending["recomputed_manifest"] if pending else invoice_manifest(paths, date.fromisoformat(invoice["period_start"]), paths.seeds_dir, code_version())
    )
    out["reason"] = recompute_reason(invoice, manifest)
    text = (
        f"the recomputed month differs from finalized invoice {invoice['invoice_number']} because of {out['reason']} after finalization; "
        f"a finalized invoice is never edited: "
    )
    if pending:
        out["pending_adjustment_minor"] = int(pending["delta_minor"])
        text += (
            f"{format_minor(int(pending['delta_minor']), exp)} {invoice['currency'].upper()} is pending as an adjustment on {cid}'s next invoice "
            f"({pending_file})"
        )
    else:
        text += f"no adjustment is recorded yet; rerun the invoices of {month} (billing run) to record it for {cid}'s next invoice"
    out["explanation"] = text[0].upper() + text[1:]
    return out


def export_evidence(dispute: Dispute, folder: Path) -> list[Path]:
    """Evidence pack: raw samples (this customer's series only), the breakdown, the reproducing SQL;
    published durably, each file whole."""

    def csv_bytes(rows: list[dict], fieldnames: list[str]) -> bytes:
        out = io.StringIO(newline="")
        w = csv.DictWriter(out, fieldnames=fieldnames)
        if fieldnames:
            w.writeheader()
            w.writerows(rows)
        return out.getvalue().encode()

    samples = folder / "raw_samples.parquet"
    with durable.staged(samples) as tmp:
        pq.write_table(dispute.evidence, tmp)
    breakdown = folder / f"breakdown_by_{dispute.by}.csv"
    events = folder / "events.csv"
    end = next_month(dispute.month)
    params = _evidence_params(dispute.customer_id, dispute.meter_id, Window(dispute.month, end), load_project().models[USAGE_MODEL].lookback_days)
    sql = folder / "reproduce.sql"
    summary = folder / "tie_out.json"
    batch = durable.Batch()
    try:
        batch.write(breakdown, csv_bytes(dispute.breakdown, list(dispute.breakdown[0]) if dispute.breakdown else []))
        batch.write(events, csv_bytes(dispute.events, ["meter_id", "series_id", "ts", "event", "prev_value", "value", "gap_ms"]))
        batch.write(
            sql,
            (
                "-- Reproduces raw_samples.parquet (the increase of every sample) from the warehouse:\n"
                "--   duckdb data/warehouse.duckdb < reproduce.sql\n"
                f"-- parameters: {json.dumps(params, sort_keys=True)}\n" + _bind_literals(EVIDENCE_SQL.read_text(), params)
            ).encode(),
        )
        batch.write(summary, (json.dumps(dispute.tie_out, indent=2, sort_keys=True, default=str) + "\n").encode())
        batch.commit()
    finally:
        batch.abort()
        batch.close()
    return [samples, breakdown, events, sql, summary]


def _bind_literals(sql: str, params: dict) -> str:
    """The evidence query with its parameters written in as SQL literals, for a person to run."""
    import re

    def literal(m: re.Match) -> str:
        value = params[m.group(1)]
        return str(value) if isinstance(value, int) else "'" + str(value).replace("'", "''") + "'"

    return re.sub(r"\$(" + "|".join(sorted(params, key=len, reverse=True)) + r")\b", literal, sql)


# --- the `billing dispute` command ------------------------------------------------------------


def _fmt(d) -> str:
    if d is None:
        return ""
    return f"{Decimal(d).normalize():f}"
