"""The invoices of a month, one row each: number, document, status, customer, plan, lines, total."""

from __future__ import annotations

import json
from datetime import date

from billing_dags.core.settings import Paths


def invoice_rows(paths: Paths, month: date) -> list[dict]:
    """One row per customer invoice file of ``month`` (the registry and other files skipped), by file name."""
    from billing_dags.billing.render import document_title

    folder = paths.invoices / f"{month:%Y-%m}"
    rows = []
    for f in sorted(folder.glob("*.json")):
        if f.name == "registry.json":
            continue
        doc = json.loads(f.read_text())
        if "customer_id" not in doc:
            continue
        rows.append(
            {
                "invoice": doc["invoice_number"],
                "document": document_title(doc).lower(),
                "status": doc["status"],
                "customer": doc["customer_id"],
                "plan": doc.get("plan_id", ""),
                "lines": len(doc["lines"]),
                "total": f"{doc['total']} {doc['currency'].upper()}",
            }
        )
    return rows
