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
  415 wrong Content-Type or Content-Encoding; 408 a body that did not arrive within
  ``read_timeout_s`` (slow uploads);
- 503 landing disk full (below ``min_free_bytes`` or a failed write), a failure of the landing
  writer on this batch, or more than ``max_in_flight`` requests at once (Prometheus retries 5xx
  with backoff).

``POST /api/usage/report`` takes an instance's usage report (seed 001, JSON; see
billing_dags/ingest/usage_reports.py) with the customer's own bearer token (seeds/report_tokens.csv):

- 201 once the report is committed (fsynced) to the report store, 200 when the same report was
  already accepted (a retry), 409 when its report_id was used for a different report;
- 400 naming the bad field (JSON body ``{"error", "field"}``), 401 without a token of the
  customer the report names, 413 over ``max_report_bytes``, 415 not JSON, 408 a slow body, 503
  when the store cannot commit (disk full, I/O error), over ``max_in_flight`` or no seeds are
  configured. The token is checked (against every customer's) before the body is read.

Both endpoints answer 401 for an unknown token, 413 and 415 without reading the body and close the
connection. Slow or idle clients cannot hold the receiver: see ``guarded_protocol`` (connection cap,
idle limit) and the body read timeout; ``max_in_flight`` counts requests being decoded and written,
and ``BodyBudget`` the bytes of bodies still arriving (503 over it).

Routes handed to ``create_app(config, extra_routes)`` are served beside these (``billing remote-write
serve`` mounts the customer API there: ``billing_dags.operations.customer_api``).

``GET /metrics`` exposes the receiver's counters (requests by code, samples, staleness markers,
non-finite values, unknown-customer samples, samples refused for their timestamp, series-cache
bytes, fsync and decode time); ``GET /-/ready``.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import math
import resource
import sqlite3
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import BaseRoute, Route

from billing_dags.ingest.remote_write import wire
from billing_dags.ingest.remote_write.customers import CustomerResolver
from billing_dags.ingest.remote_write.decode import BadRequest, Decoder, Limits, OutOfWindow, TooLarge
from billing_dags.ingest.remote_write.landing import DiskFull, SegmentWriter, Unindexable, recover_orphans
from billing_dags.ingest.usage_reports import (
    ReportConflict,
    ReportError,
    ReportSchema,
    ReportStore,
    decode_body,
    landing_store_path,
    parse_customer_id,
    parse_report,
)
from billing_dags.seeds.catalog import SeedError

log = logging.getLogger("billing_dags.ingest.remote_write")

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
    #: seconds a request body may take to arrive; slower gets 408 and the connection is closed
    read_timeout_s: float = 60.0
    #: seconds a connection may go without a complete request head (after opening or an answer)
    idle_timeout_s: float = 15.0
    #: open connections at most (lowered to fit the file limit); the longest idle makes room
    max_connections: int = 512


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
        self.closed = Counter(
            p + "connections_closed",
            "Connections closed by the receiver: idle, evicted (over the cap, idle) or refused (over the cap)",
            ["reason"],
            registry=r,
        )
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


@dataclass
class BodyBudget:
    """Bytes of request bodies being received, all connections together, at most ``limit``: bodies still
    arriving are not counted by ``max_in_flight``, so this bounds their memory (slow senders hold little)."""

    limit: int
    held: int = 0


async def _read_body(request: Request, limit: int, timeout_s: float, budget: BodyBudget) -> bytes | tuple[int, str]:
    """The whole body, or (status, message) when it is over ``limit``, slower than ``timeout_s``, over the
    receiver's ``budget`` of bodies being received, or the client went away."""
    chunks, size = [], 0
    try:
        async with asyncio.timeout(timeout_s):
            async for chunk in request.stream():
                size += len(chunk)
                budget.held += len(chunk)
                if size > limit:
                    return 413, f"body is over the limit of {limit} bytes"
                if budget.held > budget.limit:
                    return 503, f"the receiver holds {budget.limit} bytes of bodies being received; retry later"
                chunks.append(chunk)
    except ClientDisconnect:
        return 400, "client disconnected before the body was complete"
    except TimeoutError:
        return 408, f"the body did not arrive within {timeout_s:g} s; send it at once"
    finally:
        budget.held -= size
    return b"".join(chunks)


def _declared_too_large(request: Request, limit: int) -> bool:
    length = request.headers.get("content-length")
    return length is not None and length.isdigit() and int(length) > limit


#: the header of answers given without reading the body: the rest of it is not worth waiting for
CLOSE = {"Connection": "close"}
#: file descriptors kept free of connections (landing segments, the report store, seeds, libraries)
FD_RESERVE = 64
_REFUSED = (
    b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: text/plain\r\nconnection: close\r\ncontent-length: 45\r\n\r\n"
    b"over the connection limit; retry in a moment\n"
)


def connection_cap(max_connections: int) -> int:
    """``max_connections``, lowered to leave FD_RESERVE descriptors of the process's file limit."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or max_connections <= soft - FD_RESERVE:
        return max_connections
    log.warning("file limit %s: at most %s connections instead of %s", soft, max(1, soft - FD_RESERVE), max_connections)
    return max(1, soft - FD_RESERVE)


def guarded_protocol(max_connections: int, idle_timeout_s: float, closed: Counter) -> type:
    """uvicorn's HTTP protocol with a connection cap and an idle limit.

    A connection must complete a request head within ``idle_timeout_s`` of opening or of its
    previous answer, else it is closed: idle connections and slow headers alike (uvicorn alone
    times out only keep-alive connections that send nothing at all). A request whose head is in
    is governed by the body read timeout instead. Over ``max_connections`` the connection idle the
    longest is closed to make room, so idle connections never lock writers out; when every
    connection is inside a request the new one gets 503 and is closed.
    """
    from uvicorn.protocols.http.auto import AutoHTTPProtocol

    class GuardedProtocol(AutoHTTPProtocol):
        _idle_timer: asyncio.TimerHandle | None = None
        _idle_since = 0.0

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm()
            if len(self.connections) > max_connections:
                idle = [c for c in self.connections if c is not self and not c._in_request()]
                if idle:
                    min(idle, key=lambda c: c._idle_since)._close("evicted")
                else:
                    transport.write(_REFUSED)
                    self._close("refused")

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._arm()

        def connection_lost(self, exc) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _in_request(self) -> bool:
            return self.cycle is not None and not self.cycle.response_complete

        def _arm(self) -> None:
            self._disarm()
            self._idle_since = self.loop.time()
            self._idle_timer = self.loop.call_later(idle_timeout_s, self._expire)

        def _disarm(self) -> None:
            if self._idle_timer is not None:
                self._idle_timer.cancel()
                self._idle_timer = None

        def _expire(self) -> None:
            self._idle_timer = None
            if not self._in_request():  # inside a request the body read timeout applies; the answer rearms
                self._close("idle")

        def _close(self, reason: str) -> None:
            self._disarm()
            if not self.transport.is_closing():
                closed.labels(reason).inc()
                self.transport.close()

    return GuardedProtocol


def _text(status: int, message: str, **headers) -> Response:
    return PlainTextResponse(message + "\n", status_code=status, headers=headers or None)


def create_app(config: ReceiverConfig, extra_routes: Sequence[BaseRoute] = ()) -> Starlette:
    """The receiver's app; ``extra_routes`` are mounted beside its endpoints (the CLI adds the customer
    API, ``billing_dags.operations.customer_api``, so this layer never imports billing code)."""
    metrics = _Metrics()
    state: dict = {"in_flight": 0}
    # as much as max_in_flight bodies of the largest size; bodies read then wait on max_in_flight
    bodies = BodyBudget(config.max_in_flight * config.max_body_bytes)
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
                r["segment"],
                r.get("records"),
                r.get("torn_tail_bytes_dropped", 0),
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
                return answer(401, "missing or wrong bearer token", **{"WWW-Authenticate": 'Bearer realm="remote-write"'}, **CLOSE)
        ctype = request.headers.get("content-type", "")
        media, _, params = ctype.partition(";")
        proto = [p.strip() for p in params.split(";") if p.strip().startswith("proto=")]
        if media.strip().lower() != "application/x-protobuf" or (proto and proto[0] != "proto=prometheus.WriteRequest"):
            return answer(415, f"Content-Type {ctype!r} is not supported; send application/x-protobuf (remote write 1.0)", **CLOSE)
        encoding = request.headers.get("content-encoding", "")
        if encoding.strip().lower() != "snappy":
            return answer(415, f"Content-Encoding {encoding!r} is not supported; send snappy (block format)", **CLOSE)
        if _declared_too_large(request, config.max_body_bytes):
            return answer(413, f"body of {request.headers['content-length']} bytes is over the limit of {config.max_body_bytes}", **CLOSE)
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        body = await _read_body(request, config.max_body_bytes, config.read_timeout_s, bodies)
        if isinstance(body, tuple):
            return answer(*body, **CLOSE)
        if state["in_flight"] >= config.max_in_flight:
            return answer(503, f"over the in-flight limit of {config.max_in_flight} requests; retry later")
        writer: SegmentWriter = state["writer"]
        state["in_flight"] += 1
        metrics.in_flight.inc()
        try:
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
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            return report_error(**unauthorized, **challenge, **CLOSE)
        media = request.headers.get("content-type", "").partition(";")[0].strip().lower()
        if media != "application/json":
            return report_error(415, f"Content-Type {media or 'none'!r} is not supported; send application/json", **CLOSE)
        try:
            schema = state["schema"].get()
        except SeedError as e:
            log.error("usage reports refused: %s", e)
            return report_error(503, "usage reports are not configured on this server (seeds missing or invalid); retry later", **CLOSE)
        if not schema.known_token(token):  # before the body is read: strangers cost no reading or parsing
            return report_error(**unauthorized, **challenge, **CLOSE)
        if _declared_too_large(request, config.max_report_bytes):
            return report_error(413, f"body of {request.headers['content-length']} bytes is over the limit of {config.max_report_bytes}", **CLOSE)
        body = await _read_body(request, config.max_report_bytes, config.read_timeout_s, bodies)
        if isinstance(body, tuple):
            return report_error(*body, **CLOSE)
        try:
            doc = decode_body(body)
            customer_id = parse_customer_id(doc)
        except ReportError as e:
            return report_error(400, str(e), e.field)
        if not schema.authorized(customer_id, token):
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
        *extra_routes,
    ]
    app = Starlette(routes=routes, lifespan=lifespan)
    app.state.metrics = metrics
    return app


def serve(
    config: ReceiverConfig,
    host: str,
    port: int,
    log_level: str = "warning",
    extra_routes: Sequence[BaseRoute] = (),
    bound: Callable[[int], None] | None = None,
) -> None:
    """Run the receiver until SIGINT/SIGTERM; the open segment is sealed on the way out.

    The socket is bound here first: ``port`` 0 takes a free port, and ``bound`` is told the port."""
    import socket

    import uvicorn

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = create_app(config, extra_routes)
    # bound, not listening: until uvicorn listens (after the app's startup) connections are refused,
    # as when uvicorn binds itself, rather than left waiting in a backlog
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    port = sock.getsockname()[1]
    if bound is not None:
        bound(port)
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            host=host,
            port=port,
            log_level=log_level,
            access_log=False,  # no request details in logs (DESIGN rule 12)
            timeout_graceful_shutdown=10,
            server_header=False,
            http=guarded_protocol(connection_cap(config.max_connections), config.idle_timeout_s, app.state.metrics.closed),
            timeout_keep_alive=max(1, math.ceil(config.idle_timeout_s)),
        )
    )
    server.run(sockets=[sock])
    if not server.started:
        raise SystemExit(3)  # uvicorn's exit status for a server that did not start
