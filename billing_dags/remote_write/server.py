"""The remote-write receiver: a Starlette app served by uvicorn.

``POST /api/v1/write`` answers:

- 204 once the batch is appended to a landing segment and fsynced (or carries no samples, e.g.
  a metadata-only request);
- 400 undecodable body, bad snappy block, a series without a metric name or with unsorted or
  duplicate labels, a metric or label name that is not a Prometheus name (control characters
  included), a series whose id another label set already has, a sample outside the accepted time
  window, more labels or longer label names or values than the limits (``Limits``; Prometheus
  drops the batch and does not retry);
- 401 without the configured bearer token; 413 body (or its decoded size) over the limit;
  415 wrong Content-Type or Content-Encoding;
- 503 landing disk full (below ``min_free_bytes`` or a failed write), a failure of the landing
  writer on this batch, or more than ``max_in_flight`` requests at once (Prometheus retries 5xx
  with backoff).

``POST /api/usage/report`` takes an instance's usage report (seed 001, JSON; see
billing_dags/usage_reports.py) with the customer's own bearer token (seeds/report_tokens.csv):

- 201 once the report is committed (fsynced) to the report store, 200 when the same report was
  already accepted (a retry), 409 when its report_id was used for a different report;
- 400 naming the bad field (JSON body ``{"error", "field"}``), 401 without a token of the
  customer the report names, 413 over ``max_report_bytes``, 415 not JSON, 503 when the store
  cannot commit (disk full, I/O error), over ``max_in_flight`` or no seeds are configured.

``GET /metrics`` exposes the receiver's counters (requests by code, samples, staleness markers,
non-finite values, unknown-customer samples, samples refused for their timestamp, series-cache
bytes, fsync and decode time); ``GET /-/ready``.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import sqlite3
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from billing_dags.seeds import SeedError
from billing_dags.usage_reports import (
    ReportConflict,
    ReportError,
    ReportSchema,
    ReportStore,
    decode_body,
    landing_store_path,
    parse_customer_id,
    parse_report,
)

from . import wire
from .customers import CustomerResolver
from .decode import BadRequest, Decoder, Limits, OutOfWindow, TooLarge
from .landing import DiskFull, SegmentWriter, Unindexable, recover_orphans

log = logging.getLogger("billing_dags.remote_write")

WRITE_PATH = "/api/v1/write"
REPORT_PATH = "/api/usage/report"


@dataclass
class ReceiverConfig:
    landing_dir: Path
    seeds_dir: Path | None = None
    token: str | None = None
    max_body_bytes: int = 16 << 20  # compressed
    max_decoded_bytes: int = 64 << 20
    max_in_flight: int = 64
    max_segment_bytes: int = 64 << 20
    max_segment_age_s: float = 60.0
    min_free_bytes: int = 64 << 20
    decode_threads: int = 2
    max_report_bytes: int = 64 << 10
    #: the usage-report store; default landing_dir/reports/reports.sqlite
    reports_db: Path | None = None
    #: sample time window, label count and sizes, series-cache bytes
    limits: Limits = field(default_factory=Limits)


class _Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        p = "billing_remote_write_"
        self.requests = Counter(p + "requests", "Remote-write requests by HTTP status", ["code"], registry=r)
        self.samples = Counter(p + "samples", "Samples made durable (acknowledged with 204)", registry=r)
        self.stale = Counter(p + "stale_samples", "Staleness markers received (kept in raw, not usage)", registry=r)
        self.nonfinite = Counter(p + "nonfinite_samples", "NaN/Inf samples that are not staleness markers", registry=r)
        self.unknown = Counter(p + "unknown_customer_samples", "Samples of metered series naming no known customer", registry=r)
        self.out_of_window = Counter(
            p + "out_of_window_samples", "Samples refused (their request answered 400) for a timestamp outside the accepted window", registry=r
        )
        self.cache_bytes = Gauge(p + "series_cache_bytes", "Bytes held by the series cache (bounded by --series-cache-bytes)", registry=r)
        self.metadata = Counter(p + "metadata", "Metric metadata entries received (not stored)", registry=r)
        self.exemplars = Counter(p + "exemplars", "Exemplars received (not stored)", registry=r)
        self.histograms = Counter(p + "histograms", "Native histogram samples received (not stored)", registry=r)
        self.bytes = Counter(p + "body_bytes", "Compressed request bytes received", registry=r)
        self.decode_cpu = Counter(p + "decode_cpu_seconds", "CPU seconds spent decoding (snappy + protobuf + columns)", registry=r)
        self.in_flight = Gauge(p + "in_flight_requests", "Requests being processed", registry=r)
        self.fsyncs = Gauge(p + "fsyncs", "fsync calls on landing segments (one per commit group)", registry=r)
        self.fsync_seconds = Gauge(p + "fsync_seconds", "Seconds spent in fsync of landing segments", registry=r)
        self.report_requests = Counter("billing_usage_report_requests", "Usage-report requests by HTTP status", ["code"], registry=r)
        self.reports = Counter("billing_usage_reports", "Usage reports committed to the report store", registry=r)
        self.report_duplicates = Counter("billing_usage_report_duplicates", "Usage reports received again (idempotent retries)", registry=r)
        self.latency = Histogram(
            p + "request_duration_seconds",
            "Time from request start to the answer of accepted requests",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
            registry=r,
        )


class _SchemaCache:
    """The usage-report schema from the seeds, reloaded when one of its seed files changes."""

    def __init__(self, seeds_dir: Path | None):
        self.seeds_dir = seeds_dir
        self._stamp: tuple | None = None
        self._schema: ReportSchema | None = None

    def get(self) -> ReportSchema:
        if self.seeds_dir is None:
            raise SeedError("the receiver was started without a seeds folder (--seeds-dir / BILLING_SEEDS_DIR)")
        files = ReportSchema.seed_files(self.seeds_dir)
        stamp = tuple(f.stat().st_mtime_ns if f.exists() else None for f in files)
        if stamp != self._stamp or self._schema is None:
            self._schema = ReportSchema.from_seeds(self.seeds_dir)
            self._stamp = stamp
        return self._schema


async def _read_body(request: Request, limit: int) -> bytes | tuple[int, str]:
    """The whole body, or (status, message) when it is over ``limit`` or the client went away."""
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                return 413, f"body is over the limit of {limit} bytes"
            chunks.append(chunk)
    except ClientDisconnect:
        return 400, "client disconnected before the body was complete"
    return b"".join(chunks)


def _text(status: int, message: str, **headers) -> Response:
    return PlainTextResponse(message + "\n", status_code=status, headers=headers or None)


def create_app(config: ReceiverConfig) -> Starlette:
    metrics = _Metrics()
    state: dict = {"in_flight": 0}
    expected_auth = f"Bearer {config.token}".encode() if config.token else None

    @asynccontextmanager
    async def lifespan(app):
        resolver = CustomerResolver.from_seeds(config.seeds_dir)
        recovered = recover_orphans(config.landing_dir, resolver)
        for r in recovered:
            if r.get("quarantined"):  # already logged as an error by landing; status lists it
                continue
            log.warning(
                "recovered landing segment %s left by a stopped receiver: %s records, %s torn tail bytes dropped",
                r["segment"], r.get("records"), r.get("torn_tail_bytes_dropped", 0),
            )
        state["decoder"] = Decoder(resolver, config.max_decoded_bytes, limits=config.limits)
        wire.parse(b"")  # load the compiled reader now rather than in the first request
        state["writer"] = SegmentWriter(
            config.landing_dir,
            max_segment_bytes=config.max_segment_bytes,
            max_segment_age_s=config.max_segment_age_s,
            min_free_bytes=config.min_free_bytes,
        )
        state["pool"] = ThreadPoolExecutor(config.decode_threads, thread_name_prefix="rw-decode")
        state["reports"] = ReportStore(config.reports_db or landing_store_path(config.landing_dir))
        state["report_pool"] = ThreadPoolExecutor(1, thread_name_prefix="report-commit")
        state["schema"] = _SchemaCache(config.seeds_dir)
        app.state.receiver = state
        try:
            yield
        finally:
            state["writer"].close()
            state["pool"].shutdown(wait=True)
            state["report_pool"].shutdown(wait=True)
            state["reports"].close()

    def answer(code: int, message: str = "", **headers) -> Response:
        metrics.requests.labels(str(code)).inc()
        if code == 204:
            return Response(status_code=204)
        return _text(code, message, **headers)

    async def write(request: Request) -> Response:
        if expected_auth is not None:
            got = request.headers.get("authorization", "").encode()
            if not hmac.compare_digest(got, expected_auth):
                return answer(401, "missing or wrong bearer token", **{"WWW-Authenticate": 'Bearer realm="remote-write"'})
        ctype = request.headers.get("content-type", "")
        media, _, params = ctype.partition(";")
        proto = [p.strip() for p in params.split(";") if p.strip().startswith("proto=")]
        if media.strip().lower() != "application/x-protobuf" or (proto and proto[0] != "proto=prometheus.WriteRequest"):
            return answer(415, f"Content-Type {ctype!r} is not supported; send application/x-protobuf (remote write 1.0)")
        encoding = request.headers.get("content-encoding", "")
        if encoding.strip().lower() != "snappy":
            return answer(415, f"Content-Encoding {encoding!r} is not supported; send snappy (block format)")
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > config.max_body_bytes:
            return answer(413, f"body of {length} bytes is over the limit of {config.max_body_bytes}")
        if state["in_flight"] >= config.max_in_flight:
            return answer(503, f"over the in-flight limit of {config.max_in_flight} requests; retry later")
        writer: SegmentWriter = state["writer"]
        state["in_flight"] += 1
        metrics.in_flight.inc()
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        try:
            body = await _read_body(request, config.max_body_bytes)
            if isinstance(body, tuple):
                return answer(*body)
            metrics.bytes.inc(len(body))
            if writer.disk_full():
                return answer(503, "landing disk is full; retry later")
            try:
                batch = await loop.run_in_executor(state["pool"], state["decoder"].decode, body)
            except TooLarge as e:
                return answer(413, str(e))
            except OutOfWindow as e:
                metrics.out_of_window.inc(e.samples)
                return answer(400, str(e))
            except BadRequest as e:
                return answer(400, str(e))
            metrics.decode_cpu.inc(batch.decode_cpu_s)
            metrics.metadata.inc(batch.metadata)
            metrics.exemplars.inc(batch.exemplars)
            metrics.histograms.inc(batch.histograms)
            if batch.samples:
                try:
                    await asyncio.wrap_future(writer.submit(batch))
                except DiskFull as e:
                    log.error("landing write failed, answering 503: %s", e)
                    return answer(503, "landing write failed (disk full or I/O error); retry later")
                except (Unindexable, BadRequest) as e:  # outside the landing's window (a safety net), or an id the segment holds with another label set
                    return answer(400, str(e))
                metrics.samples.inc(batch.samples)
                metrics.stale.inc(batch.stale)
                metrics.nonfinite.inc(batch.nonfinite)
                metrics.unknown.inc(batch.unknown_customer)
            metrics.latency.observe(loop.time() - t0)
            return answer(204)
        finally:
            state["in_flight"] -= 1
            metrics.in_flight.dec()

    def report_answer(code: int, body: dict, **headers) -> Response:
        metrics.report_requests.labels(str(code)).inc()
        return JSONResponse(body, status_code=code, headers=headers or None)

    def report_error(code: int, message: str, field: str | None = None, **headers) -> Response:
        body = {"error": message}
        if field is not None:
            body["field"] = field
        return report_answer(code, body, **headers)

    async def usage_report(request: Request) -> Response:
        unauthorized = dict(code=401, message="send Authorization: Bearer <the customer's report token>")
        challenge = {"WWW-Authenticate": 'Bearer realm="usage-report"'}
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return report_error(**unauthorized, **challenge)
        media = request.headers.get("content-type", "").partition(";")[0].strip().lower()
        if media != "application/json":
            return report_error(415, f"Content-Type {media or 'none'!r} is not supported; send application/json")
        body = await _read_body(request, config.max_report_bytes)
        if isinstance(body, tuple):
            return report_error(*body)
        try:
            schema = state["schema"].get()
        except SeedError as e:
            log.error("usage reports refused: %s", e)
            return report_error(503, "usage reports are not configured on this server (seeds missing or invalid); retry later")
        try:
            doc = decode_body(body)
            customer_id = parse_customer_id(doc)
        except ReportError as e:
            return report_error(400, str(e), e.field)
        if not schema.authorized(customer_id, token.strip()):
            return report_error(**unauthorized, **challenge)
        try:
            report = parse_report(doc, schema)
        except ReportError as e:
            return report_error(400, str(e), e.field)
        if state["writer"].disk_full():
            return report_error(503, "landing disk is full; retry later")
        if state["in_flight"] >= config.max_in_flight:
            return report_error(503, f"over the in-flight limit of {config.max_in_flight} requests; retry later")
        state["in_flight"] += 1
        loop = asyncio.get_running_loop()
        try:
            status = await loop.run_in_executor(state["report_pool"], state["reports"].accept, report)
        except ReportConflict as e:
            return report_error(409, str(e), "report_id")
        except (sqlite3.Error, OSError) as e:
            log.error("usage report store failed, answering 503: %s", e)
            return report_error(503, "report store write failed (disk full or I/O error); retry later")
        finally:
            state["in_flight"] -= 1
        if status == "duplicate":
            metrics.report_duplicates.inc()
        else:
            metrics.reports.inc()
        body = {"report_id": report.report_id, "customer_id": report.customer_id, "status": status, "day": report.day.isoformat()}
        return report_answer(200 if status == "duplicate" else 201, body)

    async def method_not_allowed(request: Request) -> Response:
        return answer(405, "use POST", Allow="POST")

    async def metrics_endpoint(request: Request) -> Response:
        writer = state.get("writer")
        if writer is not None:
            metrics.fsyncs.set(writer.fsyncs)
            metrics.fsync_seconds.set(writer.fsync_seconds)
            metrics.cache_bytes.set(state["decoder"].cache_bytes)
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def ready(request: Request) -> Response:
        return PlainTextResponse("ready\n")

    routes = [
        Route(WRITE_PATH, write, methods=["POST"]),
        Route(WRITE_PATH, method_not_allowed, methods=["GET", "PUT", "DELETE", "PATCH"]),
        Route(REPORT_PATH, usage_report, methods=["POST"]),
        Route("/metrics", metrics_endpoint, methods=["GET"]),
        Route("/-/ready", ready, methods=["GET"]),
        Route("/-/healthy", ready, methods=["GET"]),
    ]
    return Starlette(routes=routes, lifespan=lifespan)


def serve(config: ReceiverConfig, host: str, port: int, log_level: str = "warning") -> None:
    """Run the receiver until SIGINT/SIGTERM; the open segment is sealed on the way out."""
    import uvicorn

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    uvicorn.run(
        create_app(config),
        host=host,
        port=port,
        log_level=log_level,
        access_log=False,  # no request details in logs (DESIGN rule 12)
        timeout_graceful_shutdown=10,
        server_header=False,
    )
