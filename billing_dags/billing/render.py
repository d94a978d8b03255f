"""Rendering an invoice: canonical JSON (as stored), CSV, a self-contained printable HTML page, a plain-text table.

Every renderer is deterministic: the same invoice gives the same bytes.
"""

from __future__ import annotations

import csv
import html
import io
from typing import Any, Mapping

from billing_dags.billing.document import STATUSES
from billing_dags.billing.errors import InvoiceError
from billing_dags.core import durable

FORMATS = ("json", "csv", "html", "table")

CSV_COLUMNS = (
    "invoice_number",
    "status",
    "customer_id",
    "period_start",
    "period_end",
    "currency",
    "line_number",
    "line_type",
    "meter_id",
    "dimension",
    "description",
    "quantity",
    "unit",
    "unit_price",
    "amount",
    "amount_minor",
)


def _csv_text(value: Any) -> str:
    """Text for a CSV cell; a leading formula character is neutralised for spreadsheets."""
    s = "" if value is None else str(value)
    if s and s[0] in "=+-@\t\r":
        return "'" + s
    return s


DOCUMENT_TITLES = {"adjustment_invoice": "Adjustment invoice", "credit_note": "Credit note"}


def document_title(invoice: Mapping) -> str:
    """``Invoice``, ``Adjustment invoice`` or ``Credit note`` (an adjustment invoice with a negative total)."""
    return DOCUMENT_TITLES.get(invoice.get("document"), "Invoice")


def total_label(invoice: Mapping) -> str:
    """``Total due``, or ``Total refunded`` on a credit note."""
    return "Total refunded" if invoice.get("document") == "credit_note" else "Total due"


def _render_json(invoice: dict) -> str:
    return durable.canonical_json(invoice).decode("utf-8")


def _render_csv(invoice: dict) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(CSV_COLUMNS)
    head = [invoice["invoice_number"], invoice["status"], invoice["customer_id"], invoice["period_start"], invoice["period_end"], invoice["currency"]]
    for line in invoice["lines"]:
        w.writerow(
            head
            + [
                line["line_number"],
                line["line_type"],
                line["meter_id"] or "",
                _csv_text(line["dimension"]),
                _csv_text(line["description"]),
                line["quantity"],
                _csv_text(line["unit"]),
                line["unit_price"],
                line["amount"],
                line["amount_minor"],
            ]
        )
    if int(invoice.get("credits_used_minor") or 0):
        # a summary row (not a charge): the credit lines above already hold these amounts, negated
        w.writerow(head + ["", "credits_used", "", "", "Prepaid credits used", "", "", "", invoice["credits_used"], invoice["credits_used_minor"]])
    w.writerow(head + ["", "total", "", "", total_label(invoice), "", "", "", invoice["total"], invoice["total_minor"]])
    return buf.getvalue()


def _summary_rows(invoice: Mapping) -> list[tuple[str, str]]:
    """(label, amount) rows summing up to the total due; only the rows that apply (stored invoices
    written before credits existed have none but the total)."""
    rows: list[tuple[str, str]] = []
    if int(invoice.get("adjustments_minor") or 0):
        rows.append(("Adjustments of earlier invoices", invoice["adjustments"]))
    if int(invoice.get("credits_used_minor") or 0):
        rows.append(("Prepaid credits used", "-" + invoice["credits_used"]))
    if int(invoice.get("carried_forward_minor") or 0):
        rows.append(("Credit carried to the next invoice", invoice["carried_forward"]))
    if rows:
        rows.insert(0, ("Charges for the period", invoice["charges"]))
    rows.append((total_label(invoice), invoice["total"]))
    return rows


def _render_table(invoice: dict) -> str:
    cur = invoice["currency"].upper()
    out = [
        f"{document_title(invoice)} {invoice['invoice_number']} ({invoice['status']})",
        f"Customer: {invoice['customer_name']} ({invoice['customer_id']})",
        f"Plan: {invoice.get('plan_name') or invoice['plan_id']} (v{invoice['plan_version']})",
        f"Period: {invoice['period_start']} to {invoice['period_end']} (exclusive, UTC)",
        "",
    ]
    header = ("#", "type", "description", "quantity", "unit", "unit price", f"amount {cur}")
    rows = [
        (str(l["line_number"]), l["line_type"], l["description"], l["quantity"], l["unit"], l["unit_price"], l["amount"])
        for l in invoice["lines"]
    ]
    summary = _summary_rows(invoice)
    rows.extend(("", "", label, "", "", "", value) for label, value in summary[:-1])
    rows.append(("", "", total_label(invoice), "", "", "", invoice["total"]))
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    right = {0, 3, 5, 6}

    def fmt(r: tuple) -> str:
        return "  ".join(c.rjust(widths[i]) if i in right else c.ljust(widths[i]) for i, c in enumerate(r)).rstrip()

    out.append(fmt(header))
    out.append("  ".join("-" * w for w in widths))
    n_sum = len(summary) - 1
    out.extend(fmt(r) for r in rows[: len(rows) - 1 - n_sum])
    out.append("  ".join("-" * w for w in widths))
    out.extend(fmt(r) for r in rows[len(rows) - 1 - n_sum : -1])
    out.append(fmt(rows[-1]))
    for c in invoice.get("credits") or []:
        out.append(f"Prepaid credit {c['grant_id']}: {c['available']} available, {c['used']} used, {c['remaining']} {cur} remaining"
                   + (f" (expires {c['expires_on']}, exclusive)" if c.get("expires_on") else ""))
    out += ["", invoice["dispute_instructions"], ""]
    return "\n".join(out)


_HTML_STYLE = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; color: #1f2328; margin: 2rem auto; max-width: 960px; padding: 0 1rem; }
header { display: flex; justify-content: space-between; align-items: flex-start; border-bottom: 2px solid #1f2328; padding-bottom: 1rem; }
h1 { margin: 0 0 .25rem 0; font-size: 1.6rem; }
h2 { font-size: 1.1rem; margin-top: 2rem; }
.status { display: inline-block; padding: .15rem .6rem; border-radius: 1rem; font-size: .85rem; font-weight: 600; text-transform: uppercase; }
.status-draft { background: #fff8c5; color: #7d4e00; border: 1px solid #d4a72c; }
.status-finalized { background: #dafbe1; color: #116329; border: 1px solid #4ac26b; }
dl { display: grid; grid-template-columns: max-content auto; gap: .2rem 1rem; margin: 0; }
dt { color: #59636e; } dd { margin: 0; }
table { width: 100%; border-collapse: collapse; margin-top: .5rem; font-size: .92rem; }
th, td { text-align: left; padding: .4rem .5rem; border-bottom: 1px solid #d1d9e0; vertical-align: top; }
th { background: #f6f8fa; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
td.formula { color: #59636e; font-size: .85rem; }
tr.total td { font-weight: 700; border-top: 2px solid #1f2328; border-bottom: none; font-size: 1.05rem; }
.dispute { margin-top: 2rem; padding: 1rem; background: #f6f8fa; border-left: 4px solid #59636e; font-size: .88rem; }
.manifest { margin-top: 1rem; color: #59636e; font-size: .75rem; word-break: break-all; }
@media print { body { margin: 0; max-width: none; } .status { border: 1px solid #000; } th { background: none; } }
""".strip()


def _escape(value: Any) -> str:
    """``html.escape(str(value), quote=True)`` ("" for None), without the five replacements when nothing needs them."""
    s = "" if value is None else value if type(value) is str else str(value)
    if "&" in s or "<" in s or ">" in s or '"' in s or "'" in s:
        return html.escape(s, quote=True)
    return s


def _render_html(invoice: dict) -> str:
    e = _escape
    cur = invoice["currency"].upper()
    status = invoice["status"] if invoice["status"] in STATUSES else "draft"
    usage = [l for l in invoice["lines"] if l["line_type"] == "usage"]
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en">',
        "<head>",
        '<meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{e(document_title(invoice))} {e(invoice['invoice_number'])} — {e(invoice['customer_name'])}</title>",
        f"<style>\n{_HTML_STYLE}\n</style>",
        "</head>",
        "<body>",
        "<header>",
        "<div>",
        f"<h1>{e(document_title(invoice))} {e(invoice['invoice_number'])}</h1>",
        f'<span class="status status-{e(status)}">{e(invoice["status"])}</span>',
        "</div>",
        "<dl>",
        f"<dt>Customer</dt><dd>{e(invoice['customer_name'])} ({e(invoice['customer_id'])})</dd>",
        f"<dt>Plan</dt><dd>{e(invoice.get('plan_name') or invoice['plan_id'])} (v{e(invoice['plan_version'])})</dd>",
        f"<dt>Period</dt><dd>{e(invoice['period_start'])} to {e(invoice['period_end'])} (exclusive, UTC)</dd>",
        f"<dt>Currency</dt><dd>{e(cur)}</dd>",
    ]
    if invoice.get("finalized_on"):
        parts.append(f"<dt>Finalized on</dt><dd>{e(invoice['finalized_on'])}</dd>")
    parts += ["</dl>", "</header>"]
    if invoice.get("corrects"):
        parts.append(f"<p>Corrects {e(', '.join(invoice['corrects']))} (finalized; see the adjustment lines for the reason). "
                     "No subscription in this period, so the correction is issued on its own.</p>")
    parts.append("<h2>Usage summary</h2>")
    if usage:
        parts += [
            "<table>",
            '<thead><tr><th>Meter</th><th>Dimension</th><th class="num">Quantity</th><th>Unit</th></tr></thead>',
            "<tbody>",
        ]
        for l in usage:
            parts.append(
                f"<tr><td>{e(l['meter_id'])}</td><td>{e(l['dimension'])}</td>"
                f'<td class="num">{e(l["quantity"])}</td><td>{e(l["unit"])}</td></tr>'
            )
        parts += ["</tbody>", "</table>"]
    else:
        parts.append("<p>No metered usage in this period.</p>")
    parts += [
        "<h2>Charges</h2>",
        "<table>",
        "<thead><tr><th class=\"num\">#</th><th>Description</th><th class=\"num\">Quantity</th><th>Unit</th>"
        f"<th class=\"num\">Unit price ({e(cur)})</th><th>How it is computed</th><th class=\"num\">Amount ({e(cur)})</th></tr></thead>",
        "<tbody>",
    ]
    for l in invoice["lines"]:
        parts.append(
            f'<tr><td class="num">{e(l["line_number"])}</td><td>{e(l["description"])}</td>'
            f'<td class="num">{e(l["quantity"])}</td><td>{e(l["unit"])}</td>'
            f'<td class="num">{e(l["unit_price"])}</td><td class="formula">{e(l.get("formula", ""))}</td>'
            f'<td class="num">{e(l["amount"])}</td></tr>'
        )
    parts += [
        f'<tr class="total"><td></td><td colspan="5">{e(total_label(invoice))}</td><td class="num">{e(cur)} {e(invoice["total"])}</td></tr>',
        "</tbody>",
        "</table>",
        "<h2>Summary</h2>",
        '<table class="summary">',
        "<tbody>",
    ]
    summary = _summary_rows(invoice)
    for label, value in summary[:-1]:
        parts.append(f'<tr><td>{e(label)}</td><td class="num">{e(cur)} {e(value)}</td></tr>')
    parts += [
        f'<tr class="total"><td>{e(total_label(invoice))}</td><td class="num">{e(cur)} {e(invoice["total"])}</td></tr>',
        "</tbody>",
        "</table>",
    ]
    if invoice.get("credits"):
        parts += [
            "<h2>Prepaid credits</h2>",
            "<table>",
            "<thead><tr><th>Grant</th><th>Description</th><th>Expires (exclusive)</th>"
            f'<th class="num">Available ({e(cur)})</th><th class="num">Used ({e(cur)})</th><th class="num">Remaining ({e(cur)})</th></tr></thead>',
            "<tbody>",
        ]
        for c in invoice["credits"]:
            parts.append(
                f"<tr><td>{e(c['grant_id'])}</td><td>{e(c['description'])}</td><td>{e(c['expires_on'] or 'never')}</td>"
                f'<td class="num">{e(c["available"])}</td><td class="num">{e(c["used"])}</td><td class="num">{e(c["remaining"])}</td></tr>'
            )
        parts += ["</tbody>", "</table>"]
    parts += [
        f'<div class="dispute"><strong>Disputes.</strong> {e(invoice["dispute_instructions"])}</div>',
    ]
    manifest = invoice.get("manifest") or {}
    if manifest:
        parts.append(
            f'<div class="manifest">Manifest: code {e(manifest.get("code_version", ""))}; '
            f'{e(len(manifest.get("raw_samples") or {}))} raw sample files, '
            f'{e(len(manifest.get("raw_events") or {}))} raw event files, '
            f'{e(sum(d["reports"] for d in (manifest.get("usage_reports") or {}).values()))} usage reports and '
            f'{e(len(manifest.get("seeds") or {}))} seed files hashed (SHA-256, listed in the JSON invoice).</div>'
        )
    parts += ["</body>", "</html>", ""]
    return "\n".join(parts)


def render_bytes(invoice: dict, fmt: str) -> bytes:
    """The stored bytes of one of an invoice's files (json, csv or html)."""
    if fmt == "json":
        return durable.canonical_json(invoice)
    return render_invoice(invoice, fmt).encode("utf-8")


def render_invoice(invoice: dict, fmt: str = "json") -> str:
    """The invoice as text: ``json`` (canonical, as stored), ``csv`` (one row per line plus a total row),
    ``html`` (a self-contained printable page) or ``table`` (plain text)."""
    if fmt == "json":
        return _render_json(invoice)
    if fmt == "csv":
        return _render_csv(invoice)
    if fmt == "html":
        return _render_html(invoice)
    if fmt == "table":
        return _render_table(invoice)
    raise InvoiceError(f"format {fmt!r} is not one of {', '.join(FORMATS)}")
