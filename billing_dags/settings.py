"""Where things live. Resolved when called (never at import time) from the environment."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
SQL_MODELS_DIR = PROJECT_ROOT / "sql_models"

#: lookback for a series' previous sample (DESIGN rule 3) and the Stripe send horizon (rule 9)
EDGE_LOOKBACK_DAYS = 35
#: gauge samples hold until the next sample, at most this long (Prometheus staleness, rule 5)
STALENESS_MS = 5 * 60 * 1000
#: days after a period's end before its invoice may be finalized (rule 8)
DEFAULT_GRACE_DAYS = 3
#: days raw samples, landing segments and usage reports are kept (rule 13)
DEFAULT_RETENTION_DAYS = 90


@dataclass(frozen=True)
class Paths:
    """The on-disk layout under BILLING_DATA_DIR (see DESIGN.md, "Raw layout")."""

    data_dir: Path
    seeds_dir: Path

    @property
    def raw_samples(self) -> Path:
        return self.data_dir / "raw" / "samples"

    @property
    def raw_series(self) -> Path:
        return self.data_dir / "raw" / "series"

    @property
    def raw_carry_in(self) -> Path:
        return self.data_dir / "raw" / "carry_in"

    @property
    def landing(self) -> Path:
        return self.data_dir / "landing"

    @property
    def models(self) -> Path:
        return self.data_dir / "models"

    @property
    def invoices(self) -> Path:
        return self.data_dir / "invoices"

    @property
    def outbox(self) -> Path:
        return self.data_dir / "outbox"

    @property
    def warehouse_db(self) -> Path:
        return self.data_dir / "warehouse.duckdb"


def resolve_paths(data_dir: str | os.PathLike | None = None, seeds_dir: str | os.PathLike | None = None) -> Paths:
    """Paths from explicit arguments, else BILLING_DATA_DIR / BILLING_SEEDS_DIR, else ./data and ./seeds."""
    data = data_dir or os.environ.get("BILLING_DATA_DIR") or "data"
    seeds = seeds_dir or os.environ.get("BILLING_SEEDS_DIR")
    if not seeds:
        seeds = "seeds" if Path("seeds/meters.csv").exists() else PROJECT_ROOT / "seeds"
    return Paths(Path(data).expanduser().resolve(), Path(seeds).expanduser().resolve())
