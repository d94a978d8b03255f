"""Where usage comes from: one resource per kind of source, each with one interface its ingest asset calls.

raw_samples writes a day through a ``SampleSource``, usage_events through an ``EventSource``, and
usage_reports lets a ``ReportSource`` deliver the day's reports before it compacts the report store.
Which implementation is bound is configuration, read from the environment when the code location
loads (``usage_sources``): PROMETHEUS_URL pulls samples from Prometheus, BILLING_USAGE_EVENTS_DSN
copies PostgreSQL rows; without PROMETHEUS_URL every source is simulated, deterministic per seed and
day. The assets never ask which source they have.

The simulated sources share one ``SimulationResource`` (seed, scrape interval, how many customers),
bound as the ``simulation`` resource and configured at launch: a run's config
``{"resources": {"simulation": {"config": {"seed": 7}}}}`` reaches all three.
"""

import os
import time
from abc import abstractmethod
from datetime import date

import dagster as dg

from billing_dags.core.settings import Paths
from billing_dags.defs.shared.resources import env_var


class SimulationResource(dg.ConfigurableResource):
    """Settings of the simulated sources: the seed, the scrape interval and the first N customers (default all)."""

    seed: int = 42
    interval_s: int = 60
    customers: int | None = None

    def customers_of(self, paths: Paths):
        from billing_dags.seeds.catalog import read_seed

        return read_seed(paths.seeds_dir, "customers")


# --------------------------------------------------------------------------- raw samples


class SampleSource(dg.ConfigurableResource):
    """Writes the raw samples of one UTC day in the raw layout and returns the day's figures (its metadata)."""

    @abstractmethod
    def write_day(self, context: dg.AssetExecutionContext, paths: Paths, day: date) -> dict: ...


class PrometheusSamples(SampleSource):
    """Exact raw samples from a Prometheus server (PROMETHEUS_URL), for every meter of seeds/meters.csv.

    Mimir/Cortex/Thanos: point ``url`` at the Prometheus-compatible API root (e.g.
    ``https://mimir.example/prometheus``) and set ``tenant`` (sent as X-Scope-OrgID). Secrets come
    from environment variables (EnvVar) so they never show in the UI or in run config.
    """

    url: str | None = None
    timeout_s: float = 60.0
    connect_timeout_s: float = 5.0
    max_retries: int = 4
    backoff_s: float = 0.5
    bearer_token: str | None = None
    username: str | None = None
    password: str | None = None
    tenant: str | None = None
    #: extra HTTP headers: a JSON object or "Name: value; Name2: value"
    headers: str | None = None
    verify_tls: bool = True
    ca_bundle: str | None = None
    #: "exact" (raw samples, the default) or "range" (query_range at step_s)
    mode: str = "exact"
    chunk_s: int = 3600
    customers_per_query: int = 20
    step_s: int = 60
    #: matchers added to every selector, e.g. job="billing" or cluster="prod"
    extra_matchers: str | None = None
    fail_on_warnings: bool = True
    #: how exact mode reads raw samples: "auto" (remote read, /api/v1/read; the query API when the
    #: server refuses it, logged), "remote_read" (only remote read) or "query" (only the query API)
    read_api: str = "auto"
    #: seconds of samples per remote-read request (default a day)
    remote_read_s: int = 86_400
    #: sharded data (BILLING_SHARDS > 1): pull the day shard by shard, each pull selecting its own customers'
    #: series and writing its own shard's files (the step then holds one shard's samples at a time); False:
    #: one pull of the day, split by shard as it is written. Both write the same bytes.
    pull_per_shard: bool = True

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

    def write_day(self, context: dg.AssetExecutionContext, paths: Paths, day: date) -> dict:
        from billing_dags.core.shards import all_shards
        from billing_dags.ingest import prometheus as prom
        from billing_dags.ingest.raw import RawLayoutError
        from billing_dags.seeds.catalog import SeedError

        pulls = all_shards(paths.shards) if paths.shards > 1 and self.pull_per_shard else [None]
        reports = []
        try:
            meters, label_values = prom.meters_and_label_values(paths.seeds_dir)
            with self.client() as client:
                for shard in pulls:
                    reports.append(prom.ingest_day(client, paths, day, meters, label_values, self.options(), log=context.log.info, shard=shard))
        except (prom.PrometheusError, SeedError, RawLayoutError) as e:
            done = f"shards {', '.join(r.shard for r in reports)} before it were written, rerun the day" if reports else "nothing was written for this day"
            where = f" ({pulls[len(reports)]})" if pulls[0] is not None else ""
            raise dg.Failure(description=f"raw_samples {day}{where}: {e}; {done}") from None
        report = reports[0] if len(reports) == 1 else prom.combined_report(reports)
        if report.refused_series:
            context.log.warning(
                f"{report.refused_series} series of {day} were refused (not written, not billed; fix them at the exporter or "
                f"in Prometheus, then rerun the day): " + "; ".join(report.refused_examples)
            )
        if report.unmatched_series:
            context.log.warning(
                f"{report.unmatched_series} series of {day} match no customer in customers.csv (billed to nobody): " + ", ".join(report.unmatched_examples)
            )
        meta = report.metadata()
        meta["bytes_per_sample"] = round(report.bytes / max(report.samples, 1), 2)
        meta["path"] = dg.MetadataValue.path(report.path)
        meta["server"] = prom.redact_url(self.url or "")
        meta["unmatched_examples"] = dg.MetadataValue.json(report.unmatched_examples)
        meta["refused_examples"] = dg.MetadataValue.json(report.refused_examples)
        meta["warnings"] = dg.MetadataValue.json(report.warnings)
        if len(reports) > 1:
            meta["pulls"] = len(reports)
            figures = ("series", "samples", "unmatched_series", "carry_in_series", "requests")
            meta["by_shard"] = dg.MetadataValue.json({r.shard: {**{f: getattr(r, f) for f in figures}, "seconds": round(r.seconds, 3)} for r in reports})
        return meta


class SimulatedSamples(SampleSource):
    """Simulated raw samples of every seeded customer (billing_dags.ingest.simulate)."""

    simulation: SimulationResource

    def write_day(self, context: dg.AssetExecutionContext, paths: Paths, day: date) -> dict:
        from billing_dags.ingest import simulate

        sim = self.simulation
        customers = sim.customers_of(paths)
        t0 = time.perf_counter()
        figures = simulate.write_simulated_day(paths, day, customers, seed=sim.seed, interval_s=sim.interval_s, n_customers=sim.customers)
        return {
            "source": "simulate",
            "series": figures["series"],
            "samples": figures["samples"],
            "bytes": figures["bytes"],
            "bytes_per_sample": round(figures["bytes"] / max(figures["samples"], 1), 2),
            "seconds": round(time.perf_counter() - t0, 3),
            "path": dg.MetadataValue.path(figures["path"]),
        }


# --------------------------------------------------------------------------- LLM usage events


class EventSource(dg.ConfigurableResource):
    """Writes the billable usage events of one UTC day to raw/events and returns the day's figures (its metadata)."""

    @abstractmethod
    def write_day(self, context: dg.AssetExecutionContext, paths: Paths, day: date) -> dict: ...


class PostgresEvents(EventSource):
    """A PostgreSQL ``usage_events`` table (seed 003) to copy LLM usage from (BILLING_USAGE_EVENTS_DSN).

    Table and column names default to seed 003's; ``billable_statuses`` is a comma-separated list
    of statuses that bill.
    """

    dsn: str
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

    def write_day(self, context: dg.AssetExecutionContext, paths: Paths, day: date) -> dict:
        from billing_dags.ingest import postgres_events as pg
        from billing_dags.ingest.events import EventsLayoutError
        from billing_dags.seeds.catalog import SeedError

        cfg = self.source_table()
        t0 = time.perf_counter()
        try:
            figures = pg.ingest_day(self.dsn, paths, day, cfg, batch_rows=self.batch_rows)
        except (pg.PostgresEventsError, EventsLayoutError, SeedError) as e:
            raise dg.Failure(description=f"usage_events {day}: {e}; nothing was written for this day") from None
        return {
            "source": "postgres",
            "table": cfg.table,
            "billable_statuses": ", ".join(cfg.billable_statuses),
            "events": figures["events"],
            "duplicates_dropped": figures["duplicates_dropped"],
            "bytes": figures["bytes"],
            "seconds": round(time.perf_counter() - t0, 3),
            "path": dg.MetadataValue.path(figures["path"]),
        }


class SimulatedEvents(EventSource):
    """Simulated seed-003 rows of the day's usage_events customers, converted exactly as PostgreSQL rows are."""

    simulation: SimulationResource

    def write_day(self, context: dg.AssetExecutionContext, paths: Paths, day: date) -> dict:
        from billing_dags.ingest import postgres_events as pg
        from billing_dags.ingest import simulate
        from billing_dags.ingest.events import EventsLayoutError
        from billing_dags.seeds.catalog import SeedError

        sim = self.simulation
        cfg = pg.UsageEventsTable()
        t0 = time.perf_counter()
        try:
            figures = simulate.write_simulated_usage_events(paths, day, sim.customers_of(paths), seed=sim.seed, n_customers=sim.customers, cfg=cfg)
        except (pg.PostgresEventsError, EventsLayoutError, SeedError, ValueError) as e:
            raise dg.Failure(description=f"usage_events {day} (simulated): {e}; nothing was written for this day") from None
        return {
            "source": "simulate",
            "seed": sim.seed,
            "customers": figures["customers"],
            "rows": figures["rows"],
            "unbilled_rows": figures["unbilled_rows"],
            "billable_statuses": ", ".join(cfg.billable_statuses),
            "events": figures["events"],
            "bytes": figures["bytes"],
            "seconds": round(time.perf_counter() - t0, 3),
            "path": dg.MetadataValue.path(figures["path"]),
        }


class NoEvents(EventSource):
    """No usage_events source (BILLING_USAGE_EVENTS_DSN unset, usage not simulated): nothing is written."""

    def write_day(self, context: dg.AssetExecutionContext, paths: Paths, day: date) -> dict:
        context.log.info(f"{day}: no source configured (BILLING_USAGE_EVENTS_DSN is unset, simulation off): nothing written")
        return {"source": "no source configured", "events": 0}


# --------------------------------------------------------------------------- IoT usage reports


class ReportSource(dg.ConfigurableResource):
    """Delivers the usage reports of one UTC day that do not come through the endpoint into the report
    store, before usage_reports compacts the day; returns what it delivered (the day's metadata)."""

    @abstractmethod
    def deliver_day(self, paths: Paths, day: date) -> dict: ...


class ReceivedReports(ReportSource):
    """Only the reports customers POST to the endpoint (billing remote-write serve): nothing to deliver."""

    def deliver_day(self, paths: Paths, day: date) -> dict:
        return {"source": "report store"}


class SimulatedReports(ReportSource):
    """Simulated reports of the day, accepted through parse_report and ReportStore.accept as the endpoint accepts them."""

    simulation: SimulationResource

    def deliver_day(self, paths: Paths, day: date) -> dict:
        from billing_dags.ingest import simulate
        from billing_dags.ingest import usage_reports as ur
        from billing_dags.seeds.catalog import SeedError

        sim = self.simulation
        try:
            simulated = simulate.accept_simulated_usage_reports(paths, day, sim.customers_of(paths), seed=sim.seed, n_customers=sim.customers)
        except ur.ReportConflict as e:
            raise dg.Failure(
                description=(
                    f"usage_reports {day} (simulated): {e}. The store {ur.store_path(paths)} holds reports "
                    "simulated with another seed (or real ones); accepted reports are never replaced: use a fresh "
                    "BILLING_DATA_DIR for another seed, or delete that file if it holds simulated reports only"
                )
            ) from None
        except (ur.ReportError, SeedError, ValueError) as e:
            raise dg.Failure(description=f"usage_reports {day} (simulated): {e}; nothing was written for this day") from None
        return {
            "source": "simulate",
            "seed": sim.seed,
            "simulated_reports": simulated["reports"],
            "simulated_accepted": simulated["accepted"],
            "simulated_duplicates": simulated["duplicate"],
        }


# --------------------------------------------------------------------------- which sources


def simulated_sources(simulation: SimulationResource) -> dict:
    """Every source simulated with ``simulation``'s settings, by resource key."""
    return {
        "sample_source": SimulatedSamples(simulation=simulation),
        "event_source": SimulatedEvents(simulation=simulation),
        "report_source": SimulatedReports(simulation=simulation),
    }


def prometheus_samples() -> PrometheusSamples:
    """The Prometheus sample source of the environment (PROMETHEUS_*); secrets stay EnvVars, resolved at run time."""
    return PrometheusSamples(
        url=env_var("PROMETHEUS_URL"),
        bearer_token=env_var("PROMETHEUS_BEARER_TOKEN"),
        username=env_var("PROMETHEUS_USERNAME"),
        password=env_var("PROMETHEUS_PASSWORD"),
        tenant=env_var("PROMETHEUS_TENANT"),
        headers=env_var("PROMETHEUS_HEADERS"),
        ca_bundle=env_var("PROMETHEUS_CA_BUNDLE"),
        extra_matchers=env_var("PROMETHEUS_EXTRA_MATCHERS"),
        verify_tls=os.environ.get("PROMETHEUS_TLS_VERIFY", "true").strip().lower() not in ("0", "false", "no", "off"),
        mode=os.environ.get("PROMETHEUS_MODE", "exact").strip() or "exact",
        read_api=os.environ.get("PROMETHEUS_READ_API", "auto").strip() or "auto",
    )


def usage_sources() -> dict:
    """The sources the environment selects, by resource key (read when the code location loads, never at import).

    PROMETHEUS_URL unset: usage is simulated (samples, usage_events rows, usage reports), except
    usage_events when BILLING_USAGE_EVENTS_DSN names a table. PROMETHEUS_URL set: samples from
    Prometheus, usage_events from the DSN or none, usage reports only as customers POST them.
    """
    simulation = SimulationResource.configure_at_launch()
    if os.environ.get("PROMETHEUS_URL"):
        sources = {"sample_source": prometheus_samples(), "event_source": NoEvents(), "report_source": ReceivedReports()}
    else:
        sources = simulated_sources(simulation)
    if os.environ.get("BILLING_USAGE_EVENTS_DSN"):
        sources["event_source"] = PostgresEvents(dsn=dg.EnvVar("BILLING_USAGE_EVENTS_DSN"))
    return {"simulation": simulation, **sources}


@dg.definitions
def defs() -> dg.Definitions:
    """The usage sources as resources, chosen when the code location loads."""
    return dg.Definitions(resources=usage_sources())
