"""Resources: where the warehouse lives, where usage comes from, how Stripe is reached."""

import os
from typing import Optional

import dagster as dg

from billing_dags.settings import Paths, resolve_paths


class WarehouseResource(dg.ConfigurableResource):
    """The local warehouse (BILLING_DATA_DIR) and the seeds it is priced from (BILLING_SEEDS_DIR)."""

    data_dir: Optional[str] = None
    seeds_dir: Optional[str] = None

    def paths(self) -> Paths:
        return resolve_paths(self.data_dir, self.seeds_dir)


class SimulationResource(dg.ConfigurableResource):
    """Simulated usage for the embedded default (no Prometheus): deterministic per seed and day."""

    seed: int = 42
    interval_s: int = 60
    customers: Optional[int] = None


class PrometheusResource(dg.ConfigurableResource):
    """A Prometheus server to pull raw samples from (PROMETHEUS_URL); unset means simulated usage."""

    url: Optional[str] = None
    timeout_s: float = 30.0

    @property
    def enabled(self) -> bool:
        return bool(self.url)


class StripeResource(dg.ConfigurableResource):
    """Stripe meter events (STRIPE_API_KEY, STRIPE_API_BASE); no key means dry-run."""

    api_key: Optional[str] = None
    api_base: Optional[str] = None
    max_network_retries: int = 3

    def client(self):
        from billing_dags.stripe_outbox import make_client

        return make_client(self.api_key, self.api_base, self.max_network_retries)


def _env(name: str):
    """An EnvVar when the variable is set (resolved at run time), else None (the default applies)."""
    return dg.EnvVar(name) if os.environ.get(name) else None


def build_resources() -> dict:
    """Called when the code location loads (never at import time)."""
    return {
        "warehouse": WarehouseResource(data_dir=_env("BILLING_DATA_DIR"), seeds_dir=_env("BILLING_SEEDS_DIR")),
        "simulation": SimulationResource(),
        "prometheus": PrometheusResource(url=_env("PROMETHEUS_URL")),
        "stripe": StripeResource(api_key=_env("STRIPE_API_KEY"), api_base=_env("STRIPE_API_BASE")),
    }
