"""Invoice numbers: a gap-free series per year (``INV-YYYY-000001``), kept in ``<invoices>/registry.json``.

A finalized invoice keeps its number forever: it is assigned at first finalization, in
customer_id order, and reused by every later run. The registry is read, extended and written
atomically under an exclusive file lock, so concurrent runs never hand out a number twice.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from datetime import date
from pathlib import Path

from billing_dags.billing.document import SCHEMA_VERSION, safe_customer_id
from billing_dags.billing.errors import InvoiceError
from billing_dags.billing.periods import checked_month
from billing_dags.core import durable
from billing_dags.core.settings import Paths

REGISTRY_FILE = "registry.json"
REGISTRY_LOCK = ".registry.lock"


def registry_path(paths: Paths) -> Path:
    return paths.invoices / REGISTRY_FILE


def read_registry(paths: Paths) -> dict:
    """The invoice-number registry: ``{"schema_version": 1, "numbers": {"YYYY-MM/<customer_id>": "INV-YYYY-000001"}}``."""
    path = registry_path(paths)
    try:
        data = durable.read_for_update(path)
        if data is None:
            return {"schema_version": SCHEMA_VERSION, "numbers": {}}
        reg = json.loads(data.decode("utf-8"))
    except (OSError, ValueError) as e:
        raise InvoiceError(f"{path}: invoice-number registry is unreadable ({e}); restore it from backup, never recreate it by hand") from None
    if not isinstance(reg, dict) or not isinstance(reg.get("numbers"), dict):
        raise InvoiceError(f"{path}: invoice-number registry has no 'numbers' object; restore it from backup")
    return reg


def assign_invoice_numbers(paths: Paths, month: date, customer_ids: Iterable[str]) -> dict[str, str]:
    """Numbers for the finalized invoices of ``month``: reused from the registry, else the next of the
    period's year, assigned in customer_id order. Read-modify-write under an exclusive file lock;
    the registry is written atomically. Returns ``{customer_id: "INV-YYYY-NNNNNN"}``."""
    month = checked_month(month)
    ids = sorted({safe_customer_id(c, "assign_invoice_numbers") for c in customer_ids})
    paths.invoices.mkdir(parents=True, exist_ok=True)
    prefix = f"INV-{month.year:04d}-"
    with durable.exclusive_lock(paths.invoices / REGISTRY_LOCK):
        reg = read_registry(paths)
        numbers: dict[str, str] = reg["numbers"]
        used = sorted(int(n[len(prefix) :]) for n in numbers.values() if n.startswith(prefix))
        if used != list(range(1, len(used) + 1)):
            raise InvoiceError(
                f"{registry_path(paths)}: numbers {prefix}* are not a gap-free sequence from 1; "
                "restore the registry from backup before finalizing more invoices"
            )
        nxt = len(used) + 1
        out: dict[str, str] = {}
        changed = False
        for cid in ids:
            key = f"{month:%Y-%m}/{cid}"
            if key not in numbers:
                numbers[key] = f"{prefix}{nxt:06d}"
                nxt += 1
                changed = True
            out[cid] = numbers[key]
        if changed:
            reg["schema_version"] = SCHEMA_VERSION
            durable.write_bytes(registry_path(paths), durable.canonical_json(reg))
    return out
