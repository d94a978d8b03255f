"""Resources: where the warehouse lives and how Stripe is reached (where usage comes from: defs/ingest/sources.py)."""

import os
from datetime import datetime

import dagster as dg

from billing_dags.core.settings import Paths, check_launched_settings, resolve_paths


class WarehouseResource(dg.ConfigurableResource):
    """The local warehouse (BILLING_DATA_DIR) and the seeds it is priced from (BILLING_SEEDS_DIR).

    ``backfill_parallel``: how many one-partition runs of a backfill execute at once (dagster.yaml's
    run-queue limit on the ``dagster/backfill`` tag, 2); each of them then uses its share of the
    cores instead of all of them (benchmarks/backfill.py measures the difference). A backfill of the
    partitioned assets is one run over the whole range (BackfillPolicy.single_run): it uses every core.
    """

    data_dir: str | None = None
    seeds_dir: str | None = None
    backfill_parallel: int = 2

    def setup_for_execution(self, context: dg.InitResourceContext) -> None:
        # a step executing where BILLING_SHARDS or BILLING_DATA_URL differ from where its run was launched fails here
        if context.dagster_run is not None:
            check_launched_settings(context.dagster_run.tags)

    def paths(self) -> Paths:
        return resolve_paths(self.data_dir, self.seeds_dir)

    def threads_for(self, run_tags: dict) -> int | None:
        """Threads for one partition: its share of the cores in a one-partition backfill run, every core (None) otherwise."""
        if "dagster/backfill" not in run_tags or self.backfill_parallel <= 1 or "dagster/asset_partition_range_start" in run_tags:
            return None
        return max(1, (os.cpu_count() or 1) // self.backfill_parallel)


class StripeResource(dg.ConfigurableResource):
    """Stripe meter events (STRIPE_API_KEY, STRIPE_API_BASE); no key means dry-run. ``api`` (v1 | v2),
    ``concurrency`` and ``rate_limit`` (requests/s) default to STRIPE_METER_API, STRIPE_CONCURRENCY
    and STRIPE_RATE_LIMIT, then to the sender's defaults (docs/stripe.md)."""

    api_key: str | None = None
    api_base: str | None = None
    max_network_retries: int = 3
    api: str | None = None
    concurrency: int | None = None
    rate_limit: float | None = None
    #: judge Stripe's 35-day limit as of this time (ISO 8601 with a UTC offset) instead of now: replays, tests
    as_of: str | None = None

    def now(self) -> datetime:
        from billing_dags.stripe.sender import as_of

        return as_of(self.as_of, "the stripe resource's as_of")

    def sender_options(self) -> dict:
        from billing_dags.stripe.sender import sender_options

        return sender_options(self.api, self.concurrency, self.rate_limit)

    def client(self):
        from billing_dags.stripe.sender import make_client

        return make_client(self.api_key, self.api_base, self.max_network_retries)


def env_var(name: str):
    """An EnvVar when the variable is set (resolved at run time), else None (the default applies)."""
    return dg.EnvVar(name) if os.environ.get(name) else None


def build_resources() -> dict:
    """Called when the code location loads (never at import time); the usage sources are defs/ingest/sources.py's."""
    return {
        "warehouse": WarehouseResource(data_dir=env_var("BILLING_DATA_DIR"), seeds_dir=env_var("BILLING_SEEDS_DIR")),
        "stripe": StripeResource(api_key=env_var("STRIPE_API_KEY"), api_base=env_var("STRIPE_API_BASE")),
    }


@dg.definitions
def defs() -> dg.Definitions:
    """The code location's resources, built when it loads (the environment is read then)."""
    return dg.Definitions(resources=build_resources())
