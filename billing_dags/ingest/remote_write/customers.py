"""Which customer a series belongs to, for the receiver's unknown-customer report.

Billing itself resolves customers at model time (a corrected mapping re-bills without
re-ingesting); the receiver only counts samples of metered series whose customer label does
not name a customer in the seeds, so that an operator sees them the day they arrive.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

#: outcome of resolving a series
KNOWN, UNKNOWN, UNMETERED = "known", "unknown", "unmetered"


@dataclass
class CustomerResolver:
    """metric -> customer label names (from meters.csv); label value -> customer id (customers.csv)."""

    labels_by_metric: dict[str, tuple[str, ...]] = field(default_factory=dict)
    customer_by_label_value: dict[str, str] = field(default_factory=dict)
    enabled: bool = False

    @classmethod
    def from_seeds(cls, seeds_dir: Path | None) -> CustomerResolver:
        if seeds_dir is None:
            return cls()
        from billing_dags.seeds.catalog import SeedError, load_seeds

        try:
            seeds = load_seeds(Path(seeds_dir))
        except SeedError as e:
            log.warning("unknown-customer report disabled: %s", e)
            return cls()
        by_metric: dict[str, list[str]] = {}
        for m in seeds["meters"].to_pylist():
            for metric in m["metrics"].split():
                by_metric.setdefault(metric, [])
                if m["customer_label"] not in by_metric[metric]:
                    by_metric[metric].append(m["customer_label"])
        customers = {c["label_value"]: c["customer_id"] for c in seeds["customers"].to_pylist()}
        return cls({k: tuple(v) for k, v in by_metric.items()}, customers, True)

    def resolve(self, metric: str, labels: dict[str, str]) -> tuple[str, str | None]:
        """(KNOWN | UNKNOWN | UNMETERED, the customer label value seen or None)."""
        names = self.labels_by_metric.get(metric)
        if not self.enabled or names is None:
            return UNMETERED, None
        for name in names:
            value = labels.get(name)
            if value is not None and value in self.customer_by_label_value:
                return KNOWN, value
        seen = next((labels[n] for n in names if n in labels), None)
        return UNKNOWN, seen if seen is not None else f"<no {'/'.join(names)} label>"
