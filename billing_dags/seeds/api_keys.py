"""Customers' API keys for the customer usage API: ``seeds/api_keys.csv``, SHA-256 of each key only.

A key is a credential, not a pricing input: the file is validated like every seed (columns, duplicates,
customers) but is not one of the seeds the invoices are computed from (``catalog.SPECS``), so rotating
a key changes no seed snapshot and no invoice manifest. The key itself is never stored: a customer's
client sends ``Authorization: Bearer KEY`` and the server compares ``sha256(KEY)`` with every row.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa

from billing_dags.seeds.catalog import Column, SeedSpec, _parse_seed, _safe_id, _sha256, _text, read_seed
from billing_dags.seeds.errors import SeedError

API_KEYS = SeedSpec(
    "api_keys",
    "api_keys.csv",
    (
        Column("customer_id", pa.string(), _safe_id),
        Column("key_sha256", pa.string(), _sha256),
        Column("description", pa.string(), _text),
    ),
    ("key_sha256",),
)


def demo_api_key(customer_id: str) -> str:
    """The demo's API key of a customer: derived when needed, never stored (seeds/api_keys.csv holds its SHA-256)."""
    return "bk_demo_" + hashlib.sha256(f"billing_dags demo api key/{customer_id}".encode()).hexdigest()[:32]


def key_sha256(key: str) -> str:
    """The hex digest stored for ``key``."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class ApiKeys:
    """SHA-256 of every customer's API keys (a customer may have several: rotation)."""

    hashes: tuple[tuple[str, str], ...]  # (sha256 hex, customer_id)

    def customer_of(self, key: str | None) -> str | None:
        """The customer whose key ``key`` is, or None. Every stored hash is compared in constant time."""
        if not key:
            return None
        digest = key_sha256(key)
        found = None
        for known, customer in self.hashes:
            if hmac.compare_digest(digest, known):
                found = customer
        return found

    def customers(self) -> set[str]:
        return {c for _, c in self.hashes}


def api_keys_file(seeds_dir: Path) -> Path:
    return Path(seeds_dir) / API_KEYS.file


def load_api_keys(seeds_dir: Path) -> ApiKeys:
    """Read and validate seeds/api_keys.csv against seeds/customers.csv; a SeedError names line and fix.

    A missing file is an empty key set (no customer can use the API)."""
    path = api_keys_file(seeds_dir)
    if not path.exists():
        return ApiKeys(())
    table = _parse_seed(path, API_KEYS, path.read_text(encoding="utf-8"))
    customers = set(read_seed(Path(seeds_dir), "customers").column("customer_id").to_pylist())
    rows = table.to_pylist()
    for r in rows:
        if r["customer_id"] not in customers:
            raise SeedError(f"{path}:{r['seed_line']}: customer {r['customer_id']!r} is not in customers.csv; add the customer or remove the key")
    return ApiKeys(tuple((r["key_sha256"], r["customer_id"]) for r in rows))
