"""Pulling raw samples from Prometheus (or Mimir, Cortex, Thanos) into the raw layout.

No Dagster here: the ``raw_samples`` asset calls :func:`ingest_day`, tests and the benchmark call
the same functions.

Exact mode (the default, DESIGN rules 1-3). The raw samples of a day are read with instant
queries of a range selector, ``{__name__="m", label=~"batch"}[<chunk>ms]`` evaluated at the
chunk's end minus 1 ms. Prometheus 2.x includes both ends of a range, 3.x excludes the start;
evaluating at ``end - 1 ms`` over ``end - start`` ms returns ``[start - 1 ms, end - 1 ms]`` (2.x)
or ``[start, end - 1 ms]`` (3.x), i.e. every sample of ``[start, end)`` on both. Samples
outside ``[start, end)`` are dropped and identical (series, timestamp, value) rows kept once, so a sample
at exactly midnight belongs to the next day, never to both. Requests are split by time
(``chunk_s``, default 1 h) and by series (``customers_per_query`` customers of a meter's
customer label per request, plus one request for the series whose label matches no customer), so
no response is huge.

Remote read (``read_api``: "auto", the resource's default, "remote_read" or "query", the
client's default). Exact mode reads the same samples over ``POST /api/v1/read`` (snappy-compressed
protobuf), one request per selector and ``remote_read_s`` (a day): the stored XOR chunks when the
server streams them (STREAMED_XOR_CHUNKS, remote_write/xor.py), else plain samples (SAMPLES). The
rows are the query API's: ``[start, end)`` (remote read includes the end), no stale markers (range
selectors skip them), every other NaN as ``float('nan')``; the Parquet files are byte-identical.
``auto`` falls back to the query API for the rest of the client's life, logged, when the first
remote read is refused (REMOTE_READ_REFUSED, or a body that is not a remote-read response), when
``extra_matchers`` are not plain label matchers, or when the server has external labels (which
remote read adds to every series); ``remote_read`` raises PrometheusError instead.

Range mode (``mode="range"``): ``/api/v1/query_range`` at ``step_s``, split so that no request
asks for more than 11,000 points per series. For backends without raw access (downsampled
Thanos) or expression meters; a counter billed from range mode misses what happens between steps.

Customer label values come from seeds and are escaped (:func:`promql_string`,
:func:`regex_quote`) before they go into PromQL. Series whose customer label matches no seeded
customer are still written (a corrected customer mapping re-bills without re-ingesting; the
models bill them to nobody) and are counted and reported.

Carry-in (rule 3). The usage of day D needs each series' last sample before D. Every exact-mode
ingest of D records it in D's own partition (``raw/carry_in/date=D/part-prometheus.parquet``, looked
back ``edge_lookback_days``; :func:`fetch_carry_in`), so D never needs an earlier day's partition and
an ingest writes nothing outside its own day: days are pulled in any order and in parallel, and the
result does not depend on which days are already on disk. They are genuine Prometheus samples; the
usage model takes the latest of the carry-in and the earlier days' edges, so nothing is counted
twice. Range mode records no carry-in: its days rely on the earlier days' edges.

Refused series (rule 12): a series whose metric or label names are not Prometheus names
(control characters included), or whose id another label set already holds (earlier in the same
pull, or in data/raw/series), is skipped — never merged into the other — and reported
(``refused_series``, ``refused_examples``, and a warning of the asset); the rest of the day is written.

Errors (rule 11): an unreachable server (after bounded retries with backoff on connection
errors, 5xx and 429), bad PromQL, any other HTTP 4xx, Prometheus warnings (partial responses of
Thanos/Mimir come as warnings) and malformed responses raise :class:`PrometheusError`, whose
message names the meter, the query and the server. Nothing is written for a day that failed.
"""

from __future__ import annotations

import gc
import json
import re
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import date, timedelta
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.compute as pc

from billing_dags.core import durable
from billing_dags.core.errors import InputError
from billing_dags.core.settings import EDGE_LOOKBACK_DAYS, Paths
from billing_dags.core.shards import Shard, series_shard, shard_of
from billing_dags.ingest import raw

SOURCE = "prometheus"
#: Prometheus refuses a query_range with more points per series than this
MAX_POINTS_PER_SERIES = 11_000
_QUERY_IN_MESSAGE = 400


class PrometheusError(RuntimeError):
    """A request to Prometheus that failed; the message names the meter, the query and the server."""


class _Refused(Exception):
    """The server refused a remote read in a way that means it does not serve it (auto falls back)."""


#: exact mode's ways of reading raw samples (PrometheusClient read_api)
READ_APIS = ("auto", "remote_read", "query")
#: statuses meaning "no remote read here": not found, method not allowed, not acceptable,
#: unsupported media type, not implemented
REMOTE_READ_REFUSED = (404, 405, 406, 415, 501)
#: Prometheus staleness marker: a NaN with this exact bit pattern
STALE_NAN_BITS = 0x7FF0000000000002
#: label sets of remote-read series kept decoded per client (cleared when full)
_LABELS_CACHE_MAX = 200_000


# --------------------------------------------------------------------------- PromQL text


def promql_string(value: str) -> str:
    """``value`` as a double-quoted PromQL string literal (Go escape rules).

    Backslash and double quote are escaped, control characters (newline included) and the Unicode
    line separators become ``\\uXXXX`` escapes; every other character, non-ASCII included, is kept
    as is (PromQL strings are UTF-8). The literal always decodes back to exactly ``value``.
    """
    if not isinstance(value, str):
        raise TypeError(f"label value must be a str, not {type(value).__name__}")
    out = ['"']
    for ch in value:
        o = ord(ch)
        if ch == "\\":
            out.append("\\\\")
        elif ch == '"':
            out.append('\\"')
        elif ch == "\n":
            out.append("\\n")
        elif o < 0x20 or o == 0x7F or o in (0x2028, 0x2029):
            out.append(f"\\u{o:04x}")
        elif 0xD800 <= o <= 0xDFFF:
            raise ValueError(f"label value {value!r} contains a lone surrogate (not valid UTF-8)")
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


_RE2_META = set("\\.+*?()|[]{}^$")


def regex_quote(value: str) -> str:
    """A RE2 pattern matching exactly ``value`` (like Go's regexp.QuoteMeta)."""
    return "".join("\\" + ch if ch in _RE2_META else ch for ch in value)


_METRIC_RE = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*$")
_LABEL_RE = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")


@dataclass(frozen=True)
class Selector:
    """The series of one meter metric: those of a batch of customer label values, or (``values``
    None) those whose label matches none of ``others`` (the unmatched ones). ``rest``: the batch
    is of label values no customer has (``("",)``: the series without the label), found by a pull
    per shard (:func:`shard_rest_selectors`); its series are unmatched too."""

    meter_id: str
    metric: str
    customer_label: str
    values: tuple[str, ...] | None
    others: tuple[str, ...] = ()
    extra_matchers: str = ""
    rest: bool = False

    def promql(self) -> str:
        if not _METRIC_RE.match(self.metric):
            raise ValueError(f"meter {self.meter_id}: {self.metric!r} is not a Prometheus metric name")
        if not _LABEL_RE.match(self.customer_label):
            raise ValueError(f"meter {self.meter_id}: {self.customer_label!r} is not a Prometheus label name")
        # {__name__="..."} rather than a bare name: a metric called `sum` or `offset` still parses
        parts = [f"__name__={promql_string(self.metric)}"]
        if self.values is not None:
            if len(self.values) == 1:
                parts.append(f"{self.customer_label}={promql_string(self.values[0])}")
            else:
                parts.append(f"{self.customer_label}=~{promql_string('|'.join(regex_quote(v) for v in self.values))}")
        elif self.others:
            parts.append(f"{self.customer_label}!~{promql_string('|'.join(regex_quote(v) for v in self.others))}")
        if self.extra_matchers.strip():
            parts.append(self.extra_matchers.strip())
        return "{" + ", ".join(parts) + "}"

    def matchers(self) -> list[tuple[int, str, str]]:
        """The same selection as :meth:`promql`, as remote-read label matchers (type, name, value);
        ValueError when ``extra_matchers`` is not a list of ``name op "value"`` matchers."""
        self.promql()  # the same name checks
        out = [(EQ, "__name__", self.metric)]
        if self.values is not None:
            if len(self.values) == 1:
                out.append((EQ, self.customer_label, self.values[0]))
            else:
                out.append((RE, self.customer_label, "|".join(regex_quote(v) for v in self.values)))
        elif self.others:
            out.append((NRE, self.customer_label, "|".join(regex_quote(v) for v in self.others)))
        return out + parse_matchers(self.extra_matchers)

    @property
    def unmatched(self) -> bool:
        return self.values is None or self.rest


#: remote-read LabelMatcher types
EQ, NEQ, RE, NRE = 0, 1, 2, 3
_OPS = {"=": EQ, "!=": NEQ, "=~": RE, "!~": NRE}
_MATCHER_RE = re.compile(
    r"""\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*(=~|!~|!=|=)\s*("(?:[^"\\\n]|\\.)*"|'(?:[^'\\\n]|\\.)*'|`[^`]*`)\s*(,|$)""",
    re.DOTALL,
)
_ESCAPES = {"a": "\a", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t", "v": "\v", "\\": "\\", "'": "'", '"': '"'}


def _go_unquote(literal: str) -> str:
    """A PromQL string literal's value (Go strconv.Unquote rules); ValueError when it is not one."""
    if literal[0] == "`":
        return literal[1:-1]
    body, quote = literal[1:-1], literal[0]
    out = bytearray()
    i = 0
    while i < len(body):
        ch = body[i]
        if ch != "\\":
            out += ch.encode()
            i += 1
            continue
        e = body[i + 1]
        if e in _ESCAPES and not (e == "'" and quote == '"') and not (e == '"' and quote == "'"):
            out += _ESCAPES[e].encode()
            i += 2
        elif e == "x" and re.fullmatch(r"[0-9a-fA-F]{2}", body[i + 2 : i + 4]):
            out.append(int(body[i + 2 : i + 4], 16))
            i += 4
        elif e in "01234567" and re.fullmatch(r"[0-7]{3}", body[i + 1 : i + 4]) and int(body[i + 1 : i + 4], 8) < 256:
            out.append(int(body[i + 1 : i + 4], 8))
            i += 4
        elif e in "uU":
            n = 4 if e == "u" else 8
            digits = body[i + 2 : i + 2 + n]
            if not re.fullmatch(rf"[0-9a-fA-F]{{{n}}}", digits) or int(digits, 16) > 0x10FFFF or 0xD800 <= int(digits, 16) <= 0xDFFF:
                raise ValueError(f"bad escape \\{e}{digits} in {literal}")
            out += chr(int(digits, 16)).encode()
            i += 2 + n
        else:
            raise ValueError(f"bad escape \\{e} in {literal}")
    return out.decode()  # UnicodeDecodeError is a ValueError


def parse_matchers(text: str) -> list[tuple[int, str, str]]:
    """``job="billing", cluster=~"prod|eu"`` (PromQL label matchers, as in ``extra_matchers``) as
    remote-read matchers (type, name, value); ValueError naming the part it does not understand."""
    out: list[tuple[int, str, str]] = []
    text = (text or "").strip()
    pos = 0
    while pos < len(text):
        m = _MATCHER_RE.match(text, pos)
        if not m:
            raise ValueError(f'cannot read label matchers from {text[pos : pos + 60]!r} (expected name op "value", ...)')
        out.append((_OPS[m.group(2)], m.group(1), _go_unquote(m.group(3))))
        pos = m.end()
        if m.group(4) == ",":
            while pos < len(text) and text[pos].isspace():
                pos += 1
    return out


def plan_selectors(meters: Sequence[dict], label_values: Sequence[str], customers_per_query: int, extra_matchers: str = "") -> list[Selector]:
    """One selector per meter metric and batch of customer label values, plus one for the rest."""
    if customers_per_query < 1:
        raise ValueError("customers_per_query must be at least 1")
    values = tuple(sorted(set(label_values)))
    out: list[Selector] = []
    seen: set[tuple[str, str]] = set()
    for m in meters:
        for metric in m["metrics"].split():
            if (metric, m["customer_label"]) in seen:
                continue  # the same series, already pulled for another meter
            seen.add((metric, m["customer_label"]))
            for i in range(0, len(values), customers_per_query):
                out.append(Selector(m["meter_id"], metric, m["customer_label"], values[i : i + customers_per_query], (), extra_matchers))
            out.append(Selector(m["meter_id"], metric, m["customer_label"], None, values, extra_matchers))
    return out


def plan_shard_selectors(
    meters: Sequence[dict], label_values: Sequence[str], customers_per_query: int, shard: Shard, extra_matchers: str = ""
) -> tuple[list[Selector], list[Selector]]:
    """A pull of one shard: per meter metric (with the customer label of the first meter listing it, the
    label its series are sharded by), a selector per batch of the customer label values in ``shard``;
    and per metric the selector of its unmatched series (label matching no customer, or absent), whose
    series :func:`shard_rest_selectors` sorts into shards. The other meters listing a metric select the
    same series (by another label), so they are not pulled again."""
    if customers_per_query < 1:
        raise ValueError("customers_per_query must be at least 1")
    values = tuple(sorted(set(label_values)))
    mine = tuple(v for v in values if shard_of(v, shard.count) == shard.index)
    out: list[Selector] = []
    rest: list[Selector] = []
    seen: set[str] = set()
    for m in meters:
        label = (m.get("customer_label") or "").strip()
        for metric in m["metrics"].split():
            if metric in seen or not label:
                continue
            seen.add(metric)
            for i in range(0, len(mine), customers_per_query):
                out.append(Selector(m["meter_id"], metric, label, mine[i : i + customers_per_query], (), extra_matchers))
            rest.append(Selector(m["meter_id"], metric, label, None, values, extra_matchers))
    return out, rest


def shard_rest_selectors(
    client: PrometheusClient,
    rest: Selector,
    shard: Shard,
    customer_label_of: dict[str, str],
    start_ms: int,
    end_ms: int,
    customers_per_query: int,
) -> list[Selector]:
    """The selectors pulling the unmatched series of ``rest`` (a metric's series whose customer label
    matches no customer) that are in ``shard``, from their label sets in [start, end) (``/api/v1/series``:
    labels only, no samples): a selector per batch of their label values (a label value no customer has
    is sharded like a customer's), and ``label=""`` when a series without the label (sharded by its
    series id) is in the shard; that one selects every shard's such series, the pull keeps its own."""
    values: set[str] = set()
    labelless = False
    cache: dict[str, int] = {}
    for item in client.series(rest.promql(), start_ms, end_ms - 1, what=_what(rest)):
        labels = dict(item)
        metric = labels.pop("__name__", rest.metric)
        if series_shard(metric, labels, raw.series_id(metric, labels), customer_label_of, shard.count, cache) != shard.index:
            continue
        value = labels.get(rest.customer_label)
        if value is None:
            labelless = True
        else:
            values.add(value)
    batch = sorted(values)
    out = [
        Selector(rest.meter_id, rest.metric, rest.customer_label, tuple(batch[i : i + customers_per_query]), (), rest.extra_matchers, rest=True)
        for i in range(0, len(batch), customers_per_query)
    ]
    if labelless:
        out.append(Selector(rest.meter_id, rest.metric, rest.customer_label, ("",), (), rest.extra_matchers, rest=True))
    return out


def plan_chunks(start_ms: int, end_ms: int, chunk_ms: int) -> list[tuple[int, int]]:
    """Consecutive half-open windows [a, b) of at most ``chunk_ms`` covering [start, end)."""
    if chunk_ms <= 0:
        raise ValueError("chunk length must be positive")
    out, a = [], start_ms
    while a < end_ms:
        b = min(a + chunk_ms, end_ms)
        out.append((a, b))
        a = b
    return out


def exact_query(selector_promql: str, start_ms: int, end_ms: int) -> tuple[str, int]:
    """The instant query returning the raw samples of [start, end) on Prometheus 2.x and 3.x.

    Evaluated at ``end - 1 ms`` over ``end - start`` ms: 2.x gives [start - 1, end - 1] (both ends),
    3.x gives (start - 1, end - 1]; the caller keeps [start, end) and deduplicates.
    """
    return f"{selector_promql}[{end_ms - start_ms}ms]", end_ms - 1


def plan_range_requests(start_ms: int, end_ms: int, step_ms: int, max_points: int = MAX_POINTS_PER_SERIES) -> list[tuple[int, int]]:
    """query_range (start, end) pairs, both inclusive, with points on ``start + k*step`` in [start, end),
    each asking for at most ``max_points`` points per series."""
    if step_ms <= 0:
        raise ValueError("step must be positive")
    out = []
    t = start_ms
    span = (max_points - 1) * step_ms
    while t < end_ms:
        last = min(t + span, end_ms - 1)
        last = t + ((last - t) // step_ms) * step_ms
        out.append((t, last))
        t = last + step_ms
    return out


def format_time(ms: int) -> str:
    """Epoch milliseconds as the seconds string Prometheus parses to the same millisecond."""
    sign = "-" if ms < 0 else ""
    ms = abs(ms)
    return f"{sign}{ms // 1000}.{ms % 1000:03d}"


def _short(promql: str) -> str:
    return promql if len(promql) <= _QUERY_IN_MESSAGE else promql[: _QUERY_IN_MESSAGE - 20] + f"... ({len(promql)} chars)"


def redact_url(url: str) -> str:
    """The URL without user:password@ and without the query string (never print credentials)."""
    p = urlsplit(url)
    host = p.hostname or ""
    if p.port:
        host += f":{p.port}"
    return urlunsplit((p.scheme, host, p.path, "", ""))


# --------------------------------------------------------------------------- HTTP client


@dataclass
class QueryResult:
    result_type: str
    result: list
    warnings: list[str]
    seconds: float
    stats: dict | None = None


class PrometheusClient:
    """The Prometheus HTTP API over a requests Session: auth, tenant header, retries, error messages."""

    def __init__(
        self,
        url: str,
        *,
        timeout_s: float = 60.0,
        connect_timeout_s: float = 5.0,
        max_retries: int = 4,
        backoff_s: float = 0.5,
        max_backoff_s: float = 15.0,
        bearer_token: str | None = None,
        username: str | None = None,
        password: str | None = None,
        tenant: str | None = None,
        headers: dict[str, str] | None = None,
        verify_tls: bool | str = True,
        fail_on_warnings: bool = True,
        session=None,
        sleep: Callable[[float], None] = time.sleep,
        read_api: str = "query",
        log: Callable[[str], None] | None = None,
        remote_read_chunks: bool = True,
    ):
        import requests

        if not url or urlsplit(url).scheme not in ("http", "https") or not urlsplit(url).hostname:
            raise PrometheusError(f"PROMETHEUS_URL {redact_url(url or '')!r} is not an http(s) URL; set it like http://127.0.0.1:9090")
        if bearer_token and (username or password):
            raise PrometheusError("give either a bearer token or a username/password for Prometheus, not both")
        if max_retries < 0:
            raise PrometheusError("max_retries must not be negative")
        if read_api not in READ_APIS:
            raise PrometheusError(f"read_api {read_api!r} is not one of {', '.join(READ_APIS)}")
        #: how exact mode reads raw samples: "remote_read" (/api/v1/read), "query" (range selectors
        #: over the JSON API) or "auto" (remote read; the query API when the server refuses it)
        self.read_api = read_api
        #: auto: None until the first remote read, then whether remote read is used
        self.remote_read_ok: bool | None = {"remote_read": True, "query": False}.get(read_api)
        #: why auto fell back to the query API (None: it did not)
        self.fallback_reason: str | None = None
        self.log = log or (lambda _: None)
        #: remote read asks for the stored chunks first (STREAMED_XOR_CHUNKS), samples second
        self.remote_read_chunks = remote_read_chunks
        self._labels_cache: dict[bytes, tuple] = {}
        #: exact mode over remote read has asked /api/v1/series once (see _fetch_day)
        self.series_checked = False
        self._external_labels_checked = False
        self.base = url.rstrip("/")
        self.server = redact_url(self.base)
        self.timeout = (connect_timeout_s, timeout_s)
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.fail_on_warnings = fail_on_warnings
        self.sleep = sleep
        self.session = session or requests.Session()
        self.session.verify = verify_tls
        self.session.headers.update({"Accept": "application/json", "User-Agent": "billing_dags"})
        if headers:
            self.session.headers.update(headers)
        if tenant:
            self.session.headers["X-Scope-OrgID"] = tenant
        if bearer_token:
            self.session.headers["Authorization"] = f"Bearer {bearer_token}"
        elif username or password:
            self.session.auth = (username or "", password or "")
        p = urlsplit(url)
        if p.username and not (username or bearer_token):
            self.session.auth = (p.username, p.password or "")
        self.requests = 0
        self.request_seconds = 0.0
        self.warnings: list[str] = []

    def close(self) -> None:
        self.session.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- low level

    def _fail(self, what: str, promql: str | None, reason: str) -> PrometheusError:
        q = f"; query: {_short(promql)}" if promql else ""
        return PrometheusError(f"{what}: Prometheus at {self.server} {reason}{q}")

    def _request(self, path: str, data, what: str, promql: str | None, headers: dict | None = None, refused_statuses: tuple[int, ...] = ()):
        """POST with bounded retries (connection errors, 5xx, 429); the response of a 2xx. Any other
        status raises PrometheusError, or _Refused when it is in ``refused_statuses``."""
        import requests

        url = self.base + path
        last = ""
        for attempt in range(self.max_retries + 1):
            retry_after = None
            t0 = time.perf_counter()
            try:
                resp = self.session.post(url, data=data, headers=headers, timeout=self.timeout)
            except (requests.ConnectionError, requests.Timeout) as e:
                last = f"is unreachable ({type(e).__name__})"
            except requests.RequestException as e:
                raise self._fail(what, promql, f"request failed ({type(e).__name__}: {e})") from None
            else:
                self.requests += 1
                self.request_seconds += time.perf_counter() - t0
                if resp.status_code in refused_statuses:
                    raise _Refused(f"HTTP {resp.status_code}{_error_of(resp)}")
                if resp.status_code == 429 or resp.status_code >= 500:
                    last = f"answered HTTP {resp.status_code}{_error_of(resp)}"
                    ra = resp.headers.get("Retry-After", "")
                    retry_after = float(ra) if ra.replace(".", "", 1).isdigit() else None
                elif resp.status_code >= 400:
                    raise self._fail(what, promql, f"rejected the request with HTTP {resp.status_code}{_error_of(resp)}")
                else:
                    return resp
            if attempt < self.max_retries:
                delay = min(self.max_backoff_s, self.backoff_s * (2**attempt))
                if retry_after is not None:
                    delay = min(self.max_backoff_s, max(delay, retry_after))
                self.sleep(delay)
        raise self._fail(what, promql, f"{last} after {self.max_retries + 1} attempts")

    def _post(self, path: str, params: dict, what: str, promql: str | None) -> dict:
        resp = self._request(path, params, what, promql)
        try:
            body = _json(resp)
        except ValueError:
            raise self._fail(what, promql, f"sent a response that is not JSON (HTTP {resp.status_code}, {len(resp.content)} bytes)") from None
        if not isinstance(body, dict) or body.get("status") != "success" or "data" not in body:
            err = body.get("error") if isinstance(body, dict) else None
            raise self._fail(what, promql, f"answered status {body.get('status') if isinstance(body, dict) else '?'!r}: {err}")
        warnings = [str(w) for w in (body.get("warnings") or [])]
        if warnings:
            if self.fail_on_warnings:
                raise self._fail(
                    what,
                    promql,
                    f"returned warnings (a partial or incomplete result): {'; '.join(warnings)[:500]}",
                )
            self.warnings.extend(warnings)
        return body

    # -- API

    def query(self, promql: str, time_ms: int, *, what: str = "query", stats: bool = False) -> QueryResult:
        t0 = time.perf_counter()
        params = {"query": promql, "time": format_time(time_ms), "partial_response": "false"}
        if stats:
            params["stats"] = "all"
        body = self._post("/api/v1/query", params, what, promql)
        return self._result(body, t0, what, promql)

    def query_range(self, promql: str, start_ms: int, end_ms: int, step_ms: int, *, what: str = "query", stats: bool = False) -> QueryResult:
        if (end_ms - start_ms) // step_ms + 1 > MAX_POINTS_PER_SERIES:
            raise self._fail(what, promql, f"would refuse more than {MAX_POINTS_PER_SERIES} points per series; split the range (plan_range_requests)")
        t0 = time.perf_counter()
        params = {
            "query": promql,
            "start": format_time(start_ms),
            "end": format_time(end_ms),
            "step": format_time(step_ms),
            "partial_response": "false",
        }
        if stats:
            params["stats"] = "all"
        body = self._post("/api/v1/query_range", params, what, promql)
        return self._result(body, t0, what, promql)

    def series(self, match: str, start_ms: int, end_ms: int, *, what: str = "series") -> list[dict]:
        params = {"match[]": match, "start": format_time(start_ms), "end": format_time(end_ms)}
        body = self._post("/api/v1/series", params, what, match)
        if not isinstance(body["data"], list):
            raise self._fail(what, match, "sent a series response that is not a list")
        return body["data"]

    def remote_read(
        self,
        matchers: Sequence[tuple[int, str, str]],
        start_ms: int,
        end_ms: int,
        *,
        what: str = "remote read",
        promql: str | None = None,
        window: tuple[int, int] | None = None,
    ) -> RemoteSeries:
        """Raw samples of [start, end] (both inclusive, as remote read defines them) of the series
        ``matchers`` select, over ``POST /api/v1/read`` (a snappy-compressed ReadRequest): every
        sample as stored, stale markers included (see :class:`RemoteSeries`). Asks for the stored
        XOR chunks (STREAMED_XOR_CHUNKS: the server copies them, we decode them; whole chunks, so
        samples outside the range too) when ``remote_read_chunks``, else or when the server does
        not stream, for samples (SAMPLES). With ``window`` (a, b), streamed chunks are decoded
        straight into the rows of [a, b) without stale markers (``RemoteSeries.cut``).

        Raises _Refused when the server answers a status of REMOTE_READ_REFUSED or a body that is
        not a remote-read response (auto mode falls back on it), PrometheusError otherwise.
        """
        import cramjam

        from billing_dags.ingest.remote_write import xor
        from billing_dags.ingest.remote_write.proto import ReadRequest

        req = ReadRequest()
        q = req.queries.add(start_timestamp_ms=start_ms, end_timestamp_ms=end_ms)
        for kind, name, value in matchers:
            q.matchers.add(type=kind, name=name, value=value)
        # in order of preference: the server answers with the first one it supports
        req.accepted_response_types.extend([1, 0] if self.remote_read_chunks else [0])  # STREAMED_XOR_CHUNKS, SAMPLES
        body = bytes(cramjam.snappy.compress_raw(req.SerializeToString()))
        headers = {
            "Content-Type": "application/x-protobuf",
            "Content-Encoding": "snappy",
            "Accept": "application/x-protobuf, application/x-streamed-protobuf",
            # the body is compressed or binary already; gzip on top would cost both sides time for nothing
            "Accept-Encoding": "identity",
            "X-Prometheus-Remote-Read-Version": "0.1.0",
        }
        resp = self._request("/api/v1/read", body, what, promql, headers, REMOTE_READ_REFUSED)
        ctype = resp.headers.get("Content-Type", "")
        streamed = ctype.startswith("application/x-streamed-protobuf")
        if not (streamed or ctype.startswith("application/x-protobuf")):
            raise _Refused(f"HTTP {resp.status_code} with Content-Type {ctype or 'none'!r}, not a remote-read response")
        try:
            if streamed:
                got = xor.read_stream(resp.content, *window) if window is not None else None
                if got is not None:
                    return RemoteSeries(got.keys, got.counts, got.ts, got.values, got.histograms, cut=True)
                return _chunked_series(resp.content)
            results = _read_results(bytes(cramjam.snappy.decompress_raw(resp.content)))
            if len(results) != 1:
                raise ValueError(f"{len(results)} results for 1 query")
            return _query_result_series(results[0])
        except (cramjam.DecompressionError, ValueError) as e:
            raise self._fail(what, promql, f"sent a remote-read response that cannot be decoded ({type(e).__name__}: {str(e)[:200]})") from None

    def external_labels(self) -> dict[str, str]:
        """The server's global external_labels (/api/v1/status/config; {} when it does not say): remote
        read adds them to every series, the query API does not."""
        import requests
        import yaml

        try:
            resp = self.session.get(self.base + "/api/v1/status/config", timeout=self.timeout)
            if resp.status_code != 200:
                return {}
            config = yaml.safe_load(_json(resp)["data"]["yaml"]) or {}
            return {str(k): str(v) for k, v in ((config.get("global") or {}).get("external_labels") or {}).items()}
        except (requests.RequestException, ValueError, KeyError, TypeError, AttributeError, yaml.YAMLError):
            return {}

    def _result(self, body: dict, t0: float, what: str, promql: str) -> QueryResult:
        data = body["data"]
        if not isinstance(data, dict) or "resultType" not in data or not isinstance(data.get("result"), list):
            raise self._fail(what, promql, "sent a malformed query response (no resultType/result)")
        return QueryResult(data["resultType"], data["result"], [str(w) for w in body.get("warnings") or []], time.perf_counter() - t0, data.get("stats"))


def _json(resp):
    """The body as JSON: orjson for UTF-8 (what Prometheus sends), requests' own decoding for anything
    orjson refuses (other encodings, NaN literals). The cyclic garbage collector is paused meanwhile:
    a response holds a small list per sample, none in a cycle, and collections triggered while they
    are created would scan them over and over (half the decoding time)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        return orjson.loads(resp.content)
    except orjson.JSONDecodeError:
        return resp.json()
    finally:
        if enabled:
            gc.enable()


def _error_of(resp) -> str:
    try:
        body = resp.json()
        if isinstance(body, dict) and body.get("error"):
            return f" ({body.get('errorType', 'error')}: {str(body['error'])[:300]})"
    except ValueError:
        pass
    text = (resp.text or "").strip().replace("\n", " ")
    return f" ({text[:200]})" if text else ""


# --------------------------------------------------------------------------- remote-read responses


@dataclass
class RemoteSeries:
    """The series of one remote-read query result: per series its encoded label fields and sample
    count, per sample (series after series) the timestamp in ms and the value with its exact bits;
    per series whether it holds native histogram samples (not read: float samples only)."""

    keys: list[bytes]
    counts: np.ndarray
    ts: np.ndarray
    values: np.ndarray
    histograms: np.ndarray | None = None
    #: already the rows of the asked window: no sample outside it, no stale marker, NaNs as float('nan')
    cut: bool = False


def _read_results(data: bytes) -> list[bytes]:
    """The serialized QueryResult messages of a serialized ReadResponse (field 1); other fields skipped."""
    from billing_dags.ingest.remote_write.xor import varint as _varint

    out, p = [], 0
    while p < len(data):
        tag, p = _varint(data, p)
        field, wire_type = tag >> 3, tag & 7
        if wire_type == 2:
            n, p = _varint(data, p)
            if p + n > len(data):
                raise ValueError("truncated field")
            if field == 1:
                out.append(data[p : p + n])
            p += n
        elif wire_type == 0:
            _, p = _varint(data, p)
        elif wire_type in (1, 5):
            p += 8 if wire_type == 1 else 4
        else:
            raise ValueError(f"unexpected wire type {wire_type}")
        if p > len(data):
            raise ValueError("truncated field")
    return out


def _query_result_series(payload: bytes) -> RemoteSeries:
    """A serialized QueryResult: TimeSeries as in a remote-write WriteRequest, read by the
    receiver's compiled reader, or by the protobuf runtime for any shape it leaves to it."""
    from google.protobuf.message import DecodeError

    from billing_dags.ingest.remote_write import wire
    from billing_dags.ingest.remote_write.proto import QueryResultMessage, TimeSeries

    parsed = wire.parse(payload)
    if parsed is not None:
        return RemoteSeries(parsed.keys, parsed.counts, parsed.ts, parsed.value)
    try:
        msg = QueryResultMessage.FromString(payload)
    except DecodeError as e:
        raise ValueError(str(e)) from None
    keys, counts, ts, values, histograms = [], [], [], [], []
    for series in msg.timeseries:
        keys.append(TimeSeries(labels=series.labels).SerializeToString())
        counts.append(len(series.samples))
        histograms.append(len(series.histograms) > 0)
        for sample in series.samples:
            ts.append(sample.timestamp)
            values.append(sample.value)
    return RemoteSeries(keys, np.array(counts, np.int64), np.array(ts, np.int64), np.array(values, np.float64), np.array(histograms, np.bool_))


def _chunked_series(body: bytes) -> RemoteSeries:
    """A STREAMED_XOR_CHUNKS response (one query) read with the protobuf runtime (the reference
    of xor.read_stream): its frames, their series (a series split over frames joined again) and
    their XOR chunks decoded, every sample; native histogram chunks flagged, not decoded; a chunk
    of another encoding is a ValueError."""
    from google.protobuf.message import DecodeError

    from billing_dags.ingest.remote_write import xor
    from billing_dags.ingest.remote_write.proto import ChunkedReadResponse, TimeSeries

    keys: list[bytes] = []
    chunks_per_series: list[int] = []
    histograms: list[bool] = []
    datas: list[bytes] = []
    for frame in xor.frames(body):
        try:
            msg = ChunkedReadResponse.FromString(frame)
        except DecodeError as e:
            raise ValueError(str(e)) from None
        if msg.query_index != 0:
            raise ValueError(f"chunks of query {msg.query_index} for 1 query")
        for series in msg.chunked_series:
            key = TimeSeries(labels=series.labels).SerializeToString()
            unknown = sorted({c.type for c in series.chunks} - {xor.XOR, xor.HISTOGRAM, xor.FLOAT_HISTOGRAM})
            if unknown:
                raise ValueError(f"chunks of encoding {unknown[0]}, neither XOR ({xor.XOR}) nor a native histogram ({xor.HISTOGRAM}, {xor.FLOAT_HISTOGRAM})")
            mine = [c.data for c in series.chunks if c.type == xor.XOR]
            hist = len(mine) < len(series.chunks)
            if keys and keys[-1] == key:
                chunks_per_series[-1] += len(mine)
                histograms[-1] = histograms[-1] or hist
            else:
                keys.append(key)
                chunks_per_series.append(len(mine))
                histograms.append(hist)
            datas.extend(mine)
    per_chunk, ts, values = xor.decode_chunks(datas)
    n_chunks = np.array(chunks_per_series, dtype=np.int64)
    ends = np.cumsum(n_chunks)
    before = np.concatenate([np.zeros(1, np.int64), np.cumsum(per_chunk)])  # samples before chunk i
    return RemoteSeries(keys, before[ends] - before[ends - n_chunks], ts, values, np.array(histograms, np.bool_))


def _labels_of_key(client: PrometheusClient, key: bytes, default_metric: str) -> tuple[int, str, tuple]:
    """(series_id, metric, sorted labels) of a series' encoded label fields; InvalidSeries as parse_series."""
    got = client._labels_cache.get(key)
    if got is None:
        from google.protobuf.message import DecodeError

        from billing_dags.ingest.remote_write.proto import TimeSeries

        try:
            labels = {lab.name: lab.value for lab in TimeSeries.FromString(key).labels}
        except DecodeError:
            got = InvalidSeries("a label of the series is not valid UTF-8")
        else:
            metric = labels.pop("__name__", default_metric)
            problem = raw.series_problem(metric, labels)
            got = InvalidSeries(problem) if problem else (raw.series_id(metric, labels), metric, tuple(sorted(labels.items())))
        if len(client._labels_cache) >= _LABELS_CACHE_MAX:
            client._labels_cache.clear()
        client._labels_cache[key] = got
    if isinstance(got, InvalidSeries):
        raise got
    return got


# --------------------------------------------------------------------------- samples


@dataclass
class _Series:
    metric: str
    labels: tuple[tuple[str, str], ...]
    first_seen: int


@dataclass
class Collector:
    """Raw samples accumulated per series as numpy arrays (16 bytes a sample), turned into Arrow
    tables once: filled series by series into preallocated columns, already sorted by
    (series_id, ts) with identical samples once, releasing the pieces as it goes.

    A series whose id an earlier series of another label set holds is refused (kept out, its
    reason in ``refused``): the first label set keeps the id."""

    series: dict[int, _Series] = field(default_factory=dict)
    _parts: dict[int, list[tuple[np.ndarray, np.ndarray]]] = field(default_factory=dict)
    samples: int = 0
    non_finite: int = 0
    refused: dict[str, None] = field(default_factory=dict)

    def add(self, sid: int, metric: str, labels: tuple, ts: np.ndarray, values: np.ndarray) -> bool:
        """Add a series' samples; False when the series is refused."""
        s = self.series.get(sid)
        if s is not None and (s.metric, s.labels) != (metric, labels):
            self.refused[str(raw.Collision(sid, metric, labels, s.metric, s.labels, "the same pull"))] = None
            return False
        if not len(ts):
            return True
        first = int(ts.min())
        if s is None:
            self.series[sid] = _Series(metric, labels, first)
        elif first < s.first_seen:
            s.first_seen = first
        self._parts.setdefault(sid, []).append((ts, values))
        self.samples += len(ts)
        self.non_finite += int((~np.isfinite(values)).sum())
        return True

    def tables(self) -> tuple[pa.Table, pa.Table]:
        ids = sorted(self.series)
        sid_col = np.empty(self.samples, dtype=np.int64)
        ts_col = np.empty(self.samples, dtype=np.int64)
        val_col = np.empty(self.samples, dtype=np.float64)
        n = 0
        for sid in ids:
            parts = self._parts.pop(sid)
            ts = parts[0][0] if len(parts) == 1 else np.concatenate([p[0] for p in parts])
            vals = parts[0][1] if len(parts) == 1 else np.concatenate([p[1] for p in parts])
            del parts
            if len(ts) > 1 and not (ts[1:] > ts[:-1]).all():
                order, keep = raw.distinct_samples(np.zeros(len(ts), np.int64), ts, vals)
                idx = order[keep]
                ts, vals = ts[idx], vals[idx]
            k = len(ts)
            sid_col[n : n + k] = sid
            ts_col[n : n + k] = ts
            val_col[n : n + k] = vals
            n += k
        self.samples = n
        samples = pa.table({"series_id": sid_col[:n], "ts": ts_col[:n], "value": val_col[:n]}, schema=raw.SAMPLES_SCHEMA)
        series = pa.table(
            {
                "series_id": pa.array(ids, pa.int64()),
                "metric": pa.array([self.series[i].metric for i in ids], pa.string()),
                "labels": pa.array([list(self.series[i].labels) for i in ids], pa.map_(pa.string(), pa.string())),
                "first_seen": pa.array([self.series[i].first_seen for i in ids], pa.int64()),
            },
            schema=raw.SERIES_SCHEMA,
        )
        return samples, series


class InvalidSeries(InputError):
    """A series that cannot be stored (see raw.series_problem): skipped and reported."""


def parse_series(item: dict, default_metric: str, key: str = "values") -> tuple[int, str, tuple, np.ndarray, np.ndarray]:
    """One matrix entry -> (series_id, metric, sorted labels, ts ms int64, values float64).

    Raises InvalidSeries for names that are not Prometheus names (or values that are not UTF-8).
    """
    labels = dict(item.get("metric") or {})
    metric = labels.pop("__name__", default_metric)
    problem = raw.series_problem(metric, labels)
    if problem:
        raise InvalidSeries(problem)
    pairs = item.get(key) or []
    times, texts = zip(*pairs) if pairs else ((), ())
    ts = np.rint(np.array(times, dtype=np.float64) * 1000.0).astype(np.int64)
    # float() parses every decimal, 'NaN', '+Inf' and '-Inf' exactly; list + np.array is faster than fromiter
    values = np.array(list(map(float, texts)), dtype=np.float64)
    return raw.series_id(metric, labels), metric, tuple(sorted(labels.items())), ts, values


def keep_window(ts: np.ndarray, values: np.ndarray, start_ms: int, end_ms: int) -> tuple[np.ndarray, np.ndarray]:
    """Samples with start <= ts < end (a range selector's both-ends samples are cut here)."""
    mask = (ts >= start_ms) & (ts < end_ms)
    if mask.all():
        return ts, values
    return ts[mask], values[mask]


# --------------------------------------------------------------------------- ingest


@dataclass
class IngestOptions:
    mode: str = "exact"  # or "range"
    chunk_s: int = 3600
    customers_per_query: int = 20
    step_s: int = 60  # range mode only
    extra_matchers: str = ""
    edge_lookback_days: int = EDGE_LOOKBACK_DAYS
    skip_empty_metrics: bool = True  # query API: ask /api/v1/series first; no series -> no sample queries
    #: exact mode over remote read: seconds of samples per request (the day: the stored chunks are
    #: sent whole, so shorter windows send the chunks across their bounds twice)
    remote_read_s: int = 86_400


@dataclass
class IngestReport:
    day: date
    series: int = 0
    samples: int = 0
    bytes: int = 0
    path: str = ""
    non_finite_samples: int = 0
    unmatched_series: int = 0
    unmatched_examples: list[str] = field(default_factory=list)
    refused_series: int = 0
    refused_examples: list[str] = field(default_factory=list)
    requests: int = 0
    query_seconds: float = 0.0
    seconds: float = 0.0
    warnings: list[str] = field(default_factory=list)
    carry_in_series: int = 0
    #: how raw samples were read: "remote_read" or "query" (range mode: "query_range")
    read_api: str = ""
    #: the shard's key when the pull was of one shard
    shard: str | None = None

    def metadata(self) -> dict:
        return {
            "source": SOURCE,
            "series": self.series,
            "samples": self.samples,
            "bytes": self.bytes,
            "non_finite_samples": self.non_finite_samples,
            "unmatched_series": self.unmatched_series,
            "unmatched_examples": self.unmatched_examples,
            "refused_series": self.refused_series,
            "refused_examples": self.refused_examples,
            "requests": self.requests,
            "query_seconds": round(self.query_seconds, 3),
            "seconds": round(self.seconds, 3),
            "samples_per_second": round(self.samples / self.seconds) if self.seconds else 0,
            "warnings": self.warnings,
            "carry_in_series": self.carry_in_series,
            "read_api": self.read_api,
            **({} if self.shard is None else {"shard": self.shard}),
        }


def _what(sel: Selector) -> str:
    return f"meter {sel.meter_id} (metric {sel.metric})"


def _parsed(result: list, sel: Selector, a: int, b: int, refused: dict[str, None] | None) -> Iterator[tuple]:
    """The matrix entries in [a, b); an invalid series is skipped and its reason put in ``refused``."""
    refused = {} if refused is None else refused
    for item in result:
        try:
            sid, metric, labels, ts, values = parse_series(item, sel.metric)
        except InvalidSeries as e:
            refused[f"{_what(sel)}: {e}"] = None
            continue
        if item.get("histograms"):
            refused[_histogram_reason(sel, sid, metric, labels)] = None
        ts, values = keep_window(ts, values, a, b)
        yield sid, metric, labels, ts, values


def _fetch_exact(client: PrometheusClient, sel: Selector, a: int, b: int, refused: dict[str, None] | None = None) -> Iterator[tuple]:
    """The raw samples of [a, b) of the selector's series: over remote read (``client.read_api``
    remote_read, or auto until the server refuses it), else range selectors over the query API."""
    if _reads_remotely(client):
        got = _remote_read_exact(client, sel, a, b)
        if got is not None:
            yield from _parsed_remote(client, got, sel, a, b, refused)
            return
    promql, t = exact_query(sel.promql(), a, b)
    res = client.query(promql, t, what=_what(sel))
    if res.result_type != "matrix":
        raise client._fail(_what(sel), promql, f"returned a {res.result_type}, not a matrix of raw samples")
    yield from _parsed(res.result, sel, a, b, refused)


def _reads_remotely(client) -> bool:
    """Whether exact mode reads over remote read (auto: until the server refused it); False for
    anything but a PrometheusClient (test doubles of the query API)."""
    return isinstance(client, PrometheusClient) and client.remote_read_ok is not False


def _fetch_day(client: PrometheusClient, sel: Selector, start: int, end: int, opt: IngestOptions, refused: dict[str, None]) -> Iterator[tuple]:
    """Exact mode: the selector's samples of [start, end), over remote read in windows of
    ``remote_read_s`` (while the client reads remotely), else over the query API in ``chunk_s``
    windows, after asking /api/v1/series whether it has series at all (``skip_empty_metrics``: one
    request instead of a query per chunk). Over remote read the day's one request says it, so the
    series are asked for only once per client: that checks the selector's PromQL (bad extra matchers
    are a 400 there, a 500 to remote read)."""
    remote = _reads_remotely(client)
    if opt.skip_empty_metrics and not (remote and client.series_checked):
        empty = not client.series(sel.promql(), start, end - 1, what=_what(sel))
        if remote:
            client.series_checked = True
        if empty:
            return
    resume = start
    if remote:
        for a, b in plan_chunks(start, end, opt.remote_read_s * 1000):
            got = _remote_read_exact(client, sel, a, b)
            if got is None:  # auto mode, refused: the query API from this window on
                resume = a
                break
            yield from _parsed_remote(client, got, sel, a, b, refused)
        else:
            return
    for a, b in plan_chunks(resume, end, opt.chunk_s * 1000):
        yield from _fetch_exact(client, sel, a, b, refused)


def _no_remote_read(client: PrometheusClient, what: str, desc: str, reason: str) -> None:
    """auto: use the query API from now on (logged); remote_read: PrometheusError."""
    if client.read_api == "remote_read":
        raise client._fail(what, desc, f"cannot be read over remote read: {reason}; set read_api to auto or query")
    client.remote_read_ok = False
    client.fallback_reason = reason
    client.log(f"prometheus at {client.server}: no remote read ({reason}); reading raw samples over the query API")
    return None


def _remote_read_exact(client: PrometheusClient, sel: Selector, a: int, b: int) -> RemoteSeries | None:
    """The selector's series in [a, b] over remote read, or None when auto mode falls back."""
    what = _what(sel)
    desc = f"remote read {sel.promql()} from {format_time(a)} to {format_time(b - 1)}"
    try:
        matchers = sel.matchers()
    except ValueError as e:
        return _no_remote_read(client, what, desc, f"extra matchers {sel.extra_matchers!r}: {e}")
    if not client._external_labels_checked:
        client._external_labels_checked = True
        ext = client.external_labels()
        if ext:
            # remote read adds them to each series (the query API does not): other series ids
            return _no_remote_read(client, what, desc, f"the server adds external_labels {sorted(ext)} to series read remotely")
    try:
        got = client.remote_read(matchers, a, b - 1, what=what, promql=desc, window=(a, b))
    except _Refused as e:
        if client.remote_read_ok is None:
            return _no_remote_read(client, what, desc, f"/api/v1/read answered {e}")
        hint = "; set read_api to auto or query for a server without remote read" if client.read_api == "remote_read" else ""
        raise client._fail(what, desc, f"refused the remote read at /api/v1/read ({e}){hint}") from None
    client.remote_read_ok = True
    return got


def _parsed_remote(client: PrometheusClient, got: RemoteSeries, sel: Selector, a: int, b: int, refused: dict[str, None] | None) -> Iterator[tuple]:
    """The series of a remote read as the query API gives them: samples in [a, b) (remote read's
    end is inclusive), without stale markers (range selectors skip them), every other NaN with the
    bits float('nan') has; series left without samples skipped; invalid series into ``refused``."""
    refused = {} if refused is None else refused
    ts, values, counts = got.ts, got.values, got.counts
    if not got.cut:
        keep = (ts >= a) & (ts < b) & (values.view(np.int64) != STALE_NAN_BITS)
        if not keep.all():
            owner = np.repeat(np.arange(len(counts)), counts)
            counts = np.bincount(owner[keep], minlength=len(counts))
            ts, values = ts[keep], values[keep]
        nan = np.isnan(values)
        if nan.any():
            values[nan] = np.nan
    hist = got.histograms if got.histograms is not None and got.histograms.any() else None
    ends = np.cumsum(counts).tolist()
    start = 0
    for i, (key, end) in enumerate(zip(got.keys, ends)):
        if end == start and (hist is None or not hist[i]):
            continue
        try:
            sid, metric, labels = _labels_of_key(client, key, sel.metric)
        except InvalidSeries as e:
            refused[f"{_what(sel)}: {e}"] = None
        else:
            if hist is not None and hist[i]:
                refused[_histogram_reason(sel, sid, metric, labels)] = None
            if end > start:
                yield sid, metric, labels, ts[start:end], values[start:end]
        start = end


def _histogram_reason(sel: Selector, sid: int, metric: str, labels: tuple) -> str:
    """Why a series' native histogram samples are not in the pull (both read APIs say it alike)."""
    return f"{_what(sel)}: series {sid} ({raw.describe(metric, labels)}) holds native histogram samples, which are not pulled (float samples only)"


def _fetch_range(client: PrometheusClient, sel: Selector, a: int, b: int, step_ms: int, refused: dict[str, None] | None = None) -> Iterator[tuple]:
    promql = sel.promql()
    for s, e in plan_range_requests(a, b, step_ms):
        res = client.query_range(promql, s, e, step_ms, what=_what(sel))
        if res.result_type != "matrix":
            raise client._fail(_what(sel), promql, f"returned a {res.result_type}, not a matrix")
        yield from _parsed(res.result, sel, a, b, refused)


def _without_collisions(paths: Paths, tables: tuple[pa.Table, pa.Table], refused: dict[str, None]) -> tuple[pa.Table, pa.Table]:
    """(samples, series) without the series whose id data/raw/series holds with other labels (reasons into ``refused``)."""
    samples, series = tables
    found = raw.collisions(paths, series)
    if not found:
        return samples, series
    refused.update((str(c), None) for c in found)
    bad = pa.array([c.series_id for c in found], pa.int64())
    keep = lambda t: t.filter(pc.invert(pc.is_in(t["series_id"], value_set=bad)))  # noqa: E731
    return keep(samples), keep(series)


def _label_of(labels: tuple, name: str) -> str:
    return next((v for k, v in labels if k == name), "")


def ingest_day(
    client: PrometheusClient,
    paths: Paths,
    day: date,
    meters: Sequence[dict],
    label_values: Sequence[str],
    options: IngestOptions | None = None,
    log: Callable[[str], None] = lambda _: None,
    shard: Shard | None = None,
) -> IngestReport:
    """Pull every meter's series for ``day`` and replace the day's ``part-prometheus`` files and, in
    exact mode, its carry-in (each series' last sample before the day).

    With ``shard`` (sharded data, ``paths.shards`` > 1): pull only that shard's series and replace only
    its files. Its customers' series are selected by their label values; the unmatched series are
    found by their labels first (:func:`shard_rest_selectors`). The N pulls of a day write what one pull
    split by shard writes, byte for byte, and each touches no other shard's files."""
    opt = options or IngestOptions()
    if opt.mode not in ("exact", "range"):
        raise PrometheusError(f"mode {opt.mode!r} is not one of exact, range")
    if shard is not None and shard.count != paths.shards:
        raise raw.RawLayoutError(f"{shard} is not a shard of the {paths.shards} shard(s) BILLING_SHARDS sets")
    if paths.shards == 1:
        shard = None
    t0 = time.perf_counter()
    req0, sec0 = client.requests, client.request_seconds
    if isinstance(client, PrometheusClient):
        client.log = log
    start_ms, end_ms = raw.day_bounds_ms(day)
    if opt.chunk_s <= 0 or opt.remote_read_s <= 0:
        raise PrometheusError(f"chunk_s ({opt.chunk_s}) and remote_read_s ({opt.remote_read_s}) must be positive seconds")
    keep = None
    if shard is None:
        selectors = plan_selectors(meters, label_values, opt.customers_per_query, opt.extra_matchers)
    else:
        label_of = raw.customer_labels(paths)
        selectors, rests = plan_shard_selectors(meters, label_values, opt.customers_per_query, shard, opt.extra_matchers)
        # the carry-in looks back for series silent on the day: their labels are looked up as far back
        lo = start_ms - opt.edge_lookback_days * raw.DAY_MS if opt.mode == "exact" else start_ms
        for rest in rests:
            selectors += shard_rest_selectors(client, rest, shard, label_of, lo, end_ms, opt.customers_per_query)
        cache: dict[str, int] = {}
        keep = lambda sid, metric, labels: series_shard(metric, labels, sid, label_of, shard.count, cache) == shard.index  # noqa: E731
    report = IngestReport(day)
    col = Collector()
    refused = col.refused
    unmatched: dict[int, str] = {}
    for sel in selectors:
        if opt.mode == "exact":
            parts = _fetch_day(client, sel, start_ms, end_ms, opt, refused)
        elif opt.skip_empty_metrics and not client.series(sel.promql(), start_ms, end_ms - 1, what=_what(sel)):
            continue
        else:
            parts = _fetch_range(client, sel, start_ms, end_ms, opt.step_s * 1000, refused)
        for sid, metric, labels, ts, values in parts:
            if not len(ts) or (keep is not None and not keep(sid, metric, labels)) or not col.add(sid, metric, labels, ts, values):
                continue
            if sel.unmatched and sid not in unmatched:
                unmatched[sid] = f"{metric}{{{sel.customer_label}={_label_of(labels, sel.customer_label)!r}}}"
    non_finite = col.non_finite
    # every selector, not only those with series today: a gauge's last sample holds into the day
    carry_in = fetch_carry_in(client, day, selectors, opt, refused, keep) if opt.mode == "exact" else None
    # the carry-in first: the day's samples file is what makes it a raw day
    if carry_in is not None:
        carried = _without_collisions(paths, carry_in.tables(), refused)
        report.carry_in_series = raw.write_carry_in(paths, day, *carried, SOURCE, opt.edge_lookback_days, shard)
    else:  # range mode records none; a carry-in of an earlier exact ingest would not match this day
        for f in raw.carry_in_files(paths, day, shard):
            if f.name == f"part-{SOURCE}.parquet":
                durable.remove(f)
                series = raw.series_day_dir(paths, day) / f.relative_to(raw.carry_in_day_dir(paths, day))
                durable.remove(series.with_name(f"part-{SOURCE}-carry-in.parquet"))
    # no local reference to the samples table: write_day sorts a copy only when it is out of order
    figures = raw.write_day(paths, day, *_without_collisions(paths, col.tables(), refused), SOURCE, shard)
    del col
    report.series = figures["series"]
    report.samples = figures["samples"]
    report.bytes = figures["bytes"]
    report.path = figures["path"]
    report.non_finite_samples = non_finite
    report.unmatched_series = len(unmatched)
    report.unmatched_examples = sorted(unmatched.values())[:10]
    report.refused_series = len(refused)
    report.refused_examples = list(refused)[:10]
    report.requests = client.requests - req0
    report.query_seconds = client.request_seconds - sec0
    report.warnings = list(client.warnings)
    report.read_api = "query_range" if opt.mode == "range" else "remote_read" if _reads_remotely(client) else "query"
    report.seconds = time.perf_counter() - t0
    report.shard = None if shard is None else shard.key
    log(
        f"prometheus {day}{'' if shard is None else f' ({shard})'}: {report.series} series, {report.samples} samples, {report.unmatched_series} unmatched, "
        f"{report.carry_in_series} carried in, {report.requests} requests ({report.read_api}) in {report.query_seconds:.2f}s"
    )
    return report


def combined_report(reports: Sequence[IngestReport]) -> IngestReport:
    """The report of a day pulled shard by shard: the shards' figures summed, their examples joined."""
    first = reports[0]
    out = IngestReport(first.day, read_api=first.read_api, path=str(Path(first.path).parent.parent) if first.path else "")
    summed = ("series", "samples", "bytes", "non_finite_samples", "unmatched_series", "refused_series", "requests", "query_seconds", "seconds")
    summed += ("carry_in_series",)
    for r in reports:
        for name in summed:
            setattr(out, name, getattr(out, name) + getattr(r, name))
        out.unmatched_examples += r.unmatched_examples
        out.refused_examples += r.refused_examples
        out.warnings += r.warnings
    out.unmatched_examples = sorted(out.unmatched_examples)[:10]
    out.refused_examples = out.refused_examples[:10]
    return out


def fetch_carry_in(
    client: PrometheusClient,
    day: date,
    selectors: Sequence[Selector],
    opt: IngestOptions,
    refused: dict[str, None] | None = None,
    keep: Callable[[int, str, tuple], bool] | None = None,
) -> Collector:
    """Each series' last finite sample before ``day``, at most ``edge_lookback_days`` earlier (rule 3).

    Per selector: the series of the lookback (``/api/v1/series``), then the chunk just before the day
    (where every series alive at midnight has its last sample). Series not found there are located
    with one ``count_over_time(sel[chunk])`` range query over the rest of the lookback (a point per
    chunk that holds samples), and the chunks holding their last samples are read exactly, latest
    first; a chunk whose samples turn out all NaN (or only 1 ms before it, Prometheus 2.x's range
    end) sends its series on to their next chunk. Nothing depends on which days are on disk.
    Invalid series are skipped, their reasons put in ``refused``; with ``keep`` (a pull of one shard),
    only the series ``keep(series_id, metric, sorted labels)`` holds are looked for and kept.
    """
    refused = {} if refused is None else refused
    start_ms, _ = raw.day_bounds_ms(day)
    lo = start_ms - opt.edge_lookback_days * raw.DAY_MS
    chunk = opt.chunk_s * 1000
    col = Collector()
    for sel in selectors:
        expected = set()
        for s in client.series(sel.promql(), lo, start_ms - 1, what=_what(sel)):
            labels = dict(s)
            metric = labels.pop("__name__", sel.metric)
            if raw.series_problem(metric, labels) is None:  # an invalid one is refused where its samples come
                sid = raw.series_id(metric, labels)
                if keep is None or keep(sid, metric, tuple(sorted(labels.items()))):
                    expected.add(sid)
        if not expected:
            continue
        found: set[int] = set()

        def take_last(a: int, b: int, sel: Selector = sel, found: set[int] = found) -> None:
            for sid, metric, labels, ts, values in _fetch_exact(client, sel, a, b, refused):
                finite = np.isfinite(values)
                if sid not in found and finite.any() and (keep is None or keep(sid, metric, labels)):
                    i = int(np.argmax(np.where(finite, ts, np.iinfo(np.int64).min)))
                    if col.add(sid, metric, labels, ts[i : i + 1], values[i : i + 1]):
                        found.add(sid)

        a = max(lo, start_ms - chunk)
        take_last(a, start_ms)
        if expected <= found or a <= lo:
            continue
        # chunk ends e = a - k * chunk; count_over_time at e - 1 ms covers [e - chunk, e) (and e - chunk - 1 on 2.x)
        n = -(-(a - lo) // chunk)
        ends: dict[int, list[int]] = {}
        promql = f"count_over_time({sel.promql()}[{chunk}ms])"
        for s, e in plan_range_requests(a - 1 - (n - 1) * chunk, a, chunk):
            res = client.query_range(promql, s, e, chunk, what=_what(sel))
            if res.result_type != "matrix":
                raise client._fail(_what(sel), promql, f"returned a {res.result_type}, not a matrix")
            for item in res.result:
                # count_over_time drops the metric name: the selector's one metric is the series' name
                labels = dict(item.get("metric") or {})
                metric = labels.pop("__name__", sel.metric)
                sid = raw.series_id(metric, labels)
                if sid not in found and (keep is None or sid in expected):
                    ends.setdefault(sid, []).extend(round(float(t) * 1000) + 1 for t, _ in item.get("values") or [])
        pending = {sid: sorted(set(e), reverse=True) for sid, e in ends.items()}
        while pending:
            b = max(e[0] for e in pending.values())
            take_last(max(lo, b - chunk), b)
            for sid in list(pending):
                if sid in found:
                    del pending[sid]
                elif pending[sid][0] == b:
                    pending[sid].pop(0)
                    if not pending[sid]:
                        del pending[sid]
    return col


# --------------------------------------------------------------------------- helpers for callers


def parse_headers(text: str | None) -> dict[str, str]:
    """Extra HTTP headers from a JSON object or ``Name: value`` pairs separated by newlines or ';'."""
    if not text or not text.strip():
        return {}
    text = text.strip()
    if text.startswith("{"):
        try:
            obj = json.loads(text)
        except ValueError as e:
            raise PrometheusError(f'PROMETHEUS_HEADERS is not valid JSON ({e}); use {{"Name": "value"}} or Name: value; Name2: value') from None
        if not isinstance(obj, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in obj.items()):
            raise PrometheusError("PROMETHEUS_HEADERS must be a JSON object of strings")
        return obj
    out = {}
    for part in re.split(r"[;\n]", text):
        if not part.strip():
            continue
        name, sep, value = part.partition(":")
        if not sep or not re.match(r"^[A-Za-z0-9-]+$", name.strip()):
            raise PrometheusError(f"PROMETHEUS_HEADERS entry {name.strip()[:40]!r} is not 'Name: value'; use Name: value; Name2: value")
        out[name.strip()] = value.strip()
    return out


def meters_and_label_values(seeds_dir) -> tuple[list[dict], list[str]]:
    """The meters (dicts) and every customer label value of the seeds."""
    from billing_dags.seeds.catalog import read_seed

    meters = read_seed(seeds_dir, "meters").to_pylist()
    values = read_seed(seeds_dir, "customers")["label_value"].to_pylist()
    return meters, values


def iter_days(start: date, end: date) -> Iterable[date]:
    d = start
    while d < end:
        yield d
        d += timedelta(days=1)
