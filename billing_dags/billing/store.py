"""The invoice files: ``<invoices>/YYYY-MM/<customer_id>.json|.csv|.html`` (and ``.pdf`` once finalized) and the pending adjustments.

Files are published only through ``core.durable`` (atomic, the files of a month made durable
together) and are deterministic: no wall-clock time inside, so rerunning unchanged inputs
reproduces every file byte for byte, and a file whose bytes would not change is left alone.

A finalized invoice already on disk is never rewritten: a recomputation whose charges differ is
recorded as ``YYYY-MM/pending_adjustments/<customer_id>.json`` for an adjustment line on a later
invoice (``billing.settlement``).
"""

from __future__ import annotations

import json
import os
import re
from datetime import date
from pathlib import Path

from billing_dags.billing import credits as _credits
from billing_dags.billing.document import SCHEMA_VERSION, STATUSES, carried_adjustments, charge_lines, charges_minor, figures, safe_customer_id
from billing_dags.billing.errors import InvoiceError
from billing_dags.billing.render import FILE_FORMATS, lay_out_ahead, pdf_wanted, render_bytes
from billing_dags.core import durable
from billing_dags.core.money import format_minor
from billing_dags.core.settings import Paths

PENDING_DIR = "pending_adjustments"


def invoice_dir(paths: Paths, month: date | str) -> Path:
    key = month if isinstance(month, str) else f"{month:%Y-%m}"
    if not re.fullmatch(r"\d{4}-\d{2}", key):
        raise InvoiceError(f"month {month!r} must look like YYYY-MM")
    return paths.invoices / key


def invoice_files(paths: Paths, month: date | str, customer_id: str) -> dict[str, Path]:
    """Where a customer's invoice of a month lives: {"json": ..., "csv": ..., "html": ..., "pdf": ...}."""
    d = invoice_dir(paths, month)
    cid = safe_customer_id(customer_id, "invoice_files")
    return {fmt: d / f"{cid}.{fmt}" for fmt in FILE_FORMATS}


def read_invoice(paths: Paths, month: date | str, customer_id: str) -> dict | None:
    """A stored invoice (JSON), or None if there is none."""
    return read_stored(invoice_files(paths, month, customer_id)["json"])


def read_stored(path: Path) -> dict | None:
    """A stored invoice JSON, None when there is none; read for an update (``durable.read_for_update``)."""
    try:
        data = durable.read_for_update(path)
        if data is None:
            return None
    except OSError as e:
        raise InvoiceError(f"{path}: stored invoice is unreadable ({e}); restore it from backup (a finalized invoice is never regenerated)") from None
    try:
        return json.loads(data.decode("utf-8"))
    except ValueError as e:
        raise InvoiceError(f"{path}: stored invoice is unreadable ({e}); restore it from backup (a finalized invoice is never regenerated)") from None


def _carried_elsewhere(paths: Paths, cid: str, source_month: str) -> int:
    """What finalized invoices of ``cid`` already carried as adjustments of ``source_month``'s recomputation."""
    return carried_adjustments(_credits.stored_invoices(paths.invoices, cid), source_month).get(("recompute", source_month), 0)


def _same_bytes(path: Path, data: bytes) -> bool:
    """Whether ``path`` holds exactly ``data`` (the size first: a file of another size is not read)."""
    try:
        if os.stat(path).st_size != len(data):
            return False
        with open(path, "rb") as f:
            return f.read() == data
    except FileNotFoundError:
        return False


def write_if_changed(path: Path, data: bytes, written: list[str], unchanged: list[str], write) -> None:
    if _same_bytes(path, data):
        unchanged.append(str(path))
        return
    write(path, data)
    written.append(str(path))


def pdf_stored(inv: dict) -> bool:
    """Whether an invoice has a PDF file: a finalized one (the document sent to the customer, laid out once
    when it is finalized and never again), while PDFs are on (``BILLING_INVOICE_PDF``). A draft has none: it
    changes until the grace period ends and nobody receives it; ``billing invoice --format pdf`` lays out
    a preview on demand."""
    return inv.get("status") == "finalized" and pdf_wanted()


def write_files(files: dict[str, Path], inv: dict, written: list[str], unchanged: list[str], write, remove=durable.remove) -> None:
    """Write an invoice's files whose bytes would change. The PDF (a finalized invoice's only) is laid out from
    the HTML page: while the page is unchanged and its PDF is there, the PDF is left alone without being laid
    out again. A draft's PDF left by an earlier version is removed (it would show figures the draft no
    longer has)."""
    html_unchanged = False
    for fmt in FILE_FORMATS:
        if fmt == "pdf" and not pdf_stored(inv):
            # a draft has none; with PDFs off, a PDF of the page before would disagree with the invoice
            if (inv.get("status") != "finalized" or not html_unchanged) and files[fmt].exists():
                remove(files[fmt])
            continue
        if fmt == "pdf" and html_unchanged and files[fmt].exists():
            unchanged.append(str(files[fmt]))
            continue
        before = len(unchanged)
        write_if_changed(files[fmt], render_bytes(inv, fmt), written, unchanged, write)
        if fmt == "html":
            html_unchanged = len(unchanged) > before


def write_invoice_files(paths: Paths, invoices: list[dict]) -> dict:
    """Write each invoice as ``<invoices>/YYYY-MM/<customer_id>.json|.csv|.html`` and, once finalized, ``.pdf``
    (atomic, deterministic).

    A finalized invoice already on disk is never rewritten (rule 8): if the recomputed figures
    differ, the customer is listed in ``changed_after_finalization`` and the new figures go to
    ``YYYY-MM/pending_adjustments/<customer_id>.json``; a missing CSV/HTML/PDF of it is re-rendered from
    the stored JSON. Files whose bytes would not change are left alone. Returns figures: counts by
    status and totals by currency of the invoices as they now stand on disk, and the paths written.
    """
    written: list[str] = []
    unchanged: list[str] = []
    changed_after: list[str] = []
    pending: list[str] = []
    by_status: dict[str, int] = dict.fromkeys(STATUSES, 0)
    totals_minor: dict[str, int] = {}
    exponents: dict[str, int] = {}
    # the files of a month are made durable together (see durable.Batch), before the next month is read
    batch = durable.Batch()
    batch_month = None
    try:
        with lay_out_ahead(_pdfs_to_lay_out(paths, invoices)):
            for inv in sorted(invoices, key=lambda i: (i["period_start"], i["customer_id"])):
                if inv["period_start"][:7] != batch_month:
                    batch.commit()
                    batch_month = inv["period_start"][:7]
                _write_invoice(paths, inv, batch, written, unchanged, changed_after, pending, by_status, totals_minor, exponents)
        batch.commit()
    except BaseException:
        batch.abort()
        raise
    finally:
        batch.close()
    return {
        "invoices": len(invoices),
        "by_status": by_status,
        "totals_by_currency": {c: format_minor(totals_minor[c], exponents[c]) for c in sorted(totals_minor)},
        "totals_minor_by_currency": dict(sorted(totals_minor.items())),
        "written": written,
        "unchanged": unchanged,
        "changed_after_finalization": changed_after,
        "pending_adjustments": pending,
    }


def _pdfs_to_lay_out(paths: Paths, invoices: list[dict]) -> list[dict]:
    """The invoices whose PDF write_invoice_files will lay out (laid out ahead, on every core): finalized
    ones that are new or changed, and finalized ones on disk that lack their PDF (from the stored JSON)."""
    if not pdf_wanted():
        return []
    out = []
    for inv in invoices:
        files = invoice_files(paths, inv["period_start"][:7], inv["customer_id"])
        stored = read_stored(files["json"])
        if stored is not None and stored.get("status") == "finalized":
            if not files["pdf"].exists():
                out.append(stored)
        elif inv.get("status") == "finalized" and (not files["pdf"].exists() or not _same_bytes(files["html"], render_bytes(inv, "html"))):
            out.append(inv)
    return out


def _write_invoice(
    paths: Paths,
    inv: dict,
    batch: durable.Batch,
    written: list[str],
    unchanged: list[str],
    changed_after: list[str],
    pending: list[str],
    by_status: dict[str, int],
    totals_minor: dict[str, int],
    exponents: dict[str, int],
) -> None:
    """One invoice of write_invoice_files: its files go into ``batch``; the figures are added up."""
    month_key = inv["period_start"][:7]
    cid = safe_customer_id(inv["customer_id"], f"invoice {inv.get('invoice_number')!r}")
    folder = invoice_dir(paths, month_key)
    files = {fmt: folder / f"{cid}.{fmt}" for fmt in FILE_FORMATS}  # invoice_files
    pending_path = folder / PENDING_DIR / f"{cid}.json"
    stored = read_stored(files["json"])
    if stored is not None and stored.get("status") == "finalized":
        effective = stored
        differs = figures(stored) != figures(inv)
        if differs or (pending_path.exists() and _carried_elsewhere(paths, cid, month_key)):
            # a recomputation that later returns to the finalized figures keeps its file while some of it
            # was already carried, so that the reversal is carried too
            if differs:
                changed_after.append(cid)
            fin_charges, rec_charges = charges_minor(stored), charges_minor(inv)
            adjustment = {
                "schema_version": SCHEMA_VERSION,
                "status": "pending",
                "customer_id": cid,
                "period_start": stored["period_start"],
                "period_end": stored["period_end"],
                "currency": stored["currency"],
                "minor_unit_exponent": stored["minor_unit_exponent"],
                "finalized_invoice_number": stored["invoice_number"],
                "finalized_total_minor": int(stored["total_minor"]),
                "recomputed_total_minor": int(inv["total_minor"]),
                # charges: the period's own lines, before adjustments and credits; the delta is what an
                # adjustment line on the customer's next invoice carries (less what was already carried)
                "finalized_charges_minor": fin_charges,
                "recomputed_charges_minor": rec_charges,
                "delta_minor": rec_charges - fin_charges,
                "delta": format_minor(rec_charges - fin_charges, int(stored["minor_unit_exponent"])),
                "recomputed_lines": charge_lines(inv),
                "recomputed_manifest": inv.get("manifest"),
            }
            write_if_changed(pending_path, durable.canonical_json(adjustment), written, unchanged, batch.write)
            pending.append(str(pending_path))
        elif pending_path.exists():
            # usage went back to what was finalized: nothing left to adjust
            batch.remove(pending_path)
        for fmt in FILE_FORMATS[1:]:
            if not files[fmt].exists() and (fmt != "pdf" or pdf_stored(stored)):
                batch.write(files[fmt], render_bytes(stored, fmt))
                written.append(str(files[fmt]))
    else:
        effective = inv
        write_files(files, inv, written, unchanged, batch.write, batch.remove)
    by_status[effective["status"]] = by_status.get(effective["status"], 0) + 1
    cur = effective["currency"]
    totals_minor[cur] = totals_minor.get(cur, 0) + int(effective["total_minor"])
    exponents[cur] = int(effective["minor_unit_exponent"])


def invoice_pdf(paths: Paths, month: date | str, customer_id: str) -> tuple[Path | None, bytes]:
    """A stored invoice's PDF and where it is. A finalized invoice's: the stored file, else laid out from the
    stored JSON (the same page, the same bytes an invoice run writes) and published beside it; a PDF on disk
    is never rewritten. A draft's: a preview laid out now and not stored (None for the path: a draft has no
    PDF file, ``write_files`` removes one)."""
    files = invoice_files(paths, month, customer_id)
    doc = read_stored(files["json"])
    if doc is None:
        raise InvoiceError(f"no invoice for {customer_id} in {month if isinstance(month, str) else f'{month:%Y-%m}'} under {files['json'].parent}")
    if doc.get("status") != "finalized":
        return None, render_bytes(doc, "pdf")
    try:
        return files["pdf"], files["pdf"].read_bytes()
    except FileNotFoundError:
        pass
    data = render_bytes(doc, "pdf")
    # published only while the JSON it was laid out from is still the stored one and no PDF has appeared
    if read_stored(files["json"]) == doc and not files["pdf"].exists():
        durable.write_bytes(files["pdf"], data)
    return files["pdf"], data


def read_pending(path: Path) -> dict:
    """A pending adjustment file."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise InvoiceError(f"{path}: pending adjustment is unreadable ({e}); restore it from backup") from None


def withdraw(paths: Paths, month: date, customer_id: str) -> list[str]:
    """Remove a draft's files; returns the paths removed."""
    removed = []
    for path in invoice_files(paths, month, customer_id).values():
        if durable.remove(path):
            removed.append(str(path))
    return removed
