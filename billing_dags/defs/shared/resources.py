"""Resources: where the warehouse lives, where usage comes from, how Stripe is reached."""

import os
from typing import Optional

import dagster as dg

from billing_dags.core.settings import Paths, resolve_paths


class WarehouseResource(dg.ConfigurableResource):
    """The local warehouse (BILLING_DATA_DIR) and the seeds it is priced from (BILLING_SEEDS_DIR).

    ``backfill_parallel``: how many one-partition runs of a backfill execute at once (dagster.yaml's
    run-queue limit on the ``dagster/backfill`` tag, 2); each of them then uses its share of the
    cores instead of all of them (benchmarks/backfill.py measures the difference). A backfill of the
    partitioned assets is one run over the whole range (BackfillPolicy.single_run): it uses every core.
    """

    data_dir: Optional[str] = None
    seeds_dir: Optional[str] = None
    backfill_parallel: int = 2

    def paths(self) -> Paths:
        return resolve_paths(self.data_dir, self.seeds_dir)

    def threads_for(self, run_tags: dict) -> Optional[int]:
        """Threads for one partition: its share of the cores in a one-partition backfill run, every core (None) otherwise."""
        if "dagster/backfill" not in run_tags or self.backfill_parallel <= 1 or "dagster/asset_partition_range_start" in run_tags:
            return None
        return max(1, (os.cpu_count() or 1) // self.backfill_parallel)


class SimulationResource(dg.ConfigurableResource):
    """Simulated usage for the embedded default (no Prometheus): deterministic per seed and day.

    ``enabled`` decides for the event sources (usage_events rows, usage reports): None (auto)
    simulates when PROMETHEUS_URL is unset, the rule raw_samples follows; True or False force it.
    """

    seed: int = 42
    interval_s: int = 60
    customers: Optional[int] = None
    enabled: Optional[bool] = None

    def applies(self, prometheus: "PrometheusResource") -> bool:
        """Whether usage is simulated: forced by ``enabled``, else when no Prometheus server is configured."""
        return self.enabled if self.enabled is not None else not prometheus.enabled


class PrometheusResource(dg.ConfigurableResource):
    """A Prometheus server to pull raw samples from (PROMETHEUS_URL); unset means simulated usage.

    Mimir/Cortex/Thanos: point ``url`` at the Prometheus-compatible API root (e.g.
    ``https://mimir.example/prometheus``) and set ``tenant`` (sent as X-Scope-OrgID). Secrets come
    from environment variables (EnvVar) so they never show in the UI or in run config.
    """

    url: Optional[str] = None
    timeout_s: float = 60.0
    connect_timeout_s: float = 5.0
    max_retries: int = 4
    backoff_s: float = 0.5
    bearer_token: Optional[str] = None
    username: Optional[str] = None
    password: Optional[str] = None
    tenant: Optional[str] = None
    #: extra HTTP headers: a JSON object or "Name: value; Name2: value"
    headers: Optional[str] = None
    verify_tls: bool = True
    ca_bundle: Optional[str] = None
    #: "exact" (raw samples, the default) or "range" (query_range at step_s)
    mode: str = "exact"
    chunk_s: int = 3600
    customers_per_query: int = 20
    step_s: int = 60
    #: matchers added to every selector, e.g. job="billing" or cluster="prod"
    extra_matchers: Optional[str] = None
    fail_on_warnings: bool = True
    #: how exact mode reads raw samples: "auto" (remote read, /api/v1/read; the query API when the
    #: server refuses it, logged), "remote_read" (only remote read) or "query" (only the query API)
    read_api: str = "auto"
    #: seconds of samples per remote-read request (default a day)
    remote_read_s: int = 86_400

    @property
    def enabled(self) -> bool:
        return bool(self.url)

    def client(self):
        from billing_dags.ingest.prometheus import PrometheusClient, parse_headers

        return PrometheusClient(
            self.url or "",
            timeout_s=self.timeout_s,
            connect_timeout_s=self.connect_timeout_s,
            max_retries=self.max_retries,
            backoff_s=self.backoff_s,
            bearer_token=self.bearer_token or None,
            username=self.username or None,
            password=self.password or None,
            tenant=self.tenant or None,
            headers=parse_headers(self.headers),
            verify_tls=(self.ca_bundle or True) if self.verify_tls else False,
            fail_on_warnings=self.fail_on_warnings,
            read_api=self.read_api,
        )

    def options(self):
        from billing_dags.ingest.prometheus import IngestOptions

        return IngestOptions(
            mode=self.mode,
            chunk_s=self.chunk_s,
            customers_per_query=self.customers_per_query,
            step_s=self.step_s,
            extra_matchers=self.extra_matchers or "",
            remote_read_s=self.remote_read_s,
        )


class UsageEventsResource(dg.ConfigurableResource):
    """A PostgreSQL ``usage_events`` table (seed 003) to copy LLM usage from (BILLING_USAGE_EVENTS_DSN).

    Unset ``dsn`` means no source: the usage_events asset simulates rows when simulation applies
    (SimulationResource), else writes nothing. Table and column names
    default to seed 003's; ``billable_statuses`` is a comma-separated list of statuses that bill.
    """

    dsn: Optional[str] = None
    table: str = "usage_events"
    id_column: str = "id"
    created_at_column: str = "created_at"
    api_key_hash_column: str = "api_key_hash"
    model_column: str = "model"
    provider_column: str = "provider"
    status_column: str = "status"
    tokens_input_column: str = "tokens_input"
    tokens_output_column: str = "tokens_output"
    billable_statuses: str = "success,completed"
    batch_rows: int = 10_000

    @property
    def enabled(self) -> bool:
        return bool(self.dsn)

    def source_table(self):
        from billing_dags.ingest.postgres_events import UsageEventsTable

        return UsageEventsTable(
            table=self.table,
            id=self.id_column,
            created_at=self.created_at_column,
            api_key_hash=self.api_key_hash_column,
            model=self.model_column,
            provider=self.provider_column,
            status=self.status_column,
            tokens_input=self.tokens_input_column,
            tokens_output=self.tokens_output_column,
            billable_statuses=tuple(s.strip() for s in self.billable_statuses.split(",") if s.strip()),
        )


class StripeResource(dg.ConfigurableResource):
    """Stripe meter events (STRIPE_API_KEY, STRIPE_API_BASE); no key means dry-run."""

    api_key: Optional[str] = None
    api_base: Optional[str] = None
    max_network_retries: int = 3

    def client(self):
        from billing_dags.stripe.outbox import make_client

        return make_client(self.api_key, self.api_base, self.max_network_retries)


def _env(name: str):
    """An EnvVar when the variable is set (resolved at run time), else None (the default applies)."""
    return dg.EnvVar(name) if os.environ.get(name) else None


def build_resources() -> dict:
    """Called when the code location loads (never at import time)."""
    return {
        "warehouse": WarehouseResource(data_dir=_env("BILLING_DATA_DIR"), seeds_dir=_env("BILLING_SEEDS_DIR")),
        "simulation": SimulationResource(),
        "prometheus": PrometheusResource(
            url=_env("PROMETHEUS_URL"),
            bearer_token=_env("PROMETHEUS_BEARER_TOKEN"),
            username=_env("PROMETHEUS_USERNAME"),
            password=_env("PROMETHEUS_PASSWORD"),
            tenant=_env("PROMETHEUS_TENANT"),
            headers=_env("PROMETHEUS_HEADERS"),
            ca_bundle=_env("PROMETHEUS_CA_BUNDLE"),
            extra_matchers=_env("PROMETHEUS_EXTRA_MATCHERS"),
            # read when the code location loads, never at import time
            verify_tls=os.environ.get("PROMETHEUS_TLS_VERIFY", "true").strip().lower() not in ("0", "false", "no", "off"),
            mode=os.environ.get("PROMETHEUS_MODE", "exact").strip() or "exact",
            read_api=os.environ.get("PROMETHEUS_READ_API", "auto").strip() or "auto",
        ),
        "usage_events": UsageEventsResource(dsn=_env("BILLING_USAGE_EVENTS_DSN")),
        "stripe": StripeResource(api_key=_env("STRIPE_API_KEY"), api_base=_env("STRIPE_API_BASE")),
    }
