"""`billing remote-write serve|compact|status`: registered on the main parser by billing_dags.cli.main."""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from datetime import UTC
from pathlib import Path

from billing_dags.cli.common import CliError
from billing_dags.core.errors import InputError

_LISTEN_RE = re.compile(r"^(?P<host>\[[0-9a-fA-F:]+\]|[A-Za-z0-9.\-]+):(?P<port>\d{1,5})$")


def _size(value: str) -> int:
    m = re.match(r"^(\d+)\s*([kmg]i?b?)?$", value.strip().lower())
    if not m:
        raise argparse.ArgumentTypeError(f"{value!r} is not a size; give bytes or e.g. 16MiB, 512KiB, 1GiB")
    n = int(m.group(1))
    unit = (m.group(2) or "").rstrip("b").rstrip("i")
    return n * {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}[unit]


def _seconds(value: str) -> float:
    try:
        seconds = float(value)
    except ValueError:
        seconds = float("nan")
    if not 0 < seconds < 86_400:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number of seconds between 0 and 86400; give e.g. 60 or 0.5")
    return seconds


def parse_listen(value: str) -> tuple[str, int]:
    m = _LISTEN_RE.match(value or "")
    if not m or not 0 <= int(m.group("port")) < 65536:
        raise CliError(f"--listen {value!r} is not HOST:PORT; give e.g. --listen 127.0.0.1:9201 (port 0: any free port)")
    return m.group("host").strip("[]"), int(m.group("port"))


def read_token(path: str | None) -> str | None:
    if not path:
        return None
    try:
        token = Path(path).read_text().strip()
    except OSError as e:
        raise CliError(f"--token-file {path}: cannot read it ({e.strerror}); give a readable file holding the bearer token") from None
    if not token or any(c.isspace() for c in token):
        raise CliError(f"--token-file {path}: the token must be one non-empty word on one line")
    return token


def _limits(args):
    """The receiver's input limits from the flags; a bad one is a CliError naming the flag."""
    from datetime import date, datetime

    from billing_dags.ingest.remote_write.decode import Limits

    try:
        day = date.fromisoformat(args.min_sample_time)
    except ValueError:
        raise CliError(f"--min-sample-time {args.min_sample_time!r}: give a UTC day as YYYY-MM-DD, e.g. 2000-01-01") from None
    try:
        return Limits(
            min_sample_ms=int(datetime(day.year, day.month, day.day, tzinfo=UTC).timestamp() * 1000),
            max_future_ms=round(args.max_sample_future * 1000),
            max_labels=args.max_labels,
            max_label_name_bytes=args.max_label_name_bytes,
            max_label_value_bytes=args.max_label_value_bytes,
            max_cache_bytes=args.series_cache_bytes,
        )
    except ValueError as e:
        raise CliError(f"{e}; see billing remote-write serve --help") from None


def cmd_serve(args) -> int:
    from billing_dags.core.settings import resolve_paths
    from billing_dags.ingest.remote_write.server import ReceiverConfig, serve

    host, port = parse_listen(args.listen)
    limits = _limits(args)
    paths = resolve_paths(args.data_dir, args.seeds_dir)
    config = ReceiverConfig(
        landing_dir=paths.landing,
        seeds_dir=paths.seeds_dir,
        token=read_token(args.token_file),
        max_body_bytes=args.max_body_bytes,
        max_decoded_bytes=args.max_decoded_bytes,
        max_in_flight=args.max_in_flight,
        max_segment_bytes=args.segment_max_bytes,
        max_segment_age_s=args.segment_max_age,
        min_free_bytes=args.min_free_bytes,
        limits=limits,
        read_timeout_s=args.read_timeout,
        idle_timeout_s=args.idle_timeout,
        max_connections=args.max_connections,
    )
    routes = []
    if not args.no_customer_api:
        from billing_dags.operations.customer_api import CustomerApiConfig, customer_routes
        from billing_dags.stripe.portal import check_return_url

        default_return_url = None
        if args.portal_return_url:
            try:
                default_return_url = check_return_url(args.portal_return_url)
            except InputError as e:
                raise CliError(f"--portal-return-url: {e}") from None
        routes = customer_routes(CustomerApiConfig.from_env(paths, default_return_url=default_return_url))

    def bound(port: int) -> None:
        base = f"http://{f'[{host}]' if ':' in host else host}:{port}"
        print(
            f"remote-write receiver on {base}/api/v1/write, usage reports on {base}/api/usage/report, "
            + ("" if args.no_customer_api else f"customer usage API on {base}/v1/billing/usage, ")
            + f"landing in {paths.landing}",
            file=sys.stderr,
            flush=True,
        )

    serve(config, host, port, extra_routes=routes, bound=bound)
    return 0


def cmd_compact(args) -> int:
    from billing_dags.core.settings import resolve_paths
    from billing_dags.ingest.compaction import compact

    paths = resolve_paths(args.data_dir, args.seeds_dir)
    days = None
    if args.day:
        from datetime import date

        try:
            days = [date.fromisoformat(d).isoformat() for d in args.day]
        except ValueError:
            raise CliError(f"--day {args.day}: give days as YYYY-MM-DD, e.g. --day 2026-10-15") from None
    result = compact(paths, days=days)
    print(json.dumps(result, indent=2, default=str))
    return 0


def cmd_status(args) -> int:
    from billing_dags.core.settings import resolve_paths
    from billing_dags.ingest.compaction import landing_status
    from billing_dags.ingest.usage_reports import ReportStore

    paths = resolve_paths(args.data_dir, args.seeds_dir)
    status = landing_status(paths)
    with ReportStore.open(paths, readonly=True) as store:
        status["usage_reports_waiting"] = store.pending_days()
    print(json.dumps(status, indent=2, default=str))
    return 0


def register(sub) -> None:
    """Add `remote-write` and its subcommands to the `billing` parser."""
    p = sub.add_parser("remote-write", help="receive Prometheus remote write into landing segments; compact them")
    rw = p.add_subparsers(dest="rw_command", required=True, metavar="SUBCOMMAND")

    s = rw.add_parser(
        "serve", help="run the receiver (POST /api/v1/write), the usage-report endpoint (POST /api/usage/report) and the customer API (/v1/billing/...)"
    )
    s.add_argument("--listen", default=os.environ.get("BILLING_REMOTE_WRITE_LISTEN", "127.0.0.1:9201"), help="HOST:PORT (default 127.0.0.1:9201; 0: free port)")
    s.add_argument("--token-file", help="file holding the bearer token Prometheus must send (default: no auth)")
    s.add_argument("--max-body-bytes", type=_size, default=16 << 20, help="largest compressed body (default 16MiB); larger gets 413")
    s.add_argument("--max-decoded-bytes", type=_size, default=64 << 20, help="largest decompressed body (default 64MiB); larger gets 413")
    s.add_argument(
        "--max-in-flight",
        type=int,
        default=64,
        help="requests being decoded and written at once before answering 503 (default 64); bodies being received are bounded by this times --max-body-bytes",
    )
    s.add_argument("--segment-max-bytes", type=_size, default=64 << 20, help="seal a landing segment at this size (default 64MiB)")
    s.add_argument("--segment-max-age", type=float, default=60.0, help="seal a landing segment after this many seconds (default 60)")
    s.add_argument("--read-timeout", type=_seconds, default=60.0, help="seconds a request body may take to arrive (default 60); slower gets 408")
    s.add_argument("--idle-timeout", type=_seconds, default=15.0, help="seconds a connection may go without sending a request head (default 15)")
    s.add_argument(
        "--max-connections", type=int, default=512, help="open connections at most (default 512, lowered to fit the file limit); the longest idle makes room"
    )
    s.add_argument("--min-free-bytes", type=_size, default=64 << 20, help="answer 503 when the landing disk has less free (default 64MiB)")
    s.add_argument("--min-sample-time", default="2000-01-01", help="refuse (400) samples before this UTC day (default 2000-01-01; from 1970-01-01)")
    s.add_argument(
        "--max-sample-future", type=float, default=600.0, help="refuse (400) samples more than this many seconds ahead of the receiver's clock (default 600)"
    )
    s.add_argument("--max-labels", type=int, default=64, help="refuse (400) series with more labels, __name__ included (default 64)")
    s.add_argument("--max-label-name-bytes", type=int, default=1024, help="refuse (400) series with a longer label name (default 1024)")
    s.add_argument("--max-label-value-bytes", type=int, default=2048, help="refuse (400) series with a longer label value or metric name (default 2048)")
    s.add_argument("--series-cache-bytes", type=_size, default=256 << 20, help="memory of the series cache before it starts over (default 256MiB)")
    s.add_argument(
        "--no-customer-api",
        action="store_true",
        help="do not serve the customer API (GET /v1/billing/usage, /v1/billing/usage/current-period, POST /v1/billing/portal)",
    )
    s.add_argument(
        "--portal-return-url",
        default=os.environ.get("BILLING_PORTAL_RETURN_URL"),
        help="where Stripe's billing portal sends customers back when their request names no return_url",
    )
    s.set_defaults(func=cmd_serve)

    c = rw.add_parser("compact", help="move sealed landing segments into the raw day partitions (any day, today included)")
    c.add_argument("--day", action="append", help="only this UTC day (YYYY-MM-DD); repeatable")
    c.set_defaults(func=cmd_compact)

    st = rw.add_parser("status", help="landing segments and usage reports waiting for compaction, by day; quarantined segments")
    st.set_defaults(func=cmd_status)
