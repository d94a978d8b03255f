"""Rendering an invoice: canonical JSON (as stored), CSV, a self-contained printable HTML page, its PDF, a plain-text table.

Every renderer is deterministic: the same invoice gives the same bytes. The PDF is the HTML page
(``templates/invoice.html``) laid out by WeasyPrint, so the two never disagree; its bytes also depend
on the fonts installed (fontconfig), not on the time.

The JSON keeps every quantity exact; the page shows quantities rounded to the meter's display decimals
(``seeds/meter_display.csv``), with as many more decimals as it takes for the quantity shown times the
unit price to give the amount shown.
"""

from __future__ import annotations

import calendar
import contextlib
import csv
import functools
import html
import io
import os
from collections.abc import Iterator, Mapping
from datetime import date, timedelta
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path
from typing import Any

import jinja2

from billing_dags.billing.document import GENERATED_LINE_TYPES, STATUSES
from billing_dags.billing.errors import InvoiceError
from billing_dags.billing.tax import TREATMENT_LABELS, rate_text
from billing_dags.core import durable

FORMATS = ("json", "csv", "html", "table")
EN_DASH = "\u2013"
#: the files of a stored invoice, in the order they are written
FILE_FORMATS = ("json", "csv", "html", "pdf")
TEMPLATES = Path(__file__).parent / "templates"

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
            [
                *head,
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
        w.writerow([*head, "", "credits_used", "", "", "Prepaid credits used", "", "", "", invoice["credits_used"], invoice["credits_used_minor"]])
    w.writerow([*head, "", "total", "", "", total_label(invoice), "", "", "", invoice["total"], invoice["total_minor"]])
    return buf.getvalue()


def _summary_rows(invoice: Mapping) -> list[tuple[str, str]]:
    """(label, amount) rows summing up to the total due; only the rows that apply (stored invoices
    written before credits existed have none but the total)."""
    rows: list[tuple[str, str]] = []
    if int(invoice.get("adjustments_minor") or 0):
        rows.append(("Adjustments of earlier invoices", invoice["adjustments"]))
    tax = invoice.get("tax")
    if tax:
        rows.append((tax_summary_label(tax, invoice["currency"]), tax["amount"]))
    if int(invoice.get("credits_used_minor") or 0):
        rows.append(("Prepaid credits used", "-" + invoice["credits_used"]))
    if int(invoice.get("carried_forward_minor") or 0):
        rows.append(("Credit carried to the next invoice", invoice["carried_forward"]))
    if rows:
        rows.insert(0, ("Charges for the period", invoice["charges"]))
        if tax and int(invoice.get("adjustments_minor") or 0):
            rows.insert(2, ("Subtotal", invoice["subtotal"]))
    rows.append((total_label(invoice), invoice["total"]))
    return rows


def tax_summary_label(tax: Mapping, currency: str) -> str:
    """``VAT 19% on 71.61 USD`` or ``VAT 0% (reverse charge) on 180.00 USD``."""
    label = TREATMENT_LABELS.get(tax["treatment"], tax["treatment"])
    return f"{tax['name']} {rate_text(tax['rate_percent'])}" + (f" ({label})" if label else "") + f" on {tax['taxable']} {currency.upper()}"


def _render_table(invoice: dict) -> str:
    cur = invoice["currency"].upper()
    out = [
        f"{document_title(invoice)} {invoice['invoice_number']} ({invoice['status']})",
        f"Customer: {invoice['customer_name']} ({invoice['customer_id']})",
        f"Plan: {invoice.get('plan_name') or invoice['plan_id']} (v{invoice['plan_version']})",
        f"Period: {invoice['period_start']} to {invoice['period_end']} (exclusive, UTC)",
    ]
    if invoice.get("issuer"):
        out.append(f"Issued by: {invoice['issuer']['name']}, VAT ID {invoice['issuer']['tax_id']}")
    if invoice.get("bill_to"):
        bill_to = invoice["bill_to"]
        out.append(f"Bill to: {', '.join([bill_to['name'], *bill_to['address']])}" + (f", tax ID {bill_to['tax_id']}" if bill_to.get("tax_id") else ""))
    if invoice.get("issue_date"):
        out.append(f"Issue date: {invoice['issue_date']}; due {invoice['due_date']} ({invoice['payment_terms']})")
    out.append("")
    header = ("#", "type", "description", "quantity", "unit", "unit price", f"amount {cur}")
    rows = [(str(l["line_number"]), l["line_type"], l["description"], l["quantity"], l["unit"], l["unit_price"], l["amount"]) for l in invoice["lines"]]
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
    if (invoice.get("tax") or {}).get("note"):
        out.append(f"{invoice['tax']['name']}: {invoice['tax']['note']}")
    for c in invoice.get("credits") or []:
        out.append(
            f"Prepaid credit {c['grant_id']}: {c['available']} available, {c['used']} used, {c['remaining']} {cur} remaining"
            + (f" (expires {c['expires_on']}, exclusive)" if c.get("expires_on") else "")
        )
    out += ["", invoice["dispute_instructions"], ""]
    return "\n".join(out)


def _escape(value: Any) -> str:
    """``html.escape(str(value), quote=True)`` ("" for None), without the five replacements when nothing needs them."""
    s = "" if value is None else value if type(value) is str else str(value)
    if "&" in s or "<" in s or ">" in s or '"' in s or "'" in s:
        return html.escape(s, quote=True)
    return s


def period_label(start: str, end: str) -> str:
    """A half-open period [start, end) as people write it, with an en dash: ``1\u201330 November 2026``,
    ``15 October \u2013 14 November 2026``."""
    first, last = date.fromisoformat(start), date.fromisoformat(end) - timedelta(days=1)
    if last < first:
        return first.strftime(f"{first.day} %B %Y")
    if (first.year, first.month) == (last.year, last.month):
        return f"{first.day}{EN_DASH}{last.day} {calendar.month_name[first.month]} {first.year}"
    if first.year == last.year:
        return f"{first.day} {calendar.month_name[first.month]} {EN_DASH} {last.day} {calendar.month_name[last.month]} {last.year}"
    return f"{first.day} {calendar.month_name[first.month]} {first.year} {EN_DASH} {last.day} {calendar.month_name[last.month]} {last.year}"


def long_date(iso: str | None) -> str:
    """``2026-12-04`` as ``4 December 2026``."""
    if not iso:
        return ""
    d = date.fromisoformat(iso)
    return f"{d.day} {calendar.month_name[d.month]} {d.year}"


def group_digits(value: Decimal, decimals: int) -> str:
    """``value`` rounded half-up to ``decimals`` places, with thousands separators: ``82,556``, ``18.99``."""
    q = value.quantize(Decimal(1).scaleb(-decimals), rounding=ROUND_HALF_UP)
    return f"{q:,.{decimals}f}"


def _round(value: Decimal, decimals: int) -> Decimal:
    return value.quantize(Decimal(1).scaleb(-decimals), rounding=ROUND_HALF_UP)


def display_decimals(line: Mapping, exponent: int) -> int:
    """The decimals a usage line's quantities are shown with: the meter's (``display_decimals``, default 2),
    more if needed so that, as shown, used − included = billable and billable × unit price = amount."""
    start = int(line.get("display_decimals", 2))
    used = Decimal(line["quantity"])
    included = Decimal(line.get("included_quantity") or 0)
    billable = Decimal(line.get("billable_quantity") if line.get("billable_quantity") is not None else line["quantity"])
    price = Decimal(line["unit_price"])
    per_unit = "packages" not in line and "tier_formula" not in line
    amount = Decimal(int(line["amount_minor"])).scaleb(-exponent)
    for d in range(start, 10):
        shown = _round(billable, d)
        if _round(used, d) - _round(included, d) != shown:
            continue
        if per_unit and _round(shown * price, exponent) != amount:
            continue
        return d
    return 9


def _usage_row(line: Mapping, exponent: int) -> dict:
    """What the page shows of a usage line: name, unit and the quantities at display precision."""
    d = display_decimals(line, exponent)
    unit = line.get("display_unit") or line["unit"]
    billable = line.get("billable_quantity") if line.get("billable_quantity") is not None else line["quantity"]
    price = line["unit_price"]
    if "packages" in line:
        how = f"{int(line['packages']):,} packages of {int(line['package_size']):,} {unit} × {price} = {line['amount']}"
        price = f"{price} per {int(line['package_size']):,}"
    elif "tier_formula" in line:
        how = f"tiers: {line['tier_formula']} = {line['amount']}"
        price = "tiered"
    else:
        how = ""
    name = line.get("meter_name") or line["meter_id"]
    return {
        "name": f"{name} ({line['dimension']})" if line.get("dimension") else name,
        "unit": unit,
        "used": group_digits(Decimal(line["quantity"]), d),
        "included": group_digits(Decimal(line.get("included_quantity") or 0), d),
        "billable": group_digits(Decimal(billable), d),
        "how": how,
        "price": price,
    }


def _render_html(invoice: dict) -> str:
    """The self-contained printable page (``templates/invoice.html``); every value HTML-escaped."""
    status = invoice["status"] if invoice["status"] in STATUSES else "draft"
    exp = int(invoice["minor_unit_exponent"])
    return _html_template().render(
        inv=invoice,
        title=document_title(invoice),
        total_label=total_label(invoice),
        status_class=status,
        cur=invoice["currency"].upper(),
        period=period_label(invoice["period_start"], invoice["period_end"]),
        issue_date=long_date(invoice.get("issue_date")),
        due_date=long_date(invoice.get("due_date")),
        usage={l["line_number"]: _usage_row(l, exp) for l in invoice["lines"] if l["line_type"] == "usage"},
        summary=_summary_rows(invoice)[:-1],
        tax=invoice.get("tax"),
        generated=GENERATED_LINE_TYPES,
        manifest=invoice.get("manifest") or {},
    )


PDF_SETTING = "BILLING_INVOICE_PDF"


def pdf_wanted(environ: Mapping[str, str] | None = None) -> bool:
    """Whether invoice PDFs are written: ``BILLING_INVOICE_PDF`` ``1`` (the default) or ``0``. A PDF costs about
    0.3 s of CPU to lay out; a stage that only measures or checks figures may turn it off."""
    value = (os.environ if environ is None else environ).get(PDF_SETTING, "1").strip()
    if value not in ("0", "1"):
        raise InvoiceError(f"{PDF_SETTING}={value!r} must be 1 (write invoice PDFs, the default) or 0 (do not)")
    return value == "1"


def _render_pdf(invoice: dict) -> bytes:
    """The HTML page laid out as a PDF by WeasyPrint (same template, same figures)."""
    page = _render_html(invoice)
    laid_out = _LAID_OUT.get(page)
    return laid_out if laid_out is not None else pdf_from_html(page)


#: PDFs laid out ahead (lay_out_ahead), by HTML page: _render_pdf takes them instead of laying them out again
_LAID_OUT: dict[str, bytes] = {}
#: fewer pages than this are laid out in this process (starting the workers costs about a second)
PARALLEL_MIN_PAGES = 8


@contextlib.contextmanager
def lay_out_ahead(invoices: list[dict]) -> Iterator[None]:
    """Lay out the PDFs of ``invoices`` on every core at once (one worker process per core; in this
    process when there are few), for the ``render_bytes(..., "pdf")`` calls of the block to take: the
    same bytes as laying each out here (the same page, the same fonts), in a fraction of the wall time."""
    pages = sorted({_render_html(inv) for inv in invoices} - _LAID_OUT.keys())
    workers = min(os.cpu_count() or 1, len(pages) // (PARALLEL_MIN_PAGES // 2))
    if workers < 2 or len(pages) < PARALLEL_MIN_PAGES:
        yield
        return
    done = _lay_out_in_workers(pages, workers)
    _LAID_OUT.update(done)
    try:
        yield
    finally:
        for page in done:
            _LAID_OUT.pop(page, None)


def _lay_out_in_workers(pages: list[str], workers: int) -> dict[str, bytes]:
    """PDFs of ``pages`` from ``workers`` processes (``python -m billing_dags.billing.render``, pages in
    and PDFs out as pickles over pipes): fresh interpreters, so nothing of this process (threads, locks,
    the main module) is inherited; a page a worker did not return is laid out later, here."""
    import pickle
    import subprocess
    import sys
    from concurrent.futures import ThreadPoolExecutor

    chunks = [pages[i::workers] for i in range(workers)]

    def run(chunk: list[str]) -> dict[str, bytes]:
        cmd = [sys.executable, "-m", "billing_dags.billing.render"]
        done = subprocess.run(cmd, input=pickle.dumps(chunk), capture_output=True, check=False)
        if done.returncode:
            return {}
        return dict(zip(chunk, pickle.loads(done.stdout), strict=True))

    out: dict[str, bytes] = {}
    with ThreadPoolExecutor(workers) as pool:
        for part in pool.map(run, chunks):
            out.update(part)
    return out


@functools.lru_cache(maxsize=8)
def pdf_from_html(page: str) -> bytes:
    """The PDF of an HTML page (the template is self-contained: it refers to no file or URL; every value in it is escaped)."""
    import weasyprint  # imported when a PDF is made: it loads pango

    return weasyprint.HTML(string=page).write_pdf()


@functools.cache
def _html_template() -> jinja2.Template:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATES),
        # every {{ value }} goes through _escape: html.escape's entities (&quot; &#x27;), not markupsafe's (&#34; &#39;)
        autoescape=False,
        finalize=_escape,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )
    return env.get_template("invoice.html")


def render_bytes(invoice: dict, fmt: str) -> bytes:
    """The stored bytes of one of an invoice's files (json, csv, html or pdf)."""
    if fmt == "json":
        return durable.canonical_json(invoice)
    if fmt == "pdf":
        return _render_pdf(invoice)
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


if __name__ == "__main__":  # a worker of _lay_out_in_workers: HTML pages in, their PDFs out (pickles)
    import pickle
    import sys

    sys.stdout.buffer.write(pickle.dumps([pdf_from_html(page) for page in pickle.loads(sys.stdin.buffer.read())]))
